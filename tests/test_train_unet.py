"""`python -m ldm.train_unet`: outputs, the latent + text cache, resume after Ctrl-C and SIGKILL, two
processes under torchrun, unconditional models, and every bad input as one line."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SESSION_SEED
from PIL import Image
from safetensors.torch import load_file
from t2i_helpers import RESOLUTION, SHARED_LR, make_vae, shared_assets, train_flags

import ldm.latent_cache as latent_cache
import ldm.train_unet as train_unet
import ldm.unet_training as training
from ldm.distributed import Dist, weights_digest
from ldm.checkpoint import CheckpointDir
from ldm.data import ShapesDataset, ShuffledStream, eval_prompts
from ldm.diffusion import sample_timesteps
from ldm.pretrained import load_vae
from ldm.pipeline import generate, load_pipeline
from ldm.text import TextEncoder
from ldm.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory, SESSION_SEED % 1000)


def run(argv) -> tuple[int, str]:
    """train_unet.main in this process; -> (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train_unet.main([str(a) for a in argv])
    return rc, err.getvalue()


def text_flags(assets, steps, seed, **kw):
    return (["--text", "--text-encoder", assets["encoder"], "--cache-dir", assets["cache"]]
            + train_flags(assets["vae"], steps, seed, **kw))


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "unet.safetensors"), load_file(b / "unet.safetensors")
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst == 0.0, f"weights differ by up to {worst}"


def ckpt_part(out: Path, part: str) -> dict:
    return CheckpointDir(out / "checkpoints").load()[1][part]


# ---------------------------------------------------------------- one run and what it leaves behind
def test_text_run_writes_every_output_and_lowers_the_loss(assets):
    out = assets["unet"]
    meta = json.loads((out / "unet.json").read_text())
    assert meta["created_by"] == "ldm.train_unet" and meta["steps"] == 40 and meta["batch_size"] == 8
    assert meta["prediction"] == training.DEMO.prediction and meta["schedule"] == "cosine"  # train_flags'
    assert meta["num_timesteps"] == 1000
    assert meta["text_encoder"] == {"path": str(Path(assets["encoder"]).resolve()), "width": 16}
    assert meta["config"]["context_dim"] == 16 and meta["config"]["model_channels"] == 16
    assert meta["latent_shape"] == [4, 4, 4] and meta["resolution"] == RESOLUTION
    assert meta["vae"] == str(Path(assets["vae"]).resolve())
    assert meta["val_prompts"] == [text for _, text in eval_prompts(training.DEMO.val_prompts, 0)]
    assert meta["sampler"] == "unipc" and meta["sample_steps"] == 2
    assert meta["cfg_scale"] == training.DEMO.val_cfg
    assert meta["training"]["world_size"] == 1 and len(meta["training"]["weights_sha256"]) == 1
    scores = meta["eval"]  # --eval 4: eval_text's scores of the EMA model
    assert scores["n"] == 4 and scores["sampler"] == "unipc" and scores["steps"] == 2
    assert all(0 <= scores[k] <= 1 for k in ("shape", "colour", "size", "position", "background", "all"))
    assert f"eval: shape+colour+position {100 * scores['shape+colour+position']:.1f}% of 4 prompts" in assets["stderr"]
    # the export is the EMA of the last checkpoint, which differs from the raw weights
    exported, ema, raw = load_file(out / "unet.safetensors"), ckpt_part(out, "ema"), ckpt_part(out, "unet")
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert all(k in rows[-1] for k in ("loss", "lr", "grad_norm", "ema_decay", "images_per_s"))
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-10:]])
    assert last < 0.8 * first, (first, last)
    grids = sorted(p.name for p in (out / "val").glob("step_*.png"))
    assert grids == ["step_0000020.png", "step_0000040.png"]
    grid = Image.open(out / "val" / grids[-1])
    scale, rows_ = 64 // RESOLUTION, training.DEMO.val_images  # 8 prompts a row, val_images rows, upscaled
    assert grid.size == (scale * (8 * (RESOLUTION + 2) + 2), scale * (rows_ * (RESOLUTION + 2) + 2))
    gif = Image.open(out / "val" / "progress.gif")
    assert gif.format == "GIF" and gif.n_frames == 2
    assert Image.open(out / "loss.png").format == "PNG"
    latest = CheckpointDir(out / "checkpoints").latest()
    assert latest.name == "step_0000040"
    assert {p.name for p in latest.iterdir()} == {"checkpoint.json", "unet.safetensors", "ema.safetensors",
                                                  "optimizer.safetensors", "rng.safetensors", "run.safetensors"}
    run_part = ckpt_part(out, "run")
    assert run_part["data_position"] == 40 * 8 and run_part["step"] == 40
    assert "building the latent cache" in assets["stderr"] and "building the text cache" in assets["stderr"]


