"""A catalogue of bad inputs across the commands and the library: each row is the input, the one-line
message it must give (naming the file, flag, shape or dtype), a non-zero exit, no traceback, and
nothing written or overwritten in the folders it was pointed at."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SESSION_SEED
from PIL import Image
from t2i_helpers import RESOLUTION, shared_assets, train_flags

from ldm import convert, eval_text, eval_vae, sample, train_unet, train_vae
from ldm.checkpoint import save_json

TINY_VAE = ["--steps", "2", "--batch-size", "4", "--threads", "1", "--quiet", "--resolution", "16",
            "--ckpt-every", "1", "--sample-every", "1"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory, SESSION_SEED % 1000)  # the seed every test file shares


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A finished two-step train_vae run folder (checkpoints and export), to point bad runs at."""
    out = tmp_path_factory.mktemp("vae_run") / "run"
    assert train_vae.main(["--out", str(out)] + TINY_VAE) == 0
    return out


def snapshot(*folders: Path) -> dict:
    """Every file below ``folders``: its path -> (size, sha256, mode)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
            if p.is_file():
                out[str(p)] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
    return out


def bad_utf8(path: Path, text: bytes = b"a red \xff\xfe circle") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    return path


def folder_with(tmp: Path, caption: bytes | None = None, metadata: bytes | None = None) -> Path:
    """An image folder of two PNGs; ``caption`` the bytes of one sidecar caption, ``metadata`` the
    bytes of a metadata.jsonl."""
    root = tmp / "data"
    root.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(root / f"{i}.png")
    if caption is not None:
        (root / "0.txt").write_bytes(caption)
    if metadata is not None:
        (root / "metadata.jsonl").write_bytes(metadata)
    return root


def unet_copy(a, tmp: Path, **changes) -> Path:
    folder = tmp / "unet"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet.json", "unet.safetensors"):
        shutil.copy(Path(a["unet"]) / name, folder / name)
    if changes:
        meta = json.loads((folder / "unet.json").read_text())
        save_json({**meta, **changes}, folder / "unet.json")
    return folder


def mixed_pair(a, tmp: Path) -> Path:
    """An export cut short: new weights (another export id) beside the old JSON."""
    from safetensors.torch import load_file, save_file

    folder = unet_copy(a, tmp)
    state = load_file(folder / "unet.safetensors")
    save_file(state, folder / "unet.safetensors", metadata={"export_id": "0" * 32})
    return folder


def damaged_checkpoints(a, tmp: Path) -> Path:
    """A run folder whose every checkpoint is cut short."""
    out = tmp / "run"
    shutil.copytree(Path(a["unet"]) / "checkpoints", out / "checkpoints")
    for part in (out / "checkpoints").rglob("*.safetensors"):
        part.write_bytes(part.read_bytes()[:100])
    return out


def unet_flags(a, *extra):
    return ["--text", "--text-encoder", str(a["encoder"]), "--cache-dir", str(a["cache"])] + \
        train_flags(a["vae"], 4, 0) + list(extra)


# (id, command, argv from (assets, vae_run, tmp), the message, the folders that must stay untouched)
CASES = [
    # ---- train_vae
    ("vae-steps-0-in-a-run", train_vae.main, lambda a, v, t: ["--out", v, "--steps", "0"],
     "--steps must be positive, got 0", lambda a, v, t: [v]),
    ("vae-empty-data-in-a-run", train_vae.main,
     lambda a, v, t: ["--out", v, "--data", (t / "empty").mkdir() or t / "empty"] + TINY_VAE,
     "no images (PNG, JPEG, WebP) found in {tmp}/empty", lambda a, v, t: [v]),
    ("vae-missing-data", train_vae.main, lambda a, v, t: ["--out", t / "o", "--data", t / "nowhere"],
     "--data: folder not found: {tmp}/nowhere", lambda a, v, t: [t]),
    ("vae-resolution", train_vae.main, lambda a, v, t: ["--out", v, "--resolution", "30"],
     "--resolution 30 is not divisible by the downsampling factor 4", lambda a, v, t: [v]),
    ("vae-lr", train_vae.main, lambda a, v, t: ["--out", v, "--lr", "-1"], "--lr must be positive, got -1.0",
     lambda a, v, t: [v]),
    ("vae-resume-nothing", train_vae.main, lambda a, v, t: ["--out", t / "fresh", "--resume"],
     "--resume: no checkpoint in {tmp}/fresh/checkpoints", lambda a, v, t: [t]),
    ("vae-resume-changed", train_vae.main, lambda a, v, t: ["--out", v, "--resume", "--batch-size", "8"],
     "--batch-size 8 differs from the checkpoint's 4", lambda a, v, t: [v]),
    ("vae-device", train_vae.main, lambda a, v, t: ["--out", v, "--device", "cuda"],
     "--device cuda: no CUDA device is available here", lambda a, v, t: [v]),
    ("vae-device-name", train_vae.main, lambda a, v, t: ["--out", v, "--device", "gpu7"],
     "--device 'gpu7' is not a device name", lambda a, v, t: [v]),
    ("vae-lpips-missing", train_vae.main, lambda a, v, t: ["--out", v, "--lpips-weights", t / "vgg.safetensors"],
     "LPIPS: VGG16 weights file not found: {tmp}/vgg.safetensors", lambda a, v, t: [v]),
    ("vae-caption-utf8", train_vae.main,
     lambda a, v, t: ["--out", v, "--data", folder_with(t, caption=b"a \xff red square")] + TINY_VAE,
     "{tmp}/data/0.txt is not UTF-8 text (byte 2", lambda a, v, t: [v]),
    ("vae-metadata-utf8", train_vae.main,
     lambda a, v, t: ["--out", v, "--data", folder_with(t, metadata=b'{"file_name": "0.png", "text": "\xe9"}\n')]
     + TINY_VAE, "{tmp}/data/metadata.jsonl is not UTF-8 text (byte 32", lambda a, v, t: [v]),
    # ---- train_unet
    ("unet-steps-0-in-a-run", train_unet.main, lambda a, v, t: ["--out", a["unet"]] + unet_flags(a, "--steps", "0"),
     "--steps must be positive, got 0", lambda a, v, t: [a["unet"]]),
    ("unet-missing-vae", train_unet.main, lambda a, v, t: ["--out", t / "o", "--vae", t / "novae"],
     "--vae: checkpoint folder not found: {tmp}/novae", lambda a, v, t: [t]),
    ("unet-val-cfg", train_unet.main, lambda a, v, t: ["--out", a["unet"]] + unet_flags(a, "--val-cfg", "-1"),
     "--val-cfg must be >= 0 (1: no guidance), got -1.0", lambda a, v, t: [a["unet"]]),
    ("unet-cfg-drop", train_unet.main, lambda a, v, t: ["--out", a["unet"]] + unet_flags(a, "--cfg-drop", "1.5"),
     "--cfg-drop must lie in [0, 1), got 1.5", lambda a, v, t: [a["unet"]]),
    ("unet-override", train_unet.main,
     lambda a, v, t: ["--out", a["unet"]] + unet_flags(a, "--unet-override", "bogus=1"),
     "--unet-override 'bogus=1': expected KEY=VALUE", lambda a, v, t: [a["unet"]]),
    ("unet-encoder-without-text", train_unet.main,
     lambda a, v, t: ["--out", t / "o", "--text-encoder", a["encoder"], "--vae", a["vae"]],
     "--text-encoder needs --text", lambda a, v, t: [t]),
    ("unet-eval-without-text", train_unet.main, lambda a, v, t: ["--out", t / "o", "--eval", "5", "--vae", a["vae"]],
     "--eval scores prompts; it needs --text", lambda a, v, t: [t]),
    ("unet-resume-changed", train_unet.main, lambda a, v, t: ["--out", a["unet"], "--resume", "--batch-size", "16"],
     "--batch-size 16 differs from the checkpoint's 8", lambda a, v, t: [a["unet"]]),
    ("unet-resume-damaged", train_unet.main, lambda a, v, t: ["--out", damaged_checkpoints(a, t), "--resume"],
     "no whole checkpoint in {tmp}/run/checkpoints", lambda a, v, t: [t]),
    ("unet-device", train_unet.main, lambda a, v, t: ["--out", a["unet"], "--device", "cuda:0"],
     "--device cuda:0: no CUDA device is available here", lambda a, v, t: [a["unet"]]),
    # ---- sample
    ("sample-prompts-utf8", sample.main,
     lambda a, v, t: ["--unet", a["unet"], "--prompts-file", bad_utf8(t / "p.txt"), "--out", t / "g.png"],
     "--prompts-file: {tmp}/p.txt is not UTF-8 text (byte 6", lambda a, v, t: [t, a["unet"]]),
    ("sample-prompts-missing", sample.main, lambda a, v, t: ["--unet", a["unet"], "--prompts-file", t / "none.txt"],
     "--prompts-file: file not found: {tmp}/none.txt", lambda a, v, t: [t]),
    ("sample-device", sample.main, lambda a, v, t: ["--unet", a["unet"], "--device", "cuda", "--out", t / "g.png"],
     "--device cuda: no CUDA device is available here", lambda a, v, t: [t]),
    ("sample-negative-cfg", sample.main, lambda a, v, t: ["--unet", a["unet"], "--cfg", "-2"],
     "--cfg must be >= 0, got -2.0", lambda a, v, t: [t]),
    ("sample-n-0", sample.main, lambda a, v, t: ["--unet", a["unet"], "--n", "0"], "--n must be positive, got 0",
     lambda a, v, t: [t]),
    ("sample-unknown-sampler-in-json", sample.main,
     lambda a, v, t: ["--unet", unet_copy(a, t, sampler="warp"), "--out", t / "g.png"],
     "{tmp}/unet/unet.json: unknown sampler 'warp'", lambda a, v, t: [t]),
    ("sample-mixed-export", sample.main, lambda a, v, t: ["--unet", mixed_pair(a, t), "--out", t / "g.png"],
     "come from two different exports (a write cut short)", lambda a, v, t: [t]),
    ("sample-bad-steps-in-json", sample.main,
     lambda a, v, t: ["--unet", unet_copy(a, t, sample_steps=0), "--out", t / "g.png"],
     "{tmp}/unet/unet.json: sample_steps must be a positive integer, got 0", lambda a, v, t: [t]),
    # ---- eval_text, eval_vae, convert
    ("eval-negative-cfg", eval_text.main, lambda a, v, t: ["--unet", a["unet"], "--cfg", "-1"],
     "--cfg must be >= 0 (1: no guidance), got -1.0", lambda a, v, t: [t]),
    ("eval-unknown-sampler", eval_text.main, lambda a, v, t: ["--unet", a["unet"], "--sampler", "foo:3"],
     "--sampler 'foo:3': unknown sampler 'foo'", lambda a, v, t: [t]),
    ("eval-device", eval_text.main, lambda a, v, t: ["--unet", a["unet"], "--device", "cuda"],
     "--device cuda: no CUDA device is available here", lambda a, v, t: [t]),
    ("eval-vae-missing", eval_vae.main, lambda a, v, t: ["--ckpt", t / "novae"],
     "checkpoint folder not found: {tmp}/novae", lambda a, v, t: [t]),
    ("eval-vae-device", eval_vae.main, lambda a, v, t: ["--ckpt", v, "--device", "cuda"],
     "--device cuda: no CUDA device is available here", lambda a, v, t: [v]),
    ("convert-missing", convert.main, lambda a, v, t: ["from-diffusers", t / "nosd", "--out", t / "o"],
     "diffusers folder not found: {tmp}/nosd", lambda a, v, t: [t]),
    ("convert-not-ours", convert.main, lambda a, v, t: ["to-diffusers", v, "--out", t / "o"],
     "unet config not found: {vae}/unet.json", lambda a, v, t: [t, v]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(case, assets, vae_run, tmp_path, capsys):
    _, main, argv, message, watched = case
    args = [str(x) for x in argv(assets, vae_run, tmp_path)]
    folders = watched(assets, vae_run, tmp_path)
    before = snapshot(*folders)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    want = message.format(tmp=tmp_path, vae=vae_run, unet=assets["unet"])
    assert want in lines[0], err
    assert snapshot(*folders) == before, "a bad input changed the files it was pointed at"


def test_the_catalogue_is_large_and_covers_every_command():
    assert len(CASES) >= 30
    assert {c[1] for c in CASES} == {train_vae.main, train_unet.main, sample.main, eval_text.main, eval_vae.main,
                                     convert.main}


# ---- the library's own bad inputs: an exception naming the shape, dtype or value
def test_ddim_eta_above_one_is_refused():
    from ldm.diffusion import Denoiser, NoiseSchedule
    from ldm.samplers import get_sigmas, sample_ddim

    denoiser = Denoiser(lambda x, t, **kw: torch.zeros_like(x), NoiseSchedule.from_name("linear"), "eps")
    sigmas = get_sigmas(NoiseSchedule.from_name("linear"), 4)
    with pytest.raises(ValueError, match=r"sample_ddim: eta must lie in \[0, 1\], got 1.5"):
        sample_ddim(denoiser, torch.randn(2, 3, 4, 4), sigmas, eta=1.5)


def test_a_16_bit_png_keeps_its_greys(tmp_path):
    """mode I;16 read as RGB clipped every value over 255 to white."""
    from ldm.data.folder import FolderDataset

    root = tmp_path / "data"
    root.mkdir()
    ramp = (torch.arange(RESOLUTION * RESOLUTION).reshape(RESOLUTION, RESOLUTION) * 257 * 255
            // (RESOLUTION * RESOLUTION - 1)).numpy().astype("uint16")  # 0 .. 65535
    Image.fromarray(ramp).save(root / "ramp.png")  # uint16: mode I;16
    with Image.open(root / "ramp.png") as img:
        assert img.mode.startswith("I")  # what Pillow gives back for a 16-bit grey PNG
    item = FolderDataset(root, RESOLUTION)[0]["image"]  # (3, R, R) in [-1, 1]
    expect = torch.from_numpy(ramp.astype("float64")) / 65535 * 2 - 1  # the same greys, in [-1, 1]
    assert item.min() < -0.95 and item.max() > 0.95 and 0.2 < (item > 0).float().mean() < 0.8
    assert (item[0].double() - expect).abs().max() < 4 / 255  # a Lanczos resize of a same-size image


def test_a_truncated_jpeg_is_dropped_with_its_caption(tmp_path):
    """It passed the header check before and decoding failed later, when the next image stood in for
    it under its own caption; now the scan decodes it, drops the pair and names it once."""
    from ldm.data.folder import FolderDataset

    root = tmp_path / "data"
    root.mkdir()
    colours = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200)}
    for name, rgb in colours.items():
        Image.new("RGB", (64, 64), rgb).save(root / f"{name}.jpg", quality=95)
        (root / f"{name}.txt").write_text(f"a {name} square")
    whole = (root / "b.jpg").read_bytes()
    (root / "b.jpg").write_bytes(whole[: len(whole) // 2])  # cut in the middle of the scan data
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): b.jpg"):
        data = FolderDataset(root, RESOLUTION)
    assert [p.name for p in data.files] == ["a.jpg", "c.jpg"] and data.captions == ["a a square", "a c square"]
    for i, name in enumerate(("a", "c")):  # every caption with its own image
        item = data[i]
        assert item["text"] == f"a {name} square"
        mean = (item["image"].mean(dim=(1, 2)) + 1) * 127.5  # (3,) in 0..255
        assert torch.allclose(mean, torch.tensor(colours[name], dtype=torch.float32), atol=4)
    assert data.describe()["skipped"] == 1


def test_a_new_run_keeps_every_earlier_run(vae_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(vae_run, out)
    for _ in range(2):
        assert train_vae.main(["--out", str(out)] + TINY_VAE) == 0
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoints"))
    assert names == ["checkpoints", "checkpoints.previous", "checkpoints.previous.2"]
    assert snapshot(out / "checkpoints.previous") != {}


def test_a_non_finite_loss_between_log_steps_is_never_saved(assets, tmp_path, monkeypatch, capsys):
    import ldm.unet_training as training

    real, calls = training.diffusion_loss, {"n": 0}

    def nan_at_step_2(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(training, "diffusion_loss", nan_at_step_2)
    out = tmp_path / "run"
    flags = unet_flags(assets, "--log-every", "100", "--ckpt-every", "3", "--steps", "6")
    assert train_unet.main(["--out", str(out)] + [str(x) for x in flags]) == 2
    err = capsys.readouterr().err
    assert "train_unet: error: the loss became non-finite by step 3" in err and "Traceback" not in err
    assert not list(out.glob("checkpoints/step_*")) and not (out / "unet.safetensors").exists()


# ---- the kernels: a ValueError naming the shape, dtype or value, the same from every backend
KERNEL_BACKENDS = ["torch", "triton"]  # the tests run Triton through its interpreter


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_attention_head_dim_0_is_named(backend):
    import kernels

    q = torch.randn(1, 4, 2, 0)
    with pytest.raises(ValueError, match=r"attention: head dim of q \(1x4x2x0\) is 0"):
        kernels.attention(q, q, q, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_group_norm_eps_must_be_finite_and_not_negative(backend, eps):
    import kernels

    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"group_norm: eps must be a finite number >= 0, got"):
        kernels.group_norm(x, 4, torch.ones(8), torch.zeros(8), eps=eps, backend=backend)


def test_group_norm_parameters_of_another_dtype_agree_across_backends(seed):
    """fp16 weight and bias with an fp32 input: Triton took it, PyTorch's path refused it; both take it
    now, compute in fp32 and return x's dtype, and agree with a float64 reference."""
    import kernels

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 5, 3, generator=g)
    w, b = (torch.randn(8, generator=g) * 0.5 + 1).half(), (torch.randn(8, generator=g) * 0.1).half()
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x.double(), 4, w.double(), b.double(), 1e-5))
    for backend in KERNEL_BACKENDS:
        y = kernels.group_norm(x, 4, w, b, eps=1e-5, silu=True, backend=backend)
        assert y.dtype == torch.float32, backend
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5, msg=backend)
