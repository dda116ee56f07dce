"""Section 3: our models against diffusers' on identical weights.

- UNet ``sd15``: a training step (bf16 autocast over fp32 weights, batch 8, 64 x 64 latents, 77 x 768
  context; ``diffusion_loss``, backward, AdamW) and 25 DPM-Solver++(2M) steps of sampling with
  classifier-free guidance 7.5 (batch 4, one batched call of 2B per step), for our UNet as it runs by
  default ("ours": kernels.dispatch's auto rule), with every op on our Triton kernels ("ours-triton",
  GPU only), with PyTorch's ops in their place ("ours-torch") and diffusers'
  ``UNet2DConditionModel`` ("diffusers", the baseline), loaded with our weights through
  ``ldm.convert.unet_to_diffusers`` / ``unet_config_to_diffusers``.
- VAE ``sd`` at 512 x 512, batch 4: encode (the posterior's mode) and decode, against
  ``AutoencoderKL`` (``vae_to_diffusers`` / ``vae_config_to_diffusers``).

The check before the timing: on the same inputs, each provider's bf16 output, and for the UNet the
gradient of a fixed projection of it with respect to the input latents, against the fp32 output of the
reference (diffusers', or ours with PyTorch's ops when diffusers is missing). The baseline's own bf16
error sets the bound: a provider passes when its error is within E2E_SLACK times that, plus E2E_FLOOR.
The providers of one mode are timed in alternation, so all see the same stretch of the machine.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from autoencoder import VAE, VAE_CONFIGS, VAEConfig
from bench.gpu.common import CUT, FAILED, PASS, SKIPPED, Device, E2ERow, SectionClock, free_memory, interleave, \
    off_call, rel_l2, short_error, triton_call, unzero_
from ldm.sd_format import unet_config_to_diffusers, unet_to_diffusers, vae_config_to_diffusers, vae_to_diffusers
from ldm.diffusion import Denoiser, NoiseSchedule, diffusion_loss
from ldm.samplers import CFGDenoiser, get_sigmas, sample_dpmpp_2m
from ldm.unet import UNet, UNetConfig, unet_config

E2E_SLACK = 2.0  # ours may be this many times as far from fp32 as the baseline's bf16 is ...
E2E_FLOOR = 1e-3  # ... plus this (relative L2): a bound for a baseline that happens to round very little
AMP_DTYPE = torch.bfloat16  # autocast over fp32 weights, as diffusers' mixed-precision training runs
CHECK_BATCH = 2  # the check's batch: the fp32 reference of sd15 with its backward at batch 8 is needlessly big
SCHEDULE = "scaled_linear"  # SD 1.x's
GUIDANCE = 7.5
TEXT_TOKENS = 77
VAE_SCALING_FACTOR = 0.18215  # SD 1.x's; written into diffusers' config only, encode/decode do not use it
BASELINE = "diffusers"
PROVIDERS = ("ours", "ours-triton", "ours-torch", BASELINE)

# A UNet diffusers can express, at toy size, for the dry run: two levels with cross-attention, the
# cross-attention middle, 4 heads of 8 and 16 channels.
TOY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                      mid_attention=True, num_heads=4, context_dim=64)


@dataclass(frozen=True)
class Sizes:
    unet: str  # a preset of ldm.unet.UNET_CONFIGS, or "toy" (TOY_UNET)
    latent: int
    train_batch: int
    sample_batch: int
    steps: int
    vae: str  # a preset of autoencoder.VAE_CONFIGS
    vae_resolution: int
    vae_batch: int
    min_rounds: int
    max_rounds: int


SIZES = {
    "gpu": Sizes(unet="sd15", latent=64, train_batch=8, sample_batch=4, steps=25, vae="sd", vae_resolution=512,
                 vae_batch=4, min_rounds=3, max_rounds=50),
    "dry": Sizes(unet="toy", latent=8, train_batch=2, sample_batch=1, steps=3, vae="tiny", vae_resolution=32,
                 vae_batch=2, min_rounds=1, max_rounds=1),
}
# Shares of the section's time left when each mode starts (the model builds come out of them)
SHARES = {"unet train step": 0.3, "unet sample": 0.5, "vae encode": 0.4, "vae decode": 1.0}


class DiffusersUNet(nn.Module):
    """diffusers' UNet behind our model contract, ``model(x, t, context=None, context_lengths=None)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context=None, context_lengths=None):
        mask = None
        if context_lengths is not None:  # (B, L): True keeps a token
            mask = torch.arange(context.shape[1], device=x.device) < context_lengths[:, None]
        return self.unet(x, t, encoder_hidden_states=context, encoder_attention_mask=mask, return_dict=False)[0]


