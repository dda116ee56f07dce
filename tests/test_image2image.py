"""Image-conditioned diffusion (ldm.image2image): the masks, the conditioning of every task, the UNet's
extra input channels, training with --task, sampling and its command-line errors."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ldm.sample as sample_cmd
import ldm.train_unet as train_unet
from ldm import Pipeline
from ldm import image2image as i2i
from ldm.data.shapes import ShapesDataset, render, shape_coverage, scene_box
from ldm.diffusion import NoiseSchedule
from ldm.pretrained import load_vae
from ldm.unet import UNet, unet_config
from t2i_helpers import RESOLUTION, shared_assets, train_flags
from conftest import SESSION_SEED


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory, SESSION_SEED % 1000)


def _train(assets, tmp_path_factory, task: str):
    out = tmp_path_factory.mktemp(task)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train_unet.main(["--out", str(out), "--text", "--text-encoder", str(assets["encoder"]), "--task", task,
                              "--cache-dir", str(assets["cache"])]
                             + train_flags(assets["vae"], 4, SESSION_SEED % 1000))
    assert rc == 0, err.getvalue()
    return out


@pytest.fixture(scope="module")
def palette(assets, tmp_path_factory):
    return _train(assets, tmp_path_factory, "palette")


@pytest.fixture(scope="module")
def colorize(assets, tmp_path_factory):
    return _train(assets, tmp_path_factory, "colorize")


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("res", [16, 32, 37])  # 37: odd, the halves differ by a column
def test_masks_have_the_promised_geometry(seed, res):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        box = i2i.box_mask(rng, res)
        ys, xs = np.nonzero(box)
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert box.sum() == h * w  # one solid rectangle
        lo, hi = (np.array(i2i.BOX_SIDE) * res).round()
        assert lo - 1 <= h <= hi + 1 and lo - 1 <= w <= hi + 1
        strokes = i2i.stroke_mask(rng, res)
        assert set(np.unique(strokes)) <= {0.0, 1.0} and 0 < strokes.sum() < res * res
    for side, region in (("left", np.s_[:, : res // 2]), ("right", np.s_[:, res // 2:]),
                         ("top", np.s_[: res // 2]), ("bottom", np.s_[res // 2:])):
        m = i2i.half_mask(rng, res, side)
        assert m[region].all() and m.sum() == m[region].size


def test_a_stroke_covers_the_segment_it_is_drawn_along(seed):
    """A single straight stroke: every pixel within its radius of the segment is in, none beyond."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    # the same maths by brute force over points along the segment, in float64
    (x0, y0), (x1, y1), r = rng.uniform(4, 28, 2), rng.uniform(4, 28, 2), 3.0
    s = np.linspace(0, 1, 2001)
    d = np.min((xx[..., None] - (x0 + s * (x1 - x0))) ** 2 + (yy[..., None] - (y0 + s * (y1 - y0))) ** 2, -1)
    m = d <= r**2

    class Fixed:  # a generator that draws this stroke
        def integers(self, lo, hi=None):
            return 1 if hi == i2i.STROKES[1] + 1 else 2

        def uniform(self, lo, hi=None, size=None):
            if size is not None:
                return np.array([[x0, y0], [x1, y1]])
            return 2 * r / 32

    got = i2i.stroke_mask(Fixed(), 32).astype(bool)
    near = np.abs(np.sqrt(d) - r) < 0.01  # pixels on the rim may fall either way by rounding
    assert (got == m)[~near].all() and m.any()


def test_the_object_mask_holds_the_whole_shape(seed):
    ds = ShapesDataset(32, seed=seed % 1000, split="eval")
    for i in range(30):
        attrs = ds.attributes(i)
        cover = shape_coverage(attrs["shape"], *scene_box(attrs), 32)
        m = i2i.object_mask(attrs, 32)
        assert (cover[m == 0] == 0).all()  # nothing of the shape outside
        assert m.sum() < 32 * 32 * 0.5  # yet it is a box around the shape, not the image


