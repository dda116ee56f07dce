"""`python -m ldm.sample`: grids from a tiny checkpoint, determinism, guidance, image-to-image, and
every bad input as one line naming the file."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import SESSION_SEED
from PIL import Image
from t2i_helpers import RESOLUTION, VAE_CONFIG, make_text_encoder, make_vae, shared_assets

from autoencoder import VAEConfig
from ldm import sample
from ldm.pretrained import load_unet
from ldm.checkpoint import save_json, save_tensors
from ldm.data import ShapesDataset
from ldm.pipeline import generate, load_pipeline, sampling_sigmas
from ldm.samplers import SIGMA_CAP, get_sigmas

PROMPTS = ["a large red circle in the center on a black background",
           "small blue square, in the top left, white background"]
SCALE = sample.GRID_SIDE // RESOLUTION  # the grid's upscaling


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The shared run's export with every layer given random weights (a freshly trained tiny UNet is
    nearly the identity: its zero-initialised output layers have barely moved)."""
    assets = shared_assets(tmp_path_factory, SESSION_SEED % 1000)
    folder = tmp_path_factory.mktemp("sample") / "unet"
    shutil.copytree(assets["unet"], folder, ignore=shutil.ignore_patterns("checkpoints*", "cache", "val"))
    unet, _ = load_unet(folder)
    torch.manual_seed(SESSION_SEED)
    for m in unet.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    save_tensors(unet.state_dict(), folder / "unet.safetensors")
    return {**assets, "unet": folder}


@pytest.fixture(scope="module")
def pipe(ckpt):
    return load_pipeline(ckpt["unet"])


def cli(argv, capsys) -> tuple[int, str]:
    rc = sample.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------- grids and determinism
