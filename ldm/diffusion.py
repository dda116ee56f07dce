"""Diffusion maths: noise schedules, prediction targets, the denoiser wrapper and the training loss.

One forward process, two coordinate systems:

- the network's (DDPM, Ho et al. 2020): ``x_t = alpha_t x0 + s_t eps`` with ``alpha_t = sqrt(abar_t)``,
  ``s_t = sqrt(1 - abar_t)``, integer timesteps ``t = 0 .. T-1``; the UNet is trained on (x_t, t);
- the samplers' (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
  Models", as in k-diffusion): ``x = x0 + sigma eps`` with ``sigma = sqrt((1 - abar) / abar)``.

They are the same point scaled: ``x_t = x / sqrt(1 + sigma^2)``. ``Denoiser`` turns a network of the
first kind, whatever it predicts (eps, v or x0), into the samplers' contract
``denoiser(x, sigma, **extra_args) -> x0 estimate``. Nothing here imports a network.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

PREDICTIONS = ("eps", "v", "x0")


# ------------------------------------------------------------------------------------ schedules
def _from_betas(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)  # (T,)


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """betas linear in t (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"). -> abar (T,) float64."""
    return _from_betas(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))


def scaled_linear_schedule(num_timesteps: int = 1000, beta_start: float = 0.00085,
                           beta_end: float = 0.012) -> torch.Tensor:
    """sqrt(beta) linear in t, Stable Diffusion's schedule (Rombach et al. 2022). -> abar (T,) float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return _from_betas(betas)


def cosine_schedule(num_timesteps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """abar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2, betas clipped at max_beta
    (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"). -> abar (T,) float64."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # (T + 1,)
    f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)  # (T,)
    return _from_betas(betas)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear_schedule,
    "scaled_linear": scaled_linear_schedule,
    "cosine": cosine_schedule,
}


