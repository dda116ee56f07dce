"""The UNet end to end: a training step and sampling, in images/s, for our UNet as dispatched by
default ("ours": kernels.dispatch's auto rule) and with our kernels off ("ours-torch",
``kernels.use_backend("torch")``) and for diffusers'
``UNet2DConditionModel`` built at the identical configuration ("diffusers", the baseline of the
ratios), so that both ratios come out of one run.

Sizes: the ``sd15`` preset at 64 x 64 latents on a GPU (bf16 autocast, fp32 weights, as diffusers'
mixed-precision training runs), the ``tiny`` preset at its demo's 8 x 8 latents on the CPU (fp32).
Text: 77 random context tokens of the preset's width, every token valid.

- train step: ``diffusion_loss`` (random timesteps and noise), backward, AdamW step, zero_grad.
- sample: 25 DPM-Solver++(2M) steps (Karras sigmas) with classifier-free guidance at 7.5: ``CFGDenoiser``
  runs the conditional and unconditional halves as one batch of 2B, so 25 network calls.

Both networks run behind the same model contract and the same sampler, so the ratio is the
networks' alone. Parameter counts are recorded side by side (and printed at the end of the session).
On the CPU "ours" and "ours-torch" run the same PyTorch ops (the Triton kernels need CUDA): their
ratio there only shows the run's noise, and each result says so.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ldm.diffusion import Denoiser, NoiseSchedule, diffusion_loss
from ldm.samplers import CFGDenoiser, get_sigmas, sample_dpmpp_2m
from ldm.unet import TIME_EMBED_MULT, UNet, UNetConfig, count_parameters, unet_config

pytestmark = pytest.mark.quick  # every case runs in quick mode too, at its quick sizes

ON_GPU = torch.cuda.is_available()
PRESET = "sd15" if ON_GPU else "tiny"
LATENT = 64 if ON_GPU else 8
TRAIN_BATCH = {"full": 8 if ON_GPU else 16, "quick": 1 if ON_GPU else 2}
SAMPLE_BATCH = {"full": 4, "quick": 1}
STEPS, GUIDANCE, TEXT_TOKENS = 25, 7.5, 77
SCHEDULE = "scaled_linear"  # SD 1.x's
PROVIDERS = ("ours", "ours-torch", "diffusers")  # our kernels on, off (bench.report.KERNELS_ON / _OFF)
BASELINE = "diffusers"
BUDGET_S = 5.0 if ON_GPU else 3.0  # measured time per provider and mode, at least MIN_ROUNDS rounds
MIN_ROUNDS = 5 if ON_GPU else 3


class NotExpressible(ValueError):
    """Our config has a feature diffusers' UNet2DConditionModel cannot express."""


def diffusers_config(cfg: UNetConfig, sample_size: int) -> dict:
    """``UNet2DConditionModel`` keyword arguments for the network of ``cfg`` (same layers, same
    parameters; the name map is in ldm/unet.py's docstring)."""
    if cfg.context_dim is None:
        raise NotExpressible("an unconditional UNet (context_dim=None) is diffusers' UNet2DModel, not this one")
    if cfg.ff_mult != 4:
        raise NotExpressible(f"diffusers' transformer blocks have a feed-forward of 4x, ours {cfg.ff_mult}x")
    levels = range(len(cfg.channel_mult))
    return dict(
        sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D"
                               for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D"
                             for i in reversed(levels)),
        mid_block_type="UNetMidBlock2DCrossAttn" if cfg.mid_attention else "UNetMidBlock2D",
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, transformer_layers_per_block=cfg.transformer_depth,
        attention_head_dim=cfg.num_heads,  # diffusers' legacy name for the number of heads
        cross_attention_dim=cfg.context_dim, norm_num_groups=cfg.norm_groups, norm_eps=1e-5,
        dropout=cfg.dropout, flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False,
    )


def diffusers_unet(cfg: UNetConfig, sample_size: int) -> nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

    model = UNet2DConditionModel(**diffusers_config(cfg, sample_size))
    if not cfg.mid_attention:
        # The config's attention-free middle ("UNetMidBlock2D") is built with ONE ResBlock; ours has two,
        # as SD's cross-attention middle does. diffusers' own block class, given two:
        ch = cfg.model_channels * cfg.channel_mult[-1]
        model.mid_block = UNetMidBlock2D(in_channels=ch, temb_channels=TIME_EMBED_MULT * cfg.model_channels,
                                         dropout=cfg.dropout, num_layers=1, resnet_eps=1e-5,
                                         resnet_groups=cfg.norm_groups, add_attention=False)
    return model