def test_grid_has_a_row_per_prompt_and_the_same_seed_gives_the_same_images(ckpt, tmp_path, seed, capsys):
    argv = ["--unet", ckpt["unet"], "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--n", "3", "--steps", "3",
            "--seed", seed, "--images", tmp_path / "each"]
    rc, err = cli(argv + ["--out", tmp_path / "a.png"], capsys)
    assert rc == 0, err
    grid = Image.open(tmp_path / "a.png")
    assert grid.size == (SCALE * (3 * (RESOLUTION + 2) + 2), SCALE * (2 * (RESOLUTION + 2) + 2))
    files = sorted(p.name for p in (tmp_path / "each").iterdir())
    assert len(files) == 6 and files[0].startswith("0000_a_large_red_circle") and files[3].startswith("0003_small_blue")
    assert all(Image.open(tmp_path / "each" / f).size == (RESOLUTION, RESOLUTION) for f in files)
    assert f"row 0: {PROMPTS[0]}" in err and str(tmp_path / "a.png") in err
    assert cli(argv + ["--out", tmp_path / "b.png"], capsys)[0] == 0
    assert cli(argv[:-4] + ["--seed", seed + 1, "--out", tmp_path / "c.png"], capsys)[0] == 0
    a, b, c = (torch.from_numpy(np.array(Image.open(tmp_path / f))) for f in ("a.png", "b.png", "c.png"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_image_k_depends_on_its_prompt_and_seed_plus_k_only(pipe, seed):
    images = generate(pipe, PROMPTS, n=2, steps=4, seed=seed, batch_size=1)
    assert images.shape == (4, 3, RESOLUTION, RESOLUTION) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    torch.testing.assert_close(generate(pipe, PROMPTS, n=2, steps=4, seed=seed, batch_size=4), images,
                               atol=1e-5, rtol=1e-5)
    # image 2 is the second prompt's first: alone, it starts from seed + 2
    torch.testing.assert_close(generate(pipe, PROMPTS[1:], n=1, steps=4, seed=seed + 2), images[2:3],
                               atol=1e-5, rtol=1e-5)
    assert (images[0] - images[1]).abs().max() > 1e-3  # another seed, another image


def test_guidance_contrasts_the_prompt_with_the_empty_prompt(pipe, seed):
    # at scale 0 only the unconditional half counts: that is the empty prompt sampled without guidance
    uncond = generate(pipe, PROMPTS[:1], n=2, steps=3, cfg=0.0, seed=seed)
    torch.testing.assert_close(uncond, generate(pipe, [""], n=2, steps=3, cfg=1.0, seed=seed), atol=1e-5, rtol=1e-5)
    plain = generate(pipe, PROMPTS[:1], n=2, steps=3, cfg=1.0, seed=seed)
    guided = generate(pipe, PROMPTS[:1], n=2, steps=3, cfg=4.0, seed=seed)
    assert (plain - uncond).abs().max() > 1e-4 and (guided - plain).abs().max() > 1e-4


def test_default_prompts_sampler_and_guidance_come_from_unet_json(ckpt, tmp_path, capsys):
    rc, err = cli(["--unet", ckpt["unet"], "--n", "1", "--out", tmp_path / "g.png"], capsys)
    assert rc == 0, err
    meta = json.loads((ckpt["unet"] / "unet.json").read_text())
    for i, p in enumerate(meta["val_prompts"]):
        assert f"row {i}: {p}" in err
    assert f"({meta['sampler']}, {meta['sample_steps']} steps, cfg {meta['cfg_scale']}" in err
    assert Image.open(tmp_path / "g.png").size[1] == SCALE * (len(meta["val_prompts"]) * (RESOLUTION + 2) + 2)


def test_prompts_file_and_other_samplers(ckpt, tmp_path, capsys):
    (tmp_path / "p.txt").write_text(f"\n{PROMPTS[0]}\n\n  {PROMPTS[1]}  \n")
    for sampler in ("ddpm", "ddim", "euler"):
        rc, err = cli(["--unet", ckpt["unet"], "--prompts-file", tmp_path / "p.txt", "--n", "1", "--steps", "2",
                       "--sampler", sampler, "--out", tmp_path / f"{sampler}.png"], capsys)
        assert rc == 0, err
        assert f"row 1: {PROMPTS[1]}" in err and f"({sampler}, 2 steps" in err


def test_sigmas_follow_the_sampler_and_strength(pipe):
    s = pipe.schedule
    karras, uniform = sampling_sigmas(s, 10, "dpmpp_2m"), sampling_sigmas(s, 10, "ddpm")
    torch.testing.assert_close(karras, get_sigmas(s, 10, karras=True, sigma_cap=SIGMA_CAP))
    torch.testing.assert_close(uniform, get_sigmas(s, 10, karras=False))
    for sampler in ("euler", "ddim"):
        torch.testing.assert_close(sampling_sigmas(s, 10, sampler, "uniform"), uniform)
        torch.testing.assert_close(sampling_sigmas(s, 10, sampler, "karras"), karras)
    img2img = sampling_sigmas(s, 10, "dpmpp_2m", strength=0.3)
    torch.testing.assert_close(img2img, karras[7:])
    assert len(sampling_sigmas(s, 10, "dpmpp_2m", strength=0.01)) == 2  # at least one step


# ---------------------------------------------------------------- image-to-image
CANDIDATES = 8  # scenes to pick the second image of the image-to-image test from


def test_image_to_image_keeps_the_image_at_low_strength_and_ignores_it_at_full(ckpt, pipe, seed, tmp_path, capsys):
    data = ShapesDataset(RESOLUTION, split="eval", seed=seed)
    images = torch.stack([data[i]["image"] for i in range(CANDIDATES)])  # (CANDIDATES, 3, H, W)
    recons = pipe.decode_latents(pipe.encode_images(images))  # (CANDIDATES, 3, H, W)
    # The test VAE is barely trained, so two scenes can decode almost alike (0.004 apart for one seed):
    # b is the scene whose reconstruction lies farthest from a's, the scale "close to a" is measured on.
    apart = (recons[1:] - recons[:1]).abs().flatten(1).mean(1)  # (CANDIDATES - 1,)
    between, j = apart.max(0)
    a, b, recon_a = images[0], images[1 + int(j)], recons[:1]

    def img2img(init, strength, s=seed):
        return generate(pipe, PROMPTS[:1], steps=20, seed=s, init_image=init, strength=strength)

    assert (img2img(a, 0.05) - recon_a).abs().mean() < 0.1 * between  # one step at the lowest noise
    full_a, full_b, other_seed = img2img(a, 1.0), img2img(b, 1.0), img2img(a, 1.0, seed + 1)
    assert (full_a - full_b).abs().mean() < 0.01 * (full_a - other_seed).abs().mean()
    half = img2img(a, 0.5)
    assert (half - recon_a).abs().mean() > (img2img(a, 0.05) - recon_a).abs().mean()
    # the CLI reads, resizes and crops the file
    image = Image.fromarray(((a.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    image.resize((40, 32)).save(tmp_path / "i.png")
    rc, err = cli(["--unet", ckpt["unet"], "--prompt", PROMPTS[0], "--n", "2", "--init-image", tmp_path / "i.png",
                   "--strength", "0.3", "--out", tmp_path / "o.png"], capsys)
    assert rc == 0, err
    assert Image.open(tmp_path / "o.png").size == (SCALE * (2 * (RESOLUTION + 2) + 2), SCALE * (RESOLUTION + 4))


# ---------------------------------------------------------------- bad input
def _copy_unet(ckpt, tmp, drop=None):
    folder = tmp / "unet"
    shutil.copytree(ckpt["unet"], folder)
    if drop:
        (folder / drop).unlink()
    return folder


def _not_ours(ckpt, tmp):
    folder = tmp / "unet"
    folder.mkdir()
    shutil.copy(ckpt["vae"] / "vae.json", folder / "unet.json")
    shutil.copy(ckpt["vae"] / "vae.safetensors", folder / "unet.safetensors")
    return folder


def _moved_vae(ckpt, tmp):
    folder = _copy_unet(ckpt, tmp)
    meta = json.loads((folder / "unet.json").read_text())
    save_json({**meta, "vae": str(tmp / "gone")}, folder / "unet.json")
    return folder


BAD = {  # name: (argv built from (ckpt, tmp), message)
    "missing-folder": (lambda c, t: ["--unet", t / "nowhere"], "checkpoint folder not found: {tmp}/nowhere"),
    "missing-json": (lambda c, t: ["--unet", _copy_unet(c, t, "unet.json")],
                     "unet config not found: {tmp}/unet/unet.json"),
    "missing-weights": (lambda c, t: ["--unet", _copy_unet(c, t, "unet.safetensors")],
                        "unet weights not found: {tmp}/unet/unet.safetensors"),
    "not-ours": (lambda c, t: ["--unet", _not_ours(c, t)],
                 "{tmp}/unet/unet.json is not a UNet exported by ldm.train_unet (no prediction, schedule"),
    "moved-vae": (lambda c, t: ["--unet", _moved_vae(c, t)],
                  "checkpoint folder not found: {tmp}/gone (the VAE for {tmp}/unet/unet.json; pass --vae DIR"),
    "vae-channels": (lambda c, t: ["--unet", c["unet"], "--vae",
                                   make_vae(t / "vae3", 0, VAEConfig(**{**VAE_CONFIG.__dict__, "latent_channels": 3}))],
                     "{tmp}/vae3/vae.json has 3 latent channels but {unet}/unet.json takes in_channels=4"),
    "encoder-width": (lambda c, t: ["--unet", c["unet"], "--text-encoder", make_text_encoder(t / "enc8", width=8)],
                      "text encoder {tmp}/enc8 gives 8-wide tokens but {unet}/unet.json expects context_dim 16"),
    "missing-init": (lambda c, t: ["--unet", c["unet"], "--init-image", t / "no.png"], "--init-image: file not found"),
    "unreadable-init": (lambda c, t: ["--unet", c["unet"], "--init-image", _text_file(t / "fake.png")],
                        "--init-image: {tmp}/fake.png is not a readable image"),
    "strength-zero": (lambda c, t: ["--unet", c["unet"], "--init-image", _text_file(t / "x.png"), "--strength", "0"],
                      "--strength must lie in (0, 1], got 0.0"),
    "strength-big": (lambda c, t: ["--unet", c["unet"], "--init-image", _text_file(t / "x.png"), "--strength", "1.5"],
                     "--strength must lie in (0, 1], got 1.5"),
    "strength-alone": (lambda c, t: ["--unet", c["unet"], "--strength", "0.5"], "--strength needs --init-image"),
    "empty-prompts-file": (lambda c, t: ["--unet", c["unet"], "--prompts-file", _text_file(t / "p.txt", "\n  \n")],
                           "--prompts-file {tmp}/p.txt holds no prompts"),
    "missing-prompts-file": (lambda c, t: ["--unet", c["unet"], "--prompts-file", t / "none.txt"],
                             "--prompts-file: file not found: {tmp}/none.txt"),
    "zero-n": (lambda c, t: ["--unet", c["unet"], "--n", "0"], "--n must be positive, got 0"),
}


def _text_file(path, text="not an image"):
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_naming_the_file(ckpt, tmp_path, capsys, name):
    build, message = BAD[name]
    rc, err = cli(build(ckpt, tmp_path) + ["--out", tmp_path / "g.png"], capsys)
    assert rc == 2, err
    assert message.format(tmp=tmp_path, unet=ckpt["unet"]) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g.png").exists()


def test_another_vae_with_the_right_shape_warns(ckpt, tmp_path):
    with pytest.warns(UserWarning, match="is not the VAE .* was trained with"):
        load_pipeline(ckpt["unet"], make_vae(tmp_path / "other", SESSION_SEED + 1))
