"""Stable Diffusion 1.x folders in diffusers' layout: read them into our models, write ours out.

- ``load_diffusers_pipeline(path)`` reads ``unet/``, ``vae/`` and ``scheduler/`` straight into our
  models (``ldm.Pipeline.from_pretrained`` uses it);
- ``convert_from_diffusers(path, out)`` writes them as our files (``ldm.pretrained``: ``unet.*`` with
  the one ``UNetFile`` schema, ``vae.*``), so ``Pipeline.from_pretrained(out)`` and
  ``python -m ldm.sample --unet out`` open them;
- ``convert_to_diffusers(folder, out)`` writes our models back in the layout diffusers'
  ``from_pretrained`` opens.

Weights are read from safetensors only: pickle files (.bin / .ckpt) can run code and are never loaded.
The key maps and config translations are ``ldm.sd_format``.
"""

from __future__ import annotations

import inspect
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from autoencoder import VAE, VAEConfig
from ldm.checkpoint import few_keys, load_json, load_model_files, load_tensors, save_json, save_tensors
from ldm.diffusion import SCHEDULES, NoiseSchedule, check_prediction
from ldm.pretrained import SD_CFG, UNET_NAME, VAE_NAME, TextEncoderSpec, UNetFile, save_unet, save_vae
from ldm.sd_format import (
    BETA_ARGS,
    BETA_SCHEDULES,
    CONFIG_NAME,
    DEFAULT_SCALING_FACTOR,
    PREDICTION_NAMES,
    SCHEDULER_CONFIG,
    SD_TEXT_ENCODER_OPTIONS,
    UNET_CARRIED,
    WEIGHTS_NAME,
    _meta_model,
    _unsupported,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)
from ldm.unet import UNet

# ================================================================ schedules
def _default(fn: Callable, arg: str):
    return inspect.signature(fn).parameters[arg].default


def schedule_from_config(spec: str | dict, source: str = "schedule") -> NoiseSchedule:
    """The training noise schedule from a diffusers scheduler config (``beta_schedule``, ``beta_start``,
    ``beta_end``, ``num_train_timesteps``, ``trained_betas``; the sampler-time settings such as
    timestep_spacing or steps_offset are not part of it), from one of our names (``SCHEDULES``), or
    from ``{"name": ..., "num_timesteps": ...}``."""
    if isinstance(spec, str):
        return NoiseSchedule.from_name(spec)
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: a schedule is a name or a dict, got {type(spec).__name__}")
    if "name" in spec and "beta_schedule" not in spec:
        return NoiseSchedule.from_name(spec["name"], int(spec.get("num_timesteps", 1000)))
    if spec.get("rescale_betas_zero_snr"):
        raise _unsupported(source, "rescale_betas_zero_snr", True,
                           "it drives alphas_cumprod to 0 at the last step, which our NoiseSchedule excludes")
    if spec.get("trained_betas") is not None:
        betas = torch.tensor(spec["trained_betas"], dtype=torch.float64)
        return NoiseSchedule(torch.cumprod(1.0 - betas, dim=0), name="trained_betas")
    if "beta_schedule" not in spec:
        raise ValueError(f"{source}: no beta_schedule (a DDPM-family scheduler config has one; "
                         f"{spec.get('_class_name', 'this scheduler')} is not supported)")
    kind = spec["beta_schedule"]
    if kind not in BETA_SCHEDULES:
        raise _unsupported(source, "beta_schedule", kind, f"expected one of {list(BETA_SCHEDULES)}")
    ours = BETA_SCHEDULES[kind]
    fn = SCHEDULES[ours]
    T = int(spec.get("num_train_timesteps", 1000))
    # diffusers' defaults when a field is absent: beta_start 0.0001, beta_end 0.02 (our linear_schedule's)
    kwargs = {a: float(spec.get(a, _default(SCHEDULES["linear"], a))) for a in BETA_ARGS[ours]}
    return NoiseSchedule(fn(T, **kwargs), name=ours)