# --------------------------------------------------------------------------------------- conditioning
def test_sources_of_each_task(seed):
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    mask = (torch.rand(3, 1, 16, 16) > 0.5).float()
    src, m = i2i.source("inpaint", images, mask)
    assert torch.equal(src[mask.expand_as(src) == 1], torch.zeros(int(mask.sum()) * 3))  # SD: masked -> 0
    assert torch.equal(src[mask.expand_as(src) == 0], images[mask.expand_as(src) == 0]) and torch.equal(m, mask)
    grey, m = i2i.source("colorize", images)
    want = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).double()
    for c in range(3):
        assert torch.allclose(grey[:, c].double(), want, atol=1e-6)
    assert torch.equal(m, torch.ones(3, 1, 16, 16))
    low = i2i.downsample(images, 4)  # (3, 3, 4, 4) block means
    assert torch.allclose(low[:, :, 1, 2].double(), images[:, :, 4:8, 8:12].double().mean((-1, -2)), atol=1e-6)
    up, _ = i2i.source("sr", low, resolution=16)
    assert up.shape == (3, 3, 16, 16) and up.abs().max() <= 1
    with pytest.raises(ValueError, match="mask is 8 x 8 but the image 16 x 16"):
        i2i.source("inpaint", images, mask[..., :8, :8])


def test_condition_layout_and_noise_augmentation(assets, seed):
    vae, _ = load_vae(assets["vae"], "cpu")
    schedule = NoiseSchedule.from_name("linear")
    src = torch.rand(4, 3, RESOLUTION, RESOLUTION) * 2 - 1
    mask = torch.zeros(4, 1, RESOLUTION, RESOLUTION)
    mask[:, :, 5, 9] = 1  # one pixel: its latent cell (f = 4) is masked, no other
    level = torch.tensor([0, 0, 100, 249])
    noise = torch.randn(4, *vae.latent_shape())
    with torch.no_grad():
        cond = i2i.build_condition(vae, src, mask, level, schedule, noise)
        z = vae.encode_latents(src).double()
    C, h, w = vae.latent_shape()
    assert cond.shape == (4, 1 + C, h, w)
    want_mask = torch.zeros(4, 1, h, w)
    want_mask[:, :, 1, 2] = 1
    assert torch.equal(cond[:, :1], want_mask)
    assert torch.allclose(cond[:2, 1:].double(), z[:2], atol=1e-6)  # level 0: the clean latents
    abar = schedule.alphas_cumprod[level[2:]].view(-1, 1, 1, 1)  # float64
    want = abar.sqrt() * z[2:] + (1 - abar).sqrt() * noise[2:].double()
    assert torch.allclose(cond[2:, 1:].double(), want, atol=1e-5)


def test_training_inputs_cover_every_task_of_palette(seed):
    rng = np.random.default_rng(seed)
    ds = ShapesDataset(16, seed=seed % 1000)
    images = torch.stack([ds[i]["image"] for i in range(64)])
    attrs = [ds.attributes(i) for i in range(64)]
    src, mask, level = i2i.training_inputs("palette", images, rng, attrs)
    assert src.shape == images.shape and mask.shape == (64, 1, 16, 16) and level.shape == (64,)
    full = mask.flatten(1).all(1)  # colorize and sr draw everywhere
    grey = (src[:, 0] == src[:, 1]).flatten(1).all(1) & (src[:, 1] == src[:, 2]).flatten(1).all(1)
    half = mask.flatten(1).mean(1) == 0.5
    assert grey.any() and (full & ~grey).any() and (~full).any() and half.any()
    assert (level[~full] == 0).all() and (level[grey & full] == 0).all()
    assert ((0 <= level) & (level < i2i.AUG_LEVELS)).all() and (level > 0).any()


# ---------------------------------------------------------------------------------------------- UNet
def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def test_cond_channels_are_conv_in_inputs_after_the_latents(seed):
    """A UNet with cond_channels 5 is, to float64 precision, a plain UNet of in_channels 9 fed the
    concatenation: SD's inpainting layout, the latents first."""
    base = dict(model_channels=16, norm_groups=8, num_heads=2, context_dim=8, out_channels=4)
    cond_net = UNet(unet_config("tiny", in_channels=4, cond_channels=5, **base)).double()
    plain = UNet(unet_config("tiny", in_channels=9, **base)).double()
    _randomise(cond_net, seed)
    plain.load_state_dict(cond_net.state_dict())
    x, c = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 5, 8, 8, dtype=torch.float64)
    t, ctx = torch.tensor([3.0, 700.0], dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    got = cond_net(x, t, ctx, cond=c)
    assert torch.allclose(got, plain(torch.cat([x, c], 1), t, ctx), rtol=1e-12, atol=1e-12)
    c.requires_grad_(True)
    cond_net(x, t, ctx, cond=c).square().sum().backward()
    assert c.grad.abs().sum() > 0  # the conditioning reaches the output


def test_noise_level_is_an_input(seed):
    cfg = unet_config("tiny", in_channels=4, out_channels=4, cond_channels=5, noise_level_embed=True,
                      model_channels=16, norm_groups=8, num_heads=2, context_dim=None)
    net = UNet(cfg).double()
    _randomise(net, seed)
    x, c = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 5, 8, 8, dtype=torch.float64)
    t = torch.tensor([10.0, 10.0], dtype=torch.float64)
    a = net(x, t, cond=c, noise_level=torch.tensor([0.0, 0.0], dtype=torch.float64))
    b = net(x, t, cond=c, noise_level=torch.tensor([0.0, 200.0], dtype=torch.float64))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="noise_level"):
        net(x, t, cond=c)


