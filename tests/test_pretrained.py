"""The one unet.json schema: what train_unet and convert write today and wrote before, and the VAE's codec."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from autoencoder import VAE, VAEConfig
from ldm.checkpoint import save_model
from ldm.errors import InputError
from ldm.pretrained import TextEncoderSpec, UNetFile, load_unet, load_vae, save_unet, save_vae
from ldm.unet import UNetConfig

CONFIG = UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                    attention_levels=(1,), num_heads=2, context_dim=12, norm_groups=4)


def random_unet(seed):
    from ldm.unet import UNet

    torch.manual_seed(seed)
    unet = UNet(CONFIG)
    for m in unet.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    return unet


def test_convert_files_written_before_the_one_schema_load(tmp_path, seed):
    """convert's unet.json of before: the text encoder as a path string with its options, diffusers'
    betas as the schedule, the latent side as sample_size, no guidance."""
    unet = random_unet(seed)
    betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
    save_model(tmp_path, "unet", unet, CONFIG, prediction="eps", schedule=betas, text_encoder="/models/te",
               text_encoder_options={"pad_to_max": True, "mask_padding": False, "max_tokens": 77}, sample_size=8,
               resolution=64, diffusers_config={"sample_size": 8}, source="/models",
               created_by="ldm.convert from-diffusers")
    loaded, info = load_unet(tmp_path)
    assert info.latent_shape == (4, 8, 8) and info.cfg_scale == 7.5 and info.prediction == "eps"
    assert info.text_encoder == TextEncoderSpec("/models/te", 12, pad_to_max=True, mask_padding=False, max_tokens=77)
    assert info.noise_schedule().name == "scaled_linear" and info.extra["source"] == "/models"
    for k, v in unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_train_unet_files_round_trip(tmp_path, seed):
    unet = random_unet(seed)
    info = UNetFile(config=CONFIG, prediction="v", schedule="cosine", latent_shape=(4, 4, 4), resolution=16,
                    text_encoder=TextEncoderSpec(None, 12), vae="/runs/vae", vae_sha256="ab" * 32, sampler="ddim",
                    sample_steps=7, cfg_scale=2.5, val_prompts=["a red circle"], created_by="ldm.train_unet",
                    extra={"steps": 40, "training": {"world_size": 1}})
    save_unet(tmp_path, unet, info)
    meta = json.loads((tmp_path / "unet.json").read_text())
    assert meta["text_encoder"] == {"path": None, "width": 12} and "text_encoder_options" not in meta
    assert meta["steps"] == 40 and meta["latent_shape"] == [4, 4, 4] and meta["schedule"] == "cosine"
    _, back = load_unet(tmp_path)
    assert back == info


@pytest.mark.parametrize("change, message", [
    ({"prediction": "noise"}, "unknown prediction"),
    ({"schedule": "quadratic"}, "unknown noise schedule 'quadratic'"),
    ({"schedule": 3}, "schedule must be a name or a diffusers betas dict"),
    ({"latent_shape": [4, 4]}, "latent_shape must be [C, h, w]"),
    ({"config": {"model_channels": -1}}, "model_channels must be positive"),
])
def test_a_damaged_unet_json_is_one_line_naming_the_file(tmp_path, change, message):
    info = UNetFile(config=CONFIG, prediction="v", schedule="linear", latent_shape=(4, 4, 4))
    save_unet(tmp_path, random_unet(0), info)
    meta = json.loads((tmp_path / "unet.json").read_text())
    (tmp_path / "unet.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(InputError, match=r"unet\.json") as e:
        load_unet(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_vae_carries_its_codec(tmp_path, seed):
    config = VAEConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=4,
                       mid_attention=False)
    torch.manual_seed(seed)
    vae = VAE(config, latent_scale=0.37, latent_shift=-0.2, resolution=16).double().eval()
    save_vae(tmp_path, vae.float(), created_by="tests")
    loaded, meta = load_vae(tmp_path)
    assert (loaded.latent_scale, loaded.latent_shift, loaded.resolution) == (0.37, -0.2, 16)
    assert meta["latent_shape"] == [4, 8, 8] and loaded.latent_shape() == (4, 8, 8)
    vae = vae.double()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).mode()
        z = vae.encode_latents(x)
        assert z.dtype == torch.float32  # what a diffusion model and a cache take
        assert torch.allclose(z.double(), (mean + 0.2) * 0.37, rtol=0, atol=1e-6)
        m, s = vae.latent_moments(x)
        assert torch.equal(m, z) and torch.allclose(s.double(), vae.encode(x).std * 0.37, rtol=1e-6)
        assert torch.allclose(vae.decode_latents((mean + 0.2) * 0.37), vae.decode(mean), rtol=0, atol=1e-12)
