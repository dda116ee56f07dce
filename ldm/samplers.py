"""Samplers: plain functions with one signature, after k-diffusion (Crowson), plus guidance and inversion.

    sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x0

``model(x, sigma, **extra_args) -> denoised x0`` is the denoiser contract (``ldm.diffusion.Denoiser``
wraps a network, ``CFGDenoiser`` adds classifier-free guidance on text, ``ClassCFGDenoiser`` on class
labels); ``x`` is the starting noise already scaled by ``sigmas[0]``; ``sigmas`` decreases to 0
(``get_sigmas``). ``callback`` gets a dict
(``x``, ``i``, ``sigma``, ``sigma_next``, ``denoised``) after every step; ``disable`` turns the
progress bar off (None: off when not on a terminal). Stochastic samplers take ``generator=``.
In these coordinates (x = x0 + sigma * noise) every update below is a few lines; the papers'
alpha_t x0 + sigma_t eps forms are the same steps scaled by alpha_t.

Image-to-image at strength s in (0, 1]: keep the last k = round(s * steps) steps,
``sigmas[steps - k:]``, and start from ``init_latent + sigmas[steps - k] * noise``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from tqdm.auto import trange

from ldm.diffusion import NoiseSchedule


SIGMA_CAP = 10.0  # the Karras ramp's top in the samplers' default spacing; see get_sigmas


def get_sigmas(schedule: NoiseSchedule, steps: int, karras: bool = False, rho: float = 7.0,
               sigma_min: float | None = None, sigma_max: float | None = None, device=None,
               dtype: torch.dtype = torch.float32, sigma_cap: float | None = None) -> torch.Tensor:
    """``steps + 1`` decreasing sigmas ending in 0 for a sampler run of ``steps`` model calls.

    Default: timesteps evenly spaced from T-1 down to 0 (1000 steps on a T = 1000 schedule are
    exactly DDPM's). ``karras``: sigma^(1/rho) evenly spaced between sigma_max and sigma_min
    (Karras et al. 2022, eq. 5), the schedule's ends unless given; denser at low noise, it is the
    one to use with few steps (DPM-Solver++ at 20 steps on the Gaussian mixture of
    tests/test_samplers.py: even-t spacing misses its covariances by up to 0.08, ~12 standard
    errors at 10000 samples; Karras spacing stays within sampling error).

    ``sigma_cap`` (with ``karras``): when the schedule starts above it, one step goes from sigma_max
    down to the cap and the ramp spans [sigma_min, cap] with the other steps. Far above the data's
    scale the denoiser is nearly linear in x and one exponential-integrator step crosses that range;
    the linear schedule's sigma_max of 157 otherwise spends a third of a 20-step ramp there. On the
    mixture (data sd ~1.7, ``ldm.mixture``): UniPC at 20 steps, bias 10.4 standard errors of 20000
    samples uncapped, 2.5 at cap 10; a cap of 3 or 5 leaves a floor (3.0 / 1.2 even at 50 steps),
    10 does not (0.6). ``SIGMA_CAP`` = 10 is for data of unit scale, as our latents are.
    """
    if steps < 1:
        raise ValueError(f"get_sigmas: steps must be at least 1, got {steps}")
    if karras:
        lo = schedule.sigma_min if sigma_min is None else sigma_min
        hi = schedule.sigma_max if sigma_max is None else sigma_max
        if not 0 < lo <= hi:
            raise ValueError(f"get_sigmas: need 0 < sigma_min <= sigma_max, got {lo} and {hi}")
        top = hi
        if sigma_cap is not None:
            if not sigma_cap > lo:
                raise ValueError(f"get_sigmas: sigma_cap must exceed sigma_min {lo}, got {sigma_cap}")
            if hi > sigma_cap and steps >= 2:
                top, steps = sigma_cap, steps - 1  # one step from sigma_max to the cap, the ramp below it
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        sigmas = (top ** (1 / rho) + ramp * (lo ** (1 / rho) - top ** (1 / rho))) ** rho  # (steps,)
        if top != hi:
            sigmas = torch.cat([sigmas.new_tensor([hi]), sigmas])
    else:
        if sigma_min is not None or sigma_max is not None or sigma_cap is not None:
            raise ValueError("get_sigmas: sigma_min / sigma_max / sigma_cap apply to karras=True only")
        t = torch.linspace(schedule.num_timesteps - 1, 0, steps, dtype=torch.float64)
        sigmas = schedule.t_to_sigma(t)  # (steps,)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=dtype)  # (steps + 1,)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _check_sigmas(sigmas: torch.Tensor) -> list[float]:
    """The schedule as Python floats (one device sync per run; the step arithmetic runs in float64)."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
        got = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 values, got {got}")
    s = sigmas.tolist()
    if any(s[i + 1] >= s[i] for i in range(len(s) - 1)) or s[-1] < 0:
        raise ValueError("sigmas must decrease strictly and stay non-negative (get_sigmas makes such schedules)")
    return s


def _steps(sigmas: torch.Tensor, disable):
    """(i, sigma, sigma_next) for each step, with a progress bar."""
    s = _check_sigmas(sigmas)
    for i in trange(len(s) - 1, disable=disable):
        yield i, s[i], s[i + 1]


def _denoise(model, x, sigma: float, extra_args) -> torch.Tensor:
    return model(x, x.new_full((x.shape[0],), sigma), **(extra_args or {}))  # (B, ...)


def _report(callback, x, i, sigma, sigma_next, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, *, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, generator=None):
    """Euler on the probability-flow ODE, with optional churn (Karras et al. 2022, Algorithm 2)."""
    n = len(sigmas) - 1
    for i, sigma, sigma_next in _steps(sigmas, disable):
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        if gamma > 0:  # raise the noise level to sigma_hat by adding fresh noise
            sigma_hat = sigma * (1 + gamma)
            x = x + _noise_like(x, generator) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
            sigma = sigma_hat
        denoised = _denoise(model, x, sigma, extra_args)
        d = (x - denoised) / sigma  # dx/dsigma
        x = x + d * (sigma_next - sigma)
        _report(callback, x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, *, eta: float = 0.0,
                generator=None):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"); eta=0 deterministic, eta=1 DDPM's posterior."""
    if not 0.0 <= eta <= 1.0:  # past 1 the posterior's variance exceeds sigma_next^2: a negative root
        raise ValueError(f"sample_ddim: eta must lie in [0, 1], got {eta}")
    for i, sigma, sigma_next in _steps(sigmas, disable):
        denoised = _denoise(model, x, sigma, extra_args)
        eps = (x - denoised) / sigma
        # eq. 16 in these coordinates: the DDPM posterior variance times eta^2
        var = eta**2 * sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
        x = denoised + (sigma_next**2 - var) ** 0.5 * eps
        if var > 0:
            x = x + var**0.5 * _noise_like(x, generator)
        _report(callback, x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, *, generator=None):
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0 = denoised) (Ho et al. 2020, eq. 6-7)."""
    for i, sigma, sigma_next in _steps(sigmas, disable):
        denoised = _denoise(model, x, sigma, extra_args)
        # In x = x0 + sigma noise coordinates the forward chain adds N(0, sigma^2 - sigma_next^2), so
        # the posterior is N(x0 + r (x - x0), sigma_next^2 (1 - r)) with r = sigma_next^2 / sigma^2.
        r = sigma_next**2 / sigma**2
        x = denoised + r * (x - denoised)
        if sigma_next > 0:
            x = x + (sigma_next**2 * (1 - r)) ** 0.5 * _noise_like(x, generator)
        _report(callback, x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M), multistep second order in the data prediction (Lu et al. 2022, "DPM-Solver++", Alg. 2)."""
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in _steps(sigmas, disable):
        denoised = _denoise(model, x, sigma, extra_args)
        if sigma_next == 0:  # the last step lands on the data prediction
            x = denoised
        else:
            h = math.log(sigma / sigma_next)  # step in lambda = -log sigma (half the log-SNR)
            d = denoised
            if old_denoised is not None:  # second order: extrapolate the data prediction in lambda
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        _report(callback, x, i, sigma, sigma_next, denoised)
    return x


