"""``ldm.Pipeline``: everything sampling needs, whoever trained the model, and the sampling path.

    from ldm import Pipeline
    pipe = Pipeline.from_pretrained("runs/unet")           # train_unet's folder, convert's, or an SD 1.x folder
    images = pipe(["a large red circle in the center on a black background"], n=4, seed=0)  # PIL images
    digits = Pipeline.from_pretrained("runs/digits-unet")(classes=[7], n=4)  # a class-conditional UNet

A Pipeline holds the UNet, the VAE (which carries its latent codec), the text encoder, the noise
schedule, the prediction type and the sampling defaults of its ``unet.json``. ``generate`` is the one
path from prompts to images: image ``k`` (prompt-major order) starts from noise drawn on the CPU from
seed ``seed + k``, so it is the same whatever the batch size, the prompts after it or the device.
Stochastic samplers (ddpm) also draw noise at every step, from a generator per batch.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from autoencoder import VAE
from ldm.diffusion import Denoiser, NoiseSchedule
from ldm.errors import InputError
from ldm.pretrained import (DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS, SD_CFG, VAE_NAME, check_sampling,
                            file_digest, load_unet, load_vae)
from ldm.runlog import to_uint8_images
from ldm.samplers import SAMPLERS, SIGMA_CAP, CFGDenoiser, ClassCFGDenoiser, get_sigmas
from ldm.unet import UNet

# How each sampler spaces its sigmas unless told: DDPM and DDIM on evenly spaced timesteps (1000
# DDPM steps are then exactly Ho et al.'s chain), the ODE solvers on Karras et al.'s ramp, capped at
# SIGMA_CAP (``get_sigmas``).
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpmpp_2m": "karras", "euler": "karras",
                   "unipc": "karras"}
SPACINGS = ("karras", "uniform")
DEFAULT_STRENGTH = 0.6  # image-to-image: how much of the init image is redrawn when not told


@dataclass(frozen=True)
class SampleConfig:
    """How to sample: a sampler of ``ldm.samplers.SAMPLERS``, its model calls, the guidance scale
    (1: none) and the sigma spacing (None: the sampler's default)."""

    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    spacing: str | None = None

    def __post_init__(self):
        try:
            check_sampling(self.sampler, self.steps, self.cfg, names=("steps", "guidance scale cfg"))
        except ValueError as e:
            raise InputError(str(e)) from None
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise InputError(f"unknown sigma spacing {self.spacing!r}; expected one of {SPACINGS}")


@dataclass
class Pipeline:
    """VAE + UNet + text encoder + noise schedule + sampling defaults. Latents live in the UNet's
    space (``vae.encode_latents`` / ``vae.decode_latents``)."""

    unet: UNet
    vae: VAE
    schedule: NoiseSchedule
    prediction: str
    latent_shape: tuple[int, int, int]  # (C, h, w) the UNet samples
    encoder: object | None = None  # ldm.text.TextEncoder, None for an unconditional UNet
    defaults: SampleConfig = field(default_factory=SampleConfig)
    autocast_dtype: torch.dtype | None = None  # run UNet and VAE under autocast, None: as loaded
    meta: dict = field(default_factory=dict)  # what the checkpoint says besides (val_prompts, source...)

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, *, vae: str | Path | None = None,
                        text_encoder: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, load_text_encoder: bool = True) -> Pipeline:
        """Open a folder written by ``train_unet`` or ``ldm.convert`` (``unet.json`` in it), or a Stable
        Diffusion 1.x folder in diffusers' layout (``unet/``, ``vae/``, ``scheduler/``). ``vae`` and
        ``text_encoder`` replace the ones the folder names; ``dtype`` (e.g. torch.float16 on a GPU) casts
        the UNet and VAE and runs them under autocast."""
        path = Path(path)
        device = torch.device(device)
        if (path / "unet.json").is_file() or not (path / "unet").is_dir():
            pipe = load_pipeline(path, vae, text_encoder, device, load_text_encoder)
        else:
            pipe = load_diffusers(path, text_encoder, device, load_text_encoder)
        return pipe.to(dtype=dtype) if dtype is not None else pipe

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move the models to ``device`` and cast the UNet and VAE to ``dtype``; half precision runs
        under autocast. Returns self."""
        for m in (self.unet, self.vae, self.encoder):
            if m is not None and device is not None:
                m.to(device)
        if dtype is not None:
            self.unet.to(dtype=dtype)
            self.vae.to(dtype=dtype)
            self.autocast_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else None
        return self

    def load_lora(self, path: str | Path, scale: float = 1.0) -> Pipeline:
        """Merge a LoRA file (``ldm.lora``: ours or diffusers' layout) into the UNet, times ``scale``;
        call again to stack several. Returns self."""
        from ldm.lora import load_lora

        load_lora(path, self.unet).merge(scale)
        return self

    # ----------------------------------------------------------------------------- properties
    @property
    def conditional(self) -> bool:
        return self.unet.config.context_dim is not None

    @property
    def num_classes(self) -> int | None:
        """The classes a class-conditional UNet draws (labels 0 .. num_classes - 1); None: no class input."""
        return self.unet.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def resolution(self) -> int:
        return self.latent_shape[1] * self.vae.config.downsample_factor

    def autocast(self):
        dev = self.device.type
        return torch.autocast(dev, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None)

    # ----------------------------------------------------------------------------- latents
    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the UNet's latents (B, C, h, w) (posterior means)."""
        with self.autocast():
            return self.vae.encode_latents(x.to(self.device))

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The UNet's latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], float32."""
        with self.autocast():
            x = self.vae.decode_latents(z)
        return x.float().clamp(-1, 1)

    # ----------------------------------------------------------------------------- sampling
    def generate(self, prompts: list[str] | None = None, **kwargs) -> torch.Tensor:
        """``generate(self, prompts, ...)``: (P * n, 3, H, W) float32 in [-1, 1] on the CPU."""
        return generate(self, prompts, **kwargs)

    def __call__(self, prompts: str | list[str] | None = None, *, classes: int | list[int] | None = None,
                 n: int = 1, steps: int | None = None, sampler: str | None = None, cfg: float | None = None,
                 seed: int = 0, init_image=None, strength: float | None = None, spacing: str | None = None,
                 batch_size: int = 16, output: str = "pil", progress: bool = False):
        """``n`` images of each prompt (prompt-major; an unconditional model takes none), or of each class
        label of a class-conditional model (``classes``), as a list of PIL images, or with ``output="pt"``
        a (P * n, 3, H, W) tensor in [-1, 1]. Unset sampling options come from the checkpoint.
        ``init_image`` (a path, a PIL image or a (3, H, W) tensor in [-1, 1]) with ``strength`` in (0, 1]
        draws image-to-image."""
        if output not in ("pil", "pt"):
            raise InputError(f"output must be 'pil' or 'pt', got {output!r}")
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(classes, int):
            classes = [classes]
        how = replace(self.defaults, **{k: v for k, v in (("sampler", sampler), ("steps", steps), ("cfg", cfg),
                                                          ("spacing", spacing)) if v is not None})
        if init_image is not None:
            init_image = load_image(init_image, self.resolution)
            strength = DEFAULT_STRENGTH if strength is None else strength
        images = generate(self, prompts, classes=classes, n=n, steps=how.steps, sampler=how.sampler, cfg=how.cfg,
                          seed=seed, batch_size=batch_size, spacing=how.spacing, init_image=init_image,
                          strength=1.0 if strength is None else strength, progress=progress)
        if output == "pt":
            return images
        from PIL import Image

        return [Image.fromarray(a.numpy()) for a in to_uint8_images(images)]


    @property
    def task(self) -> str | None:
        """The image-conditioned task the UNet was trained for (``ldm.image2image``), None for text-to-image."""
        from ldm.image2image import model_task

        return model_task(self.unet, self.meta)

    def image2image(self, task: str, images: torch.Tensor, masks: torch.Tensor | None = None,
                    prompts: str | list[str] | None = None, **kwargs) -> torch.Tensor:
        """``task`` (inpaint, outpaint, colorize, sr) on images (P, 3, H, W) in [-1, 1] (sr: the low-res
        ones) with masks (P, 1, H, W), 1 = draw: ``ldm.image2image.generate_task``, (P * n, 3, R, R)."""
        from ldm.image2image import generate_task

        prompts = [prompts] if isinstance(prompts, str) else prompts
        try:
            return generate_task(self, task, images, masks, prompts, **kwargs)
        except ValueError as e:
            raise InputError(str(e)) from None


# --------------------------------------------------------------------------------------------- loading
def load_encoder(path: str | Path | None, device, width: int | None, what: str, **options):
    """The text encoder at ``path`` (None: the packaged MiniLM); ``width`` must match the UNet's
    context_dim, ``what`` names the file that asks for it."""
    from ldm.text import TextEncoder

    try:
        encoder = TextEncoder(path, device=device, **options)
    except (FileNotFoundError, ImportError, OSError, ValueError) as e:
        raise InputError(f"text encoder: {e}") from None
    if width is not None and encoder.width != width:
        raise InputError(f"text encoder {encoder.path} gives {encoder.width}-wide tokens but {what} "
                         f"expects context_dim {width}")
    return encoder


def load_pipeline(unet_dir: str | Path, vae_dir: str | Path | None = None, text_encoder: str | Path | None = None,
                  device: str | torch.device = "cpu", load_text_encoder: bool = True) -> Pipeline:
    """A folder with ``unet.json`` (train_unet's or convert's): the UNet, the VAE it records (or the one
    beside it, or ``vae_dir``), the text encoder it records (or ``text_encoder``)."""
    unet_dir = Path(unet_dir)
    unet, info = load_unet(unet_dir, device)
    json_path = unet_dir / "unet.json"
    if vae_dir is None:
        if info.vae:
            vae_dir = info.vae
        elif (unet_dir / f"{VAE_NAME}.json").is_file():
            vae_dir = unet_dir
        else:
            raise InputError(f"{json_path} records no VAE folder; pass --vae DIR")
    try:
        vae, _ = load_vae(vae_dir, device)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"{e} (the VAE for {json_path}; pass --vae DIR if it moved)") from None
    vae_json = Path(vae_dir) / f"{VAE_NAME}.json"
    if vae.config.latent_channels != unet.config.in_channels:
        raise InputError(f"{vae_json} has {vae.config.latent_channels} latent channels but {json_path} "
                         f"takes in_channels={unet.config.in_channels}")
    if info.vae_sha256 and file_digest(Path(vae_dir) / f"{VAE_NAME}.safetensors") != info.vae_sha256:
        warnings.warn(f"{Path(vae_dir) / 'vae.safetensors'} is not the VAE {json_path} was trained with "
                      "(its digest differs): expect poor images", stacklevel=2)
    encoder = None
    width = unet.config.context_dim
    if width is not None and load_text_encoder:
        spec = info.text_encoder
        recorded = spec.path if spec is not None else None
        options = spec.options() if spec is not None else {}
        encoder = load_encoder(text_encoder if text_encoder is not None else recorded, device, width, str(json_path),
                               **options)
    elif width is None and text_encoder is not None:
        raise InputError(f"{json_path} describes an unconditional UNet; it takes no --text-encoder")
    latent_shape = info.latent_shape
    if latent_shape is None:  # a hand-written unet.json: the VAE's latents at the resolution it records
        if vae.resolution is None:
            raise InputError(f"{json_path} has no latent_shape and {vae_json} no resolution to derive it from")
        latent_shape = vae.latent_shape()
    meta = {**info.extra, "val_prompts": info.val_prompts, "created_by": info.created_by, "source": str(unet_dir)}
    return Pipeline(unet=unet, vae=vae, schedule=info.noise_schedule(), prediction=info.prediction,
                    latent_shape=tuple(latent_shape), encoder=encoder,
                    defaults=SampleConfig(info.sampler, info.sample_steps, info.cfg_scale), meta=meta)


