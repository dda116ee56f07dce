"""`python -m ldm.train_vae` and `python -m ldm.eval_vae`: training, outputs, resume, the scale factor, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import SESSION_SEED
from PIL import Image
from safetensors.torch import load_file

from autoencoder import VAE_CONFIGS

import ldm.train_vae as train_vae
import ldm.vae_training as vae_training
from ldm import eval_vae
from ldm.checkpoint import save_json
from ldm.data import ShapesDataset
from ldm.metrics import psnr, ssim
from ldm.pretrained import load_vae

# a run small enough for seconds on two cores: 16 x 16 shapes, 4 latent pixels a side
SMALL = ["--resolution", "16", "--batch-size", "8", "--threads", "1", "--quiet", "--log-every", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run shared by the tests that read its outputs (32 x 32: at 16 x 16 the first
    hundred steps are all plateau). 200 steps: over 16 seeds the last-ten / first-ten L1 ratio
    spread 0.33-0.70 after 100 steps but 0.15-0.54 after 200."""
    out = tmp_path_factory.mktemp("vae")
    seed = SESSION_SEED % 1000
    print(f"training seed {seed}")
    rc = train_vae.main(["--out", str(out), "--steps", "200", "--disc-start", "190", "--sample-every", "100",
                         "--ckpt-every", "100", "--lr", "2e-3", "--seed", str(seed)] + SMALL + ["--resolution", "32"])
    assert rc == 0
    return out


def test_short_training_lowers_the_loss_and_writes_every_output(trained):
    rows = [json.loads(line) for line in open(trained / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 201))
    first, last = np.mean([r["l1"] for r in rows[:10]]), np.mean([r["l1"] for r in rows[-10:]])
    assert last < 0.6 * first, (first, last)
    assert all("d_loss" in r for r in rows if r["step"] > 190) and not any("d_loss" in r for r in rows[:189])
    assert all(k in rows[-1] for k in ("loss", "kl", "psnr", "images_per_s", "lr"))
    meta = json.loads((trained / "vae.json").read_text())
    assert meta["resolution"] == 32 and meta["downsample_factor"] == 4
    assert meta["latent_shape"] == [VAE_CONFIGS["tiny"].latent_channels, 8, 8]
    assert meta["dataset"]["name"] == "shapes" and meta["steps"] == 200
    assert meta["latent_scale_factor"] > 0 and np.isfinite(meta["eval"]["psnr"])
    assert set(load_file(trained / "vae.safetensors")) == set(load_vae(trained)[0].state_dict())
    grids = sorted(p.name for p in (trained / "recon").glob("*.png"))
    assert grids == ["step_0000100.png", "step_0000200.png"]
    assert Image.open(trained / "recon" / grids[-1]).size[0] > 8 * 32
    assert Image.open(trained / "loss.png").format == "PNG"
    ckpt = trained / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000200"
    assert {p.name for p in (ckpt / "step_0000200").iterdir()} == {
        "checkpoint.json", "vae.safetensors", "discriminator.safetensors", "opt_vae.safetensors",
        "opt_disc.safetensors", "rng.safetensors", "run.safetensors"}


def test_scale_factor_is_stored_and_makes_unit_variance_latents(trained):
    vae, meta = load_vae(trained)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    data = ShapesDataset(32, seed=meta["dataset"]["seed"])
    x = torch.stack([data[i]["image"] for i in range(vae_training.SCALE_SAMPLE)])
    with torch.no_grad():
        z = vae.encode(x).sample()  # another draw of the posterior noise than train_vae's
    assert abs(z.std().item() * meta["latent_scale_factor"] - 1.0) < 0.05
    assert abs(z.mean().item() - meta["latent_mean"]) < 0.05 * z.std().item()