def _unipc_weights(ratios: list[float], h: float) -> list[float]:
    """UniPC's weights rho for the divided differences of the data prediction (Zhao et al. 2023, Alg. 1
    with B(h) = e^-h - 1, the "bh2" variant). ``ratios`` r_k = (lambda_k - lambda) / h of the points
    used, the last being the step's far end (r = 1) for a corrector; solves sum_k rho_k r_k^(j-1) =
    j! phi_(j+1)(-h) (-h) / B(h), j = 1..len(ratios), phi the exponential integrator's phi functions."""
    hh = -h
    B = math.expm1(hh)
    phi = math.expm1(hh) / hh  # phi_1(hh)
    rhs, fact = [], 1.0
    for j in range(1, len(ratios) + 1):
        phi = (phi - 1.0 / fact) / hh  # phi_(j+1)
        rhs.append(hh * phi * fact / B)
        fact *= j + 1
    if len(ratios) == 1:
        return [0.5]  # the paper's choice for one difference (the solve would give B-dependent ~0.5)
    R = torch.tensor([[r ** (j - 1) for r in ratios] for j in range(1, len(ratios) + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(rhs, dtype=torch.float64)).tolist()


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, *, order: int = 3,
                 corrector: bool = True, lower_order_final: bool = True):
    """UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework"): multistep predictor of
    ``order`` in the data prediction, and a corrector that reuses the model call at the new point, so a
    run of n steps costs n model calls. The order warms up over the first steps and winds down over the
    last ones (fewer points to extrapolate from, and a last step that lands on the data prediction)."""
    if order not in (1, 2, 3):
        raise ValueError(f"sample_unipc: order must be 1, 2 or 3, got {order}")
    s = _check_sigmas(sigmas)
    n = len(s) - 1
    lambdas, outs = [], []  # lambda = -log sigma and the data prediction of every point so far
    x_prev, used = None, 0  # the point the last step started from, and that step's order
    for i, sigma, sigma_next in _steps(sigmas, disable):
        denoised = _denoise(model, x, sigma, extra_args)
        lam = -math.log(sigma)
        if corrector and x_prev is not None:  # correct the last step with the model output at its end
            h = lam - lambdas[-1]
            ratios = [(lambdas[-1 - k] - lambdas[-1]) / h for k in range(1, used)] + [1.0]
            diffs = [(outs[-1 - k] - outs[-1]) / r for k, r in zip(range(1, used), ratios)] + [denoised - outs[-1]]
            rho = _unipc_weights(ratios, h)
            x = (sigma / s[i - 1]) * x_prev + (1 - sigma / s[i - 1]) * outs[-1]
            x = x - math.expm1(-h) * sum(r * d for r, d in zip(rho, diffs))
        lambdas.append(lam)
        outs.append(denoised)  # the output at the point as predicted, as UniPC keeps it
        if sigma_next == 0:  # the last step lands on the data prediction
            x = denoised
            _report(callback, x, i, sigma, sigma_next, denoised)
            break
        h = -math.log(sigma_next) - lam
        used = min(order, len(outs))  # warm-up: as many points as there are
        if lower_order_final:
            used = max(1, min(used, n - 1 - i))
        x_prev = x
        x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * denoised  # first order (DDIM)
        if used > 1:
            ratios = [(lambdas[-1 - k] - lam) / h for k in range(1, used)]
            diffs = [(outs[-1 - k] - denoised) / r for k, r in zip(range(1, used), ratios)]
            rho = _unipc_weights(ratios, h)
            x = x - math.expm1(-h) * sum(r * d for r, d in zip(rho, diffs))
        _report(callback, x, i, sigma, sigma_next, denoised)
    return x


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "unipc": sample_unipc,
}