def test_unet_refuses_missing_or_misshaped_conditioning():
    net = UNet(unet_config("tiny", in_channels=4, out_channels=4, cond_channels=5, model_channels=16,
                           norm_groups=8, num_heads=2, context_dim=None))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"cond must have shape \(2, 5, 8, 8\)"):
        net(x, t)
    with pytest.raises(ValueError, match=r"cond must have shape \(2, 5, 8, 8\), got \(2, 5, 4, 4\)"):
        net(x, t, cond=torch.randn(2, 5, 4, 4))
    plain = UNet(unet_config("tiny", in_channels=4, out_channels=4, model_channels=16, norm_groups=8,
                             num_heads=2, context_dim=None))
    with pytest.raises(ValueError, match="takes no conditioning image"):
        plain(x, t, cond=torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="cond_channels"):
        unet_config("tiny", noise_level_embed=True)


# ----------------------------------------------------------------------------------- training, sampling
def test_trained_task_models_record_their_task_and_layout(palette, colorize, assets):
    for folder, task, level in ((palette, "palette", True), (colorize, "colorize", False)):
        info = json.loads((folder / "unet.json").read_text())
        vae_c = json.loads((assets["vae"] / "vae.json").read_text())["config"]["latent_channels"]
        assert info["task"] == task if "task" in info else info["extra"]["task"] == task
        pipe = Pipeline.from_pretrained(folder)
        assert pipe.task == task
        assert pipe.unet.config.cond_channels == 1 + vae_c and pipe.unet.config.noise_level_embed == level
        assert (folder / "val" / "step_0000004.png").is_file()


def test_inpainting_keeps_the_unmasked_pixels(palette, seed):
    pipe = Pipeline.from_pretrained(palette)
    ds = ShapesDataset(RESOLUTION, seed=seed % 1000, split="eval")
    images = torch.stack([ds[i]["image"] for i in range(2)])
    masks = torch.from_numpy(np.stack([i2i.box_mask(np.random.default_rng(seed + i), RESOLUTION)
                                       for i in range(2)]))[:, None]
    prompts = [ds[i]["text"] for i in range(2)]
    out = pipe.image2image("inpaint", images, masks, prompts, n=2, steps=2, seed=seed)
    raw = pipe.image2image("inpaint", images, masks, prompts, n=2, steps=2, seed=seed, composite=False)
    assert out.shape == (4, 3, RESOLUTION, RESOLUTION)
    keep = (masks.repeat_interleave(2, 0) == 0).expand_as(out)
    assert torch.equal(out[keep], images.repeat_interleave(2, 0)[keep])  # identical outside the mask
    assert torch.equal(out[~keep], raw[~keep])  # the model's pixels inside it
    low = i2i.downsample(images, 2)
    assert pipe.image2image("sr", low, None, prompts, steps=2).shape == (2, 3, RESOLUTION, RESOLUTION)


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def _run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = sample_cmd.main(argv)
    return rc, err.getvalue()