def scheduler_config_to_diffusers(spec: str | dict, prediction: str) -> dict:
    """Our schedule (name or dict) and prediction -> a diffusers ``DDIMScheduler`` config with SD's
    sampler settings (no x0 clipping, steps_offset 1)."""
    if isinstance(spec, dict) and "beta_schedule" in spec:
        betas = {k: spec[k] for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps",
                                      "trained_betas") if k in spec}
    else:
        name, T = (spec, 1000) if isinstance(spec, str) else (spec.get("name"), int(spec.get("num_timesteps", 1000)))
        theirs = {v: k for k, v in BETA_SCHEDULES.items()}
        if name not in theirs:
            raise _unsupported("schedule", "name", name, f"expected one of {list(theirs)}")
        betas = {"beta_schedule": theirs[name], "num_train_timesteps": T,
                 **{a: _default(SCHEDULES[name], a) for a in BETA_ARGS[name]}}
    schedule_from_config(betas, "schedule")  # fails here, not in diffusers, if it cannot be built
    prediction_type = {v: k for k, v in PREDICTION_NAMES.items()}[check_prediction(prediction)]
    return {"_class_name": "DDIMScheduler", **betas, "prediction_type": prediction_type, "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1}


def read_scheduler(path: str | Path) -> tuple[NoiseSchedule, str, dict]:
    """``PATH/scheduler/scheduler_config.json`` -> (NoiseSchedule, our prediction name, the betas fields)."""
    file = Path(path) / SCHEDULER_CONFIG
    cfg = load_json(file, "scheduler config")
    schedule = schedule_from_config(cfg, str(file))
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in PREDICTION_NAMES:
        raise _unsupported(str(file), "prediction_type", kind, f"expected one of {list(PREDICTION_NAMES)}")
    betas = {k: cfg[k] for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "trained_betas")
             if cfg.get(k) is not None}
    return schedule, PREDICTION_NAMES[kind], betas