@torch.no_grad()
def ddim_invert(model, x, sigmas, extra_args=None, callback=None, disable=None, *, fixed_point_iters: int = 0):
    """DDIM inversion (Song et al. 2021, sec. 4.3; Dhariwal & Nichol 2021): a clean latent -> the noise
    that deterministic DDIM (``sample_ddim``, eta=0, same ``sigmas``) maps back onto it.

    ``sigmas`` is the sampling schedule (decreasing to 0); inversion walks it backwards and returns
    x at ``sigmas[0]``. Plain inversion evaluates the model at the start of each step, where sampling
    evaluates it at the end; ``fixed_point_iters`` > 0 re-solves each step for the point that the
    sampling step maps back exactly (fixed-point iteration, as in Pan et al. 2023, "Effective Real
    Image Editing with Accelerated Iterative Diffusion Inversion").
    """
    s = _check_sigmas(sigmas)
    if fixed_point_iters < 0:
        raise ValueError(f"ddim_invert: fixed_point_iters must be >= 0, got {fixed_point_iters}")
    steps = len(s) - 1
    for n in trange(steps, disable=disable):
        i = steps - 1 - n  # invert sampling step i: sigma_to (larger) -> sigma_from (smaller)
        sigma_from, sigma_to = s[i + 1], s[i]
        x_from = x
        # evaluate the model at x_from; from sigma_from = 0 the clean latent stands for the point at sigma_to
        sigma_eval = sigma_from if sigma_from > 0 else sigma_to
        denoised = _denoise(model, x_from, sigma_eval, extra_args)
        x = denoised + sigma_to * (x_from - denoised) / sigma_eval
        for _ in range(fixed_point_iters):
            # sampling step i from x lands exactly on x_from when x = x_from + (sigma_to - sigma_from) d(x),
            # d(x) = (x - denoised(x)) / sigma_to: iterate that map (a contraction for a well-trained model)
            denoised = _denoise(model, x, sigma_to, extra_args)
            x = x_from + (1 - sigma_from / sigma_to) * (x - denoised)
        _report(callback, x, n, sigma_from, sigma_to, denoised)
    return x


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond), the conditional
    and unconditional halves in ONE batched call of the wrapped denoiser.

    ``cfg(x, sigma, context, context_lengths=None, uncond_context=..., uncond_context_lengths=None)``;
    the unconditional context (the empty prompt's tokens) may have batch 1 (broadcast) and another
    length L than the prompts: the shorter is zero-padded and masked through the lengths.
    """

    def __init__(self, model, scale: float):
        super().__init__()
        self.inner_model = model
        self.scale = scale

    def forward(self, x, sigma, context, context_lengths=None, *, uncond_context, uncond_context_lengths=None,
                **extra_args):
        B = x.shape[0]
        if context.dim() != 3 or context.shape[0] != B:
            raise ValueError(f"CFGDenoiser: context must be ({B}, L, C) for x of batch {B}, got {tuple(context.shape)}")
        if uncond_context.dim() != 3 or uncond_context.shape[0] not in (1, B) \
                or uncond_context.shape[2] != context.shape[2]:
            raise ValueError(f"CFGDenoiser: uncond_context must be (1 or {B}, L', {context.shape[2]}), "
                             f"got {tuple(uncond_context.shape)}")
        uncond_context = uncond_context.expand(B, -1, -1)  # (B, L', C)
        L_c, L_u = context.shape[1], uncond_context.shape[1]
        L = max(L_c, L_u)
        if context_lengths is None and uncond_context_lengths is None and L_c == L_u:
            lengths = None
        else:
            lengths = torch.cat([_lengths(context_lengths, B, L_c, x.device),
                                 _lengths(uncond_context_lengths, B, L_u, x.device)])  # (2B,)
        both = torch.cat([_pad_tokens(context, L), _pad_tokens(uncond_context, L)])  # (2B, L, C)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(B)  # (B,)
        out = self.inner_model(torch.cat([x, x]), torch.cat([sigma, sigma]), context=both,
                               context_lengths=lengths, **extra_args)  # (2B, ...)
        cond, uncond = out.chunk(2)
        return uncond + self.scale * (cond - uncond)


class ClassCFGDenoiser(nn.Module):
    """Classifier-free guidance of a class-conditional model: ``uncond + scale * (cond - uncond)``, the
    unconditional half run as the null class, both halves in ONE batched call of the wrapped denoiser.

    ``cfg(x, sigma, class_labels, *, null_class)``; class_labels (B,) integers, null_class the
    label the model was trained to treat as "no class" (``UNetConfig.num_classes``).
    """

    def __init__(self, model, scale: float):
        super().__init__()
        self.inner_model = model
        self.scale = scale

    def forward(self, x, sigma, class_labels, *, null_class: int, **extra_args):
        B = x.shape[0]
        if class_labels.shape != (B,):
            raise ValueError(f"ClassCFGDenoiser: class_labels must be ({B},) for x of batch {B}, "
                             f"got {tuple(class_labels.shape)}")
        labels = torch.cat([class_labels, torch.full_like(class_labels, null_class)])  # (2B,)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(B)  # (B,)
        out = self.inner_model(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=labels,
                               **extra_args)  # (2B, ...)
        cond, uncond = out.chunk(2)
        return uncond + self.scale * (cond - uncond)


def _lengths(lengths, B, L, device):
    if lengths is None:
        return torch.full((B,), L, device=device, dtype=torch.long)
    return lengths.to(device=device, dtype=torch.long).expand(B)  # (B,)


def _pad_tokens(context, L):
    return torch.nn.functional.pad(context, (0, 0, 0, L - context.shape[1]))  # (B, L, C)
