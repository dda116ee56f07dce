"""Stable Diffusion 1.x weights in the diffusers folder layout <-> our ``UNet`` and ``VAE``.

Our models hold the same layers as diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` (see the
docstrings of ``ldm/unet.py`` and ``autoencoder/vae.py``), so a checkpoint converts by an explicit key
map, one table read both ways:

- renames (``UNET_RENAMES``, ``VAE_RENAMES``): down / mid / up <-> down_blocks / mid_block / up_blocks,
  res <-> resnets, emb_proj <-> time_emb_proj, skip <-> conv_shortcut, ...;
- fusions (``UNET_FUSED``): our self-attention ``qkv`` is diffusers' to_q, to_k, to_v stacked along
  the output dimension, our cross-attention ``kv`` is to_k, to_v;
- 1x1 convolution vs linear (``UNET_1X1``, ``VAE_1X1``): the spatial transformer's proj_in / proj_out
  are 1x1 convolutions here and in SD 1.x, linear layers where ``use_linear_projection`` is set (SD 2.x);
  the VAE's mid attention projections are linear here and in diffusers, 1x1 convolutions in files
  converted from the CompVis checkpoints. Both shapes are read; the export writes diffusers' own.
  Old diffusers files name the VAE's attention query / key / value / proj_attn; they are read too.

Every diffusers tensor must find its place and every place must be filled: a key with no home, a
missing key or a shape that does not fit raises an error that names it. Configs translate the same
way (``unet_config_from_diffusers`` ...): a setting our models cannot express is an error naming the
field and its value.

Commands (``python -m ldm.convert --help``):

    python -m ldm.convert from-diffusers PATH --out DIR   # SD folder -> DIR/unet.*, DIR/vae.*
    python -m ldm.convert to-diffusers DIR --out PATH     # our folder -> diffusers layout

What ``from-diffusers`` writes (``ldm.checkpoint.save_model``, read back by ``load_unet`` /
``ldm.pretrained.load_vae``):

- ``unet.safetensors`` + ``unet.json``: ``config`` (UNetConfig), ``prediction`` ("eps" | "v" | "x0"),
  ``schedule`` (diffusers' scheduler keys: ``beta_schedule``, ``beta_start``, ``beta_end``,
  ``num_train_timesteps``, plus ``trained_betas`` when the file gives them; ``schedule_from_config``
  rebuilds the ``NoiseSchedule`` from it or from one of our schedule names), ``text_encoder`` (the
  absolute path of PATH/text_encoder, or null), ``text_encoder_options`` (SD's conventions for
  ``ldm.text.TextEncoder``: pad_to_max true, mask_padding false), ``sample_size`` (latent side),
  ``resolution`` (pixels), ``diffusers_config`` (the source config.json, whose cosmetic fields
  ``to-diffusers`` carries back), ``source``, ``created_by``;
- ``vae.safetensors`` + ``vae.json``: ``config`` (VAEConfig), ``latent_scale_factor`` (the config's
  ``scaling_factor``), ``latent_mean`` (0), ``resolution``, ``downsample_factor``, ``latent_shape``,
  ``diffusers_config``, ``source``, ``created_by``.

``load_diffusers_pipeline(path)`` reads an SD folder straight into our models for ``ldm.sample``.
This module never imports diffusers: it reads and writes the folder layout itself.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from autoencoder import VAE, VAEConfig
from ldm.checkpoint import load_json, load_model_files, load_tensors, save_json, save_model, save_tensors
from ldm.diffusion import SCHEDULES, NoiseSchedule, check_prediction
from ldm.pretrained import VAE_NAME
from ldm.text import MAX_TOKENS
from ldm.unet import RESNET_EPS, TIME_EMBED_MULT, UNet, UNetConfig

UNET_NAME = "unet"  # our files: unet.safetensors + unet.json
WEIGHTS_NAME = "diffusion_pytorch_model"  # diffusers: <name>[.<variant>].safetensors[.index.json]
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
DIFFUSERS_VAE_EPS = 1e-6  # AutoencoderKL's GroupNorm eps, fixed in its Encoder / Decoder
DIFFUSERS_FF_MULT = 4  # BasicTransformerBlock's GEGLU width multiplier, fixed in UNet2DConditionModel
DEFAULT_SCALING_FACTOR = 0.18215  # AutoencoderKL's default scaling_factor (SD 1.x), when a config has none
SD_TEXT_ENCODER_OPTIONS = {"pad_to_max": True, "mask_padding": False, "max_tokens": MAX_TOKENS}

PREDICTION_NAMES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers prediction_type -> ours
# diffusers beta_schedule -> ours; the arguments diffusers reads for each (squaredcos_cap_v2 has its own fixed
# offset 0.008 and max_beta 0.999, our cosine_schedule's defaults)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
BETA_ARGS = {"linear": ("beta_start", "beta_end"), "scaled_linear": ("beta_start", "beta_end"), "cosine": ()}


# ================================================================ key maps
# Ours -> diffusers, applied in order by re.sub; the inverse map comes from the same table.
UNET_RENAMES = (
    (r"^time_embed\.", "time_embedding."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"^down\.(\d+)\.res\.", r"down_blocks.\1.resnets."),
    (r"^down\.(\d+)\.attn\.", r"down_blocks.\1.attentions."),
    (r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0."),
    (r"^mid\.res1\.", "mid_block.resnets.0."),
    (r"^mid\.attn\.", "mid_block.attentions.0."),
    (r"^mid\.res2\.", "mid_block.resnets.1."),
    (r"^up\.(\d+)\.res\.", r"up_blocks.\1.resnets."),
    (r"^up\.(\d+)\.attn\.", r"up_blocks.\1.attentions."),
    (r"^up\.(\d+)\.resample\.", r"up_blocks.\1.upsamplers.0."),
    (r"\.emb_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.blocks\.(\d+)\.", r".transformer_blocks.\1."),
    (r"\.(attn[12])\.out\.", r".\1.to_out.0."),
    (r"\.attn2\.q\.", ".attn2.to_q."),
    (r"\.ff\.proj\.", ".ff.net.0.proj."),
    (r"\.ff\.out\.", ".ff.net.2."),
)
# Our fused projections (after renaming) -> the diffusers tensors stacked along dim 0, in order.
UNET_FUSED = (
    (r"\.attn1\.qkv\.weight$", (".attn1.to_q.weight", ".attn1.to_k.weight", ".attn1.to_v.weight")),
    (r"\.attn2\.kv\.weight$", (".attn2.to_k.weight", ".attn2.to_v.weight")),
)
UNET_1X1 = re.compile(r"\.proj_(in|out)\.weight$")  # ours (C, C, 1, 1); diffusers (C, C) with linear projection

VAE_RENAMES = (
    (r"^encoder\.levels\.(\d+)\.blocks\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.levels\.(\d+)\.resample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.levels\.(\d+)\.blocks\.", r"decoder.up_blocks.\1.resnets."),
    (r"^decoder\.levels\.(\d+)\.resample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"\.mid\.res1\.", ".mid_block.resnets.0."),
    (r"\.mid\.res2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn\.out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
)
VAE_1X1 = re.compile(r"\.mid\.attn\.(q|k|v|out)\.weight$")  # ours (C, C); CompVis-converted files (C, C, 1, 1)
# diffusers < 0.14 names of the VAE's mid attention, renamed on read as diffusers itself does
VAE_LEGACY_ATTENTION = re.compile(r"^((?:en|de)coder\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.")
VAE_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def unet_diffusers_keys(ours: str) -> tuple[str, ...]:
    """Our UNet parameter name -> the diffusers ``UNet2DConditionModel`` tensors it holds (several,
    stacked along dim 0, for the fused q/k/v and k/v projections)."""
    key = _rename(ours, UNET_RENAMES)
    for pattern, parts in UNET_FUSED:
        match = re.search(pattern, key)
        if match:
            return tuple(key[:match.start()] + part for part in parts)
    return (key,)


def vae_diffusers_key(ours: str) -> str:
    """Our VAE parameter name -> diffusers ``AutoencoderKL``'s (a pure renaming)."""
    return _rename(ours, VAE_RENAMES)


