"""`python -m ldm.sample`: images from a trained UNet + VAE (+ text encoder), as a grid PNG.

    python -m ldm.sample                                           # runs/unet, its validation prompts
    python -m ldm.sample --prompt "a large red circle in the center on a black background" --n 8
    python -m ldm.sample --prompts-file prompts.txt --sampler ddpm --steps 1000 --cfg 3 --seed 1
    python -m ldm.sample --init-image photo.png --strength 0.5 --prompt "..."      # image-to-image
    python -m ldm.sample --from-diffusers PATH --prompt "..."       # a Stable Diffusion 1.x folder

The grid has one row per prompt and ``--n`` images a row; ``--images DIR`` also writes each image.
Image ``k`` (prompt-major order) starts from noise drawn on the CPU from seed ``--seed + k``, so it
is the same whatever the batch size, the number of prompts after it, or the device. Stochastic
samplers (ddpm) also draw noise at every step, from a generator per batch.

``generate(pipe, prompts, ...)`` is the shared path: our checkpoints (``load_pipeline``) and
Stable Diffusion folders (``ldm.convert.load_diffusers_pipeline``) both become a ``Pipeline``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autoencoder import VAE
from ldm.checkpoint import load_model_files, load_state_dict_strict
from ldm.diffusion import Denoiser, NoiseSchedule, check_prediction
from ldm.pretrained import load_vae
from ldm.runlog import image_grid
from ldm.samplers import SAMPLERS, CFGDenoiser, get_sigmas
from ldm.unet import UNet, UNetConfig

UNET_NAME = "unet"
CREATED_BY = "ldm.train_unet"  # what unet.json says when train_unet wrote it
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_CFG = "dpmpp_2m", 20, 3.0
SD_CFG = 7.5  # the guidance scale Stable Diffusion 1.x is usually sampled with
# How each sampler spaces its sigmas unless told: DDPM and DDIM on evenly spaced timesteps (1000
# DDPM steps are then exactly Ho et al.'s chain), the ODE solvers on Karras et al.'s ramp.
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpmpp_2m": "karras", "euler": "karras"}
SPACINGS = ("karras", "uniform")
GRID_SIDE = 128  # small images are scaled up in the grid to about this many pixels a side
UNET_KEYS = ("prediction", "schedule", "latent_shape")  # what unet.json must hold besides its config


class SampleError(Exception):
    """Bad input: printed as one line naming the file or flag, no traceback."""


@dataclass
class Pipeline:
    """Everything sampling needs, whoever trained it. Latents live in the UNet's space:
    ``z = (vae_latent - latent_shift) * latent_scale``."""

    unet: UNet
    vae: VAE
    schedule: NoiseSchedule
    prediction: str
    latent_shape: tuple[int, int, int]  # (C, h, w) the UNet samples
    latent_scale: float
    latent_shift: float = 0.0
    encoder: object | None = None  # ldm.text.TextEncoder, None for an unconditional UNet
    autocast_dtype: torch.dtype | None = None  # run UNet and VAE under autocast (CUDA), None: as loaded
    meta: dict = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        return self.unet.config.context_dim is not None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def resolution(self) -> int:
        return self.latent_shape[1] * self.vae.config.downsample_factor

    def autocast(self):
        dev = self.device.type
        return torch.autocast(dev, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None)

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the UNet's latents (B, C, h, w) (posterior means)."""
        with self.autocast():
            z = self.vae.encode(x.to(self.device)).mode().float()
        return (z - self.latent_shift) * self.latent_scale

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The UNet's latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], float32."""
        with self.autocast():
            x = self.vae.decode(z / self.latent_scale + self.latent_shift)
        return x.float().clamp(-1, 1)