def load_diffusers(path: str | Path, text_encoder: str | Path | None, device: torch.device,
                   load_text_encoder: bool = True) -> Pipeline:
    """A Stable Diffusion 1.x folder in diffusers' layout, read into our models (half precision under
    autocast on a GPU)."""
    from ldm.sd_folder import SD_TEXT_ENCODER_OPTIONS, load_diffusers_pipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        p = load_diffusers_pipeline(path, device=device, dtype=dtype)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise InputError(str(e)) from None
    encoder = None
    if load_text_encoder:
        encoder = load_encoder(text_encoder or p.text_encoder_path, device, p.unet.config.context_dim,
                               f"the UNet in {path}", **SD_TEXT_ENCODER_OPTIONS)
    f = p.vae.config.downsample_factor
    return Pipeline(unet=p.unet, vae=p.vae, schedule=p.schedule, prediction=p.prediction,
                    latent_shape=(p.unet.config.in_channels, p.resolution // f, p.resolution // f),
                    encoder=encoder, defaults=SampleConfig(cfg=SD_CFG),
                    autocast_dtype=dtype if device.type == "cuda" else None, meta={"source": str(path)})


def load_image(image, resolution: int, what: str = "init image") -> torch.Tensor:
    """An image file, PIL image or (3, R, R) tensor in [-1, 1] -> (3, R, R) float in [-1, 1]: the short
    side resized to ``resolution`` and centre-cropped. Errors start with ``what``."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or tuple(image.shape[1:]) != (resolution, resolution):
            raise InputError(f"{what}: tensor must be (3, {resolution}, {resolution}), got {tuple(image.shape)}")
        return image
    from PIL import Image, UnidentifiedImageError

    from ldm.data.folder import resize_crop, to_rgb
    from ldm.data.shapes import to_tensor

    if isinstance(image, (str, Path)):
        p = Path(image)
        if not p.is_file():
            raise InputError(f"{what}: file not found: {p}")
        try:
            with Image.open(p) as img:
                img.load()
                image = img.copy()
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise InputError(f"{what}: {p} is not a readable image ({e})") from None
    return to_tensor(np.asarray(resize_crop(to_rgb(image), resolution, "center")).copy())


# --------------------------------------------------------------------------------------------- sampling
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
    karras = spacing == "karras"
    sigmas = get_sigmas(schedule, steps, karras=karras, sigma_cap=SIGMA_CAP if karras else None,
                        device=device)  # (steps + 1,)
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
                   class_labels: torch.Tensor | None = None, init: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, disable: bool | None = True,
                   guide=None) -> torch.Tensor:
    """Run ``sampler`` over ``sigmas`` from ``init + sigmas[0] * noise`` (``init`` None: pure noise).

    noise (B, C, h, w) standard normal; context (B, L, width) and context_lengths (B,) the prompts'
    tokens; uncond (context (1, L', width), lengths (1,)) the empty prompt's, used with ``cfg`` != 1
    for classifier-free guidance; or class_labels (B,) of a class-conditional UNet, guided against its
    null class with ``cfg`` != 1; ``guide(denoiser) -> denoiser`` wraps the result (CLIP guidance).
    -> (B, C, h, w) latents."""
    denoiser = Denoiser(unet, schedule, prediction)
    extra = {}
    if class_labels is not None:
        extra = {"class_labels": class_labels}
        if cfg != 1.0:
            denoiser = ClassCFGDenoiser(denoiser, cfg)
            extra["null_class"] = unet.config.num_classes
    elif context is not None:
        extra = {"context": context, "context_lengths": context_lengths}
        if uncond is not None and cfg != 1.0:
            denoiser = CFGDenoiser(denoiser, cfg)
            extra.update(uncond_context=uncond[0], uncond_context_lengths=uncond[1])
    if guide is not None:
        denoiser = guide(denoiser)
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
def generate(pipe: Pipeline, prompts: list[str] | None, *, classes: list[int] | None = None, n: int = 1,
             steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER, cfg: float = DEFAULT_CFG, seed: int = 0,
             batch_size: int = 16, spacing: str | None = None, init_image: torch.Tensor | None = None,
             strength: float = 1.0, encoded: tuple | None = None, progress: bool = False,
             guide=None) -> torch.Tensor:
    """``n`` images for each prompt (prompt-major), for each class label of a class-conditional UNet
    (``classes``, class-major), or ``n`` images of an unconditional UNet (``prompts`` None).
    ``init_image`` (3, H, W) in [-1, 1] at the pipeline's resolution with ``strength`` in (0, 1] for
    image-to-image. ``encoded``: (context, lengths, uncond) from ``encode_prompts`` instead of running
    ``pipe.encoder``. ``guide(rows (b,)) -> (denoiser -> denoiser)`` wraps each batch's denoiser
    (``ldm.clip_guidance.ClipGuide``); with it an unconditional UNet takes prompts, for the guide only.
    -> (P * n, 3, H, W) float32 in [-1, 1], on the CPU."""
    labels = None
    if pipe.num_classes is not None:
        if not classes:
            raise ValueError(f"generate: this UNet is class-conditional; give at least one class "
                             f"(0..{pipe.num_classes - 1})")
        bad = [c for c in classes if not (isinstance(c, int) and 0 <= c < pipe.num_classes)]
        if bad:
            raise ValueError(f"generate: classes {bad} lie outside 0..{pipe.num_classes - 1}")
        labels = torch.tensor(list(classes), dtype=torch.long, device=pipe.device)  # (P,)
    elif classes:
        raise ValueError("generate: this UNet takes no class labels (num_classes is None)")
    if pipe.conditional:
        if not prompts:
            raise ValueError("generate: this UNet is text-conditional; give at least one prompt")
        if encoded is None and pipe.encoder is None:
            raise ValueError("generate: the pipeline was loaded without its text encoder; pass encoded=")
        context, lengths, uncond = encoded or encode_prompts(pipe.encoder, prompts, pipe.device)
        rows = len(prompts)
        if labels is not None and len(labels) != rows:
            raise ValueError(f"generate: {rows} prompts but {len(labels)} classes; give one class per prompt")
    else:
        if prompts and guide is None:
            raise ValueError("generate: this UNet takes no prompts (context_dim is None)")
        context = lengths = uncond = None
        rows = len(prompts) if prompts else 1 if labels is None else len(labels)
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
        rows_idx = torch.arange(start, start + count, device=device) // n  # prompt (class) of each image
        if context is not None:
            cond = {"context": context[rows_idx], "context_lengths": lengths[rows_idx], "uncond": uncond}
        if labels is not None:
            cond["class_labels"] = labels[rows_idx]  # (b,)
        gen = torch.Generator(device).manual_seed(seed + start)
        with pipe.autocast():
            z = sample_latents(pipe.unet, pipe.schedule, pipe.prediction, noise, sigmas, sampler=sampler, cfg=cfg,
                               init=init, generator=gen, disable=not progress,
                               guide=guide(rows_idx) if guide is not None else None, **cond)
        images.append(pipe.decode_latents(z.float()).cpu())
    return torch.cat(images)  # (P * n, 3, H, W)