class NoiseSchedule:
    """A discrete schedule abar_0 > ... > abar_{T-1} and the map t <-> sigma = sqrt((1 - abar) / abar),
    linear in log sigma between integer timesteps, so fractional t and any sigma in range work."""

    def __init__(self, alphas_cumprod: torch.Tensor, name: str | None = None):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        if abar.dim() != 1 or abar.numel() < 2:
            raise ValueError(f"NoiseSchedule: alphas_cumprod must be 1-D with T >= 2, got shape {tuple(abar.shape)}")
        if not ((abar > 0) & (abar < 1)).all() or not (abar[1:] < abar[:-1]).all():
            raise ValueError("NoiseSchedule: alphas_cumprod must decrease strictly inside (0, 1)")
        self.name = name
        self.alphas_cumprod = abar  # (T,) float64
        self.sigmas = ((1 - abar) / abar).sqrt()  # (T,) increasing
        self.log_sigmas = self.sigmas.log()
        self._cache: dict = {}

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000) -> NoiseSchedule:
        if name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {name!r}; expected one of {list(SCHEDULES)}")
        return cls(SCHEDULES[name](num_timesteps), name=name)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def _table(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A float64 table moved to ``like``'s device, in float64 for float64 inputs, float32 otherwise."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (name, like.device, dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(like.device, dtype)
        return self._cache[key]

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps in [0, T-1] (fractional allowed) -> sigmas, same shape."""
        t = torch.as_tensor(t)
        t = t if t.is_floating_point() else t.float()
        log_sigmas = self._table("log_sigmas", t)
        t = t.to(log_sigmas.dtype).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low  # in [0, 1]
        return (torch.lerp(log_sigmas[low], log_sigmas[low + 1], w)).exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Sigmas -> fractional timesteps in [0, T-1] (clamped outside [sigma_min, sigma_max]), same shape."""
        sigma = torch.as_tensor(sigma)
        log_sigmas = self._table("log_sigmas", sigma)
        log_sigma = sigma.to(log_sigmas.dtype).log()
        low = (torch.searchsorted(log_sigmas, log_sigma.contiguous()) - 1).clamp(0, self.num_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low + w

    def alphas_cumprod_at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar at integer timesteps t, on ``like``'s device (float64 for float64 ``like``, else float32)."""
        return self._table("alphas_cumprod", like)[t.to(like.device)]

    def __repr__(self) -> str:
        return (f"NoiseSchedule(name={self.name!r}, T={self.num_timesteps}, "
                f"sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})")


# -------------------------------------------------------------------------- prediction targets
def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction target {prediction!r}; expected one of {PREDICTIONS}")
    return prediction


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dims in all, to broadcast over a batch of images."""
    return v.reshape(*v.shape, *([1] * (ndim - v.dim())))


def prediction_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor,
                      s: torch.Tensor) -> torch.Tensor:
    """What a network predicting ``prediction`` should output for x_t = alpha x0 + s noise
    (alpha^2 + s^2 = 1). v = alpha noise - s x0 (Salimans & Ho 2022, "Progressive Distillation")."""
    if check_prediction(prediction) == "eps":
        return noise
    if prediction == "x0":
        return x0
    return alpha * noise - s * x0


def x0_from_prediction(prediction: str, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                       s: torch.Tensor) -> torch.Tensor:
    """Invert ``prediction_target``: the x0 estimate implied by a network's output at x_t."""
    if check_prediction(prediction) == "eps":
        return (x_t - s * output) / alpha
    if prediction == "x0":
        return output
    return alpha * x_t - s * output


class Denoiser(nn.Module):
    """``denoiser(x, sigma, **extra_args) -> x0 estimate`` (the k-diffusion contract, Karras et al. 2022)
    for a network ``model(x_t, t, **extra_args)`` trained on ``schedule`` to predict ``prediction``.

    x (B, ...) is x0 + sigma * noise, sigma a (B,) tensor or a scalar. The network sees
    x_t = c_in x with c_in = 1/sqrt(1 + sigma^2) and the fractional timestep of sigma.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, prediction: str = "eps"):
        super().__init__()
        self.inner_model = model
        self.schedule = schedule
        self.prediction = check_prediction(prediction)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **extra_args) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(x.shape[0])  # (B,)
        c_in = append_dims((1 + sigma**2).rsqrt(), x.dim())  # (B, 1, ..., 1) = alpha_t
        x_t = x * c_in  # (B, ...)
        t = self.schedule.sigma_to_t(sigma)  # (B,)
        output = self.inner_model(x_t, t, **extra_args).to(x.dtype)  # (B, ...)
        return x0_from_prediction(self.prediction, output, x_t, c_in, append_dims(sigma, x.dim()) * c_in)


# ---------------------------------------------------------------------------------- training loss
def sample_timesteps(batch: int, num_timesteps: int, device=None, generator: torch.Generator | None = None, *,
                     focus: float = 0.0, focus_mean: float = 0.0, focus_std: float = 1.0) -> torch.Tensor:
    """Integer timesteps in [0, T). -> (B,) int64.

    ``focus`` 0: uniform. ``focus`` in (0, 1]: each timestep comes with probability ``focus`` from a
    logit-normal over t / T (logit(t / T) ~ N(focus_mean, focus_std^2), the timestep density of
    Esser et al. 2024, "Scaling Rectified Flow Transformers"), otherwise uniform. It trains more where
    the samples' content is decided; the uniform share keeps every noise level trained."""
    if not 0.0 <= focus <= 1.0:
        raise ValueError(f"sample_timesteps: focus must lie in [0, 1], got {focus}")
    if focus_std <= 0:
        raise ValueError(f"sample_timesteps: focus_std must be positive, got {focus_std}")
    if focus == 0.0:
        return torch.randint(0, num_timesteps, (batch,), device=device, generator=generator)
    pick = torch.rand(batch, device=device, generator=generator)  # (B,) < focus: logit-normal
    z = torch.randn(batch, device=device, generator=generator)  # (B,)
    uniform = torch.rand(batch, device=device, generator=generator)  # (B,)
    frac = torch.where(pick < focus, torch.sigmoid(focus_mean + focus_std * z), uniform)  # (B,) t / T in (0, 1)
    return (frac * num_timesteps).long().clamp(0, num_timesteps - 1)


def loss_weights(prediction: str, snr: torch.Tensor, min_snr_gamma: float | None = None) -> torch.Tensor:
    """Per-sample loss weights. Without ``min_snr_gamma``: 1, the plain MSE on each target. With it:
    min(SNR, gamma) on the x0 error (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy"), expressed on each target's error: |eps err|^2 = SNR |x0 err|^2 and
    |v err|^2 = (SNR + 1) |x0 err|^2, hence the divisions. snr (B,) -> (B,)."""
    check_prediction(prediction)
    if min_snr_gamma is None:
        return torch.ones_like(snr)
    if min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
    clipped = snr.clamp(max=min_snr_gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(model: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, prediction: str = "eps", *,
                   min_snr_gamma: float | None = None, t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   **model_kwargs) -> torch.Tensor:
    """Per-sample denoising losses (B,) for ``model(x_t, t, **model_kwargs)``; ``.mean()`` is the training loss.

    x0 (B, ...) clean latents; t (B,) integer timesteps and noise like x0 are drawn (uniform t,
    standard normal noise, from ``generator``) unless given. ``model_kwargs`` go to the model, e.g.
    ``context=..., context_lengths=...``. Each loss is the mean squared error on ``prediction``'s
    target times ``loss_weights(prediction, SNR(t), min_snr_gamma)``, computed in float32 or better.
    """
    check_prediction(prediction)
    B = x0.shape[0]
    if t is None:
        t = sample_timesteps(B, schedule.num_timesteps, x0.device, generator)
    elif t.shape != (B,) or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"diffusion_loss: t must be ({B},) integer timesteps, got {tuple(t.shape)} {t.dtype}")
    elif t.min() < 0 or t.max() >= schedule.num_timesteps:
        raise ValueError(f"diffusion_loss: t must lie in [0, {schedule.num_timesteps}), "
                         f"got {t.min().item()}..{t.max().item()}")
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    elif noise.shape != x0.shape:
        raise ValueError(f"diffusion_loss: noise {tuple(noise.shape)} must have x0's shape {tuple(x0.shape)}")
    abar = schedule.alphas_cumprod_at(t, x0)  # (B,) float32 (float64 for float64 x0)
    alpha, s = append_dims(abar.sqrt(), x0.dim()), append_dims((1 - abar).sqrt(), x0.dim())
    x_t = (alpha * x0 + s * noise).to(x0.dtype)  # (B, ...)
    output = model(x_t, t.to(abar.dtype), **model_kwargs)  # (B, ...)
    target = prediction_target(prediction, x0, noise, alpha, s)  # (B, ...)
    mse = (output.to(abar.dtype) - target.to(abar.dtype)).square().flatten(1).mean(1)  # (B,)
    return mse * loss_weights(prediction, abar / (1 - abar), min_snr_gamma)
