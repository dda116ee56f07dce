"""train_unet --init-from and --lora on a tiny random Stable Diffusion 1.x folder (diffusers' UNet and VAE,
transformers' CLIP text model, a tokenizer built offline): what the folder brings, what trains, an exact
resume after a kill, and sample --lora."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm import checkpoint, sample, train_unet
from ldm.checkpoint import CheckpointDir
from ldm.lora import load_lora, target_names
from ldm.pipeline import Pipeline
from ldm.pretrained import load_unet
from test_convert import SD15_SCHEDULER, make_tiny_sd_folder

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("sd") / "sd", seed=0)


def flags(sd: Path, out: Path, *extra) -> list[str]:
    return ["--text", "--init-from", str(sd), "--out", str(out), "--steps", str(STEPS), "--batch-size", "4",
            "--cache-images", "16", "--val-every", "0", "--val-steps", "2", "--ckpt-every", str(EVERY),
            "--threads", "1", "--quiet", "--lr", "1e-2", *extra]


LORA = ("--lora", "3", "--lora-alpha", "6", "--lora-targets", "attn+ff")


def run(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train_unet.main([str(a) for a in argv])
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def lora_run(sd, tmp_path_factory):
    """An uninterrupted LoRA run from the diffusers folder, counting its crash points."""
    out = tmp_path_factory.mktemp("lora") / "run"
    count = out.parent / "count"
    os.environ["LDM_CRASH_COUNT"] = str(count)
    try:
        rc, err = run(flags(sd, out, *LORA))
    finally:
        os.environ.pop("LDM_CRASH_COUNT")
    assert rc == 0, err
    return out, int(count.read_text())


def test_init_from_diffusers_brings_the_folder_and_trains_lora_only(sd, lora_run):
    out, _ = lora_run
    meta = json.loads((out / "unet.json").read_text())
    assert meta["prediction"] == "eps" and meta["init_from"] == str(sd.resolve())
    assert meta["schedule"] == {k: SD15_SCHEDULER[k] for k in ("beta_schedule", "beta_start", "beta_end",
                                                               "num_train_timesteps")}
    assert meta["text_encoder"]["path"] == str((sd / "text_encoder").resolve())
    assert meta["text_encoder_options"] == {"pad_to_max": True, "mask_padding": False, "max_tokens": 77}
    assert meta["lora"] == {"file": "lora.safetensors", "rank": 3, "alpha": 6.0, "targets": "attn+ff"}
    text = load_file(out / "cache" / "text.safetensors")
    assert text["tokens"].shape[1:] == (77, 32) and bool((text["lengths"] == 77).all())  # SD's padding, all seen

    # the checkpoints hold the adapters and their optimizer state only
    _, parts = CheckpointDir(out / "checkpoints").load()
    base, _ = load_unet(out / "base")
    names = target_names(base, "attn+ff")
    assert set(parts["unet"]) == {f"adapters.{i}.{ab}" for i in range(len(names)) for ab in "AB"}
    assert len(parts["optimizer"]["state"]) == 2 * len(names)

    # the export is the frozen base plus the EMA adapters, merged; nothing else moved
    tuned, _ = load_unet(out)
    lora = load_lora(out / "lora.safetensors", base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora.merge()
    moved = {k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {n + ".weight" for n in names}
    for k, v in base.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[k], v, rtol=1e-6, atol=1e-7)


def test_lora_run_killed_and_resumed_ends_identical(sd, lora_run, tmp_path):
    ref, total = lora_run
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LDM_CRASH_AT": str(total // 2)}
    killed = subprocess.run([sys.executable, "-m", "ldm.train_unet", *flags(sd, out, *LORA)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr  # SIGKILL inside a checkpoint write, mid-run
    assert not (out / "lora.safetensors").exists()
    rc, err = run(flags(sd, out, *LORA, "--resume"))
    assert rc == 0, err
    assert "resumed" in err
    for name in ("lora.safetensors", "unet.safetensors"):
        a, b = load_file(ref / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_full_fine_tune_from_our_folder(lora_run, tmp_path):
    """--init-from one of our folders (the LoRA run's merged export): every weight trains."""
    src, _ = lora_run
    out = tmp_path / "full"
    rc, err = run(flags(src, out, "--steps", "2"))
    assert rc == 0, err
    _, parts = CheckpointDir(out / "checkpoints").load()
    start, _ = load_unet(src)
    assert set(parts["unet"]) == set(start.state_dict())
    assert len(parts["optimizer"]["state"]) == len(list(start.parameters()))
    meta = json.loads((out / "unet.json").read_text())
    assert meta["text_encoder_options"]["pad_to_max"] and meta["init_from"] == str(src.resolve())
    assert not (out / "base").exists()  # ours is read in place


def test_lora_under_torchrun_trains_as_one_process_would(sd, lora_run, tmp_path):
    """Two processes, each half of every batch: the adapters' gradients averaged by hand (they sit outside
    DistributedDataParallel) give the adapters one process on the whole batch trains."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ldm.train_unet", *flags(sd, tmp_path / "ddp", *LORA)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    one, _ = lora_run
    single, ddp = load_file(one / "lora.safetensors"), load_file(tmp_path / "ddp" / "lora.safetensors")
    assert single and single.keys() == ddp.keys()
    # lora_B starts at zero: what the run moved is the B matrices' size
    moved = sum(single[k].double().square().sum() for k in single if "lora_B" in k).sqrt()
    apart = sum((single[k].double() - ddp[k].double()).square().sum() for k in single).sqrt()
    assert moved > 0 and apart < 1e-3 * moved, (apart, moved)


def test_adamw8bit_full_fine_tune_keeps_8bit_moments_and_resumes_exactly(sd, tmp_path, monkeypatch):
    """--optimizer adamw8bit: bitsandbytes' 8-bit moments in the checkpoint, and a run killed inside a
    checkpoint write and resumed ends bit-identical to an uninterrupted one."""
    pytest.importorskip("bitsandbytes")
    argv = ("--optimizer", "adamw8bit", "--lr", "1e-3")
    ref, count = tmp_path / "ref", tmp_path / "count"
    monkeypatch.setitem(checkpoint._crash, "seen", 0)  # the count is per process: earlier runs here passed some
    os.environ["LDM_CRASH_COUNT"] = str(count)
    try:
        rc, err = run(flags(sd, ref, *argv))
    finally:
        os.environ.pop("LDM_CRASH_COUNT")
    assert rc == 0, err
    _, parts = CheckpointDir(ref / "checkpoints").load()
    states = [s.get("__bnb_optimizer_quant_state__", s) for s in parts["optimizer"]["state"].values()]
    moments = [s[k] for s in states for k in ("state1", "state2") if k in s]
    # tensors of 4096 elements and more keep 8-bit moments; bitsandbytes keeps smaller ones in 32 bits
    assert {m.dtype for m in moments if m.numel() >= 4096} == {torch.uint8}
    base, _ = load_unet(ref)  # an export that loads, weights moved from the folder's
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "LDM_CRASH_AT": str(int(count.read_text()) // 2)}
    killed = subprocess.run([sys.executable, "-m", "ldm.train_unet", *flags(sd, out, *argv)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    rc, err = run(flags(sd, out, *argv, "--resume"))
    assert rc == 0 and "resumed" in err, err
    a, b = load_file(ref / "unet.safetensors"), load_file(out / "unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adamw8bit_without_bitsandbytes_is_one_line(sd, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    rc, err = run(flags(sd, tmp_path / "x", "--optimizer", "adamw8bit"))
    assert rc == 2 and "--optimizer adamw8bit needs bitsandbytes" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_sample_lora_scales_stack(sd, lora_run, tmp_path):
    out, _ = lora_run
    file = out / "lora.safetensors"
    plain = Pipeline.from_pretrained(sd)
    stacked = Pipeline.from_pretrained(sd).load_lora(file, 0.5).load_lora(file, 1.0)
    delta = {n: a.delta() for n, _, a in load_lora(file, Pipeline.from_pretrained(sd).unet).layers()}
    ws, wp = stacked.unet.state_dict(), plain.unet.state_dict()
    for n, d in delta.items():
        torch.testing.assert_close(ws[n + ".weight"], wp[n + ".weight"] + 1.5 * d, rtol=1e-5, atol=1e-6)
    args = ["--from-diffusers", str(sd), "--prompt", "a red cube", "--n", "1", "--steps", "2"]
    assert sample.main(args + ["--lora", f"{file}:0.5", "--lora", str(file), "--out", str(tmp_path / "a.png")]) == 0
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert sample.main(args + ["--lora", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "b.png")]) == 2
    assert "--lora" in err.getvalue() and "none.safetensors" in err.getvalue()


def test_buckets_run_from_sd(sd, tmp_path, seed):
    """--buckets with --init-from: a folder of wide, tall and square pictures trains a bucket a batch."""
    from test_buckets import two_colour_folder

    data = two_colour_folder(tmp_path / "data", seed)
    rc, err = run(flags(sd, tmp_path / "run", *LORA, "--data", data, "--buckets", "--steps", "3"))
    assert rc == 0, err
    latents = load_file(tmp_path / "run" / "cache" / "latents.safetensors")
    sizes = {tuple(s) for s in latents["bucket_sizes"][latents["bucket"]].tolist()}
    assert len(sizes) >= 3 and (8, 8) in sizes  # 32 px pictures in 8 x 8 latents and other shapes
    rc, err = run(flags(sd, tmp_path / "bad", "--buckets"))
    assert rc == 2 and "--buckets" in err and "--data" in err


def test_prior_preservation(sd, tmp_path, seed):
    """--class-prompt: the pretrained model draws the class pictures once; every batch is half the user's
    pictures, half the class's, weighted 1 and --prior-weight."""
    from ldm.distributed import Dist
    from ldm.latent_cache import Batches, Cache
    from ldm.runlog import image_grid
    from test_buckets import two_colour_folder

    data = two_colour_folder(tmp_path / "data", seed)
    out = tmp_path / "run"
    argv = flags(sd, out, *LORA, "--data", data, "--class-prompt", "a red cube", "--class-images", "5",
                 "--prior-weight", "0.5", "--steps", "2", "--batch-size", "4")
    rc, err = run(argv)
    assert rc == 0, err
    drawn = out / "class_images"
    rows = [json.loads(line) for line in (drawn / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a red cube"] * 5
    images = Pipeline.from_pretrained(out / "base")(["a red cube"], n=5, seed=0, output="pt")
    image_grid(images[3:4], pad=0).save(tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == (drawn / rows[3]["file_name"]).read_bytes()
    stamp = (drawn / "class_images.json").stat().st_mtime_ns
    rc, err = run(argv[:-4] + ["--steps", "4", "--batch-size", "4", "--resume"])
    assert rc == 0, err
    assert (drawn / "class_images.json").stat().st_mtime_ns == stamp  # drawn once

    latents = load_file(out / "cache" / "latents.safetensors")
    n_instance = 10  # two_colour_folder's pictures come first, then the class's
    assert latents["mean"].shape[0] == n_instance + 5
    cache = Cache(latents["mean"], latents["std"], keys={})
    batches = Batches(cache, 4, Dist(), seed, 0.0, 1000, torch.device("cpu"), prior=(n_instance, 0.5))
    for step in range(7):
        idx = batches.positions.take(step * 4, 4)
        assert (idx[:2] < n_instance).all() and (idx[2:] >= n_instance).all()
    assert batches.weight.tolist() == [2.0, 2.0, 1.0, 1.0]  # mean(w * loss) = instance + 0.5 x class
    rc, err = run(flags(sd, tmp_path / "bad", "--class-prompt", "a dog"))
    assert rc == 2 and "--class-prompt" in err and "--data" in err


@pytest.mark.parametrize("extra, message", [
    (("--init-from", "/no/such/folder"), "--init-from /no/such/folder"),
    (("--lora", "-1"), "--lora"),
])
def test_bad_fine_tune_flags(sd, tmp_path, extra, message):
    argv = flags(sd, tmp_path / "x") + list(extra)
    rc, err = run(argv)
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x" / "checkpoints").exists()
    rc, err = run([a for a in flags(sd, tmp_path / "y") if a != "--text"])
    assert rc == 2 and "--init-from" in err and "--text" in err
