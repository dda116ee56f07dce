"""Scores: PSNR and SSIM of reconstructions, and how often a text-to-image model draws what its prompts say.

- ``psnr``, ``ssim``, ``evaluate_vae``: PSNR averaged over images (pixels in [0, 1]); SSIM is Wang et al.
  2004 ("Image quality assessment: from error visibility to structural similarity"): an 11 x 11 Gaussian
  window of sigma 1.5, K1 = 0.01, K2 = 0.03, per channel over the valid region, averaged.
- ``score``, ``evaluate_prompts``: one image per held-out prompt of the built-in shapes
  (``eval_prompts``), read back with the dataset's own attribute reader (``read_attributes``): the share
  of images whose shape, colour, size, position and background match the prompt, the headline
  "shape+colour+position" (all three right in one image) and "all" five.

The commands ``python -m ldm.eval_vae`` and ``python -m ldm.eval_text`` are shells over these.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ldm.data.shapes import SHAPES, eval_prompts, read_attributes
from ldm.pipeline import generate
from ldm.pretrained import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1]: (B, C, H, W) x 2 -> (B,)."""
    mse = ((x.float() - y.float()) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-t * t / (2 * sigma * sigma))
    return g / g.sum()  # (size,)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-image SSIM of images in [-1, 1]: (B, C, H, W) x 2 -> (B,). H and W must be >= ``window``."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: expected two (B, C, H, W) tensors of one shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim: images {tuple(x.shape[-2:])} are smaller than the {window} x {window} window")
    x, y = (x.double() + 1) / 2, (y.double() + 1) / 2  # dynamic range L = 1
    C = x.shape[1]
    g = _gaussian_window(window, sigma).to(x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable, valid region: (B, C, H - w + 1, W - w + 1)
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(C, 1, 1, window), groups=C)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(C, 1, window, 1), groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3)).float()


@torch.no_grad()
def evaluate_vae(vae, dataset, n: int, batch_size: int = 64, device: str | torch.device = "cpu") -> dict:
    """Mean PSNR and SSIM of posterior-mean reconstructions of the first ``n`` items of ``dataset``."""
    n = min(n, len(dataset))
    if n <= 0:
        raise ValueError("evaluate_vae: no images to evaluate")
    was_training = vae.training
    vae.eval()
    p, s = [], []
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, n))]).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        p.append(psnr(recon, x))
        if min(x.shape[-2:]) >= SSIM_WINDOW:
            s.append(ssim(recon, x))
    vae.train(was_training)
    out = {"psnr": torch.cat(p).mean().item(), "images": n}
    out["ssim"] = torch.cat(s).mean().item() if s else math.nan
    return out


ATTRIBUTES = ("shape", "colour", "size", "position", "background")
HEADLINE = "shape+colour+position"
COMBINED = {HEADLINE: ("shape", "colour", "position"), "all": ATTRIBUTES}
PROMPT_SEED = 0  # eval_prompts(n, PROMPT_SEED): the same prompts for every model and run
DEFAULT_N = 200  # held-out prompts eval_text scores


def score(images: torch.Tensor, attributes: list[dict], shapes: tuple[str, ...] = SHAPES) -> tuple[dict, list[dict]]:
    """images (N, 3, H, W) in [-1, 1] and the attributes each should show -> (share right per attribute
    and per combination, what the reader saw in each image). ``shapes``: what the reader tells apart."""
    seen = [read_attributes(img, shapes) for img in images]
    right = [{a: s[a] == want[a] for a in ATTRIBUTES} for s, want in zip(seen, attributes, strict=True)]
    shares = {a: sum(r[a] for r in right) / len(right) for a in ATTRIBUTES}
    for name, group in COMBINED.items():
        shares[name] = sum(all(r[a] for a in group) for r in right) / len(right)
    return shares, seen


def evaluate_prompts(pipe, n: int = DEFAULT_N, *, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
                     cfg: float = DEFAULT_CFG, seed: int = 0, batch_size: int = 100, spacing: str | None = None,
                     progress: bool = False, return_images: bool = False, guide=None,
                     pairs: list[tuple[dict, str]] | None = None, shapes: tuple[str, ...] = SHAPES) -> dict:
    """Sample the first ``n`` held-out prompts once each with ``pipe`` (a text-conditional
    ``ldm.Pipeline`` with its encoder) and score them. -> {"n", "sampler", "steps", "cfg",
    "seed", "seconds", per-attribute shares, HEADLINE, "all", "misses" (the first few wrong images)}
    plus "images" (N, 3, H, W) with ``return_images``. ``guide`` (``ldm.clip_guidance.ClipGuide`` of the same
    ``n`` prompts) steers sampling; with it an unconditional UNet can be scored too. ``pairs``: other
    (attributes, prompt) pairs than the held-out ones (e.g. a ``ldm.data.wording.split_prompts`` split or
    ``ldm.data.new_shapes.held_out_prompts``); ``shapes``: the
    reader's shapes."""
    if not pipe.conditional and guide is None:
        raise ValueError("evaluate_prompts: the UNet is unconditional; eval_text scores text-conditional models")
    if n <= 0:
        raise ValueError(f"evaluate_prompts: n must be positive, got {n}")
    pairs = eval_prompts(n, PROMPT_SEED) if pairs is None else list(pairs)[:n]
    n = len(pairs)
    prompts = [text for _, text in pairs]
    t0 = time.perf_counter()
    images = generate(pipe, prompts, n=1, steps=steps, sampler=sampler, cfg=cfg, seed=seed, batch_size=batch_size,
                      spacing=spacing, progress=progress,
                      **({"guide": guide} if guide is not None else {}))  # (n, 3, H, W)
    seconds = time.perf_counter() - t0
    shares, seen = score(images, [a for a, _ in pairs], shapes)
    misses = [{"prompt": p, "read": {a: s[a] for a in ATTRIBUTES}}
              for p, s, (want, _) in zip(prompts, seen, pairs, strict=True)
              if any(s[a] != want[a] for a in COMBINED[HEADLINE])][:10]
    result = {"n": n, "sampler": sampler, "steps": steps, "cfg": cfg, "seed": seed, "seconds": round(seconds, 2),
              **shares, "misses": misses}
    if return_images:
        result["images"] = images
    return result
