"""Stable Diffusion 1.x inpainting weights (9-channel conv_in) through ldm.convert, in float64 against
diffusers' UNet2DConditionModel, and sampled with ``ldm.sample --from-diffusers PATH --task inpaint``."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ldm.sample as sample_cmd
from ldm import Pipeline, convert
from ldm.pretrained import load_unet
from ldm.sd_format import unet_config_from_diffusers, unet_config_to_diffusers, unet_from_diffusers, unet_to_diffusers
from ldm.unet import UNet, unet_config

diffusers = pytest.importorskip("diffusers")
from test_convert import (F64, TINY_SD_UNET, TOL, Float64Timesteps, convert_model, diffusers_unet,  # noqa: E402
                          make_tiny_sd_folder, redraw_, rel_err)

# SD 1.5 inpainting's layout at a small size: 4 latent + 1 mask + 4 masked-image channels in, 4 out
INPAINT_UNET = dict(TINY_SD_UNET, in_channels=9, out_channels=4)


def test_inpainting_unet_matches_diffusers_and_round_trips(seed):
    g = torch.Generator().manual_seed(seed)
    theirs = diffusers_unet(INPAINT_UNET, g)
    config, their_state, ours = convert_model(theirs, UNet, unet_config_from_diffusers, unet_from_diffusers)
    assert (config.in_channels, config.cond_channels, config.out_channels) == (4, 5, 4)
    x = torch.randn(2, 9, 8, 8, generator=g, dtype=F64)  # diffusers' input: [latents, mask, masked latents]
    t = torch.tensor([917.0, 3.0], dtype=F64)
    context = torch.randn(2, 7, INPAINT_UNET["cross_attention_dim"], generator=g, dtype=F64)
    with torch.no_grad():
        ref = theirs(x, t, encoder_hidden_states=context).sample
        out = ours(x[:, :4], t, context, cond=x[:, 4:])
    err = rel_err(out, ref)
    print(f"inpainting UNet: relative error {err:.2e}")
    assert out.shape == (2, 4, 8, 8) and err < TOL
    back = unet_to_diffusers(ours.state_dict(), config)
    assert set(back) == set(their_state) and all(torch.equal(back[k], their_state[k]) for k in their_state)
    exported = unet_config_to_diffusers(config, 8)
    assert exported["in_channels"] == 9 and exported["out_channels"] == 4
    fresh = diffusers.UNet2DConditionModel(**exported).to(F64).eval()
    fresh.load_state_dict(back, strict=True)
    fresh.time_proj = Float64Timesteps(INPAINT_UNET["block_out_channels"][0])
    with torch.no_grad():
        assert rel_err(fresh(x, t, encoder_hidden_states=context).sample, out) < TOL


def test_only_the_inpainting_layout_becomes_conditioning():
    """5 in, 3 out is not SD's layout (2 x 3 + 1 = 7): all five stay latent channels, as before."""
    cfg = dict(TINY_SD_UNET, in_channels=5, out_channels=3)
    config = unet_config_from_diffusers(cfg)
    assert (config.in_channels, config.cond_channels) == (5, 0)
    with pytest.raises(ValueError, match="noise_level_embed"):
        unet_config_to_diffusers(unet_config("tiny", in_channels=4, out_channels=4, cond_channels=5,
                                             noise_level_embed=True, mid_attention=True, pooled_context=False,
                                             ff_mult=4))
    with pytest.raises(ValueError, match="cond_channels"):
        unet_config_to_diffusers(unet_config("tiny", in_channels=4, out_channels=4, cond_channels=3,
                                             mid_attention=True, pooled_context=False, ff_mult=4))


@pytest.fixture
def inpaint_folder(tmp_path, seed):
    """A tiny SD folder whose UNet has SD inpainting's 9 input channels."""
    path = make_tiny_sd_folder(tmp_path / "sd", seed)
    g = torch.Generator().manual_seed(seed + 1)
    unet = redraw_(diffusers.UNet2DConditionModel(**INPAINT_UNET), g)
    unet.save_pretrained(path / "unet")
    return path


def test_inpainting_folder_converts_and_samples(inpaint_folder, tmp_path, seed):
    ours = tmp_path / "ours"
    assert convert.main(["from-diffusers", str(inpaint_folder), "--out", str(ours)]) == 0
    meta = json.loads((ours / "unet.json").read_text())
    assert meta["latent_shape"] == [4, 8, 8]
    unet, _ = load_unet(ours)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(inpaint_folder / "unet").to(F64).eval()
    theirs.time_proj = Float64Timesteps(INPAINT_UNET["block_out_channels"][0])
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(1, 9, 8, 8, generator=g, dtype=F64), torch.tensor([500.0], dtype=F64)
    context = torch.randn(1, 5, INPAINT_UNET["cross_attention_dim"], generator=g, dtype=F64)
    with torch.no_grad():
        assert rel_err(unet.to(F64)(x[:, :4], t, context, cond=x[:, 4:]),
                       theirs(x, t, encoder_hidden_states=context).sample) < TOL
    assert Pipeline.from_pretrained(ours).task == "inpaint"
    back = tmp_path / "back"
    assert convert.main(["to-diffusers", str(ours), "--out", str(back)]) == 0
    assert json.loads((back / "unet" / "config.json").read_text())["in_channels"] == 9

    # ldm.sample on the diffusers folder itself: the kept pixels come back exactly
    image = (np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[8:24, 4:20] = 255
    Image.fromarray(image).save(tmp_path / "i.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = sample_cmd.main(["--from-diffusers", str(inpaint_folder), "--task", "inpaint", "--init-image",
                              str(tmp_path / "i.png"), "--mask", str(tmp_path / "m.png"), "--prompt", "a red cube",
                              "--n", "1", "--steps", "2", "--out", str(tmp_path / "g.png"),
                              "--images", str(tmp_path / "each")])
    assert rc == 0, err.getvalue()
    out = np.asarray(Image.open(next((tmp_path / "each").glob("*.png"))).convert("RGB"))
    keep = mask[..., 0] == 0
    assert np.array_equal(out[keep], image[keep])
    with contextlib.redirect_stderr(err):
        rc = sample_cmd.main(["--from-diffusers", str(inpaint_folder), "--task", "colorize", "--init-image",
                              str(tmp_path / "i.png"), "--prompt", "a red cube", "--out", str(tmp_path / "g.png")])
    assert rc == 2 and "trained for --task inpaint" in err.getvalue()
