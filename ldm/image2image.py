"""Image-conditioned diffusion: one UNet for inpainting, outpainting, colourisation and super-resolution.

SR3 (Saharia et al. 2021, "Image Super-Resolution via Iterative Refinement") and Palette (Saharia et al.
2022, "Palette: Image-to-Image Diffusion Models") give the network the conditioning image beside the
noisy sample; here, as in Stable Diffusion's inpainting UNet, both live in latent space: the UNet's
``cond`` input (``UNetConfig.cond_channels`` = 1 + C) is concatenated to the noisy latents (C):

    channel 0        the mask at latent resolution, 1 where the model draws (a latent cell is 1 when any
                     of its pixels is): the masked region (inpaint, outpaint), everywhere (colorize, sr)
    channels 1..C    the VAE latents of the source image: the image with the masked pixels set to 0
                     (SD's convention, mid-grey), the greyscale image, or the low-resolution image
                     upsampled bicubically to the model's resolution

SD 1.x inpainting is the same layout with C = 4 (9 input channels). One layout for every task lets one
model learn them all (``--task palette``); the conditioning present tells it which. The text condition
stays, so every task can be text-guided.

Super-resolution noise-conditions its input (Ho et al. 2021, "Cascaded Diffusion Models"): the
low-resolution latents are noised to a random level of the training schedule and the level is given to
the model (``UNetConfig.noise_level_embed``), so in a cascade it learns to ignore the base model's
artefacts; sampling uses a small fixed level.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TASKS = ("inpaint", "outpaint", "colorize", "sr")
TRAIN_TASKS = (*TASKS, "palette")  # palette: all four tasks in one model
# What a model trained for a task can be asked for: both mask tasks share their conditioning (SD's inpainting
# UNet outpaints too); the others only themselves.
SERVES = {"inpaint": ("inpaint", "outpaint"), "outpaint": ("outpaint", "inpaint"), "colorize": ("colorize",),
          "sr": ("sr",), "palette": TASKS}
MASKED_TASKS = ("inpaint", "outpaint")
SR_FACTORS = (2, 4)  # super-resolution factors trained (the low-res image is 1/2 or 1/4 of the side)
# Noise augmentation of the low-res latents: a training level uniform in [0, AUG_LEVELS) of the schedule's
# timesteps (on the linear schedule t = 250 keeps abar = 0.53 of the signal's power), and the level sampling
# gives it: a little noise hides a base model's artefacts while keeping the picture.
AUG_LEVELS = 250
SAMPLE_AUG_LEVEL = 50
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B: the greyscale of colourisation
# Training masks, as fractions of the image side: boxes with sides in BOX_SIDE, strokes of STROKES
# polylines of STROKE_POINTS vertices, STROKE_WIDTH wide; object boxes grow by OBJECT_MARGIN on each side.
BOX_SIDE = (0.25, 0.6)
STROKES = (1, 4)
STROKE_POINTS = (2, 5)
STROKE_WIDTH = (0.08, 0.2)
OBJECT_MARGIN = 0.06
# inpaint's mix of mask kinds; "object" (the shape's box) only where the dataset knows where its shape is
INPAINT_MASKS = {"box": 0.35, "strokes": 0.35, "object": 0.3}
MASK_KINDS = ("box", "strokes", "half", "object")


def unet_fields(task: str, latent_channels: int) -> dict:
    """The UNetConfig fields of a model of ``task``: mask + source latents; the noise level for sr."""
    check_task(task, TRAIN_TASKS)
    return {"cond_channels": 1 + latent_channels, "noise_level_embed": task in ("sr", "palette")}


def check_task(task: str, allowed=TASKS) -> str:
    if task not in allowed:
        raise ValueError(f"unknown task {task!r}; expected one of {allowed}")
    return task


def model_task(unet, meta: dict) -> str | None:
    """The task a UNet was trained for (its unet.json's "task"; an SD inpainting UNet: "inpaint"), None
    for a model without a conditioning image."""
    if not unet.config.cond_channels:
        return None
    return meta.get("task") or "inpaint"


def check_serves(trained: str | None, task: str, where: str) -> None:
    """ValueError naming ``where`` when a model trained for ``trained`` cannot do ``task``."""
    check_task(task)
    if trained is None:
        raise ValueError(f"{where}: the UNet takes no conditioning image (cond_channels 0); --task {task} needs a "
                         f"model from python -m ldm.train_unet --task (a plain text model: ldm.repaint)")
    if task not in SERVES[trained]:
        raise ValueError(f"{where}: the UNet was trained for --task {trained}, which serves "
                         f"{', '.join(SERVES[trained])}, not {task}")


# ------------------------------------------------------------------------------------------------ masks
def box_mask(rng: np.random.Generator, res: int) -> np.ndarray:
    """A random axis-aligned box, sides in BOX_SIDE of the image. -> (res, res) float32, 1 inside."""
    h, w = (rng.uniform(*BOX_SIDE, size=2) * res).round().astype(int)
    y, x = rng.integers(0, res - h + 1), rng.integers(0, res - w + 1)
    m = np.zeros((res, res), np.float32)
    m[y:y + h, x:x + w] = 1
    return m


def stroke_mask(rng: np.random.Generator, res: int) -> np.ndarray:
    """Free-form strokes (as in the free-form masks of Yu et al. 2019, "DeepFill v2"): polylines of
    random vertices, thick, with round joints. -> (res, res) float32, 1 on the strokes."""
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5  # pixel centres
    m = np.zeros((res, res), bool)
    for _ in range(rng.integers(STROKES[0], STROKES[1] + 1)):
        pts = rng.uniform(0, res, size=(rng.integers(STROKE_POINTS[0], STROKE_POINTS[1] + 1), 2))  # (P, 2) x, y
        radius = rng.uniform(*STROKE_WIDTH) * res / 2
        for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
            d = np.array([x1 - x0, y1 - y0])
            u = np.clip(((xx - x0) * d[0] + (yy - y0) * d[1]) / max(d @ d, 1e-9), 0, 1)  # nearest point's share
            m |= (xx - x0 - u * d[0]) ** 2 + (yy - y0 - u * d[1]) ** 2 <= radius**2
    return m.astype(np.float32)


def half_mask(rng: np.random.Generator, res: int, side: str | None = None) -> np.ndarray:
    """Outpainting: one half (left, right, top or bottom; random unless given) to draw. -> (res, res)."""
    side = side or ("left", "right", "top", "bottom")[rng.integers(4)]
    m = np.zeros((res, res), np.float32)
    half = res // 2
    {"left": lambda: m[:, :half].fill(1), "right": lambda: m[:, half:].fill(1),
     "top": lambda: m[:half].fill(1), "bottom": lambda: m[half:].fill(1)}[side]()
    return m


def object_mask(attrs: dict, res: int, margin: float = OBJECT_MARGIN) -> np.ndarray:
    """The bounding box of a built-in scene's shape, grown by ``margin`` of the side. -> (res, res)."""
    from ldm.data.shapes import scene_box

    cx, cy, side = scene_box(attrs)
    lo = np.floor((np.array([cx, cy]) - side / 2 - margin) * res).clip(0, res).astype(int)
    hi = np.ceil((np.array([cx, cy]) + side / 2 + margin) * res).clip(0, res).astype(int)
    m = np.zeros((res, res), np.float32)
    m[lo[1]:hi[1], lo[0]:hi[0]] = 1
    return m


def make_mask(kind: str, rng: np.random.Generator, res: int, attrs: dict | None = None) -> np.ndarray:
    """A mask of ``kind`` (MASK_KINDS); "object" needs the scene's attributes. -> (res, res) float32."""
    if kind == "box":
        return box_mask(rng, res)
    if kind == "strokes":
        return stroke_mask(rng, res)
    if kind == "half":
        return half_mask(rng, res)
    if kind == "object":
        if attrs is None:
            raise ValueError("make_mask: an object mask needs the scene's attributes")
        return object_mask(attrs, res)
    raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")


# ------------------------------------------------------------------------------------------- sources
def greyscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the luma repeated in 3 channels, (B, 3, H, W)."""
    w = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True).expand(-1, 3, -1, -1)  # (B, 3, H, W)


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Area average: what the renderer's coverage anti-aliasing draws at 1/factor of the side.
    (B, 3, H, W) -> (B, 3, H / factor, W / factor)."""
    return F.avg_pool2d(images, factor)


def upsample(low: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic to ``size`` x ``size``, clamped to [-1, 1] (the baseline of super-resolution, and how the
    model sees its low-res input). (B, 3, h, w) -> (B, 3, size, size)."""
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


# Rounds of the SR projection: each round's clamp to [-1, 1] moves the area averages off the input a little; on
# the palette model's x4 outputs the largest gap to the input fell 0.25 -> 0.079 -> 0.0055 after 1, 5 and 20
CONSISTENCY_ROUNDS = 20


def consistent(x: torch.Tensor, low: torch.Tensor, rounds: int = CONSISTENCY_ROUNDS) -> torch.Tensor:
    """Super-resolution's compositing: the output made to agree with its input. Alternating projections onto
    {x : area average of x at the input's size = the input} (add each block's residual to its pixels) and
    [-1, 1]; both sets hold the true image whenever the input is its area average (``downsample``), so
    every round can only bring ``x`` nearer to it. x (B, 3, H, W), low (B, 3, H / k, W / k) -> (B, 3, H, W)."""
    k = x.shape[-1] // low.shape[-1]
    for _ in range(rounds):
        residual = low - downsample(x, k)  # (B, 3, H / k, W / k)
        x = (x + F.interpolate(residual, scale_factor=k, mode="nearest")).clamp(-1, 1)
    return x


def composited(task: str, x: torch.Tensor, inputs: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """``task``'s outputs x (B, 3, R, R) made to keep what their inputs fix: the masked tasks' kept pixels
    pasted back from inputs (B, 3, R, R) where masks (B, 1, R, R) is 0; sr's outputs made to agree with the
    low-res inputs (``consistent``); colorize's unchanged."""
    if task in MASKED_TASKS:
        return masks * x + (1 - masks) * inputs
    if task == "sr":
        return consistent(x, inputs)
    return x


def source(task: str, image: torch.Tensor, mask: torch.Tensor | None = None, resolution: int | None = None):
    """The pixel source and pixel mask of ``task``: image (B, 3, H, W) in [-1, 1] (for sr: the low-res
    image), mask (B, 1, H, W) 1 = draw (inpaint, outpaint). -> (source (B, 3, R, R), mask (B, 1, R, R))."""
    check_task(task)
    if task in MASKED_TASKS:
        if mask is None:
            raise ValueError(f"--task {task} needs a mask")
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"the mask is {mask.shape[-1]} x {mask.shape[-2]} but the image "
                             f"{image.shape[-1]} x {image.shape[-2]}")
        return image * (1 - mask), mask
    if task == "colorize":
        src = greyscale(image)
    else:
        src = upsample(image, resolution or image.shape[-1])
    return src, torch.ones_like(src[:, :1])


def build_condition(vae, src: torch.Tensor, mask: torch.Tensor, level: torch.Tensor, schedule,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's ``cond``: [mask at latent resolution, source latents noised to ``level``].

    src (B, 3, H, W) in [-1, 1]; mask (B, 1, H, W); level (B,) integer timesteps of ``schedule``, 0:
    clean; noise (B, C, h, w) standard normal for the levels > 0. -> (B, 1 + C, h, w)."""
    z = vae.encode_latents(src)  # (B, C, h, w)
    m = F.adaptive_max_pool2d(mask.to(z.dtype), z.shape[-2:])  # (B, 1, h, w): a cell with any masked pixel
    if bool((level > 0).any()):
        abar = schedule.alphas_cumprod_at(level.long(), z).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        noised = abar.sqrt() * z + (1 - abar).sqrt() * (noise if noise is not None else torch.randn_like(z))
        z = torch.where(level.view(-1, 1, 1, 1) > 0, noised, z)  # (B, C, h, w)
    return torch.cat([m, z], dim=1)  # (B, 1 + C, h, w)


def training_inputs(task: str, images: torch.Tensor, rng: np.random.Generator, attrs: list | None = None):
    """Random conditioning of a training batch: images (B, 3, H, W) in [-1, 1] -> (src (B, 3, H, W),
    mask (B, 1, H, W), level (B,) int64), each row's task drawn uniformly for palette."""
    B, res = images.shape[0], images.shape[-1]
    srcs, masks, levels = [], [], []
    for i in range(B):
        row_task = TASKS[rng.integers(len(TASKS))] if task == "palette" else task
        level, img = 0, images[i:i + 1]
        if row_task in MASKED_TASKS:
            if row_task == "outpaint":
                kind = "half"
            else:
                kinds = [k for k in INPAINT_MASKS if k != "object" or attrs is not None]
                p = np.array([INPAINT_MASKS[k] for k in kinds])
                kind = kinds[rng.choice(len(kinds), p=p / p.sum())]
            m = torch.from_numpy(make_mask(kind, rng, res, attrs[i] if attrs else None))[None, None]
            src, m = source(row_task, img, m)
        elif row_task == "sr":
            factor = SR_FACTORS[rng.integers(len(SR_FACTORS))]
            src, m = source("sr", downsample(img, factor), resolution=res)
            level = int(rng.integers(AUG_LEVELS))
        else:
            src, m = source(row_task, img)
        srcs.append(src)
        masks.append(m)
        levels.append(level)
    return torch.cat(srcs), torch.cat(masks), torch.tensor(levels, dtype=torch.long)


class TaskBatches:
    """Wraps ``ldm.latent_cache.Batches``: step s's batch plus its conditioning, the masks and levels
    drawn from seed (seed, s, rank), the source latents encoded by the (frozen) VAE."""

    def __init__(self, base, task: str, images: torch.Tensor, vae, schedule, seed: int, rank: int = 0,
                 attrs: list | None = None, noise_level: bool = False):
        self.base, self.task, self.images, self.vae, self.schedule = base, task, images, vae, schedule
        self.seed, self.rank, self.attrs, self.noise_level = seed, rank, attrs, noise_level

    def __call__(self, step: int):
        x0, t, noise, kwargs = self.base(step)
        b = self.base
        idx = b.positions.take(step * b.B + b.first, b.b)  # (b,) the same items as x0's
        rng = np.random.default_rng([self.seed, step, self.rank])
        images = self.images[idx].float().div(127.5).sub(1)  # (b, 3, H, W) in [-1, 1]
        attrs = [self.attrs[i] for i in idx.tolist()] if self.attrs is not None else None
        src, mask, level = training_inputs(self.task, images, rng, attrs)
        gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
        with torch.no_grad():
            aug = torch.randn(x0.shape, generator=gen)  # (b, C, h, w), for the noise-augmented rows
            cond = build_condition(self.vae, src.to(x0.device), mask.to(x0.device), level.to(x0.device),
                                   self.schedule, aug.to(x0.device))
        kwargs = {**kwargs, "cond": cond}
        if self.noise_level:
            kwargs["noise_level"] = level.to(x0.device, torch.float32)  # (b,)
        return x0, t, noise, kwargs


def rendered_images(dataset, n: int) -> torch.Tensor:
    """Items 0..n-1 of ``dataset`` (the latent cache's), as (n, 3, H, W) uint8: the sources of training."""
    return torch.stack([((dataset[i]["image"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                        for i in range(n)])


# ------------------------------------------------------------------------------------------- sampling
class Conditioned(nn.Module):
    """``unet(x, t, **extra) `` with the conditioning image (and level) attached: cond (P, 1 + C, h, w) is
    tiled to x's batch, which classifier-free guidance doubles ([cond rows; uncond rows])."""

    def __init__(self, unet, cond: torch.Tensor, noise_level: torch.Tensor | None):
        super().__init__()
        self.unet, self.cond, self.level = unet, cond, noise_level
        self.config = unet.config

    def forward(self, x, t, **extra):
        k = x.shape[0] // self.cond.shape[0]
        level = None if self.level is None else self.level.repeat(k)  # (B,)
        return self.unet(x, t, cond=self.cond.repeat(k, 1, 1, 1), noise_level=level, **extra)


@torch.no_grad()
def generate_task(pipe, task: str, images: torch.Tensor, masks: torch.Tensor | None = None,
                  prompts: list[str] | None = None, *, n: int = 1, steps: int | None = None,
                  sampler: str | None = None, cfg: float | None = None, seed: int = 0,
                  noise_level: int = SAMPLE_AUG_LEVEL, batch_size: int = 16, encoded: tuple | None = None,
                  composite: bool = True) -> torch.Tensor:
    """``n`` outputs of ``task`` for each input image (input-major): images (P, 3, H, W) in [-1, 1] at the
    pipeline's resolution (sr: the low-res images, 1/2 or 1/4 of it), masks (P, 1, H, W) 1 = draw
    (inpaint, outpaint), one prompt per image for a text model. ``composite`` pastes the kept pixels of
    the input back over the masked tasks' outputs, and makes sr's outputs agree with the low-res input
    (``consistent``). -> (P * n, 3, R, R) float32 in [-1, 1] on the CPU."""
    from ldm.pipeline import encode_prompts, initial_noise, sample_latents, sampling_sigmas

    check_serves(model_task(pipe.unet, pipe.meta), task, str(pipe.meta.get("source", "the pipeline")))
    R, dev = pipe.resolution, pipe.device
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"generate_task: images must be (P, 3, H, W), got {tuple(images.shape)}")
    side = images.shape[-1]
    if task == "sr" and (images.shape[-2] != side or R % side or R // side < 2):
        raise ValueError(f"--task sr: the low-res image is {images.shape[-1]} x {images.shape[-2]}; the model draws "
                         f"{R} x {R}, so it must be square with a side R / k for an integer k >= 2 (trained: "
                         f"{', '.join(str(R // f) for f in SR_FACTORS)})")
    if task != "sr" and tuple(images.shape[-2:]) != (R, R):
        raise ValueError(f"--task {task}: the image is {images.shape[-1]} x {images.shape[-2]}, the model draws "
                         f"{R} x {R}")
    P = images.shape[0]
    if pipe.conditional and (not prompts or len(prompts) != P) and encoded is None:
        raise ValueError(f"generate_task: the UNet is text-conditional; give one prompt per image ({P})")
    src, mask = source(task, images.float(), None if masks is None else masks.float(), R)
    steps, sampler = steps or pipe.defaults.steps, sampler or pipe.defaults.sampler
    cfg = pipe.defaults.cfg if cfg is None else cfg
    context = lengths = uncond = None
    if pipe.conditional:
        context, lengths, uncond = encoded or encode_prompts(pipe.encoder, prompts, dev)
    level = torch.full((P,), noise_level if task == "sr" else 0, dtype=torch.long, device=dev)
    aug = initial_noise(P, pipe.latent_shape, seed + P * n).to(dev)  # (P, C, h, w), apart from the images' noise
    cond = build_condition(pipe.vae, src.to(dev), mask.to(dev), level, pipe.schedule, aug)  # (P, 1 + C, h, w)
    sigmas = sampling_sigmas(pipe.schedule, steps, sampler, device=dev)
    out, total = [], P * n
    for start in range(0, total, batch_size):
        count = min(batch_size, total - start)
        rows = torch.arange(start, start + count, device=dev) // n  # the input of each output
        model = Conditioned(pipe.unet, cond[rows],
                            level[rows].float() if pipe.unet.config.noise_level_embed else None)
        extra = {} if context is None else {"context": context[rows], "context_lengths": lengths[rows],
                                            "uncond": uncond}
        noise = initial_noise(count, pipe.latent_shape, seed, start).to(dev)  # (b, C, h, w)
        with pipe.autocast():
            z = sample_latents(model, pipe.schedule, pipe.prediction, noise, sigmas, sampler=sampler, cfg=cfg,
                               generator=torch.Generator(dev).manual_seed(seed + start), **extra)
        x = pipe.decode_latents(z.float()).cpu()  # (b, 3, R, R)
        if composite:
            x = composited(task, x, images[rows.cpu()].float(), mask[rows.cpu()])
        out.append(x)
    return torch.cat(out)


def demo_inputs(task: str, images: torch.Tensor, seed: int = 0, factor: int = SR_FACTORS[-1]):
    """Fixed inputs for pictures and validation: images (P, 3, R, R) -> (inputs, masks or None) as
    ``generate_task`` takes them: a box mask (inpaint), a half (outpaint, the sides in turn), the image
    (colorize: generate_task greys it), the image at 1/``factor`` (sr)."""
    res = images.shape[-1]
    rng = np.random.default_rng(seed)
    if task == "inpaint":
        return images, torch.from_numpy(np.stack([box_mask(rng, res) for _ in images]))[:, None]
    if task == "outpaint":
        sides = ("left", "right", "top", "bottom")
        return images, torch.from_numpy(np.stack([half_mask(rng, res, sides[i % 4])
                                                  for i in range(len(images))]))[:, None]
    if task == "sr":
        return downsample(images, factor), None
    return images, None


def save_validation(pipe, task: str, images: torch.Tensor, cache, steps: int, cfg: float, seed: int, path) -> None:
    """train_unet's validation picture of a task model: for each task it serves (palette: all), a row of
    inputs (the training items ``images`` (V, 3, R, R)), a row of what the model sees, a row of outputs."""
    from ldm.runlog import image_grid

    V, R = images.shape[0], images.shape[-1]
    encoded = None
    if cache.tokens is not None:
        rows = cache.caption_row[:V]
        encoded = (cache.tokens[rows].float(), cache.token_lengths[rows],
                   (cache.tokens[cache.empty_row][None].float(), cache.token_lengths[cache.empty_row][None]))
    shown = []
    for t in (TASKS if task == "palette" else (task,)):
        inputs, masks = demo_inputs(t, images, seed)
        out = generate_task(pipe, t, inputs, masks, steps=steps, cfg=cfg, seed=seed, encoded=encoded,
                            batch_size=V)
        src, _ = source(t, inputs, masks, R)
        shown += [images, src, out]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(torch.cat(shown), nrow=V, scale=max(1, 64 // R)).save(path)


# --------------------------------------------------------------------------------------- file inputs
def read_image(path, what: str) -> torch.Tensor:
    """An image file at its own size -> (3, H, W) float in [-1, 1]; InputError naming ``what``."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    from ldm.errors import InputError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what}: file not found: {p}")
    try:
        with Image.open(p) as img:
            arr = np.asarray(img.convert("RGB")).copy()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InputError(f"{what}: {p} is not a readable image ({e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1)  # (3, H, W)


def task_inputs(task: str, image_path, mask_path, resolution: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``--init-image`` and ``--mask`` files -> (image (1, 3, H, W), mask (1, 1, H, W) or None) for
    ``generate_task``: the image at the model's resolution (sr: the low-res image as it is), the mask
    (white = draw) of the image's own size resized with it. InputError naming the flag."""
    from ldm.errors import InputError

    check_task(task)
    if image_path is None:
        raise InputError(f"--task {task} needs --init-image")
    image = read_image(image_path, "--init-image")[None]  # (1, 3, H, W)
    H, W = image.shape[-2:]
    if task in MASKED_TASKS and mask_path is None:
        raise InputError(f"--task {task} needs --mask (white where the model draws)")
    if task not in MASKED_TASKS and mask_path is not None:
        raise InputError(f"--mask: --task {task} takes no mask")
    if H != W:
        raise InputError(f"--init-image {image_path}: {W} x {H}, expected a square image")
    mask = None
    if mask_path is not None:
        m = read_image(mask_path, "--mask")[None]  # (1, 3, h, w)
        if m.shape[-2:] != image.shape[-2:]:
            raise InputError(f"--mask {mask_path} is {m.shape[-1]} x {m.shape[-2]} but --init-image {image_path} "
                             f"is {W} x {H}; the mask must have the image's size")
        mask = (m.mean(1, keepdim=True) > 0).float()  # (1, 1, H, W): white (> mid-grey) = draw
        if not mask.any():
            raise InputError(f"--mask {mask_path} is black everywhere: nothing to draw")
    if task == "sr":
        if resolution % W or resolution // W < 2:
            raise InputError(f"--init-image {image_path}: a {W} x {H} low-res image does not divide the model's "
                             f"{resolution} x {resolution} by an integer factor >= 2")
        return image, None
    if W != resolution:
        image = F.interpolate(image, size=(resolution, resolution), mode="bicubic", align_corners=False).clamp(-1, 1)
        if mask is not None:
            mask = F.interpolate(mask, size=(resolution, resolution), mode="nearest")
    return image, mask


@torch.no_grad()
def generate_cascade(base, upscalers: list, prompts: list[str] | None, *, n: int = 1, seed: int = 0,
                     noise_level: int = SAMPLE_AUG_LEVEL, batch_size: int = 16, base_kwargs: dict | None = None,
                     up_kwargs: dict | None = None) -> list[torch.Tensor]:
    """Cascaded diffusion (Ho et al. 2021): ``base`` (a text-to-image ``ldm.Pipeline``) draws ``n`` images a
    prompt, each of ``upscalers`` (sr or palette Pipelines, each at an integer multiple >= 2 of the previous
    resolution) refines the last stage's images from their noise-augmented upsampling, with the same prompt.
    -> the images of every stage, [(P * n, 3, R0, R0), (P * n, 3, R1, R1), ...], prompt-major."""
    from ldm.pipeline import generate

    res = base.resolution
    for k, up in enumerate(upscalers):
        check_serves(model_task(up.unet, up.meta), "sr", str(up.meta.get("source", f"upscaler {k + 1}")))
        if up.resolution % res or up.resolution // res < 2:
            raise ValueError(f"upscaler {k + 1} ({up.meta.get('source')}) draws {up.resolution} px, not an integer "
                             f"multiple >= 2 of the previous stage's {res} px")
        res = up.resolution
    stages = [generate(base, prompts, n=n, seed=seed, batch_size=batch_size, **(base_kwargs or {}))]
    rows = [p for p in prompts for _ in range(n)] if prompts else None
    for up in upscalers:
        stages.append(generate_task(up, "sr", stages[-1], None, rows if up.conditional else None, n=1, seed=seed,
                                    noise_level=noise_level, batch_size=batch_size, **(up_kwargs or {})))
    return stages