def test_sample_command_draws_each_task(palette, tmp_path, seed):
    img = _png(tmp_path / "i.png", render(ShapesDataset(RESOLUTION).attributes(0), RESOLUTION))
    mask = np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)
    mask[4:10, 4:10] = 255
    m = _png(tmp_path / "m.png", mask)
    low = _png(tmp_path / "low.png", render(ShapesDataset(RESOLUTION).attributes(0), RESOLUTION // 4))
    for args in (["--task", "inpaint", "--init-image", img, "--mask", m],
                 ["--task", "outpaint", "--init-image", img, "--mask", m],
                 ["--task", "colorize", "--init-image", img],
                 ["--task", "sr", "--init-image", low]):
        rc, err = _run(["--unet", str(palette), *args, "--prompt", "a red circle", "--n", "2", "--steps", "2",
                        "--out", str(tmp_path / "g.png")])
        assert rc == 0, err
        assert Image.open(tmp_path / "g.png").size[0] > 2 * RESOLUTION


@pytest.mark.parametrize("case, message", [
    ("mask_size", "the mask must have the image's size"),
    ("not_trained", "trained for --task colorize, which serves colorize, not inpaint"),
    ("plain_model", "takes no conditioning image"),
    ("no_mask", "--task inpaint needs --mask"),
    ("mask_without_task", "--mask needs --task"),
    ("sr_size", "does not divide the model's"),
    ("colorize_mask", "--task colorize takes no mask"),
    ("black_mask", "black everywhere"),
])
def test_sample_command_errors(case, message, palette, colorize, assets, tmp_path):
    img = _png(tmp_path / "i.png", render(ShapesDataset(RESOLUTION).attributes(0), RESOLUTION))
    mask = np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)
    mask[2:6, 2:6] = 255
    m = _png(tmp_path / "m.png", mask)
    args = {"mask_size": ["--unet", str(palette), "--task", "inpaint", "--init-image", img, "--mask",
                          _png(tmp_path / "m2.png", mask[:8, :8])],
            "not_trained": ["--unet", str(colorize), "--task", "inpaint", "--init-image", img, "--mask", m],
            "plain_model": ["--unet", str(assets["unet"]), "--task", "inpaint", "--init-image", img, "--mask", m],
            "no_mask": ["--unet", str(palette), "--task", "inpaint", "--init-image", img],
            "mask_without_task": ["--unet", str(palette), "--init-image", img, "--mask", m],
            "sr_size": ["--unet", str(palette), "--task", "sr", "--init-image",
                        _png(tmp_path / "l.png", np.zeros((6, 6, 3), np.uint8))],
            "colorize_mask": ["--unet", str(palette), "--task", "colorize", "--init-image", img, "--mask", m],
            "black_mask": ["--unet", str(palette), "--task", "inpaint", "--init-image", img, "--mask",
                           _png(tmp_path / "b.png", np.zeros_like(mask))]}[case]
    rc, err = _run([*args, "--steps", "2", "--out", str(tmp_path / "g.png")])
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_train_unet_task_errors(assets, tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train_unet.main(["--out", str(tmp_path / "u"), "--text", "--text-encoder", str(assets["encoder"]),
                              "--task", "inpaint", "--eval", "4"] + train_flags(assets["vae"], 2, 0))
    assert rc == 2 and "ldm.eval_image2image" in err.getvalue()
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        train_unet.main(["--task", "deblur"])
    assert not (tmp_path / "u").exists()


def test_downsample_is_what_the_renderer_draws_at_the_lower_size(seed):
    """The SR inputs are the 1/k renders: area averaging the coverage is the renderer's anti-aliasing."""
    attrs = ShapesDataset(32, seed=seed % 1000).attributes(0)
    hi = torch.from_numpy(render(attrs, 32)).permute(2, 0, 1)[None].float()
    lo = torch.from_numpy(render(attrs, 8)).permute(2, 0, 1)[None].float()
    # the renderer estimates coverage from 8 x 8 samples a pixel, so the 8-px render's edge pixels err by a few
    # levels (up to 26 of 255 at a triangle's tip over the 1000 seeds this test draws from) where the 32-px one,
    # at 16x the samples, is near exact: compared on the mean (<= 1.7 levels over those seeds), against nearest
    # subsampling (>= 2.4x that)
    diff = (F.avg_pool2d(hi, 4) - lo).abs().mean()
    assert diff <= 2.5
    assert (F.interpolate(hi, size=8, mode="nearest") - lo).abs().mean() > 2 * diff  # not any subsampling


# ------------------------------------------------------------------------------------ RePaint and the eval
def test_ancestral_split_is_ddpm_posterior_noise(seed):
    """DDPM's posterior std between two levels, in the samplers' coordinates, is sigma_up; the rest moves
    deterministically: down^2 + up^2 = sigma_next^2."""
    from ldm.repaint import ancestral_split

    schedule = NoiseSchedule.from_name("linear")
    for t, t_next in ((999, 949), (500, 480), (40, 20)):
        s, s_next = schedule.sigmas[t].item(), schedule.sigmas[t_next].item()
        down, up = ancestral_split(s, s_next)
        abar, abar_next = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_next]
        beta = 1 - abar / abar_next  # the compound beta of the jump
        posterior_var = beta * (1 - abar_next) / (1 - abar)  # Ho et al. 2020, eq. 7, in x_t coordinates
        assert abs(up**2 * abar_next - posterior_var) < 1e-9 * max(posterior_var, 1e-12) + 1e-12
        assert abs(down**2 + up**2 - s_next**2) < 1e-9 * s_next**2


def test_repaint_keeps_the_known_region_and_follows_the_model(seed):
    """With a denoiser that always answers ``target``, the drawn region ends as the target and the kept
    region as the known latents, whatever the resampling."""
    from ldm.repaint import repaint_latents

    g = torch.Generator().manual_seed(seed)
    known, target = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    mask = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).float()
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
    seen = []

    def denoiser(x, sigma):
        seen.append(((1 - mask) * (x - known)).std().item() / sigma[0].item())  # kept region: known + sigma eps
        return target

    for resample in (1, 3):
        seen.clear()
        out = repaint_latents(denoiser, known, mask, torch.randn(2, 4, 6, 6, generator=g), sigmas, {}, g, resample)
        assert torch.equal(out, mask * target + (1 - mask) * known)
        assert len(seen) == 3 * resample + 1  # the last step (to sigma 0) runs once
        assert all(0.3 < r < 2.0 for r in seen)  # the kept region was noised to each step's level


