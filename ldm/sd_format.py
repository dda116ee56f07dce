"""Stable Diffusion 1.x checkpoints in diffusers' layout <-> our ``UNet`` and ``VAE``: the key maps and configs.

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
field and its value. Reading and writing whole folders is ``ldm.sd_folder``; the command is
``python -m ldm.convert``. This module never imports diffusers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from autoencoder import VAE, VAEConfig
from ldm.checkpoint import check_state, few_keys
from ldm.text import MAX_TOKENS
from ldm.unet import RESNET_EPS, TIME_EMBED_MULT, UNet, UNetConfig

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
        problems.append(f"{len(unknown)} key(s) with no home in our {what}: {few_keys(unknown, 6)}")
    if missing:
        problems.append(f"{len(missing)} key(s) our {what} needs are missing: {few_keys(missing, 6)}")
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


def _to_diffusers(ours: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
                  key_map: Mapping[str, tuple[str, ...]], source: str, what: str,
                  reshape: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers tensors (views: fused projections are split, not copied)."""
    check_state(ours, shapes, source, f"our {what}")
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
    in_ch, out_ch = cfg.get("in_channels", 4), cfg.get("out_channels", 4)
    # SD's inpainting layout: the latents, the mask, the masked image's latents (9 = 4 + 1 + 4); ours keeps the
    # last two apart as the conditioning image (ldm.image2image), conv_in sees the same 9 channels in that order
    cond = out_ch + 1 if in_ch == 2 * out_ch + 1 else 0
    fields = dict(in_channels=in_ch - cond, out_channels=out_ch, cond_channels=cond,
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
    if config.cond_channels not in (0, config.out_channels + 1):
        raise _unsupported(source, "cond_channels", config.cond_channels, "SD's inpainting layout has a mask and "
                           f"the masked image's latents: {config.out_channels + 1} channels")
    if config.noise_level_embed:
        raise _unsupported(source, "noise_level_embed", True, "SD 1.x's UNet2DConditionModel has no noise-level input")
    levels = range(len(config.channel_mult))
    cross = [lvl in config.attention_levels for lvl in levels]
    out = {
        "_class_name": "UNet2DConditionModel",
        **({"sample_size": sample_size} if sample_size is not None else {}),
        "in_channels": config.in_channels + config.cond_channels, "out_channels": config.out_channels,
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
