"""CLIP guidance (Nichol et al. 2022, "GLIDE", section 2.4): steer sampling with the gradient of a
noise-aware CLIP's similarity between the noisy latent and the prompt.

GLIDE shifts the reverse-step mean by s * Sigma * grad log p(c | x_t), with log p taken as the CLIP
similarity. In the k-diffusion contract (``denoiser(x, sigma) -> x0 estimate``) the model's score is
(D(x) - x) / sigma^2, so adding s * grad_x sim(x) to the score is

    D'(x) = D(x) + s * sigma^2 * grad_x sim(x),     sim(x) = <f_img(x * c_in, t(sigma)), f_txt(prompt)>

with x_t = x * c_in the input the UNet sees and f unit-norm embeddings of a CLIP trained on such
noisy latents (``python -m ldm.train_clip --vae DIR``). ``ClipGuidedDenoiser`` wraps any denoiser
(also ``CFGDenoiser``, so guidance stacks on classifier-free guidance) and works with every sampler.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ldm.diffusion import NoiseSchedule
from ldm.errors import InputError


def append_dims(v: torch.Tensor, n: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (n - v.dim()))


def clip_similarity_grad(clip, schedule: NoiseSchedule, x: torch.Tensor, sigma: torch.Tensor,
                         text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x of sum_b <f_img(x_b * c_in, t_b), text_b>: x (B, C, h, w) in sigma space, sigma (B,), text
    (B, D) unit norm -> (similarities (B,), gradient (B, C, h, w))."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        c_in = append_dims((1 + sigma ** 2).rsqrt(), x.dim())  # (B, 1, 1, 1) = sqrt(alpha_bar)
        t = schedule.sigma_to_t(sigma).to(x.dtype)  # (B,) fractional timesteps
        sims = (clip.image_features(xg * c_in, t) * text.to(x.dtype)).sum(-1)  # (B,)
        (grad,) = torch.autograd.grad(sims.sum(), xg)
    return sims.detach(), grad


class ClipGuidedDenoiser(nn.Module):
    """``D'(x, sigma) = D(x, sigma) + scale * sigma^2 * grad_x sim(x)`` around any denoiser ``D``."""

    def __init__(self, model, clip, text: torch.Tensor, scale: float, schedule: NoiseSchedule):
        super().__init__()
        self.inner_model, self.clip, self.scale, self.schedule = model, clip, scale, schedule
        self.text = text  # (B, D) unit norm, a row per image of the batch

    def forward(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        denoised = self.inner_model(x, sigma, **extra_args)  # (B, C, h, w)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(x.shape[0])  # (B,)
        _, grad = clip_similarity_grad(self.clip, self.schedule, x, sigma, self.text)
        return denoised + (self.scale * append_dims(sigma, x.dim()) ** 2 * grad).to(denoised.dtype)


class ClipGuide:
    """What ``ldm.pipeline.generate`` takes as ``guide``: per batch, ``guide(rows) (denoiser) -> denoiser``
    with the prompts' text embeddings of that batch's rows."""

    def __init__(self, clip, text: torch.Tensor, scale: float, schedule: NoiseSchedule):
        self.clip, self.text, self.scale, self.schedule = clip, text, scale, schedule

    def __call__(self, rows: torch.Tensor):
        text = self.text.to(rows.device)[rows]  # (b, D)
        return lambda denoiser: ClipGuidedDenoiser(denoiser, self.clip, text, self.scale, self.schedule)


def clip_guide(clip, prompts: list[str], scale: float, schedule: NoiseSchedule,
               latent_shape: tuple[int, int, int], device) -> ClipGuide:
    """A guide for ``prompts`` from a noise-aware CLIP that reads latents of ``latent_shape``."""
    if not getattr(clip, "noise_aware", False):
        raise InputError(f"{clip.meta.get('source', 'the CLIP')}: CLIP guidance needs a noise-aware CLIP "
                         "(python -m ldm.train_clip --vae DIR), which reads noisy latents")
    want = (clip.config.in_channels, clip.config.resolution, clip.config.resolution)
    if tuple(latent_shape) != want:
        raise InputError(f"{clip.meta.get('source', 'the CLIP')} reads latents {want}, the UNet samples "
                         f"{tuple(latent_shape)}")
    if not prompts:
        raise InputError("CLIP guidance needs prompts: pass --prompt TEXT or --prompts-file FILE")
    clip.to(device)
    return ClipGuide(clip, clip.encode_text(prompts).to(device), scale, schedule)