# ---------------------------------------------------------------------------------------- loading
def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (to tell whether a checkpoint is the one a run recorded)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_unet(folder: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """The UNet that ``train_unet`` exported to ``folder`` (EMA weights, eval mode, no gradients) and
    its ``unet.json``. Errors name the file that is missing or not ours."""
    folder = Path(folder)
    json_path = folder / f"{UNET_NAME}.json"
    if not folder.is_dir():
        raise SampleError(f"checkpoint folder not found: {folder} (train one with python -m ldm.train_unet --text)")
    try:
        state, meta = load_model_files(folder, UNET_NAME)
    except (FileNotFoundError, ValueError) as e:
        raise SampleError(str(e)) from None
    missing = [k for k in UNET_KEYS if k not in meta]
    if missing:
        raise SampleError(f"{json_path} is not a UNet exported by {CREATED_BY} (no {', '.join(missing)} entry)")
    try:
        config = UNetConfig(**meta["config"])
        check_prediction(meta["prediction"])
        NoiseSchedule.from_name(meta["schedule"], meta.get("num_timesteps", 1000))
    except (TypeError, ValueError) as e:
        raise SampleError(f"{json_path}: {e}") from None
    unet = UNet(config)
    try:
        load_state_dict_strict(unet, state, str(folder / f"{UNET_NAME}.safetensors"))
    except ValueError as e:
        raise SampleError(str(e)) from None
    return unet.to(device).eval().requires_grad_(False), meta


def load_encoder(path: str | Path | None, device, width: int | None, what: str):
    """The text encoder at ``path`` (None: the default MiniLM); ``width`` must match the UNet's
    context_dim, ``what`` names the file that asks for it."""
    from ldm.text import TextEncoder

    try:
        encoder = TextEncoder(path, device=device)
    except (FileNotFoundError, ImportError, OSError, ValueError) as e:
        raise SampleError(f"text encoder: {e}") from None
    if width is not None and encoder.width != width:
        raise SampleError(f"text encoder {encoder.path} gives {encoder.width}-wide tokens but {what} "
                          f"expects context_dim {width}")
    return encoder


def load_pipeline(unet_dir: str | Path, vae_dir: str | Path | None = None, text_encoder: str | Path | None = None,
                  device: str | torch.device = "cpu", load_text_encoder: bool = True) -> Pipeline:
    """Our own checkpoints: ``unet_dir`` from ``train_unet``, the VAE it recorded (or ``vae_dir``), the
    text encoder it recorded (or ``text_encoder``)."""
    unet, meta = load_unet(unet_dir, device)
    json_path = Path(unet_dir) / f"{UNET_NAME}.json"
    if vae_dir is None:
        if not meta.get("vae"):
            raise SampleError(f"{json_path} records no VAE folder; pass --vae DIR")
        vae_dir = meta["vae"]
    try:
        vae, vae_meta = load_vae(vae_dir, device)
    except (FileNotFoundError, ValueError) as e:
        raise SampleError(f"{e} (the VAE for {json_path}; pass --vae DIR if it moved)") from None
    vae_json = Path(vae_dir) / "vae.json"
    if vae.config.latent_channels != unet.config.in_channels:
        raise SampleError(f"{vae_json} has {vae.config.latent_channels} latent channels but {json_path} "
                          f"takes in_channels={unet.config.in_channels}")
    recorded = meta.get("vae_sha256")
    if recorded and file_digest(Path(vae_dir) / "vae.safetensors") != recorded:
        warnings.warn(f"{Path(vae_dir) / 'vae.safetensors'} is not the VAE {json_path} was trained with "
                      "(its digest differs): expect poor images", stacklevel=2)
    encoder = None
    width = unet.config.context_dim
    if width is not None and load_text_encoder:
        recorded_enc = (meta.get("text_encoder") or {}).get("path")
        encoder = load_encoder(text_encoder if text_encoder is not None else recorded_enc, device, width,
                               str(json_path))
    elif width is None and text_encoder is not None:
        raise SampleError(f"{json_path} describes an unconditional UNet; it takes no --text-encoder")
    schedule = NoiseSchedule.from_name(meta["schedule"], meta.get("num_timesteps", 1000))
    return Pipeline(unet=unet, vae=vae, schedule=schedule, prediction=meta["prediction"],
                    latent_shape=tuple(meta["latent_shape"]), latent_scale=float(vae_meta["latent_scale_factor"]),
                    latent_shift=float(vae_meta.get("latent_mean", 0.0)), encoder=encoder, meta=meta)


def load_diffusers(path: str | Path, text_encoder: str | Path | None, device: torch.device) -> Pipeline:
    """A Stable Diffusion 1.x folder in diffusers' layout, through ``ldm.convert``."""
    try:
        from ldm.convert import load_diffusers_pipeline
    except ImportError as e:
        raise SampleError(f"--from-diffusers needs ldm.convert, which does not import here ({e})") from None
    from ldm.text import TextEncoder

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        p = load_diffusers_pipeline(path, device=device, dtype=dtype)
        encoder = TextEncoder(text_encoder or p.text_encoder_path, pad_to_max=True, mask_padding=False, device=device)
    except (FileNotFoundError, ImportError, OSError, ValueError) as e:
        raise SampleError(str(e)) from None
    if encoder.width != p.unet.config.context_dim:
        raise SampleError(f"text encoder {encoder.path} gives {encoder.width}-wide tokens but the UNet in {path} "
                          f"expects context_dim {p.unet.config.context_dim}")
    f = p.vae.config.downsample_factor
    return Pipeline(unet=p.unet, vae=p.vae, schedule=p.schedule, prediction=p.prediction,
                    latent_shape=(p.unet.config.in_channels, p.resolution // f, p.resolution // f),
                    latent_scale=float(p.latent_scale_factor), encoder=encoder,
                    autocast_dtype=dtype if device.type == "cuda" else None,
                    meta={"source": str(path), "cfg_scale": SD_CFG})


# --------------------------------------------------------------------------------------- sampling
def sampling_sigmas(schedule: NoiseSchedule, steps: int, sampler: str, spacing: str | None = None,
                    strength: float = 1.0, device=None) -> torch.Tensor:
    """The sigmas a run walks: ``steps`` of ``sampler``'s default spacing, and for image-to-image at
    ``strength`` < 1 only the last round(strength * steps) of them (at least one)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}")
    spacing = spacing or DEFAULT_SPACING[sampler]
    if spacing not in SPACINGS:
        raise ValueError(f"unknown sigma spacing {spacing!r}; expected one of {SPACINGS}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    sigmas = get_sigmas(schedule, steps, karras=spacing == "karras", device=device)  # (steps + 1,)
    keep = max(1, round(strength * steps))
    return sigmas[steps - keep:]  # (keep + 1,)


def initial_noise(count: int, shape: tuple[int, ...], seed: int, first: int = 0) -> torch.Tensor:
    """Standard normal noise for images ``first .. first + count - 1``, image k from CPU seed ``seed + k``.
    -> (count, *shape) float32 on the CPU."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + first + k))
                        for k in range(count)])


