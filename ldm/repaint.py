"""RePaint: inpainting with any plain text-to-image model, no retraining (Lugmayr et al. 2022, "RePaint:
Inpainting using Denoising Diffusion Probabilistic Models").

At every step of an ancestral sampler the known region of the latents is replaced by the input's latents
noised to the current level, so the model only ever completes the masked region; ``resample`` > 1 goes
back up one step and down again that many times, letting the drawn region settle with the kept one
(RePaint's resampling with jumps of one step). The baseline ``ldm.eval_image2image --repaint`` scores
against an image-conditioned model. In the samplers' coordinates (``x = x0 + sigma eps``, Karras et al.
2022) the ancestral step is k-diffusion's Euler-ancestral split of DDPM's posterior noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.diffusion import Denoiser
from ldm.image2image import composited
from ldm.samplers import CFGDenoiser

DEFAULT_RESAMPLE = 2  # passes per step; RePaint used 10 on 250 steps (and 4.5x the time): 2 keeps it cheap


def ancestral_split(sigma: float, sigma_next: float) -> tuple[float, float]:
    """DDPM's step from sigma to sigma_next as (sigma_down, sigma_up): a deterministic move to sigma_down,
    then fresh noise of std sigma_up (sigma_down^2 + sigma_up^2 = sigma_next^2)."""
    up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


@torch.no_grad()
def repaint_latents(denoiser, known: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                    extra: dict, generator: torch.Generator, resample: int = DEFAULT_RESAMPLE) -> torch.Tensor:
    """known (B, C, h, w) clean latents of the input; mask (B, 1, h, w), 1 = draw; noise (B, C, h, w);
    sigmas decreasing to 0. -> (B, C, h, w) latents, the known region exactly ``known``."""
    def randn():
        return torch.randn(known.shape, generator=generator, device=known.device, dtype=known.dtype)

    x = noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        for r in range(resample):
            x = mask * x + (1 - mask) * (known + s * randn())  # the kept region at this step's level
            d = denoiser(x, torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype), **extra)  # (B, C, h, w)
            if s_next == 0:
                x = d
                break
            down, up = ancestral_split(s, s_next)
            x = d + (x - d) / s * down + up * randn()  # at s_next
            if r < resample - 1:
                x = x + (s**2 - s_next**2) ** 0.5 * randn()  # back up to s: forward noising of one step
    return mask * x + (1 - mask) * known


@torch.no_grad()
def repaint(pipe, images: torch.Tensor, masks: torch.Tensor, prompts: list[str] | None = None, *, n: int = 1,
            steps: int = 50, cfg: float | None = None, seed: int = 0, resample: int = DEFAULT_RESAMPLE,
            batch_size: int = 16, encoded: tuple | None = None, composite: bool = True) -> torch.Tensor:
    """Inpaint images (P, 3, R, R) in [-1, 1] where masks (P, 1, R, R) are 1 with a plain text model
    (``ldm.Pipeline``), ``steps`` DDPM steps on evenly spaced timesteps. -> (P * n, 3, R, R) on the CPU."""
    from ldm.pipeline import encode_prompts, initial_noise, sampling_sigmas

    if pipe.unet.config.cond_channels:
        raise ValueError("repaint: the UNet is image-conditioned; sample it with its --task instead")
    R, dev, P = pipe.resolution, pipe.device, images.shape[0]
    if tuple(images.shape[1:]) != (3, R, R) or masks.shape != (P, 1, R, R):
        raise ValueError(f"repaint: images must be (P, 3, {R}, {R}) and masks (P, 1, {R}, {R}), got "
                         f"{tuple(images.shape)} and {tuple(masks.shape)}")
    cfg = pipe.defaults.cfg if cfg is None else cfg
    known = pipe.encode_images(images.float())  # (P, C, h, w)
    m = F.adaptive_max_pool2d(masks.float().to(dev), known.shape[-2:])  # (P, 1, h, w)
    denoiser = Denoiser(pipe.unet, pipe.schedule, pipe.prediction)
    context = None
    if pipe.conditional:
        context, lengths, uncond = encoded or encode_prompts(pipe.encoder, prompts, dev)
        if cfg != 1.0:
            denoiser = CFGDenoiser(denoiser, cfg)
    sigmas = sampling_sigmas(pipe.schedule, steps, "ddpm", device=dev)
    out, total = [], P * n
    for start in range(0, total, batch_size):
        count = min(batch_size, total - start)
        rows = torch.arange(start, start + count, device=dev) // n
        extra = {}
        if context is not None:
            extra = {"context": context[rows], "context_lengths": lengths[rows]}
            if cfg != 1.0:
                extra.update(uncond_context=uncond[0], uncond_context_lengths=uncond[1])
        noise = initial_noise(count, pipe.latent_shape, seed, start).to(dev)
        gen = torch.Generator(dev).manual_seed(seed + start)
        with pipe.autocast():
            z = repaint_latents(denoiser, known[rows], m[rows], noise, sigmas, extra, gen, resample)
        x = pipe.decode_latents(z.float()).cpu()
        if composite:
            x = composited("inpaint", x, images[rows.cpu()].float(), masks[rows.cpu()].float())
        out.append(x)
    return torch.cat(out)
