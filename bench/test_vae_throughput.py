"""The VAE end to end: a training step, encoding and decoding, in images/s, for our VAE as dispatched by
default ("ours": kernels.dispatch's auto rule) and with our kernels off ("ours-torch",
``kernels.use_backend("torch")``) and for diffusers'
``AutoencoderKL`` built from the same ``VAEConfig`` ("diffusers", the baseline of the ratios; equal
parameter counts, recorded side by side), so that every ratio comes out of one run.

- train step: encode, sample the posterior, decode, L1 + 1e-6 KL, backward, Adam step.
- encode: images -> the posterior's mode (the latents a latent cache stores); no gradients.
- decode: latents -> images; no gradients.

Sizes: on the CPU (fp32) the ``tiny`` preset of the demo at 32 x 32, batch 16, and ``small`` at
32 x 32, batch 2; on a GPU (bf16 autocast over fp32 weights) Stable Diffusion's kl-f8 (``sd``) at
512 x 512, batch 4. Each in NCHW and channels_last memory (model and images). The providers of one
(case, mode) are timed in alternation (``Bench.interleave``), so all see the same load.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from autoencoder import VAE, VAE_CONFIGS, VAEConfig, latent_shape, num_parameters

ON_GPU = torch.cuda.is_available()
CASES = [("sd", 512, 4)] if ON_GPU else [("tiny", 32, 16), ("small", 32, 2)]  # (preset, resolution, batch)
QUICK_BATCH = 4
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("train step", "encode", "decode")
PROVIDERS = ("ours", "ours-torch", "diffusers")  # our kernels on, off (bench.report.KERNELS_ON / _OFF)
BASELINE = "diffusers"
BUDGET_S = 5.0 if ON_GPU else 1.0  # measured time per provider and (case, mode), at least MIN_ROUNDS rounds
MIN_ROUNDS = 5 if ON_GPU else 3
DIFFUSERS_NORM_EPS = 1e-6  # AutoencoderKL's encoder and decoder fix their GroupNorm eps


def _cases() -> list:
    out = []
    for i, (preset, res, batch) in enumerate(CASES):
        for layout in LAYOUTS:
            marks = [pytest.mark.quick] if i == 0 and layout == "nchw" else []
            out.append(pytest.param((preset, res, batch, layout), id=f"{preset}-{res}-{layout}", marks=marks))
    return out


class NotExpressible(ValueError):
    """Our config has a feature diffusers' AutoencoderKL cannot express."""


def diffusers_config(cfg: VAEConfig) -> dict:
    """``AutoencoderKL`` keyword arguments for the network of ``cfg`` (same layers, same parameters)."""
    if cfg.attention_heads != 1:
        raise NotExpressible(f"AutoencoderKL's mid attention has one head, ours {cfg.attention_heads}")
    if cfg.norm_eps != DIFFUSERS_NORM_EPS:
        raise NotExpressible(f"AutoencoderKL's GroupNorm eps is {DIFFUSERS_NORM_EPS}, ours {cfg.norm_eps}")
    n = len(cfg.channel_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=cfg.widths, layers_per_block=cfg.num_res_blocks,
                latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_groups,
                mid_block_add_attention=cfg.mid_attention)