class DiffusersContract(nn.Module):
    """diffusers' UNet behind our model contract, ``model(x, t, context=None, context_lengths=None)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context=None, context_lengths=None):
        mask = None
        if context_lengths is not None:  # (B, L): 1 keeps a token, 0 drops it
            mask = torch.arange(context.shape[1], device=x.device) < context_lengths[:, None]
        return self.unet(x, t, encoder_hidden_states=context, encoder_attention_mask=mask, return_dict=False)[0]


def bench_config() -> UNetConfig:
    """The preset, less what diffusers' UNet2DConditionModel cannot express and only adds a few
    (B, C) x (C, 4C) products: the pooled prompt of the CPU demo, so both networks match layer for layer."""
    return unet_config(PRESET, pooled_context=False)


@pytest.fixture(scope="module")
def unets():
    """{"ours": UNet, "diffusers": model or the reason it cannot be built}, initialized on the device."""
    dev = torch.device("cuda" if ON_GPU else "cpu")
    cfg = bench_config()
    torch.manual_seed(0)
    with dev:  # initialize 860M parameters where they live, not on the CPU
        out = {"ours": UNet(cfg).to(dev)}  # .to: a no-op unless some buffer came from numpy
        try:
            out["diffusers"] = DiffusersContract(diffusers_unet(cfg, LATENT)).to(dev)
        except ImportError as e:
            out["diffusers"] = f"diffusers is not importable: {e}"
        except NotExpressible as e:
            out["diffusers"] = f"diffusers' UNet2DConditionModel cannot express the '{PRESET}' config: {e}"
    out["runs"] = {}  # mode -> provider -> seconds per round, measured for all providers at once
    yield out
    out.clear()


def _train_step(bench, model: nn.Module, cfg: UNetConfig, batch: int):
    dev = bench.torch_device
    schedule = NoiseSchedule.from_name(SCHEDULE)
    x0 = torch.randn(batch, cfg.in_channels, LATENT, LATENT, device=dev)
    context = torch.randn(batch, TEXT_TOKENS, cfg.context_dim, device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step():
        with bench.autocast():
            loss = diffusion_loss(model, x0, schedule, context=context).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sample(bench, model: nn.Module, cfg: UNetConfig, batch: int):
    dev = bench.torch_device
    schedule = NoiseSchedule.from_name(SCHEDULE)
    sigmas = get_sigmas(schedule, STEPS, karras=True, device=dev)
    denoiser = CFGDenoiser(Denoiser(model, schedule), GUIDANCE)
    context = torch.randn(batch, TEXT_TOKENS, cfg.context_dim, device=dev)
    uncond = torch.randn(1, TEXT_TOKENS, cfg.context_dim, device=dev)  # the empty prompt's tokens
    x = torch.randn(batch, cfg.in_channels, LATENT, LATENT, device=dev) * sigmas[0]
    model.eval()

    def run():
        with bench.autocast():
            sample_dpmpp_2m(denoiser, x, sigmas, extra_args={"context": context, "uncond_context": uncond},
                            disable=True)

    return run


def _provider_calls(bench, unets, mode: str, batch: int) -> dict:
    """One unit of work per provider that can run here. Ours with kernels on and off share the
    model and its optimizer (the same parameters): the off call is the on call inside
    ``kernels.use_backend("torch")``."""
    cfg, make = bench_config(), _train_step if mode == "train step" else _sample
    ours = make(bench, unets["ours"], cfg, batch)
    calls = {"ours": ours, "ours-torch": bench.as_provider("ours-torch", ours)}
    if not isinstance(unets["diffusers"], str):
        calls["diffusers"] = make(bench, unets["diffusers"], cfg, batch)
    return {p: call for p, call in calls.items() if bench.provider_skip_reason(p) is None}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ("train step", "sample"))
def test_unet(bench, unets, mode, provider):
    """The first provider's test of a mode times every provider, rounds interleaved (see
    ``Bench.interleave``: each sees the same stretch of the machine's load); each test records its own."""
    if isinstance(unets[provider if provider == "diffusers" else "ours"], str):
        pytest.skip(unets["diffusers"])
    bench.check_provider(provider)
    size = "quick" if bench.quick else "full"
    batch = (TRAIN_BATCH if mode == "train step" else SAMPLE_BATCH)[size]
    n_ours = count_parameters(unets["ours"])
    n_diffusers = None if isinstance(unets["diffusers"], str) else count_parameters(unets["diffusers"])
    bench.note(f"UNet '{PRESET}' parameters: ours {n_ours:,}, diffusers' UNet2DConditionModel "
               + (f"{n_diffusers:,}" if n_diffusers is not None else f"n/a ({unets['diffusers']})"))
    case = f"{PRESET} {LATENT}x{LATENT} latents, batch {batch}"
    if mode == "sample":
        case += f", {STEPS} DPM-Solver++(2M) steps, CFG {GUIDANCE}"
    bench.label(suite="unet", case=case, mode=mode, dtype=bench.e2e_dtype, provider=provider, baseline=BASELINE,
                show=["images_per_s"], params=n_diffusers if provider == "diffusers" else n_ours,
                params_ours=n_ours, params_diffusers=n_diffusers, batch=batch, **bench.kernels_info(provider),
                **({"steps": STEPS, "guidance": GUIDANCE} if mode == "sample" else {}))
    runs = unets["runs"]
    if mode not in runs:
        calls = _provider_calls(bench, unets, mode, batch)
        runs[mode] = bench.interleave(calls, budget_s=BUDGET_S * len(calls), min_rounds=MIN_ROUNDS)
        del calls
        bench.free_memory()
    bench.replay(runs[mode][provider], items=batch)