def test_cache_holds_scaled_posterior_moments_and_each_caption_once(assets):
    latents = load_file(assets["cache"] / "latents.safetensors")
    text = load_file(assets["cache"] / "text.safetensors")
    n = 48
    assert latents["mean"].shape == latents["std"].shape == (n, 4, 4, 4) and latents["mean"].dtype == torch.float16
    vae, meta = load_vae(assets["vae"])
    data = ShapesDataset(RESOLUTION, captions=training.TrainConfig().captions)  # as train_unet words them
    x = torch.stack([data[i]["image"] for i in range(8)])
    vae.double()
    with torch.no_grad():
        posterior = vae.encode(x.double())
    scale, shift = meta["latent_scale_factor"], meta["latent_mean"]
    torch.testing.assert_close(latents["mean"][:8].double(), (posterior.mean - shift) * scale, atol=3e-3, rtol=2e-3)
    torch.testing.assert_close(latents["std"][:8].double(), posterior.std * scale, atol=3e-3, rtol=2e-3)

    captions = [data[i]["text"] for i in range(n)]
    val = json.loads((assets["unet"] / "unet.json").read_text())["val_prompts"]
    tokens, lengths, index = text["tokens"], text["lengths"], text["index"]
    assert tokens.dtype == torch.float16 and len(tokens) == len(set(captions) | set(val) | {""})
    encoder = TextEncoder(assets["encoder"])
    checks = ((captions[:6], index[:6]), (val[:3], text["extra_index"][:3]), ([""], text["empty_index"][None]))
    for texts, rows in checks:
        context, true_lengths = encoder.encode(texts)
        assert lengths[rows].tolist() == true_lengths.tolist()
        for j, r in enumerate(rows.tolist()):
            k = int(true_lengths[j])
            torch.testing.assert_close(tokens[r, :k].float(), context[j, :k], atol=3e-3, rtol=2e-3)
            assert not tokens[r, k:].any()  # padding is zero (and masked by the lengths)
    assert [captions[i] == captions[j] for i in range(n) for j in range(n)] == \
        [index[i] == index[j] for i in range(n) for j in range(n)]


def test_cache_is_reused_and_rebuilt_when_the_vae_changes(assets, tmp_path):
    seed = SESSION_SEED % 1000
    rc, err = run(["--out", tmp_path / "again", "--lr", SHARED_LR, "--ckpt-every", "20"] + text_flags(assets, 40, seed)
                  + ["--val-every", "20"])
    assert rc == 0, err
    assert "reusing the latent cache" in err and "reusing the text cache" in err and "building" not in err
    same_weights(assets["unet"], tmp_path / "again")  # the same run again, from the reused cache
    shutil.copytree(assets["cache"], tmp_path / "cache")
    other_vae = make_vae(tmp_path / "vae2", seed + 1)
    rc, err = run(["--out", tmp_path / "other", "--text", "--text-encoder", assets["encoder"],
                   "--cache-dir", tmp_path / "cache"] + train_flags(other_vae, 1, seed))
    assert rc == 0, err
    assert "building the latent cache" in err and "(changed: vae_sha256, vae_json_sha256)" in err
    assert "reusing the text cache" in err
    rebuilt = load_file(tmp_path / "cache" / "latents.safetensors")["mean"]
    assert not torch.equal(rebuilt, load_file(assets["cache"] / "latents.safetensors")["mean"])