class DiffusersVAE(nn.Module):
    """AutoencoderKL behind our VAE's ``encode(x).mode()`` and ``decode(z)``."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def encode(self, x):
        return self.vae.encode(x).latent_dist

    def decode(self, z):
        return self.vae.decode(z).sample


@contextlib.contextmanager
def exact_fp32():
    """The fp32 reference without TF32 (cuDNN convolutions use it by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def diffusers_import():
    """diffusers' two classes, or the reason they cannot be imported."""
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except Exception as e:  # ImportError, or a wheel that does not match this torch
        return None, f"diffusers is not importable ({short_error(e)}): baselines skipped; pass --wheels"
    return (UNet2DConditionModel, AutoencoderKL), ""


# ------------------------------------------------------------------------------------------ checks


def precision(dev: Device) -> str:
    return "fp32 (dry run)" if dev.dry_run else "bf16 autocast"


def _amp(dev: Device, on: bool):
    """bf16 autocast; fp32 in the dry run, where a bf16 convolution on the CPU takes ~5 ms even at toy
    size (PyTorch's slow path), which would make the dry run minutes long."""
    return torch.autocast(dev.type, dtype=AMP_DTYPE, enabled=on and not dev.dry_run)


def judge(errors: dict[str, dict[str, float]], baseline: str) -> dict[str, tuple[float, str]]:
    """errors: provider -> {quantity: relative L2 error against the fp32 reference}. Returns provider ->
    (worst error / bound, a note), the bound being E2E_SLACK x the baseline's error + E2E_FLOOR."""
    out = {}
    for provider, errs in errors.items():
        if isinstance(errs, str):  # the provider raised
            out[provider] = (math.inf, errs)
            continue
        ratios = {q: e / (E2E_SLACK * errors[baseline][q] + E2E_FLOOR) for q, e in errs.items()}
        worst = max(ratios, key=ratios.get)
        note = ", ".join(f"{q} {errs[q]:.2e} (baseline {errors[baseline][q]:.2e})" for q in errs)
        out[provider] = (ratios[worst], f"rel. L2 error vs fp32: {note}")
    return out


def bf16_errors(models: dict, baseline: str, run, measure) -> dict:
    """Each provider's ``measure(run(model, amp=True))`` (its errors against the reference), or "raised ..."
    when its run raises; the baseline's exception propagates (nothing to compare against without it)."""
    errors = {}
    for name, model in models.items():
        try:
            got = run(model, amp=True)
        except Exception as e:
            if name == baseline:
                raise
            errors[name] = f"raised {short_error(e)}"
            continue
        errors[name] = measure(got)
    return errors


def check_unet(models: dict, reference: nn.Module, cfg: UNetConfig, sizes: Sizes, dev: Device, baseline: str,
               seed: int) -> dict[str, tuple[float, str]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(CHECK_BATCH, cfg.in_channels, sizes.latent, sizes.latent, generator=gen).to(dev.torch)
    t = torch.randint(0, 1000, (CHECK_BATCH,), generator=gen).float().to(dev.torch)
    context = torch.randn(CHECK_BATCH, TEXT_TOKENS, cfg.context_dim, generator=gen).to(dev.torch)
    weight = torch.randn(x.shape, generator=gen).to(dev.torch)  # a fixed projection to differentiate

    def run(model, amp: bool):
        xi = x.clone().requires_grad_()
        with _amp(dev, amp):
            out = model(xi, t, context=context)
        (dx,) = torch.autograd.grad((out.float() * weight).sum(), xi)
        return out.detach().float(), dx

    for m in (*models.values(), reference):
        m.eval()
    with exact_fp32():
        ref_out, ref_dx = run(reference, amp=False)
    errors = bf16_errors(models, baseline, run,
                         lambda got: {"output": rel_l2(got[0], ref_out), "d/dx": rel_l2(got[1], ref_dx)})
    return judge(errors, baseline)


def check_vae(models: dict, reference, cfg: VAEConfig, sizes: Sizes, dev: Device, baseline: str,
              seed: int) -> dict[str, tuple[float, str]]:
    gen = torch.Generator().manual_seed(seed)
    f = 2 ** (len(cfg.channel_mult) - 1)
    x = torch.rand(CHECK_BATCH, cfg.in_channels, sizes.vae_resolution, sizes.vae_resolution, generator=gen)
    x = (2 * x - 1).to(dev.torch)  # images in [-1, 1]
    z = torch.randn(CHECK_BATCH, cfg.latent_channels, sizes.vae_resolution // f, sizes.vae_resolution // f,
                    generator=gen).to(dev.torch)

    def run(model, amp: bool):
        with torch.no_grad(), _amp(dev, amp):
            return model.encode(x).mode().float(), model.decode(z).float()

    with exact_fp32():
        ref = run(reference, amp=False)
    errors = bf16_errors(models, baseline, run,
                         lambda got: {"encode": rel_l2(got[0], ref[0]), "decode": rel_l2(got[1], ref[1])})
    return judge(errors, baseline)


# ------------------------------------------------------------------------------------------ units of work


def train_step(model: nn.Module, cfg: UNetConfig, sizes: Sizes, dev: Device):
    schedule = NoiseSchedule.from_name(SCHEDULE)
    x0 = torch.randn(sizes.train_batch, cfg.in_channels, sizes.latent, sizes.latent, device=dev.torch)
    context = torch.randn(sizes.train_batch, TEXT_TOKENS, cfg.context_dim, device=dev.torch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        model.train()
        with _amp(dev, True):
            loss = diffusion_loss(model, x0, schedule, context=context).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sampler(model: nn.Module, cfg: UNetConfig, sizes: Sizes, dev: Device):
    schedule = NoiseSchedule.from_name(SCHEDULE)
    sigmas = get_sigmas(schedule, sizes.steps, karras=True, device=dev.torch)
    denoiser = CFGDenoiser(Denoiser(model, schedule), GUIDANCE)
    context = torch.randn(sizes.sample_batch, TEXT_TOKENS, cfg.context_dim, device=dev.torch)
    uncond = torch.randn(1, TEXT_TOKENS, cfg.context_dim, device=dev.torch)  # the empty prompt's tokens
    x = torch.randn(sizes.sample_batch, cfg.in_channels, sizes.latent, sizes.latent, device=dev.torch) * sigmas[0]

    def run():
        model.eval()
        with torch.no_grad(), _amp(dev, True):
            sample_dpmpp_2m(denoiser, x, sigmas, extra_args={"context": context, "uncond_context": uncond},
                            disable=True)

    return run


def vae_call(model, mode: str, cfg: VAEConfig, sizes: Sizes, dev: Device):
    f = 2 ** (len(cfg.channel_mult) - 1)
    side = sizes.vae_resolution
    x = torch.rand(sizes.vae_batch, cfg.in_channels, side, side, device=dev.torch) * 2 - 1
    z = torch.randn(sizes.vae_batch, cfg.latent_channels, side // f, side // f, device=dev.torch)

    def run():
        with torch.no_grad(), _amp(dev, True):
            if mode == "encode":
                model.encode(x).mode()
            else:
                model.decode(z)

    return run


# ------------------------------------------------------------------------------------------ the section


def time_mode(rows: list[E2ERow], model_name: str, case: str, mode: str, calls: dict, checks: dict,
              items: int, dev: Device, clock: SectionClock, sizes: Sizes, missing: str) -> None:
    """Rows of one mode: checked providers timed in alternation; the rest FAILED, skipped or cut."""
    mine = {p: E2ERow(model_name, case, mode, p, BASELINE, SKIPPED) for p in PROVIDERS}
    rows += mine.values()
    if missing:
        mine[BASELINE].note = missing
    if "ours-triton" not in calls:
        mine["ours-triton"].note = "GPU only: on the CPU Triton runs only through its interpreter"
    timed = {}
    for p, call in calls.items():
        ratio, note = checks[p]
        mine[p].check, mine[p].note = ratio, note
        if ratio > 1.0:
            mine[p].status = FAILED
            mine[p].note = f"check: {ratio:.3g} x the bound; not timed. {note}"
        else:
            timed[p] = call
    seconds = clock.share_left(SHARES[f"{model_name} {mode}"])
    if clock.expired() or not timed:
        for p in timed:
            mine[p].status, mine[p].note = CUT, "section budget spent"
        if timed:
            clock.cut(f"{model_name} {mode}")
        return
    for p, call in list(timed.items()):  # the warm-up call, where a provider that raises drops out
        try:
            call()
        except Exception as e:
            del timed[p]
            mine[p].status = FAILED if p != BASELINE else SKIPPED
            mine[p].note = f"raised {short_error(e)}"
    if not timed:
        return
    runs = interleave(timed, dev, seconds=seconds, min_rounds=sizes.min_rounds, max_rounds=sizes.max_rounds,
                      warmup=False)
    for p, times in runs.items():
        median = sorted(times)[len(times) // 2]
        mine[p].status, mine[p].ms, mine[p].rounds = PASS, median * 1e3, len(times)
        mine[p].images_per_s = items / median
    base = mine[BASELINE].ms
    for r in mine.values():
        if base and r.ms:
            r.speedup = base / r.ms


def run_unet(rows: list[E2ERow], dev: Device, sizes: Sizes, clock: SectionClock, classes, missing: str,
             seed: int) -> list[str]:
    cfg = TOY_UNET if sizes.unet == "toy" else unet_config(sizes.unet)
    torch.manual_seed(seed)
    with dev.torch:  # 860M parameters initialized where they live, not on the CPU
        ours = unzero_(UNet(cfg))
        theirs = None
        if classes:
            UNet2DConditionModel = classes[0]
            theirs = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg, sample_size=sizes.latent))
            theirs.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg))
            theirs = DiffusersUNet(theirs)
    n_ours = sum(p.numel() for p in ours.parameters())
    notes = [f"UNet '{sizes.unet}': {n_ours:,} parameters" +
             (f", diffusers' {sum(p.numel() for p in theirs.parameters()):,}" if theirs is not None else "")]
    checks = _checked(lambda models, reference, baseline: check_unet(models, reference, cfg, sizes, dev, baseline,
                                                                     seed), ours, theirs)
    case = f"{sizes.unet} {sizes.latent}x{sizes.latent} latents"
    for mode, make, batch in (("train step", train_step, sizes.train_batch), ("sample", sampler, sizes.sample_batch)):
        calls = {"ours": make(ours, cfg, sizes, dev)}
        calls["ours-torch"] = off_call(calls["ours"])  # the same model and optimizer, our kernels off
        if dev.type == "cuda":
            calls["ours-triton"] = triton_call(calls["ours"])  # ... and every op on our kernels
        if theirs is not None:
            calls[BASELINE] = make(theirs, cfg, sizes, dev)
        label = f"{case}, batch {batch}" + (f", {sizes.steps} DPM-Solver++(2M) steps, CFG {GUIDANCE}"
                                            if mode == "sample" else f", {precision(dev)}, AdamW")
        time_mode(rows, "unet", label, mode, calls, checks, batch, dev, clock, sizes, missing)
        del calls
        free_memory()
    return notes


def _checked(check, ours, theirs) -> dict[str, tuple[float, str]]:
    """Run ``check`` with the reference and baseline it can have: diffusers' fp32 output and bf16 error
    when diffusers is there, else ours with PyTorch's ops (fp32 reference, bf16 baseline). "ours-torch"
    is checked with our kernels off."""
    wrapped = {"ours": ours, "ours-torch": _Wrapped(ours)}
    if next(iter(ours.parameters())).is_cuda:
        wrapped["ours-triton"] = _Wrapped(ours, triton_call)
    if theirs is not None:
        wrapped[BASELINE] = theirs
        return check(wrapped, theirs, BASELINE)
    return check(wrapped, _Wrapped(ours), "ours-torch")


class _Wrapped:
    """A model whose every call (forward, encode, decode) runs through ``wrap`` (default: our kernels
    off; ``triton_call``: every op on them)."""

    def __init__(self, model, wrap=off_call):
        self.model, self.wrap = model, wrap

    def __call__(self, *args, **kwargs):
        return self.wrap(self.model)(*args, **kwargs)

    def encode(self, x):
        return self.wrap(self.model.encode)(x)

    def decode(self, z):
        return self.wrap(self.model.decode)(z)

    def eval(self):
        self.model.eval()
        return self


def run_vae(rows: list[E2ERow], dev: Device, sizes: Sizes, clock: SectionClock, classes, missing: str,
            seed: int) -> list[str]:
    cfg = VAE_CONFIGS[sizes.vae]
    torch.manual_seed(seed)
    with dev.torch:
        ours = unzero_(VAE(cfg)).eval()
        theirs = None
        if classes:
            AutoencoderKL = classes[1]
            theirs = AutoencoderKL.from_config(vae_config_to_diffusers(cfg, VAE_SCALING_FACTOR))
            theirs.load_state_dict(vae_to_diffusers(ours.state_dict(), cfg))
            theirs = DiffusersVAE(theirs.eval())
    notes = [f"VAE '{sizes.vae}': {sum(p.numel() for p in ours.parameters()):,} parameters" +
             (f", diffusers' {sum(p.numel() for p in theirs.parameters()):,}" if theirs is not None else "")]
    checks = _checked(lambda models, reference, baseline: check_vae(models, reference, cfg, sizes, dev, baseline,
                                                                    seed), ours, theirs)
    case = f"{sizes.vae} {sizes.vae_resolution}x{sizes.vae_resolution}, batch {sizes.vae_batch}, {precision(dev)}"
    for mode in ("encode", "decode"):
        calls = {"ours": vae_call(ours, mode, cfg, sizes, dev)}
        calls["ours-torch"] = off_call(calls["ours"])
        if dev.type == "cuda":
            calls["ours-triton"] = triton_call(calls["ours"])
        if theirs is not None:
            calls[BASELINE] = vae_call(theirs, mode, cfg, sizes, dev)
        time_mode(rows, "vae", case, mode, calls, checks, sizes.vae_batch, dev, clock, sizes, missing)
    return notes


def run(dev: Device, clock: SectionClock, args) -> dict:
    sizes = SIZES["dry" if dev.dry_run else "gpu"]
    classes, missing = diffusers_import()
    rows: list[E2ERow] = []
    notes = []
    if missing:
        notes.append(missing + ". The checks then use our models with PyTorch's ops as the reference.")
    else:
        import diffusers

        notes.append(f"diffusers {diffusers.__version__}, its models built from our configs and loaded with our "
                     "weights through ldm.convert.")
    t0 = time.perf_counter()
    notes += run_unet(rows, dev, sizes, clock, classes, missing, args.seed)
    free_memory()
    if clock.expired():  # not even the VAE's build: the section's time is spent
        clock.cut("the VAE (not built)")
    else:
        notes += run_vae(rows, dev, sizes, clock, classes, missing, args.seed)
        free_memory()
    notes.append(f"Check: each provider's {precision(dev)} output (UNet: and the gradient in its input latents) "
                 f"against the fp32 output of {'diffusers' if classes else 'ours with PyTorch ops'} on the same "
                 f"inputs (batch {CHECK_BATCH}; weights with no all-zero layer, so every block reaches the output); "
                 f"bound: {E2E_SLACK:g} x the baseline's own bf16 error + {E2E_FLOOR:g}. "
                 f"Times: medians, providers in alternation; section {time.perf_counter() - t0:.0f} s.")
    return {"rows": rows, "notes": notes}
