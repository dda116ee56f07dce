"""VAE training throughput (images/s): ours against diffusers' AutoencoderKL at the same configuration.

    .venv/bin/python -m pytest bench/test_vae_throughput.py --benchmark-only

One train step = encode, sample the posterior, decode, L1 + KL, backward, on a batch of images.
Both models are built from one ``VAEConfig`` (same widths, depth, groups, latent channels; the
parameter counts in ``extra_info`` are equal), and each runs in both memory layouts, so the ratio
comes out of one run. diffusers is a test-only dependency: without it its cases skip.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from autoencoder import VAE, VAE_CONFIGS, VAEConfig, num_parameters

CASES = {  # preset -> (resolution, batch): sizes that take seconds on a 2-core CPU
    "tiny": (32, 16),
    "small": (32, 4),
}
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def diffusers_model(cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.channel_mult)
    return AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=cfg.widths, layers_per_block=cfg.num_res_blocks,
                         latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_groups)


def ours_step(model: VAE, x: torch.Tensor) -> torch.Tensor:
    recon, posterior = model(x)
    return (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()


def diffusers_step(model, x: torch.Tensor) -> torch.Tensor:
    posterior = model.encode(x).latent_dist
    recon = model.decode(posterior.sample()).sample
    return (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("provider", ["ours", "diffusers"])
@pytest.mark.parametrize("preset", list(CASES))
def test_vae_train_step(benchmark, preset, provider, layout):
    torch.set_num_threads(os.cpu_count())
    cfg = VAE_CONFIGS[preset]
    resolution, batch = CASES[preset]
    if provider == "diffusers":
        if importlib.util.find_spec("diffusers") is None:
            pytest.skip("diffusers is not installed")
        model, step = diffusers_model(cfg), diffusers_step
    else:
        model, step = VAE(cfg), ours_step
    fmt = LAYOUTS[layout]
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = (torch.rand(batch, 3, resolution, resolution) * 2 - 1).contiguous(memory_format=fmt)

    def train_step():
        opt.zero_grad(set_to_none=True)
        step(model, x).backward()
        opt.step()

    benchmark.pedantic(train_step, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        provider=provider, preset=preset, layout=layout, resolution=resolution, batch=batch,
        parameters=num_parameters(model), threads=torch.get_num_threads(),
        images_per_s=batch / benchmark.stats.stats.mean)