def test_text_cache_is_rebuilt_when_the_captions_change(assets, tmp_path, monkeypatch):
    """The dataset's description stays the same when its caption writer changes (a new wording): the
    captions' digest in the text key rebuilds the text cache, and the latents are reused."""
    shutil.copytree(assets["cache"], tmp_path / "cache")
    flags = ["--text", "--text-encoder", assets["encoder"], "--cache-dir", tmp_path / "cache"]
    written = ShapesDataset.caption
    monkeypatch.setattr(ShapesDataset, "caption", lambda self, i, attrs=None: written(self, i, attrs) + " today")
    rc, err = run(["--out", tmp_path / "reworded"] + flags + train_flags(assets["vae"], 1, SESSION_SEED % 1000))
    assert rc == 0, err
    assert "reusing the latent cache" in err and "building the text cache" in err
    assert "(changed: captions_sha256)" in err
    text = load_file(tmp_path / "cache" / "text.safetensors")
    encoder = TextEncoder(assets["encoder"])
    data = ShapesDataset(RESOLUTION, captions=training.TrainConfig().captions)
    context, lengths = encoder.encode([data.caption(0)])
    assert data.caption(0).endswith(" today") and int(text["lengths"][int(text["index"][0])]) == int(lengths[0])


def test_checkpoints_without_a_captions_digest_still_match():
    """Checkpoints written before the text key held the captions' digest resume on the same inputs."""
    latents, text = {"vae_sha256": "a"}, {"text_encoder": "e", "images": 4}
    now = {"latents": latents, "text": {**text, "captions_sha256": "d"}}
    assert latent_cache.same_inputs({"latents": latents, "text": text}, now)
    assert latent_cache.same_inputs({"latents": latents, "text": {**text, "captions_sha256": "d"}}, now)
    assert not latent_cache.same_inputs({"latents": latents, "text": {**text, "captions_sha256": "other"}}, now)
    assert not latent_cache.same_inputs({"latents": {"vae_sha256": "b"}, "text": text}, now)
    assert not latent_cache.same_inputs({"latents": latents, "text": {**text, "images": 5}}, now)


# ---------------------------------------------------------------- resume
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(assets, tmp_path, seed, monkeypatch):
    flags = ["--ckpt-every", "100"] + text_flags(assets, 6, seed)
    assert run(["--out", tmp_path / "whole"] + flags)[0] == 0
    real_loss, calls = training.diffusion_loss, {"n": 0}

    def interrupt_at_step_4(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_loss(*a, **kw)

    monkeypatch.setattr(training, "diffusion_loss", interrupt_at_step_4)
    rc, err = run(["--out", tmp_path / "cut"] + flags)
    assert rc == 130 and "interrupted at step 3" in err
    monkeypatch.setattr(training, "diffusion_loss", real_loss)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert not (tmp_path / "cut" / "unet.safetensors").exists()
    rc, err = run(["--out", tmp_path / "cut", "--resume", "--quiet"])
    assert rc == 0, err
    same_weights(tmp_path / "whole", tmp_path / "cut")
    for part in ("unet", "optimizer"):
        a, b = ckpt_part(tmp_path / "whole", part), ckpt_part(tmp_path / "cut", part)
        assert json.dumps(a, default=lambda t: t.tolist()) == json.dumps(b, default=lambda t: t.tolist())
    steps = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_equals_an_uninterrupted_run(assets, tmp_path, seed):
    """SIGKILL leaves no chance to clean up: the run resumes from its last whole checkpoint."""
    flags = ["--ckpt-every", "2"] + text_flags(assets, 100_000, seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "ldm.train_unet", "--out", str(tmp_path / "killed")]
                            + [str(f) for f in flags], env=env, stderr=subprocess.PIPE, cwd=ROOT)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not (latest.exists() and latest.read_text().strip() >= "step_0000004") and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = int(latest.read_text().strip().split("_")[1])
    assert step >= 4
    total = step + 3
    rc, err = run(["--out", tmp_path / "killed", "--resume", "--steps", total, "--quiet"])
    assert rc == 0, err
    assert f"resumed {tmp_path / 'killed'} at step {step}" in err
    whole = ["--ckpt-every", "2"] + text_flags(assets, total, seed)
    assert run(["--out", tmp_path / "whole"] + whole)[0] == 0
    same_weights(tmp_path / "whole", tmp_path / "killed")