def _meta_model(cls: type[nn.Module], config) -> nn.Module:
    """The model with shapes but no storage: builds in no time and no memory, even at 860M parameters."""
    with torch.device("meta"):
        return cls(config)


def _shapes(cls: type[nn.Module], config) -> dict[str, torch.Size]:
    """Every parameter name of ``cls(config)`` and its shape, in the model's order."""
    return {k: v.shape for k, v in _meta_model(cls, config).state_dict().items()}


def unet_key_map(config: UNetConfig) -> dict[str, tuple[str, ...]]:
    """Every parameter of ``UNet(config)`` -> its diffusers tensors."""
    return {k: unet_diffusers_keys(k) for k in _shapes(UNet, config)}


def vae_key_map(config: VAEConfig) -> dict[str, tuple[str, ...]]:
    """Every parameter of ``VAE(config)`` -> its diffusers tensor (a 1-tuple)."""
    return {k: (vae_diffusers_key(k),) for k in _shapes(VAE, config)}


def _few(keys, n: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _is_1x1_twin(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """(C_out, C_in) vs (C_out, C_in, 1, 1): a linear layer and a 1x1 convolution with the same weights."""
    return tuple(a) + (1, 1) == tuple(b) or tuple(b) + (1, 1) == tuple(a)


def _from_diffusers(theirs: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
                    key_map: Mapping[str, tuple[str, ...]], flexible: re.Pattern, source: str, what: str,
                    device=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """diffusers tensors -> our state dict (views where no fusion or dtype change is needed)."""
    home = {key: ours for ours, parts in key_map.items() for key in parts}
    unknown, missing = set(theirs) - set(home), set(home) - set(theirs)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} key(s) with no home in our {what}: {_few(unknown)}")
    if missing:
        problems.append(f"{len(missing)} key(s) our {what} needs are missing: {_few(missing)}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    out = {}
    for ours, parts in key_map.items():
        shape = tuple(shapes[ours])
        part_shape = (shape[0] // len(parts), *shape[1:])  # q, k, v are equal slices of qkv
        tensors = []
        for key in parts:
            t = theirs[key]
            if tuple(t.shape) != part_shape:
                if not (flexible.search(ours) and _is_1x1_twin(t.shape, part_shape)):
                    stacked = f" (one of {len(parts)} stacked into {ours} {shape})" if len(parts) > 1 else ""
                    problems.append(f"{key} has shape {tuple(t.shape)}, our {ours} needs {part_shape}{stacked}")
                    continue
                t = t.reshape(part_shape)
            tensors.append(t.to(device=device, dtype=dtype))
        if len(tensors) == len(parts):
            out[ours] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    if problems:
        raise ValueError(f"{source}: {len(problems)} shape(s) do not fit our {what}: " + "; ".join(problems[:6]))
    return out


def _check_state(state: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], source: str, what: str) -> None:
    """Our state dict against the shapes its config gives: every key, nothing more, each shape."""
    unknown, missing = set(state) - set(shapes), set(shapes) - set(state)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} key(s) that our {what} config has no place for: {_few(unknown)}")
    if missing:
        problems.append(f"{len(missing)} key(s) missing: {_few(missing)}")
    problems += [f"{k} has shape {tuple(state[k].shape)}, the config gives {tuple(shapes[k])}"
                 for k in sorted(set(state) & set(shapes)) if state[k].shape != shapes[k]]
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems[:8]))