@torch.no_grad()
def sample_latents(unet, schedule: NoiseSchedule, prediction: str, noise: torch.Tensor, sigmas: torch.Tensor, *,
                   sampler: str = DEFAULT_SAMPLER, context: torch.Tensor | None = None,
                   context_lengths: torch.Tensor | None = None, uncond: tuple | None = None, cfg: float = 1.0,
                   init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   disable: bool | None = True) -> torch.Tensor:
    """Run ``sampler`` over ``sigmas`` from ``init + sigmas[0] * noise`` (``init`` None: pure noise).

    noise (B, C, h, w) standard normal; context (B, L, width) and context_lengths (B,) the prompts'
    tokens; uncond (context (1, L', width), lengths (1,)) the empty prompt's, used with ``cfg`` != 1
    for classifier-free guidance. -> (B, C, h, w) latents."""
    denoiser = Denoiser(unet, schedule, prediction)
    extra = {}
    if context is not None:
        extra = {"context": context, "context_lengths": context_lengths}
        if uncond is not None and cfg != 1.0:
            denoiser = CFGDenoiser(denoiser, cfg)
            extra.update(uncond_context=uncond[0], uncond_context_lengths=uncond[1])
    x = noise * sigmas[0]
    if init is not None:
        x = x + init
    fn = SAMPLERS[sampler]
    options = {"generator": generator} if "generator" in inspect.signature(fn).parameters else {}
    return fn(denoiser, x, sigmas, extra_args=extra, disable=disable, **options)