def test_load_vae_errors_name_the_file(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vae(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    meta = json.loads((trained / "vae.json").read_text())
    del meta["latent_scale_factor"]
    save_json(meta, tmp_path / "half" / "vae.json")
    with pytest.raises(FileNotFoundError, match="vae.safetensors"):
        load_vae(tmp_path / "half")
    (tmp_path / "half" / "vae.safetensors").write_bytes((trained / "vae.safetensors").read_bytes())
    with pytest.raises(ValueError, match="latent_scale_factor"):
        load_vae(tmp_path / "half")


def test_eval_vae_reports_psnr_and_ssim(trained, capsys):
    assert eval_vae.main(["--ckpt", str(trained), "--n", "24", "--batch-size", "10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    vae, meta = load_vae(trained)
    held = ShapesDataset(32, split="eval")
    x = torch.stack([held[i]["image"] for i in range(24)])
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    assert result["images"] == 24
    assert result["psnr"] == pytest.approx(psnr(recon, x).mean().item(), abs=1e-4)
    assert result["ssim"] == pytest.approx(ssim(recon, x).mean().item(), abs=1e-4)
    assert eval_vae.main(["--ckpt", str(trained), "--n", "4"]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert eval_vae.main(["--ckpt", str(trained / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


# ---------------------------------------------------------------- metrics
def test_psnr_value():
    x = torch.zeros(2, 3, 8, 8)
    assert psnr(x + 0.1, x).tolist() == pytest.approx([20 * np.log10(1 / 0.05)] * 2, abs=1e-4)


def test_ssim_matches_a_direct_implementation(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 14, 13, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    # Wang et al. 2004 written out: every 11 x 11 window, Gaussian weights, per channel, then the mean
    t = torch.arange(11, dtype=torch.float64) - 5
    w = torch.exp(-t ** 2 / (2 * 1.5 ** 2))
    w = torch.outer(w, w) / torch.outer(w, w).sum()
    a, b = (x.double() + 1) / 2, (y.double() + 1) / 2
    vals = []
    for n in range(2):
        per_image = []
        for c in range(3):
            for i in range(14 - 10):
                for j in range(13 - 10):
                    pa, pb = a[n, c, i:i + 11, j:j + 11], b[n, c, i:i + 11, j:j + 11]
                    ma, mb = (w * pa).sum(), (w * pb).sum()
                    va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                    cov = (w * (pa - ma) * (pb - mb)).sum()
                    per_image.append(((2 * ma * mb + 1e-4) * (2 * cov + 9e-4))
                                     / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4)))
        vals.append(torch.stack(per_image).mean())
    assert torch.allclose(ssim(y, x).double(), torch.stack(vals), atol=1e-6)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    noisier = (x + 0.6 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert (ssim(noisier, x) < ssim(y, x)).all()


# ---------------------------------------------------------------- resume
def _weights(folder):
    return load_file(folder / "vae.safetensors")


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst == 0.0, f"resumed weights differ from the uninterrupted run by up to {worst}"


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, seed, monkeypatch):
    args = ["--steps", "6", "--disc-start", "2", "--ckpt-every", "100", "--seed", str(seed)] + SMALL
    assert train_vae.main(["--out", str(tmp_path / "whole")] + args) == 0
    calls = {"n": 0}
    real_psnr = vae_training.psnr

    def interrupt_at_step_4(*a):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_psnr(*a)

    monkeypatch.setattr(vae_training, "psnr", interrupt_at_step_4)
    assert train_vae.main(["--out", str(tmp_path / "cut")] + args) == 130
    monkeypatch.setattr(vae_training, "psnr", real_psnr)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert not (tmp_path / "cut" / "vae.safetensors").exists()
    assert train_vae.main(["--out", str(tmp_path / "cut"), "--resume", "--threads", "1", "--quiet",
                           "--log-every", "1"]) == 0
    _assert_same_weights(tmp_path / "whole", tmp_path / "cut")
    steps = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 5, 6]  # step 4 was cut before its row was written; none is repeated


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_equals_an_uninterrupted_run(tmp_path, seed):
    """SIGKILL leaves no chance to clean up: the run resumes from its last whole checkpoint."""
    common = ["--disc-start", "3", "--ckpt-every", "2", "--schedule", "constant", "--seed", str(seed)] + SMALL
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "ldm.train_vae", "--out", str(tmp_path / "killed"),
                             "--steps", "100000"] + common, env=env, stderr=subprocess.PIPE)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not (latest.exists() and latest.read_text().strip() >= "step_0000004") and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = int(latest.read_text().strip().split("_")[1])
    assert step >= 4
    total = str(step + 3)
    assert train_vae.main(["--out", str(tmp_path / "killed"), "--resume", "--steps", total, "--threads", "1",
                           "--quiet"]) == 0
    assert train_vae.main(["--out", str(tmp_path / "whole"), "--steps", total] + common) == 0
    _assert_same_weights(tmp_path / "whole", tmp_path / "killed")


# ---------------------------------------------------------------- folders and errors
def test_training_on_an_image_folder(tmp_path, seed):
    rng = np.random.default_rng(seed)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"picture {i}")
    out = tmp_path / "out"
    assert train_vae.main(["--out", str(out), "--data", str(data), "--steps", "2", "--ckpt-every", "1"] + SMALL) == 0
    meta = json.loads((out / "vae.json").read_text())
    assert meta["dataset"]["name"] == "folder" and meta["dataset"]["images"] == 6
    assert meta["eval"]["images"] == 6


@pytest.mark.parametrize("argv, message", [
    (["--data", "{tmp}/no_such_dir"], "--data: folder not found: {tmp}/no_such_dir"),
    (["--resolution", "30"], "--resolution 30 is not divisible by the downsampling factor 4"),
    (["--preset", "sd", "--resolution", "36"], "--resolution 36 is not divisible by the downsampling factor 8"),
    (["--resume"], "--resume: no checkpoint in {tmp}/out/checkpoints"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--lpips-weights", "{tmp}/vgg.pth"], "VGG16 weights file not found: {tmp}/vgg.pth"),
], ids=["missing-data", "bad-resolution", "bad-resolution-sd", "resume-without-checkpoint", "zero-batch",
        "missing-lpips"])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert train_vae.main(["--out", str(tmp_path / "out"), "--steps", "1", "--quiet"] + argv) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err
    assert "Traceback" not in err


def test_resume_refuses_a_different_run_flag(trained, tmp_path, capsys):
    out = tmp_path / "copy"
    out.mkdir()
    (out / "checkpoints").symlink_to(trained / "checkpoints")
    assert train_vae.main(["--out", str(out), "--resume", "--resolution", "16", "--quiet"]) == 2
    assert "--resolution 16 differs from the checkpoint's 32" in capsys.readouterr().err


def test_help_explains_every_flag():
    text = train_vae.build_parser().format_help()
    for flag in ("--data", "--resolution", "--preset", "--steps", "--batch-size", "--lr", "--out", "--resume",
                 "--seed", "--disc-start", "--kl-weight", "--ckpt-every", "--sample-every", "--device"):
        assert flag in text
    assert "{tiny,small,f4,sd}" in text