def _to_diffusers(ours: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
                  key_map: Mapping[str, tuple[str, ...]], source: str, what: str,
                  reshape: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers tensors (views: fused projections are split, not copied)."""
    _check_state(ours, shapes, source, what)
    out = {}
    for name, parts in key_map.items():
        t = reshape(name, ours[name]) if reshape else ours[name]
        for key, piece in zip(parts, t.chunk(len(parts), dim=0)):
            out[key] = piece
    return out


def unet_from_diffusers(state: Mapping[str, torch.Tensor], config: UNetConfig, source: str = "UNet state dict",
                        device=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict -> ours for ``UNet(config)``; q/k/v fused,
    linear proj_in/proj_out (``use_linear_projection``) reshaped to 1x1 convolutions."""
    shapes = _shapes(UNet, config)
    key_map = {k: unet_diffusers_keys(k) for k in shapes}
    return _from_diffusers(state, shapes, key_map, UNET_1X1, source, "UNet", device, dtype)


def unet_to_diffusers(state: Mapping[str, torch.Tensor], config: UNetConfig, linear_projection: bool = False,
                      source: str = "UNet state dict") -> dict[str, torch.Tensor]:
    """Our UNet state dict -> diffusers'; ``linear_projection`` writes proj_in/proj_out as linear
    layers (diffusers' ``use_linear_projection``, SD 2.x), else as 1x1 convolutions (SD 1.x)."""
    shapes = _shapes(UNet, config)

    def reshape(name: str, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1) if linear_projection and UNET_1X1.search(name) else t  # (C, C, 1, 1) -> (C, C)

    return _to_diffusers(state, shapes, {k: unet_diffusers_keys(k) for k in shapes}, source, "UNet", reshape)


def _rename_legacy_vae_keys(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in state.items():
        match = VAE_LEGACY_ATTENTION.match(key)
        new = f"{match[1]}.{VAE_LEGACY_NAMES[match[2]]}.{key[match.end():]}" if match else key
        if new in out:
            raise ValueError(f"{source}: holds both {key} and {new} (the old and new name of one tensor)")
        out[new] = t
    return out


def vae_from_diffusers(state: Mapping[str, torch.Tensor], config: VAEConfig, source: str = "VAE state dict",
                       device=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict (current or pre-0.14 attention names, linear or 1x1
    convolution attention weights) -> ours for ``VAE(config)``."""
    shapes = _shapes(VAE, config)
    key_map = {k: (vae_diffusers_key(k),) for k in shapes}
    return _from_diffusers(_rename_legacy_vae_keys(state, source), shapes, key_map, VAE_1X1, source, "VAE",
                           device, dtype)


def vae_to_diffusers(state: Mapping[str, torch.Tensor], config: VAEConfig,
                     source: str = "VAE state dict") -> dict[str, torch.Tensor]:
    """Our VAE state dict -> diffusers ``AutoencoderKL``'s."""
    shapes = _shapes(VAE, config)
    return _to_diffusers(state, shapes, {k: (vae_diffusers_key(k),) for k in shapes}, source, "VAE")


# ================================================================ configs
def _unsupported(source: str, field: str, value, why: str) -> ValueError:
    return ValueError(f"{source}: {field}={json.dumps(value)} is not supported: {why}")


def _one_value(cfg: dict, field: str, source: str, default=None):
    """A per-block setting that our models hold once: an int, or a list whose entries are all equal."""
    value = cfg.get(field, default)
    if isinstance(value, (list, tuple)):
        if len(set(map(json.dumps, value))) != 1:
            raise _unsupported(source, field, value, "our models use one value for every block")
        value = value[0]
    return value


def _check_fields(cfg: dict, accepted: dict[str, tuple], handled: set[str], source: str) -> None:
    """Fields with a fixed meaning in our models must hold an accepted value; a field this converter
    does not know is an error unless it is null (an optional feature left off)."""
    for field, value in cfg.items():
        if field.startswith("_") or field in handled:
            continue
        if field in accepted:
            if value not in accepted[field]:
                allowed = " or ".join(json.dumps(a) for a in accepted[field])
                raise _unsupported(source, field, value, f"our model is built for {allowed}")
        elif value is not None:
            raise _unsupported(source, field, value, "ldm.convert does not know this field")


# UNet2DConditionModel settings our UNet hard-wires (SD 1.x's values); anything else changes the maths.
UNET_FIXED = {
    "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,), "downsample_padding": (1,),
    "mid_block_scale_factor": (1,), "act_fn": ("silu",), "norm_eps": (RESNET_EPS,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "dual_cross_attention": (False,), "class_embed_type": (None,),
    "addition_embed_type": (None,), "addition_time_embed_dim": (None,), "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,), "reverse_transformer_layers_per_block": (None,),
}
# Fields read below, or with no effect on the maths of our model: sample_size (a default size),
# use_linear_projection (only the shape of proj_in / proj_out), upcast_attention (fp32 softmax for fp16
# models: our attention accumulates in fp32 anyway), addition_embed_type_num_heads (only used with an
# addition embedding, which UNET_FIXED rules out).
UNET_READ = {"sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
             "down_block_types", "up_block_types", "attention_head_dim", "cross_attention_dim",
             "transformer_layers_per_block", "norm_num_groups", "dropout", "only_cross_attention",
             "time_embedding_dim", "use_linear_projection", "upcast_attention", "addition_embed_type_num_heads"}
UNET_CARRIED = ("use_linear_projection", "upcast_attention")  # kept in unet.json for the way back


def unet_config_from_diffusers(cfg: dict, source: str = "unet/config.json") -> UNetConfig:
    """diffusers ``UNet2DConditionModel`` config -> our ``UNetConfig``; an error names any field whose
    value our UNet cannot express."""
    _check_fields(cfg, UNET_FIXED, UNET_READ, source)
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise _unsupported(source, "_class_name", cfg["_class_name"], "expected UNet2DConditionModel")
    widths = list(cfg.get("block_out_channels", ()))
    down, up = list(cfg.get("down_block_types", ())), list(cfg.get("up_block_types", ()))
    if not widths or len(down) != len(widths) or len(up) != len(widths):
        raise ValueError(f"{source}: block_out_channels {widths}, down_block_types {down} and up_block_types "
                         f"{up} must be non-empty and of one length")
    model_channels = widths[0]
    if any(w % model_channels for w in widths):
        raise _unsupported(source, "block_out_channels", widths,
                           "every width must be a multiple of the first (our channel_mult)")
    attention_levels = []
    for i, kind in enumerate(down):
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise _unsupported(source, f"down_block_types[{i}]", kind,
                               "our levels are CrossAttnDownBlock2D or DownBlock2D")
        if kind == "CrossAttnDownBlock2D":
            attention_levels.append(i)
    for i, kind in enumerate(up):
        level = len(widths) - 1 - i  # up_blocks run deepest first
        expected = "CrossAttnUpBlock2D" if level in attention_levels else "UpBlock2D"
        if kind != expected:
            raise _unsupported(source, f"up_block_types[{i}]", kind,
                               f"our up path mirrors the down path: level {level} needs {expected}")
    only_cross = cfg.get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        raise _unsupported(source, "only_cross_attention", cfg["only_cross_attention"],
                           "our transformer blocks always have self-attention")
    emb_dim = cfg.get("time_embedding_dim")
    if emb_dim is not None and emb_dim != TIME_EMBED_MULT * model_channels:
        raise _unsupported(source, "time_embedding_dim", emb_dim,
                           f"ours is {TIME_EMBED_MULT} x block_out_channels[0] = {TIME_EMBED_MULT * model_channels}")
    depth = _one_value(cfg, "transformer_layers_per_block", source, 1)
    if not isinstance(depth, int):
        raise _unsupported(source, "transformer_layers_per_block", cfg["transformer_layers_per_block"],
                           "our spatial transformers have one depth")
    fields = dict(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
                  model_channels=model_channels, channel_mult=tuple(w // model_channels for w in widths),
                  num_res_blocks=_one_value(cfg, "layers_per_block", source, 2),
                  attention_levels=tuple(attention_levels), mid_attention=True,
                  # diffusers' attention_head_dim is the number of heads (its docs call the name a legacy mistake)
                  num_heads=_one_value(cfg, "attention_head_dim", source, 8), transformer_depth=depth,
                  context_dim=_one_value(cfg, "cross_attention_dim", source, 1280), ff_mult=DIFFUSERS_FF_MULT,
                  norm_groups=cfg.get("norm_num_groups", 32), dropout=float(cfg.get("dropout", 0.0)))
    if fields["norm_groups"] is None:
        raise _unsupported(source, "norm_num_groups", None, "our UNet normalises before conv_out")
    try:
        return UNetConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from None


def unet_config_to_diffusers(config: UNetConfig, sample_size: int | None = None,
                             carried: dict | None = None) -> dict:
    """Our ``UNetConfig`` -> a diffusers ``UNet2DConditionModel`` config.json; ``carried``: the
    cosmetic fields of ``UNET_CARRIED`` (use_linear_projection, upcast_attention) to set."""
    source = "UNetConfig"
    if config.context_dim is None:
        raise _unsupported(source, "context_dim", None, "UNet2DConditionModel always has cross-attention")
    if not config.mid_attention:
        raise _unsupported(source, "mid_attention", False, "UNet2DConditionModel has no middle block of two "
                           "ResBlocks without attention (its UNetMidBlock2D holds one ResBlock)")
    if config.ff_mult != DIFFUSERS_FF_MULT:
        raise _unsupported(source, "ff_mult", config.ff_mult, f"diffusers' feed-forward is {DIFFUSERS_FF_MULT} wide")
    if config.pooled_context:
        raise _unsupported(source, "pooled_context", True, "SD 1.x's UNet2DConditionModel sees the text "
                           "through cross-attention only")
    levels = range(len(config.channel_mult))
    cross = [lvl in config.attention_levels for lvl in levels]
    out = {
        "_class_name": "UNet2DConditionModel",
        **({"sample_size": sample_size} if sample_size is not None else {}),
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "block_out_channels": [config.model_channels * m for m in config.channel_mult],
        "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)],
        "layers_per_block": config.num_res_blocks, "attention_head_dim": config.num_heads,
        "transformer_layers_per_block": config.transformer_depth, "cross_attention_dim": config.context_dim,
        "norm_num_groups": config.norm_groups, "norm_eps": RESNET_EPS, "dropout": config.dropout,
        "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "center_input_sample": False,
        "use_linear_projection": False, "upcast_attention": False,
    }
    for field, value in (carried or {}).items():
        if field not in UNET_CARRIED:
            raise ValueError(f"unet_config_to_diffusers: {field} is not a carried field {UNET_CARRIED}")
        out[field] = bool(value)
    return out


VAE_FIXED = {"act_fn": ("silu",), "use_quant_conv": (True,), "use_post_quant_conv": (True,),
             "shift_factor": (None, 0), "latents_mean": (None,), "latents_std": (None,)}
# read below, or without effect on our maths: force_upcast (a dtype hint for fp16 pipelines), sample_size
VAE_READ = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
            "layers_per_block", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
            "force_upcast", "mid_block_add_attention"}


def vae_config_from_diffusers(cfg: dict, source: str = "vae/config.json") -> VAEConfig:
    """diffusers ``AutoencoderKL`` config -> our ``VAEConfig`` (one attention head, eps 1e-6, as diffusers)."""
    _check_fields(cfg, VAE_FIXED, VAE_READ, source)
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise _unsupported(source, "_class_name", cfg["_class_name"], "expected AutoencoderKL")
    widths = list(cfg.get("block_out_channels", (64,)))
    channels = widths[0]
    if any(w % channels for w in widths):
        raise _unsupported(source, "block_out_channels", widths, "every width must be a multiple of the first")
    for field, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        kinds = list(cfg.get(field, (kind,)))
        if kinds != [kind] * len(widths):
            raise _unsupported(source, field, kinds, f"expected {len(widths)} x {kind}, one per block_out_channels")
    if cfg.get("in_channels", 3) != cfg.get("out_channels", 3):
        raise _unsupported(source, "out_channels", cfg.get("out_channels"),
                           f"our VAE decodes to its in_channels ({cfg.get('in_channels', 3)})")
    try:
        return VAEConfig(in_channels=cfg.get("in_channels", 3), channels=channels,
                         channel_mult=tuple(w // channels for w in widths),
                         num_res_blocks=cfg.get("layers_per_block", 1), latent_channels=cfg.get("latent_channels", 4),
                         norm_groups=cfg.get("norm_num_groups", 32), norm_eps=DIFFUSERS_VAE_EPS,
                         mid_attention=bool(cfg.get("mid_block_add_attention", True)), attention_heads=1)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from None


def vae_config_to_diffusers(config: VAEConfig, scaling_factor: float, sample_size: int | None = None) -> dict:
    """Our ``VAEConfig`` -> a diffusers ``AutoencoderKL`` config.json."""
    if config.attention_heads != 1:
        raise _unsupported("VAEConfig", "attention_heads", config.attention_heads,
                           "AutoencoderKL's mid attention has one head")
    if config.norm_eps != DIFFUSERS_VAE_EPS:
        raise _unsupported("VAEConfig", "norm_eps", config.norm_eps, f"AutoencoderKL uses {DIFFUSERS_VAE_EPS}")
    n = len(config.channel_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": config.in_channels, "out_channels": config.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(config.widths), "layers_per_block": config.num_res_blocks,
            "act_fn": "silu", "latent_channels": config.latent_channels, "norm_num_groups": config.norm_groups,
            "scaling_factor": float(scaling_factor), "mid_block_add_attention": config.mid_attention,
            "force_upcast": True, **({"sample_size": sample_size} if sample_size is not None else {})}


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
                raise ValueError(f"{folder / shard} holds {_few(set(tensors) ^ listed)} against what {index} lists")
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
    """``folder`` = a diffusers ``vae/``: -> (our VAE in eval mode, gradients off; its config.json)."""
    return _load_diffusers_model(folder, VAE, "VAE", vae_config_from_diffusers, vae_from_diffusers,
                                 device, dtype, variant)


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


def load_unet(folder: str | Path, device="cpu") -> tuple[UNet, dict]:
    """Our ``folder/unet.safetensors`` + ``unet.json`` -> (UNet in eval mode, gradients off; the JSON)."""
    folder = Path(folder)
    state, meta = load_model_files(folder, UNET_NAME)
    config = _our_config(UNetConfig, meta, folder / f"{UNET_NAME}.json")
    shapes = _shapes(UNet, config)
    _check_state(state, shapes, str(folder / f"{UNET_NAME}.safetensors"), "UNet")
    return _assemble(UNet, config, state).to(device), meta


# ================================================================ conversion commands
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    text_encoder = path / "text_encoder"
    source = str(path.resolve())
    save_model(out, UNET_NAME, unet, unet.config, prediction=prediction, schedule=betas,
               text_encoder=str(text_encoder.resolve()) if text_encoder.is_dir() else None,
               text_encoder_options=SD_TEXT_ENCODER_OPTIONS, sample_size=latent, resolution=latent * f,
               diffusers_config=unet_cfg, source=source, created_by="ldm.convert from-diffusers")
    save_model(out, VAE_NAME, vae, vae.config,
               latent_scale_factor=_scaling_factor(vae_cfg), latent_mean=0.0,
               resolution=latent * f, downsample_factor=f, latent_shape=[vae.config.latent_channels, latent, latent],
               diffusers_config=vae_cfg, source=source, created_by="ldm.convert from-diffusers")
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
    unet_json = folder / f"{UNET_NAME}.json"
    vae_folder = Path(vae_folder) if vae_folder is not None else folder
    if not (vae_folder / f"{VAE_NAME}.json").is_file() and isinstance(unet_meta.get("vae"), str):
        vae_folder = Path(unet_meta["vae"])  # the VAE the UNet was trained with
    vae_state, vae_meta = load_model_files(vae_folder, VAE_NAME)
    unet_config = _our_config(UNetConfig, unet_meta, unet_json)
    vae_config = _our_config(VAEConfig, vae_meta, vae_folder / f"{VAE_NAME}.json")
    for field in ("prediction", "schedule"):
        if field not in unet_meta:
            raise ValueError(f"{unet_json} has no {field!r}: cannot write the scheduler config")
    if not isinstance(vae_meta.get("latent_scale_factor"), (int, float)):
        raise ValueError(f"{vae_folder / (VAE_NAME + '.json')} has no latent_scale_factor")
    f = vae_config.downsample_factor
    if sample_size is None:
        sample_size = unet_meta.get("sample_size")
    if sample_size is None and isinstance(vae_meta.get("latent_shape"), list):
        sample_size = vae_meta["latent_shape"][-1]
    if sample_size is None and isinstance(vae_meta.get("resolution"), int):
        sample_size = vae_meta["resolution"] // f
    if not isinstance(sample_size, int) or sample_size <= 0:
        raise ValueError(f"no latent sample size in {unet_json} or the VAE's JSON; pass --sample-size")
    if vae_config.latent_channels != unet_config.in_channels:
        raise ValueError(f"the VAE in {vae_folder} makes {vae_config.latent_channels}-channel latents, "
                         f"the UNet in {folder} takes in_channels={unet_config.in_channels}")

    carried = {k: v for k, v in (unet_meta.get("diffusers_config") or {}).items() if k in UNET_CARRIED}
    unet_cfg = unet_config_to_diffusers(unet_config, sample_size, carried)
    vae_cfg = vae_config_to_diffusers(vae_config, vae_meta["latent_scale_factor"], sample_size * f)
    scheduler_cfg = scheduler_config_to_diffusers(unet_meta["schedule"], unet_meta["prediction"])
    theirs_unet = unet_to_diffusers(unet_state, unet_config, carried.get("use_linear_projection", False),
                                    str(folder / f"{UNET_NAME}.safetensors"))
    theirs_vae = vae_to_diffusers(vae_state, vae_config, str(vae_folder / f"{VAE_NAME}.safetensors"))
    _write_diffusers_model(out / "unet", unet_cfg, theirs_unet, dtype)
    _write_diffusers_model(out / "vae", vae_cfg, theirs_vae, dtype)
    save_json(scheduler_cfg, out / SCHEDULER_CONFIG)

    text_encoder = text_encoder if text_encoder is not None else unet_meta.get("text_encoder")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ldm.convert", description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m ldm.convert from-diffusers PATH --out DIR\n"
               "  python -m ldm.convert to-diffusers DIR --out PATH",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dtypes = ["keep", *DTYPES]
    a = sub.add_parser("from-diffusers", help="SD 1.x folder in diffusers layout -> our unet.* and vae.*")
    a.add_argument("path", help="the diffusers folder (unet/, vae/, scheduler/, text_encoder/)")
    a.add_argument("--out", required=True, help="folder to write unet.safetensors/json and vae.safetensors/json")
    a.add_argument("--dtype", choices=dtypes, default="keep", help="precision of the written weights")
    a.add_argument("--variant", default=None, help="read diffusion_pytorch_model.VARIANT.safetensors, e.g. fp16")
    b = sub.add_parser("to-diffusers", help="our unet.* and vae.* -> diffusers layout")
    b.add_argument("folder", help="folder holding unet.safetensors/json (and vae.*, unless --vae)")
    b.add_argument("--out", required=True, help="diffusers folder to write")
    b.add_argument("--vae", default=None, help="folder holding vae.safetensors/json (default: FOLDER)")
    b.add_argument("--text-encoder", default=None,
                   help="CLIP text encoder to copy in (default: the one unet.json names)")
    b.add_argument("--sample-size", type=int, default=None,
                   help="latent side length for the configs (default: from unet.json / vae.json)")
    b.add_argument("--dtype", choices=dtypes, default="keep", help="precision of the written weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = DTYPES.get(args.dtype)
    try:
        if args.command == "from-diffusers":
            out = convert_from_diffusers(args.path, args.out, dtype, args.variant)
            print(f"convert: wrote {out / (UNET_NAME + '.safetensors')} and {out / (VAE_NAME + '.safetensors')}",
                  file=sys.stderr)
        else:
            out = convert_to_diffusers(args.folder, args.out, args.vae, args.text_encoder, args.sample_size, dtype)
            print(f"convert: wrote the diffusers layout in {out}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