# ================================================================ diffusers folders
def read_diffusers_weights(folder: str | Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    """``folder/diffusion_pytorch_model[.variant].safetensors`` (or its sharded index). Pickle files
    (.bin / .ckpt) are never read: they can run code."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers model folder not found: {folder}")
    stem = WEIGHTS_NAME + (f".{variant}" if variant else "")
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return load_tensors(single, "diffusers weights")
    if index.is_file():
        weight_map = load_json(index, "diffusers weights index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        state = {}
        for shard in sorted(set(weight_map.values())):
            tensors = load_tensors(folder / shard, "diffusers weights shard")
            listed = {k for k, f in weight_map.items() if f == shard}
            if set(tensors) != listed:
                raise ValueError(f"{folder / shard} holds {few_keys(set(tensors) ^ listed, 6)} against what "
                                 f"{index} lists")
            state.update(tensors)
        return state
    present = sorted(p.name for p in folder.iterdir())
    pickles = [n for n in present if n.endswith((".bin", ".ckpt", ".pt", ".pth"))]
    variants = [n for n in present if n.startswith(WEIGHTS_NAME + ".") and n.endswith(".safetensors")]
    hint = (f"; only pickle weights ({', '.join(pickles)}), which ldm never loads: convert them to safetensors"
            if pickles else "")
    hint += f"; variants present: {', '.join(variants)} (pass --variant)" if variants else ""
    raise FileNotFoundError(f"no {single.name} in {folder} (it holds {present[:10]}){hint}")


def _sample_size(cfg: dict, source: str) -> int:
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        raise _unsupported(source, "sample_size", size, "need one positive side length (square samples)")
    return size


def _scaling_factor(vae_cfg: dict) -> float:
    return float(vae_cfg.get("scaling_factor") or DEFAULT_SCALING_FACTOR)


def _assemble(cls: type[nn.Module], config, state: dict[str, torch.Tensor]) -> nn.Module:
    """Build on the meta device and take ``state``'s tensors as the parameters (no copy, no init)."""
    model = _meta_model(cls, config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _load_diffusers_model(folder: str | Path, cls: type[nn.Module], what: str, config_from, state_from,
                          device, dtype: torch.dtype | None, variant: str | None):
    folder = Path(folder)
    cfg = load_json(folder / CONFIG_NAME, f"diffusers {what} config")
    config = config_from(cfg, str(folder / CONFIG_NAME))
    state = state_from(read_diffusers_weights(folder, variant), config, str(folder), device, dtype)
    return _assemble(cls, config, state), cfg


def load_diffusers_unet(folder: str | Path, device="cpu", dtype: torch.dtype | None = torch.float32,
                        variant: str | None = None) -> tuple[UNet, dict]:
    """``folder`` = a diffusers ``unet/``: -> (our UNet in eval mode, gradients off; its config.json)."""
    return _load_diffusers_model(folder, UNet, "UNet", unet_config_from_diffusers, unet_from_diffusers,
                                 device, dtype, variant)


def load_diffusers_vae(folder: str | Path, device="cpu", dtype: torch.dtype | None = torch.float32,
                       variant: str | None = None) -> tuple[VAE, dict]:
    """``folder`` = a diffusers ``vae/``: -> (our VAE in eval mode, gradients off, its latent codec set
    from ``scaling_factor``; its config.json)."""
    vae, cfg = _load_diffusers_model(folder, VAE, "VAE", vae_config_from_diffusers, vae_from_diffusers,
                                     device, dtype, variant)
    vae.latent_scale, vae.latent_shift = _scaling_factor(cfg), 0.0
    if isinstance(cfg.get("sample_size"), int):
        vae.resolution = cfg["sample_size"]
    return vae, cfg


@dataclass
class DiffusersPipeline:
    """A Stable Diffusion folder in diffusers layout, read into our models."""

    unet: UNet  # ours, eval, requires_grad False
    vae: VAE  # ours, eval, requires_grad False
    latent_scale_factor: float  # vae/config.json scaling_factor (0.18215 when absent)
    schedule: NoiseSchedule  # the training schedule of scheduler/scheduler_config.json
    prediction: str  # "eps" | "v" | "x0" (prediction_type epsilon / v_prediction / sample)
    text_encoder_path: Path  # PATH/text_encoder (use TextEncoder(path, **SD_TEXT_ENCODER_OPTIONS))
    resolution: int  # pixels: unet sample_size * the VAE's downsampling factor


def _check_sd_folder(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"diffusers folder not found: {path}")
    for sub in ("unet", "vae"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{path} is not a diffusers Stable Diffusion folder: no {sub}/ in it")


def load_diffusers_pipeline(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32,
                            variant: str | None = None) -> DiffusersPipeline:
    """Read ``PATH/unet``, ``PATH/vae`` and ``PATH/scheduler`` of a diffusers SD 1.x folder into our
    models (the text encoder is left to ``ldm.text.TextEncoder(PATH/text_encoder, pad_to_max=True,
    mask_padding=False)``)."""
    path = Path(path)
    _check_sd_folder(path)
    schedule, prediction, _ = read_scheduler(path)
    unet, unet_cfg = load_diffusers_unet(path / "unet", device, dtype, variant)
    vae, vae_cfg = load_diffusers_vae(path / "vae", device, dtype, variant)
    if vae.config.latent_channels != unet.config.in_channels:
        raise ValueError(f"{path}: the VAE makes {vae.config.latent_channels}-channel latents, the UNet takes "
                         f"in_channels={unet.config.in_channels}")
    return DiffusersPipeline(
        unet=unet, vae=vae, latent_scale_factor=_scaling_factor(vae_cfg),
        schedule=schedule, prediction=prediction, text_encoder_path=path / "text_encoder",
        resolution=_sample_size(unet_cfg, str(path / "unet" / CONFIG_NAME)) * vae.config.downsample_factor)


def _our_config(cls, meta: dict, file: Path):
    try:
        return cls(**meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: config does not describe a {cls.__name__} ({e})") from None





def convert_from_diffusers(path: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                           variant: str | None = None) -> Path:
    """An SD folder in diffusers layout -> ``out/unet.*`` and ``out/vae.*`` (see the module docstring).
    ``dtype`` None keeps the stored precision."""
    path, out = Path(path), Path(out)
    _check_sd_folder(path)
    _, prediction, betas = read_scheduler(path)
    unet, unet_cfg = load_diffusers_unet(path / "unet", dtype=dtype, variant=variant)
    vae, vae_cfg = load_diffusers_vae(path / "vae", dtype=dtype, variant=variant)
    latent = _sample_size(unet_cfg, str(path / "unet" / CONFIG_NAME))
    f = vae.config.downsample_factor
    vae.resolution = latent * f
    text_encoder = path / "text_encoder"
    source = str(path.resolve())
    encoder = TextEncoderSpec(path=str(text_encoder.resolve()) if text_encoder.is_dir() else None,
                              width=unet.config.context_dim, **SD_TEXT_ENCODER_OPTIONS)
    info = UNetFile(config=unet.config, prediction=prediction, schedule=betas,
                    latent_shape=(unet.config.in_channels, latent, latent),
                    num_timesteps=int(betas.get("num_train_timesteps", 1000)), resolution=latent * f,
                    text_encoder=encoder if unet.config.context_dim is not None else None, cfg_scale=SD_CFG,
                    created_by="ldm.convert from-diffusers",
                    extra={"diffusers_config": unet_cfg, "source": source,
                           **({"task": "inpaint"} if unet.config.cond_channels else {})})
    save_unet(out, unet, info)
    save_vae(out, vae, diffusers_config=vae_cfg, source=source, created_by="ldm.convert from-diffusers")
    return out


def _write_diffusers_model(folder: Path, config: dict, state: dict[str, torch.Tensor], dtype) -> None:
    state = {k: v.to(dtype) if dtype is not None else v for k, v in state.items()}
    save_tensors(state, folder / f"{WEIGHTS_NAME}.safetensors", metadata={"format": "pt"})
    save_json(config, folder / CONFIG_NAME)


def _clip_text_encoder(path: Path) -> tuple[Path, Path, dict] | None:
    """(text encoder folder, tokenizer folder, tokenizer_config) when ``path`` is a CLIP text model
    with its tokenizer beside it (diffusers' layout) or inside it; else None."""
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file() or load_json(cfg_file).get("model_type") not in ("clip_text_model", "clip"):
        return None
    for tok in (path.parent / "tokenizer", path):
        if (tok / "tokenizer_config.json").is_file():
            return path, tok, load_json(tok / "tokenizer_config.json")
    return None


def convert_to_diffusers(folder: str | Path, out: str | Path, vae_folder: str | Path | None = None,
                         text_encoder: str | Path | None = None, sample_size: int | None = None,
                         dtype: torch.dtype | None = None) -> Path:
    """Our ``folder/unet.*`` (and ``vae.*``, or ``vae_folder``'s) -> the diffusers layout in ``out``:
    ``unet/``, ``vae/``, ``scheduler/``; with a CLIP text encoder also ``text_encoder/``, ``tokenizer/``
    and ``model_index.json``, so ``StableDiffusionPipeline.from_pretrained(out)`` opens it."""
    folder, out = Path(folder), Path(out)
    unet_state, unet_meta = load_model_files(folder, UNET_NAME)
    info = UNetFile.from_json(unet_meta, folder / f"{UNET_NAME}.json")
    vae_folder = Path(vae_folder) if vae_folder is not None else folder
    if not (vae_folder / f"{VAE_NAME}.json").is_file() and info.vae:
        vae_folder = Path(info.vae)  # the VAE the UNet was trained with
    vae_state, vae_meta = load_model_files(vae_folder, VAE_NAME)
    unet_config = info.config
    vae_config = _our_config(VAEConfig, vae_meta, vae_folder / f"{VAE_NAME}.json")
    if not isinstance(vae_meta.get("latent_scale_factor"), (int, float)):
        raise ValueError(f"{vae_folder / (VAE_NAME + '.json')} has no latent_scale_factor")
    f = vae_config.downsample_factor
    if sample_size is None and info.latent_shape is not None:
        sample_size = info.latent_shape[-1]
    if sample_size is None and isinstance(vae_meta.get("latent_shape"), list):
        sample_size = vae_meta["latent_shape"][-1]
    if sample_size is None and isinstance(vae_meta.get("resolution"), int):
        sample_size = vae_meta["resolution"] // f
    if not isinstance(sample_size, int) or sample_size <= 0:
        raise ValueError(f"no latent sample size in {folder / 'unet.json'} or the VAE's JSON; pass --sample-size")
    if vae_config.latent_channels != unet_config.in_channels:
        raise ValueError(f"the VAE in {vae_folder} makes {vae_config.latent_channels}-channel latents, "
                         f"the UNet in {folder} takes in_channels={unet_config.in_channels}")

    carried = {k: v for k, v in (unet_meta.get("diffusers_config") or {}).items() if k in UNET_CARRIED}
    unet_cfg = unet_config_to_diffusers(unet_config, sample_size, carried)
    vae_cfg = vae_config_to_diffusers(vae_config, vae_meta["latent_scale_factor"], sample_size * f)
    scheduler_cfg = scheduler_config_to_diffusers(info.schedule, info.prediction)
    theirs_unet = unet_to_diffusers(unet_state, unet_config, carried.get("use_linear_projection", False),
                                    str(folder / f"{UNET_NAME}.safetensors"))
    theirs_vae = vae_to_diffusers(vae_state, vae_config, str(vae_folder / f"{VAE_NAME}.safetensors"))
    _write_diffusers_model(out / "unet", unet_cfg, theirs_unet, dtype)
    _write_diffusers_model(out / "vae", vae_cfg, theirs_vae, dtype)
    save_json(scheduler_cfg, out / SCHEDULER_CONFIG)

    if text_encoder is None and info.text_encoder is not None:
        text_encoder = info.text_encoder.path
    clip = _clip_text_encoder(Path(text_encoder)) if text_encoder else None
    if clip is None:
        print(f"convert: no CLIP text encoder with a tokenizer at {text_encoder}: wrote unet/, vae/ and "
              "scheduler/ only (no model_index.json)", file=sys.stderr)
        return out
    encoder, tokenizer, tok_cfg = clip
    if encoder.resolve() != (out / "text_encoder").resolve():
        shutil.copytree(encoder, out / "text_encoder", dirs_exist_ok=True)
    if tokenizer.resolve() != (out / "tokenizer").resolve():
        shutil.copytree(tokenizer, out / "tokenizer", dirs_exist_ok=True)
    save_json({"_class_name": "StableDiffusionPipeline",
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "scheduler": ["diffusers", scheduler_cfg["_class_name"]],
               "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", tok_cfg.get("tokenizer_class") or "CLIPTokenizer"],
               "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
               "requires_safety_checker": False}, out / "model_index.json")
    return out