def encode_prompts(encoder, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """-> (context (P, L, width), lengths (P,), (empty-prompt context (1, L', width), lengths (1,)))."""
    context, lengths = encoder.encode(list(prompts))
    empty, empty_len = encoder.encode([""])
    return context.to(device), lengths.to(device), (empty.to(device), empty_len.to(device))


@torch.no_grad()
def generate(pipe: Pipeline, prompts: list[str] | None, *, n: int = 1, steps: int = DEFAULT_STEPS,
             sampler: str = DEFAULT_SAMPLER, cfg: float = DEFAULT_CFG, seed: int = 0, batch_size: int = 16,
             spacing: str | None = None, init_image: torch.Tensor | None = None, strength: float = 1.0,
             encoded: tuple | None = None, progress: bool = False) -> torch.Tensor:
    """``n`` images for each prompt (prompt-major), or ``n`` images of an unconditional UNet (``prompts``
    None). ``init_image`` (3, H, W) in [-1, 1] at the pipeline's resolution with ``strength`` in (0, 1]
    for image-to-image. ``encoded``: (context, lengths, uncond) from ``encode_prompts`` instead of
    running ``pipe.encoder``. -> (P * n, 3, H, W) float32 in [-1, 1], on the CPU."""
    if pipe.conditional:
        if not prompts:
            raise ValueError("generate: this UNet is text-conditional; give at least one prompt")
        context, lengths, uncond = encoded or encode_prompts(pipe.encoder, prompts, pipe.device)
        rows = len(prompts)
    else:
        if prompts:
            raise ValueError("generate: this UNet is unconditional; it takes no prompts")
        context = lengths = uncond = None
        rows = 1
    total = rows * n
    device = pipe.device
    sigmas = sampling_sigmas(pipe.schedule, steps, sampler, spacing, strength, device=device)
    init = None
    if init_image is not None:
        init = pipe.encode_images(init_image[None])  # (1, C, h, w)
        if tuple(init.shape[1:]) != tuple(pipe.latent_shape):
            raise ValueError(f"generate: the init image encodes to {tuple(init.shape[1:])} latents, "
                             f"the UNet samples {tuple(pipe.latent_shape)}")
    elif strength != 1.0:
        raise ValueError("generate: strength < 1 needs an init image")
    images = []
    for start in range(0, total, batch_size):
        count = min(batch_size, total - start)
        noise = initial_noise(count, pipe.latent_shape, seed, start).to(device)  # (b, C, h, w)
        cond = {}
        if context is not None:
            rows_idx = torch.arange(start, start + count, device=device) // n  # prompt of each image
            cond = {"context": context[rows_idx], "context_lengths": lengths[rows_idx], "uncond": uncond}
        gen = torch.Generator(device).manual_seed(seed + start)
        with pipe.autocast():
            z = sample_latents(pipe.unet, pipe.schedule, pipe.prediction, noise, sigmas, sampler=sampler, cfg=cfg,
                               init=init, generator=gen, disable=not progress, **cond)
        images.append(pipe.decode_latents(z.float()).cpu())
    return torch.cat(images)  # (P * n, 3, H, W)


# ------------------------------------------------------------------------------------------- CLI
def read_prompts(args: argparse.Namespace, pipe: Pipeline) -> list[str] | None:
    if not pipe.conditional:
        if args.prompt or args.prompts_file:
            raise SampleError(f"{pipe.meta.get('source', args.unet)}: the UNet is unconditional (context_dim null); "
                              "it takes no --prompt or --prompts-file")
        return None
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SampleError(f"--prompts-file: file not found: {path}")
        lines = [line.strip() for line in path.read_text().splitlines()]
        from_file = [line for line in lines if line]
        if not from_file:
            raise SampleError(f"--prompts-file {path} holds no prompts (expected one prompt a line)")
        prompts += from_file
    if not prompts:
        prompts = list(pipe.meta.get("val_prompts") or [])
    if not prompts:
        raise SampleError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    return prompts


def load_init_image(path: str, resolution: int) -> torch.Tensor:
    """An image file -> (3, R, R) in [-1, 1], short side resized to R and centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    from ldm.data.folder import resize_crop, to_rgb
    from ldm.data.shapes import to_tensor

    p = Path(path)
    if not p.is_file():
        raise SampleError(f"--init-image: file not found: {p}")
    try:
        with Image.open(p) as img:
            img.load()
            img = resize_crop(to_rgb(img), resolution, "center")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise SampleError(f"--init-image: {p} is not a readable image ({e})") from None
    return to_tensor(np.asarray(img).copy())


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:length] or "image"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--unet", default="runs/unet", metavar="DIR",
                     help="folder with unet.safetensors + unet.json from train_unet (default runs/unet)")
    src.add_argument("--vae", default=None, metavar="DIR", help="VAE folder (default: the one unet.json records)")
    src.add_argument("--text-encoder", default=None, metavar="PATH",
                     help="local Hugging Face text encoder folder (default: the one unet.json records); its "
                          "width must equal the UNet's context_dim")
    src.add_argument("--from-diffusers", default=None, metavar="PATH",
                     help="sample a Stable Diffusion 1.x folder in diffusers' layout instead of --unet/--vae")
    src.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    what = p.add_argument_group("what to draw")
    what.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for more)")
    what.add_argument("--prompts-file", default=None, metavar="FILE", help="prompts, one a line")
    what.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    what.add_argument("--init-image", default=None, metavar="PATH", help="start from this image (image-to-image)")
    what.add_argument("--strength", type=float, default=None,
                      help="with --init-image: how much to change it, in (0, 1]; 1 ignores it (default 0.6)")
    how = p.add_argument_group("sampler")
    how.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                     help=f"default: unet.json's, else {DEFAULT_SAMPLER} (DPM-Solver++ 2M)")
    how.add_argument("--steps", type=int, default=None,
                     help=f"model calls (default: unet.json's, else {DEFAULT_STEPS})")
    how.add_argument("--spacing", choices=SPACINGS, default=None,
                     help="sigma spacing (default: karras for dpmpp_2m and euler, uniform for ddpm and ddim)")
    how.add_argument("--cfg", type=float, default=None,
                     help=f"classifier-free guidance scale, 1 = none (default: unet.json's, else {DEFAULT_CFG})")
    how.add_argument("--seed", type=int, default=0, help="image k starts from noise of seed + k (default 0)")
    how.add_argument("--batch-size", type=int, default=16, help="images per sampler run (default 16)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="grid.png", help="grid PNG, a row per prompt (default grid.png)")
    out.add_argument("--images", default=None, metavar="DIR", help="also write each image into DIR")
    out.add_argument("--progress", action="store_true", help="show the sampler's progress bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    for flag in ("n", "batch_size", "steps"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise SampleError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.strength is not None:
        if args.init_image is None:
            raise SampleError("--strength needs --init-image")
        if not 0.0 < args.strength <= 1.0:
            raise SampleError(f"--strength must lie in (0, 1], got {args.strength}")
    if args.init_image is not None and not Path(args.init_image).is_file():
        raise SampleError(f"--init-image: file not found: {args.init_image}")
    if args.cfg is not None and args.cfg < 0:
        raise SampleError(f"--cfg must be >= 0, got {args.cfg}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.from_diffusers is not None:
        pipe = load_diffusers(args.from_diffusers, args.text_encoder, device)
    else:
        pipe = load_pipeline(args.unet, args.vae, args.text_encoder, device)
    prompts = read_prompts(args, pipe)
    meta = pipe.meta
    sampler = args.sampler or meta.get("sampler", DEFAULT_SAMPLER)
    steps = args.steps or meta.get("sample_steps", DEFAULT_STEPS)
    cfg = args.cfg if args.cfg is not None else meta.get("cfg_scale", DEFAULT_CFG)
    init, strength = None, 1.0
    if args.init_image is not None:
        init = load_init_image(args.init_image, pipe.resolution)
        strength = args.strength if args.strength is not None else 0.6
    images = generate(pipe, prompts, n=args.n, steps=steps, sampler=sampler, cfg=cfg, seed=args.seed,
                      batch_size=args.batch_size, spacing=args.spacing, init_image=init, strength=strength,
                      progress=args.progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=args.n, scale=max(1, GRID_SIDE // images.shape[-1])).save(out)
    rows = prompts or ["(unconditional)"]
    print(f"sample: wrote {out}: {len(rows)} row(s) of {args.n}, {images.shape[-1]} x {images.shape[-2]} each "
          f"({sampler}, {steps} steps, cfg {cfg if pipe.conditional else 'n/a'}, seed {args.seed})", file=sys.stderr)
    for i, text in enumerate(rows):
        print(f"  row {i}: {text}", file=sys.stderr)
    if args.images:
        folder = Path(args.images)
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(len(images)):
            image_grid(images[k:k + 1], pad=0).save(folder / f"{k:04d}_{slug(rows[k // args.n])}.png")
        print(f"sample: wrote {len(images)} images to {folder}/", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except SampleError as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