def test_consistent_projects_onto_the_inputs_averages_and_nears_the_truth(seed):
    """Float64, fresh images: away from the clamp one round makes the area averages equal the input exactly
    and is the nearest such image; with the clamp active every round still brings the output nearer the
    truth whose average the input is, and the gap to the input shrinks."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.rand(3, 3, 16, 16, generator=g, dtype=torch.float64) - 0.5  # inside [-1, 1] with room
    guess = torch.rand(3, 3, 16, 16, generator=g, dtype=torch.float64) - 0.5
    low = i2i.downsample(truth, 4)  # (3, 3, 4, 4)
    once = i2i.consistent(guess, low, rounds=1)
    torch.testing.assert_close(i2i.downsample(once, 4), low, rtol=0, atol=1e-12)
    # the nearest image with those averages: any other one (guess + a zero-average change) lies farther
    change = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    change = change - F.interpolate(i2i.downsample(change, 4), scale_factor=4, mode="nearest")
    assert (once - guess).norm() < (once + 0.1 * change - guess).norm()
    # near the clamp: values pushed out of [-1, 1]
    truth = torch.rand(3, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    low = i2i.downsample(truth, 4)
    x = (torch.rand(3, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1).sign()  # all at the bounds
    errors, gaps = [(x - truth).norm()], [(i2i.downsample(x, 4) - low).abs().max()]
    for _ in range(20):
        x = i2i.consistent(x, low, rounds=1)
        assert x.abs().max() <= 1
        errors.append((x - truth).norm())
        gaps.append((i2i.downsample(x, 4) - low).abs().max())
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])) and errors[-1] < errors[0]
    assert gaps[-1] < 0.1 * gaps[1]
    torch.testing.assert_close(i2i.consistent(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 2, 2)),
                               torch.zeros(1, 3, 8, 8))


def test_eval_image2image_reports_every_task(palette, assets, tmp_path):
    import ldm.eval_image2image as eval_cmd

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = eval_cmd.main(["--unet", str(palette), "--n", "4", "--steps", "2", "--json", str(tmp_path / "r.json"),
                            "--strip", str(tmp_path / "s.png")] + [f"--task={t}" for t in i2i.TASKS])
    assert rc == 0, out.getvalue()
    reports = {r["task"]: r for r in json.loads((tmp_path / "r.json").read_text())["reports"]}
    assert set(reports) == set(i2i.TASKS)
    for t in i2i.MASKED_TASKS:
        assert reports[t]["kept_max_abs_diff"] == 0 and "kept_psnr_raw" in reports[t]
    sr = reports["sr"]
    assert sr["factor"] == 4 and 0 < sr["bicubic_psnr"] < 60 and -1 <= sr["ssim"] <= 1
    # the input is the truth's area average: agreeing with it never moves an image away from the truth
    assert sr["psnr"] >= sr["psnr_raw"] and sr["bicubic_consistent_psnr"] >= sr["bicubic_psnr"]
    assert sr["input_gap"] < 0.05
    for t in i2i.TASKS:
        assert 0 <= reports[t]["read"]["shape+colour+position"] <= 1
        assert Image.open(tmp_path / f"s-{t}.png").size[1] > 4 * RESOLUTION
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = eval_cmd.main(["--unet", str(assets["unet"]), "--task", "inpaint", "--repaint", "--n", "2",
                            "--steps", "3", "--json", str(tmp_path / "rp.json")])
    assert rc == 0
    rp = json.loads((tmp_path / "rp.json").read_text())["reports"][0]
    assert rp["method"] == "repaint" and rp["kept_max_abs_diff"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--task", "sr", "--repaint"], "the RePaint baseline inpaints and outpaints"),
    (["--task", "inpaint", "--resample", "3"], "--resample is a --repaint setting"),
    (["--task", "colorize"], "takes no conditioning image"),
])
def test_eval_image2image_errors(argv, message, assets, capsys):
    import ldm.eval_image2image as eval_cmd

    assert eval_cmd.main(["--unet", str(assets["unet"]), "--n", "2", "--steps", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def upscaler(assets, tmp_path_factory):
    """An sr model at twice the shared models' resolution: the shared VAE (convolutional, it encodes any
    size) recorded at 2 x RESOLUTION, and 4 steps of train_unet --task sr on it."""
    import shutil

    root = tmp_path_factory.mktemp("up")
    vae = root / "vae"
    shutil.copytree(assets["vae"], vae)
    meta = json.loads((vae / "vae.json").read_text())
    meta["resolution"] = 2 * RESOLUTION
    meta["latent_shape"] = [meta["latent_shape"][0], *(2 * s for s in meta["latent_shape"][1:])]
    (vae / "vae.json").write_text(json.dumps(meta))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train_unet.main(["--out", str(root / "sr"), "--text", "--text-encoder", str(assets["encoder"]),
                              "--task", "sr"] + train_flags(vae, 4, SESSION_SEED % 1000))
    assert rc == 0, err.getvalue()
    return root / "sr"


def test_cascade_refines_the_base_images(assets, upscaler, tmp_path, seed):
    base, up = Pipeline.from_pretrained(assets["unet"]), Pipeline.from_pretrained(upscaler)
    stages = i2i.generate_cascade(base, [up], ["a red circle", "a blue square"], n=2, seed=seed,
                                  base_kwargs={"steps": 2}, up_kwargs={"steps": 2})
    assert [s.shape for s in stages] == [(4, 3, RESOLUTION, RESOLUTION), (4, 3, 2 * RESOLUTION, 2 * RESOLUTION)]
    # the second stage is the sr model run on the first stage's images, row for row
    direct = up.image2image("sr", stages[0], None, ["a red circle"] * 2 + ["a blue square"] * 2, seed=seed, steps=2)
    assert torch.allclose(stages[1], direct, atol=1e-5)
    rc, err = _run(["--unet", str(assets["unet"]), "--upscaler", str(upscaler), "--prompt", "a red circle", "--n", "2",
                    "--steps", "2", "--out", str(tmp_path / "g.png"), "--images", str(tmp_path / "each")])
    assert rc == 0 and f"{RESOLUTION} px -> {2 * RESOLUTION} px" in err, err
    assert Image.open(next((tmp_path / "each").glob("*.png"))).size == (2 * RESOLUTION, 2 * RESOLUTION)
    rc, err = _run(["--unet", str(assets["unet"]), "--upscaler", str(assets["unet"]), "--prompt", "a", "--steps", "2"])
    assert rc == 2 and "takes no conditioning image" in err
    rc, err = _run(["--unet", str(assets["unet"]), "--upscaler", str(upscaler), "--upscaler", str(upscaler),
                    "--prompt", "a", "--steps", "2"])
    assert rc == 2 and "not an integer multiple >= 2 of the previous stage's" in err


def test_eval_image2image_scores_a_cascade(assets, upscaler, tmp_path):
    import ldm.eval_image2image as eval_cmd

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = eval_cmd.main(["--unet", str(assets["unet"]), "--upscaler", str(upscaler), "--n", "3", "--steps", "2",
                            "--json", str(tmp_path / "c.json"), "--strip", str(tmp_path / "c.png")])
    assert rc == 0, out.getvalue()
    stages = json.loads((tmp_path / "c.json").read_text())["reports"][0]["stages"]
    assert [s["resolution"] for s in stages] == [RESOLUTION, 2 * RESOLUTION]
    assert all(0 <= s["read"]["shape+colour+position"] <= 1 for s in stages)
    assert Image.open(tmp_path / "c.png").size[1] > 3 * 96
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert eval_cmd.main(["--unet", str(assets["unet"]), "--n", "2"]) == 2
    assert "give --task TASK" in err.getvalue()
