"""The files a model lives in, and the one loader of each: ``load_vae`` and ``load_unet``.

- ``vae.safetensors`` + ``vae.json``: the VAE's config, its latent codec (``latent_scale_factor``,
  ``latent_mean``), the resolution it was trained at and what it was trained on. ``load_vae`` sets the
  codec on the model (``VAE.encode_latents`` / ``decode_latents``), so no caller repeats the formula.
- ``unet.safetensors`` + ``unet.json``: one schema, ``UNetFile``, which ``train_unet`` and
  ``ldm.convert from-diffusers`` both write and ``load_unet`` reads. Files written before the schema
  was one keep loading: train_unet's (text encoder as ``{"path", "width"}``, a schedule name,
  ``sample_steps`` / ``cfg_scale``) and convert's (text encoder as a path string with
  ``text_encoder_options``, a diffusers betas dict as the schedule, ``sample_size`` for the latent side).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from autoencoder import VAE, VAEConfig
from ldm.checkpoint import EXPORT_KEY, load_model_files, load_state_dict_strict, save_model
from ldm.diffusion import NoiseSchedule, check_prediction
from ldm.errors import InputError
from ldm.unclip_decoder import build_unet
from ldm.unet import UNet, UNetConfig

VAE_NAME = "vae"
UNET_NAME = "unet"
UNET_KEYS = ("prediction", "schedule")  # what unet.json must hold besides its config
# UniPC at 20 model calls reproduces the Gaussian mixture of ldm.mixture within 2.5 standard errors of
# 20000 samples on the linear schedule, DPM-Solver++(2M) misses it by 11 (python -m bench.samplers)
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_CFG = "unipc", 20, 3.0
SD_CFG = 7.5  # the guidance scale Stable Diffusion 1.x is usually sampled with


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (to tell whether a checkpoint is the one a run recorded)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ VAE
def load_vae(folder: str | Path, device: str | torch.device = "cpu") -> tuple[VAE, dict]:
    """The VAE saved in ``folder`` (eval mode, gradients off, on ``device``, its latent codec set) and
    its metadata: ``config``, ``latent_scale_factor``, ``latent_mean``, ``resolution``,
    ``downsample_factor``, ``latent_shape``, ``dataset``, ``steps``, ``eval``. Errors name the file that
    is missing or does not fit (FileNotFoundError, ValueError)."""
    folder = Path(folder)
    state, meta = load_model_files(folder, VAE_NAME)
    json_path = folder / f"{VAE_NAME}.json"
    try:
        config = VAEConfig(**meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{json_path}: config does not describe a VAE ({e})") from None
    if not isinstance(meta.get("latent_scale_factor"), (int, float)):
        raise ValueError(f"{json_path} has no latent_scale_factor; was it written by ldm.train_vae?")
    model = VAE(config, latent_scale=meta["latent_scale_factor"], latent_shift=meta.get("latent_mean", 0.0),
                resolution=meta.get("resolution"))
    load_state_dict_strict(model, state, str(folder / f"{VAE_NAME}.safetensors"))
    return model.to(device).eval().requires_grad_(False), meta


def save_vae(folder: str | Path, vae: VAE, **extra) -> Path:
    """``folder/vae.safetensors`` + ``vae.json`` with the codec the model carries."""
    f = vae.config.downsample_factor
    shape = list(vae.latent_shape()) if vae.resolution else None
    return save_model(folder, VAE_NAME, vae, vae.config, latent_scale_factor=vae.latent_scale,
                      latent_mean=vae.latent_shift, resolution=vae.resolution, downsample_factor=f,
                      latent_shape=shape, **extra)


# ------------------------------------------------------------------------------------------ UNet
@dataclass
class TextEncoderSpec:
    """Which text encoder a UNet was trained with, and how it tokenizes."""

    path: str | None = None  # a local Hugging Face folder; None: the packaged all-MiniLM-L6-v2
    width: int | None = None  # token width (= the UNet's context_dim)
    pad_to_max: bool = False  # Stable Diffusion pads every prompt to 77 tokens...
    mask_padding: bool = True  # ...and lets cross-attention see the padding
    max_tokens: int | None = None  # None: ldm.text.MAX_TOKENS

    def options(self) -> dict:
        """Keyword arguments of ``ldm.text.TextEncoder`` besides the path."""
        out = {"pad_to_max": self.pad_to_max, "mask_padding": self.mask_padding}
        return out if self.max_tokens is None else {**out, "max_tokens": self.max_tokens}


@dataclass
class UNetFile:
    """What ``unet.json`` holds: the model, its diffusion, the models around it and sampling defaults.

    ``schedule`` is one of our names (``ldm.diffusion.SCHEDULES``) or a diffusers betas dict
    (``beta_schedule``, ``beta_start``, ``beta_end``, ``num_train_timesteps``, ``trained_betas``).
    ``extra`` carries what a consumer does not need to rebuild the model (dataset, training figures,
    scores, the source folder, diffusers' own config...) and is written back at the top level."""

    config: UNetConfig
    prediction: str
    schedule: str | dict
    latent_shape: tuple[int, int, int] | None = None  # (C, h, w) the UNet samples; None: the VAE's
    num_timesteps: int = 1000
    resolution: int | None = None  # image side in pixels
    text_encoder: TextEncoderSpec | None = None  # None: an unconditional UNet
    vae: str | None = None  # the VAE folder it was trained with (our runs); None: beside unet.json
    vae_sha256: str | None = None
    sampler: str = DEFAULT_SAMPLER
    sample_steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG
    val_prompts: list[str] = field(default_factory=list)
    created_by: str = "ldm"
    extra: dict = field(default_factory=dict)

    def noise_schedule(self) -> NoiseSchedule:
        from ldm.sd_folder import schedule_from_config

        if isinstance(self.schedule, str):
            return NoiseSchedule.from_name(self.schedule, self.num_timesteps)
        return schedule_from_config(self.schedule, "schedule")

    def to_json(self) -> dict:
        """The JSON object written beside the weights (without ``config``, which ``save_model`` adds)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("config", "extra")}
        out["latent_shape"] = None if self.latent_shape is None else list(self.latent_shape)
        enc = self.text_encoder
        out["text_encoder"] = None if enc is None else {"path": enc.path, "width": enc.width}
        if enc is not None and enc.options() != TextEncoderSpec().options():
            out["text_encoder_options"] = enc.options()
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, meta: dict, source: str | Path) -> UNetFile:
        """Read any ``unet.json`` we ever wrote; a ValueError names ``source`` and what is wrong."""
        missing = [k for k in UNET_KEYS if k not in meta]
        if missing:
            raise ValueError(f"{source} is not a UNet exported by ldm.train_unet (no {', '.join(missing)} entry)")
        try:
            config = UNetConfig(**meta["config"])
            prediction = check_prediction(meta["prediction"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
        schedule = meta["schedule"]
        if not isinstance(schedule, (str, dict)):
            raise ValueError(f"{source}: schedule must be a name or a diffusers betas dict, got {schedule!r}")
        default_T = schedule.get("num_train_timesteps", 1000) if isinstance(schedule, dict) else 1000
        enc = meta.get("text_encoder")
        options = meta.get("text_encoder_options") or {}
        if isinstance(enc, str):  # convert's files before the one schema: the path alone
            enc = {"path": enc}
        text_encoder = None
        if enc is not None or config.context_dim is not None:
            enc = enc or {}
            text_encoder = TextEncoderSpec(path=enc.get("path"), width=enc.get("width", config.context_dim),
                                           **{k: options[k] for k in ("pad_to_max", "mask_padding", "max_tokens")
                                              if k in options})
        shape = meta.get("latent_shape")
        if shape is None and isinstance(meta.get("sample_size"), int):  # convert's files before the one schema
            shape = [config.in_channels, meta["sample_size"], meta["sample_size"]]
        if shape is not None and not (isinstance(shape, (list, tuple)) and len(shape) == 3
                                      and all(isinstance(s, int) and s > 0 for s in shape)):
            raise ValueError(f"{source}: latent_shape must be [C, h, w], got {shape!r}")
        known = {f.name for f in fields(cls)} | {"text_encoder_options", "sample_size", EXPORT_KEY}
        try:
            out = cls(config=config, prediction=prediction, schedule=schedule,
                      latent_shape=None if shape is None else tuple(shape),
                      num_timesteps=int(meta.get("num_timesteps", default_T)), resolution=meta.get("resolution"),
                      text_encoder=text_encoder, vae=meta.get("vae"), vae_sha256=meta.get("vae_sha256"),
                      sampler=meta.get("sampler", DEFAULT_SAMPLER),
                      sample_steps=meta.get("sample_steps", DEFAULT_STEPS),
                      # convert's files before the one schema recorded no guidance: SD's usual one
                      cfg_scale=meta.get("cfg_scale", SD_CFG if "diffusers_config" in meta else DEFAULT_CFG),
                      val_prompts=list(meta.get("val_prompts") or []),
                      created_by=meta.get("created_by", "ldm"),
                      extra={k: v for k, v in meta.items() if k not in known})
            out.noise_schedule()
            check_sampling(out.sampler, out.sample_steps, out.cfg_scale)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
        return out


def check_sampling(sampler, steps, cfg, names: tuple[str, str] = ("sample_steps", "cfg_scale")) -> None:
    """ValueError unless the sampling settings are ones ``ldm.Pipeline`` can run (unet.json's, and
    ``SampleConfig``'s); ``names`` are what the caller calls the steps and the guidance scale."""
    from ldm.samplers import SAMPLERS

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"{names[0]} must be a positive integer, got {steps!r}")
    if not isinstance(cfg, (int, float)) or isinstance(cfg, bool) or not cfg >= 0:
        raise ValueError(f"{names[1]} must be a number >= 0, got {cfg!r}")


def save_unet(folder: str | Path, unet: torch.nn.Module, info: UNetFile) -> Path:
    """``folder/unet.safetensors`` + ``unet.json`` (``info.config`` describes ``unet``)."""
    return save_model(folder, UNET_NAME, unet, info.config, **info.to_json())


def load_unet(folder: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = torch.float32) -> tuple[UNet, UNetFile]:
    """The UNet saved in ``folder`` (by train_unet or convert; eval mode, no gradients, in ``dtype``,
    None: as stored) and its ``UNetFile``. An InputError names the file that is missing or not ours."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"checkpoint folder not found: {folder} (train one with python -m ldm.train_unet --text)")
    try:
        state, meta = load_model_files(folder, UNET_NAME)
        info = UNetFile.from_json(meta, folder / f"{UNET_NAME}.json")
        with torch.device("meta"):  # shapes only: an 860M-parameter UNet builds in no time and no memory
            unet = build_unet(info.config)  # the plain UNet, or the unCLIP decoder's
        load_state_dict_strict(unet, state, str(folder / f"{UNET_NAME}.safetensors"), assign=True)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    unet = unet.to(device) if dtype is None else unet.to(device, dtype)
    return unet.eval().requires_grad_(False), info