class DiffusersVAE(nn.Module):
    """diffusers' AutoencoderKL behind our VAE's interface: ``encode(x) -> posterior`` (``.mode()``,
    ``.sample()``, ``.kl()``), ``decode(z) -> x``, ``forward(x) -> (reconstruction, posterior)``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL(**diffusers_config(cfg))

    def encode(self, x):
        return self.vae.encode(x).latent_dist

    def decode(self, z):
        return self.vae.decode(z).sample

    def forward(self, x):
        posterior = self.encode(x)
        return self.decode(posterior.sample()), posterior


@pytest.fixture(scope="module")
def vaes():
    """preset -> {"ours": VAE, "diffusers": model or the reason it cannot be built}, built when first
    asked for, on the device; "runs": (case, mode) -> provider -> seconds per round."""
    out = {"runs": {}}
    yield out
    out.clear()


def _models(vaes: dict, preset: str, dev: torch.device) -> dict:
    if preset not in vaes:
        cfg = VAE_CONFIGS[preset]
        torch.manual_seed(0)
        with dev:
            models = {"ours": VAE(cfg).to(dev)}
            try:
                models["diffusers"] = DiffusersVAE(cfg).to(dev)
            except ImportError as e:
                models["diffusers"] = f"diffusers is not importable: {e}"
            except NotExpressible as e:
                models["diffusers"] = f"diffusers' AutoencoderKL cannot express the '{preset}' config: {e}"
        vaes[preset] = models
    return vaes[preset]


def _make(bench, mode: str, model: nn.Module, preset: str, res: int, batch: int, fmt: torch.memory_format):
    """One unit of work of ``mode`` for ``model`` in memory format ``fmt`` (the model is converted)."""
    dev = bench.torch_device
    model.to(memory_format=fmt)
    x = (torch.rand(batch, 3, res, res, device=dev) * 2 - 1).contiguous(memory_format=fmt)  # images in [-1, 1]
    if mode == "train step":
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        model.train()

        def step():
            opt.zero_grad(set_to_none=True)
            with bench.autocast():
                recon, posterior = model(x)
                loss = (recon.float() - x).abs().mean() + 1e-6 * posterior.kl().float().mean()
            loss.backward()
            opt.step()

        return step
    model.eval()
    z = torch.randn(batch, *latent_shape(VAE_CONFIGS[preset], res), device=dev).contiguous(memory_format=fmt)

    @torch.no_grad()
    def encode():
        with bench.autocast():
            return model.encode(x).mode()

    @torch.no_grad()
    def decode():
        with bench.autocast():
            return model.decode(z)

    return encode if mode == "encode" else decode


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", _cases())
def test_vae(bench, vaes, case, mode, provider):
    """The first provider's test of a (case, mode) times every provider, rounds interleaved; each
    test records its own."""
    preset, res, batch, layout = case
    models = _models(vaes, preset, bench.torch_device)
    if isinstance(models[provider if provider == "diffusers" else "ours"], str):
        pytest.skip(models["diffusers"])
    bench.check_provider(provider)
    batch = QUICK_BATCH if bench.quick else batch
    n_ours = num_parameters(models["ours"])
    n_diffusers = None if isinstance(models["diffusers"], str) else num_parameters(models["diffusers"])
    bench.note(f"VAE '{preset}' parameters: ours {n_ours:,}, diffusers' AutoencoderKL "
               + (f"{n_diffusers:,}" if n_diffusers is not None else f"n/a ({models['diffusers']})"))
    bench.label(suite="vae", case=f"{preset} {res}x{res}, batch {batch}, {layout}", mode=mode,
                dtype=bench.e2e_dtype, provider=provider, baseline=BASELINE, show=["images_per_s"],
                params=n_diffusers if provider == "diffusers" else n_ours, params_ours=n_ours,
                params_diffusers=n_diffusers, batch=batch, resolution=res, layout=layout,
                **bench.kernels_info(provider))
    key = (case, mode)
    if key not in vaes["runs"]:
        fmt = LAYOUTS[layout]
        ours = _make(bench, mode, models["ours"], preset, res, batch, fmt)
        calls = {"ours": ours, "ours-torch": bench.as_provider("ours-torch", ours)}
        if n_diffusers is not None:
            calls["diffusers"] = _make(bench, mode, models["diffusers"], preset, res, batch, fmt)
        calls = {p: call for p, call in calls.items() if bench.provider_skip_reason(p) is None}
        vaes["runs"][key] = bench.interleave(calls, budget_s=BUDGET_S * len(calls), min_rounds=MIN_ROUNDS)
        del calls, ours
        bench.free_memory()
    bench.replay(vaes["runs"][key][provider], items=batch)