# ---------------------------------------------------------------- many processes
@pytest.mark.slow
def test_two_processes_hold_identical_weights_and_train_as_one_would(assets, tmp_path, seed):
    flags = [str(f) for f in ["--ckpt-every", "100"] + text_flags(assets, 4, seed)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ldm.train_unet", "--out", str(tmp_path / "ddp")] + flags,
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "ddp" / "unet.json").read_text())
    digests = meta["training"]["weights_sha256"]
    assert meta["training"]["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    # the digest rank 0 reported is that of the weights it saved
    config = UNetConfig(**meta["config"])
    model, ema = UNet(config), UNet(config)
    model.load_state_dict(ckpt_part(tmp_path / "ddp", "unet"))
    ema.load_state_dict(ckpt_part(tmp_path / "ddp", "ema"))
    assert weights_digest(model, ema) == digests[0]
    # rank 0 alone logs: one row per step, one summary line, the cache looked at once
    assert [json.loads(line)["step"] for line in open(tmp_path / "ddp" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert proc.stderr.count("hold identical weights") == 1 and proc.stderr.count("reusing the latent cache") == 1
    assert len(ckpt_part(tmp_path / "ddp", "rng")["ranks"]) == 2
    # the two shards of each global batch train what one process on the whole batch trains
    assert run(["--out", tmp_path / "one"] + flags)[0] == 0
    torch.manual_seed(seed)
    start = UNet(config).state_dict()
    single = ckpt_part(tmp_path / "one", "unet")
    moved = sum((single[k].double() - start[k].double()).square().sum() for k in start).sqrt()
    apart = sum((single[k].double() - model.state_dict()[k].double()).square().sum() for k in start).sqrt()
    assert moved > 0 and apart < 1e-3 * moved, (apart, moved)


# ---------------------------------------------------------------- unconditional models
def test_unconditional_training_and_sampling(assets, tmp_path, seed, capsys):
    rc, err = run(["--out", tmp_path / "u", "--cache-dir", assets["cache"]] + train_flags(assets["vae"], 3, seed))
    assert rc == 0, err
    assert "reusing the latent cache" in err and "text cache" not in err
    meta = json.loads((tmp_path / "u" / "unet.json").read_text())
    assert meta["text_encoder"] is None and meta["config"]["context_dim"] is None and meta["val_prompts"] == []
    pipe = load_pipeline(tmp_path / "u")
    assert pipe.encoder is None and not pipe.conditional
    images = generate(pipe, None, n=5, steps=3, seed=seed, batch_size=2)
    assert images.shape == (5, 3, RESOLUTION, RESOLUTION) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images, generate(pipe, None, n=5, steps=3, seed=seed, batch_size=5))
    from ldm import sample

    assert sample.main(["--unet", str(tmp_path / "u"), "--n", "3", "--steps", "2",
                        "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size == (8 * (3 * (RESOLUTION + 2) + 2), 8 * (RESOLUTION + 4))
    assert sample.main(["--unet", str(tmp_path / "u"), "--prompt", "a red circle"]) == 2
    assert "unconditional" in capsys.readouterr().err


def test_another_resolution_than_the_vaes(assets, tmp_path, seed):
    """--resolution 2x the VAE's: images rendered at it, latents twice as wide, the UNet records its shape and
    samples at it."""
    rc, err = run(["--out", tmp_path / "r"] + train_flags(assets["vae"], 2, seed) + ["--resolution", 2 * RESOLUTION])
    assert rc == 0, err
    meta = json.loads((tmp_path / "r" / "unet.json").read_text())
    assert meta["resolution"] == 2 * RESOLUTION and meta["latent_shape"] == [4, RESOLUTION // 2, RESOLUTION // 2]
    latents = load_file(tmp_path / "r" / "cache" / "latents.safetensors")
    assert latents["mean"].shape[1:] == (4, RESOLUTION // 2, RESOLUTION // 2)
    images = generate(load_pipeline(tmp_path / "r"), None, n=2, steps=2, seed=seed)
    assert images.shape == (2, 3, 2 * RESOLUTION, 2 * RESOLUTION)


def test_training_on_an_image_folder(assets, tmp_path, seed):
    rng = np.random.default_rng(seed)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a red picture number {i}" if i != 2 else "")
    with pytest.warns(UserWarning, match="1 of 5 images have no caption"):
        rc, err = run(["--out", tmp_path / "out", "--data", data, "--text", "--text-encoder", assets["encoder"]]
                      + train_flags(assets["vae"], 2, seed))
    assert rc == 0, err
    meta = json.loads((tmp_path / "out" / "unet.json").read_text())
    assert meta["dataset"]["name"] == "folder" and meta["cached_items"] == 5
    assert meta["val_prompts"] == [f"a red picture number {i}" for i in (0, 1, 3, 4)]  # distinct, not empty
    text = load_file(tmp_path / "out" / "cache" / "text.safetensors")
    assert len(text["tokens"]) == 5 and text["index"][2] == text["empty_index"]  # the uncaptioned image


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, message", [
    (["--vae", "{tmp}/no_vae"], "--vae: checkpoint folder not found: {tmp}/no_vae (train one with python -m ldm"),
    (["--data", "{tmp}/no_data"], "--data: folder not found: {tmp}/no_data"),
    (["--text-encoder", "{tmp}"], "--text-encoder needs --text"),
    (["--text", "--text-encoder", "{tmp}"], "--text-encoder: {tmp} has no config.json"),
    (["--unet-override", "channels=3"], "--unet-override 'channels=3': expected KEY=VALUE with KEY a UNetConfig field"),
    (["--unet-override", "context_dim=8"], "--unet-override context_dim: set by the VAE's latent channels"),
    (["--unet-override", "num_heads=3"], "--preset tiny with --unet-override: UNetConfig: 16 channels"),
    (["--resume"], "--resume: no checkpoint in {tmp}/out/checkpoints"),
    (["--cfg-drop", "1"], "--cfg-drop must lie in [0, 1), got 1.0"),
    (["--ema-decay", "1.5"], "--ema-decay must lie in [0, 1), got 1.5"),
    (["--t-focus", "1.2"], "--t-focus must lie in [0, 1], got 1.2"),
    (["--t-focus-std", "0"], "--t-focus-std must be positive, got 0.0"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--eval", "10"], "--eval scores prompts; it needs --text"),
    (["--resolution", "0"], "--resolution must be positive, got 0"),
    (["--resolution", "18"], "--resolution 18: resolution 18 is not divisible by the downsampling factor 4"),
    (["--resolution", "20"], "--resolution 20: its 5-wide latents do not halve 1 times; use a multiple of 8"),
], ids=["missing-vae", "missing-data", "encoder-without-text", "encoder-not-a-model", "unknown-override",
        "fixed-override", "bad-config", "resume-without-checkpoint", "cfg-drop", "ema-decay", "t-focus", "t-focus-std",
        "zero-batch", "eval-unconditional", "zero-resolution", "resolution-off-factor", "resolution-off-levels"])
def test_bad_input_is_one_clear_line(assets, tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    base = train_flags(assets["vae"], 1, 0) + ["--cache-dir", str(assets["cache"])]
    rc, err = run(["--out", tmp_path / "out"] + base + argv)
    assert rc == 2, err
    assert message.format(tmp=tmp_path) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_resume_refuses_a_different_run_flag(assets, tmp_path):
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "checkpoints").symlink_to(assets["unet"] / "checkpoints")
    rc, err = run(["--out", tmp_path / "copy", "--resume", "--lr", "0.5", "--quiet"])
    assert rc == 2 and f"--lr 0.5 differs from the checkpoint's {float(SHARED_LR)}" in err  # 0.005


# ---------------------------------------------------------------- pieces
def test_positions_follow_the_shuffled_stream_rule(seed):
    class Indices:
        def __len__(self):
            return 7

        def get(self, i, rng):
            return i

    stream = ShuffledStream(Indices(), seed=seed)
    positions = latent_cache.Positions(7, seed)
    for start, count in ((0, 7), (5, 20), (13, 1), (40, 9)):  # whole epoch, across three epochs, ...
        assert positions.take(start, count).tolist() == [stream[k] for k in range(start, start + count)]


def test_shards_of_two_ranks_make_up_the_global_batch(seed):
    g = torch.Generator().manual_seed(seed)
    N, U = 10, 4
    cache = latent_cache.Cache(mean=torch.randn(N, 4, 2, 2, generator=g).half(), std=torch.zeros(N, 4, 2, 2).half(),
                             keys={}, tokens=torch.randn(U, 3, 2, generator=g).half(),
                             token_lengths=torch.randint(1, 4, (U,), generator=g),
                             caption_row=torch.randint(1, U, (N,), generator=g), empty_row=0)

    def batches(rank, world, cfg_drop=0.5, t_focus=(0.7, -0.85, 1.0)):
        return latent_cache.Batches(cache, 6, Dist(rank, world), seed, cfg_drop, 1000, torch.device("cpu"),
                                  t_focus=t_focus)

    one, halves = batches(0, 1), [batches(0, 2), batches(1, 2)]
    for step in (0, 1, 7):
        whole = one(step)
        parts = [h(step) for h in halves]
        for k in range(3):  # x0, t, noise
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
        for key in ("context", "context_lengths"):
            assert torch.equal(torch.cat([p[3][key] for p in parts]), whole[3][key])
    # with no posterior noise, an epoch of x0 rows is the cache in a shuffled order
    epoch = torch.cat([batches(0, 1)(s)[0] for s in range(5)])[:N]  # steps 0..4 cover positions 0..29
    order = [next(i for i in range(N) if torch.equal(row, cache.mean[i].float())) for row in epoch]
    assert sorted(order) == list(range(N))
    x0, t, noise, cond = batches(0, 1, cfg_drop=0.0)(3)
    assert 0 <= t.min() and t.max() < 1000 and noise.shape == x0.shape
    # the timesteps are the first draws of the step's generator, from the focused law (tested in test_diffusion)
    step_gen = torch.Generator().manual_seed((seed * latent_cache.STEP_SEED_STRIDE + 3) % 2**64)
    assert torch.equal(t, sample_timesteps(6, 1000, None, step_gen, focus=0.7, focus_mean=-0.85, focus_std=1.0))
    step_gen.manual_seed((seed * latent_cache.STEP_SEED_STRIDE + 3) % 2**64)
    assert torch.equal(batches(0, 1, t_focus=(0.0, 0.0, 1.0))(3)[1], torch.randint(0, 1000, (6,), generator=step_gen))
    assert (cond["context_lengths"] > 0).all() and not any(
        torch.equal(c, cache.tokens[0].float()) for c in cond["context"])  # no caption dropped
    assert all(torch.equal(c, cache.tokens[0].float()) for c in batches(0, 1, cfg_drop=1 - 1e-9)(3)[3]["context"])


def test_ema_decay_warms_up_to_its_ceiling():
    assert training.ema_decay(0, 0.999) == pytest.approx(1 / training.EMA_WARMUP)
    assert training.ema_decay(10**6, 0.999) == 0.999
    decays = [training.ema_decay(s, 0.999) for s in range(5000)]
    assert all(a <= b for a, b in zip(decays, decays[1:]))


def test_help_explains_every_flag():
    text = train_unet.build_parser().format_help()
    for flag in ("--vae", "--data", "--caption-column", "--cache-images", "--cache-dir", "--text", "--text-encoder",
                 "--cfg-drop", "--preset", "--prediction", "--schedule", "--min-snr-gamma", "--t-focus",
                 "--t-focus-mean", "--t-focus-std", "--steps",
                 "--batch-size", "--lr", "--warmup", "--weight-decay", "--grad-clip", "--ema-decay",
                 "--grad-checkpointing", "--device", "--threads", "--seed", "--val-every", "--ckpt-every",
                 "--log-every", "--val-steps", "--val-cfg", "--quiet", "--out", "--resume", "--eval", "torchrun"):
        assert flag in text
