"""The cross-attention UNet of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"), on the DDPM UNet of Ho et al. 2020 with the transformer blocks of Vaswani et al. 2017.

The model contract, used by the diffusion maths, the samplers and the training scripts:

    unet(x, t, context=None, context_lengths=None, class_labels=None, cond=None, noise_level=None)
        -> (B, out_channels, H, W)

x (B, in_channels, H, W) noisy latents; t (B,) float timesteps in [0, T) (fractional values are
fine: the embedding is continuous); context (B, L, context_dim) text tokens; context_lengths (B,)
integers, the number of valid tokens of each row (the rest is padding that no query attends to);
class_labels (B,) integers in [0, num_classes] for a class-conditional UNet, num_classes being the
"null" class that classifier-free guidance takes as unconditional; cond (B, cond_channels, H, W) the
conditioning image of an image-conditioned UNet and noise_level (B,) its augmentation level in [0, T).

Layout (for SD 1.x: 320 channels, multipliers 1, 2, 4, 4):

    conv_in -> down levels [ResBlock (+ SpatialTransformer)] x num_res_blocks, Downsample
            -> mid: ResBlock, SpatialTransformer, ResBlock
            -> up levels [concat skip, ResBlock (+ SpatialTransformer)] x (num_res_blocks + 1), Upsample
            -> GroupNorm + SiLU -> conv_out

Every layer holds the same parameters as its counterpart in diffusers' ``UNet2DConditionModel``
(self-attention q/k/v fused into one ``qkv`` linear, cross-attention k/v into one ``kv``), so
Stable Diffusion weights load by renaming keys: down / mid / up = down_blocks / mid_block /
up_blocks, res = resnets, attn = attentions, blocks = transformer_blocks, emb_proj = time_emb_proj,
skip = conv_shortcut, resample = down/upsamplers.0, out = to_out.0, ff.proj / ff.out = ff.net.0.proj /
ff.net.2, time_embed = time_embedding, norm_out = conv_norm_out. Attention runs through
``kernels.attention`` and every GroupNorm(+SiLU) through ``kernels.GroupNormSiLU``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import GroupNormSiLU, attention

# Constants of the SD 1.x / CompVis architecture, named once.
MAX_PERIOD = 10_000  # longest wavelength of the sinusoidal timestep embedding (Vaswani et al. 2017)
RESNET_EPS = 1e-5  # GroupNorm eps in ResBlocks and before conv_out
TRANSFORMER_NORM_EPS = 1e-6  # GroupNorm eps in front of a spatial transformer
TIME_EMBED_MULT = 4  # time-embedding width = TIME_EMBED_MULT * model_channels


@dataclass
class UNetConfig:
    """Everything that shapes a UNet; saved as JSON beside its weights. Presets: ``UNET_CONFIGS``."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320  # width of level 0; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels that get a spatial transformer per ResBlock
    mid_attention: bool = True  # a spatial transformer between the two middle ResBlocks
    num_heads: int = 8  # heads of every attention; head width = level channels // num_heads
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    context_dim: int | None = 768  # width of the text tokens; None: unconditional, no cross-attention
    ff_mult: int = 4  # GEGLU feed-forward inner width = ff_mult * channels
    norm_groups: int = 32
    dropout: float = 0.0  # inside ResBlocks, between the second norm and conv
    gradient_checkpointing: bool = False  # recompute blocks in the backward pass to save memory
    # Also condition every ResBlock on the whole prompt: the mean of the valid text tokens, projected
    # and added to the timestep embedding (the pooled text embedding of Imagen, Saharia et al. 2022).
    # Off in SD 1.x, which sees the text through cross-attention only; nothing to pool without a context.
    pooled_context: bool = False
    # LayerNorm (learned scale and shift) over each text token before anything reads it: a sentence
    # encoder's states carry a few outsized dimensions that would otherwise dominate the keys and the pool.
    context_norm: bool = False
    # Class-conditional: a learned embedding of the label (num_classes + 1 rows, the last one the "null"
    # class of classifier-free guidance) added to the timestep embedding, as in ADM (Dhariwal & Nichol
    # 2021) and DiT. None: no class input.
    num_classes: int | None = None
    # Image conditioning (ldm.image2image): cond_channels more input channels concatenated to x, e.g. SD's
    # inpainting UNet's mask (1) + masked-image latents (4), so conv_in sees in_channels + cond_channels.
    cond_channels: int = 0
    # The noise-augmentation level of the conditioning image (Ho et al. 2021, cascaded diffusion), embedded
    # as the timestep is and added to it, so the model knows how much to trust the image.
    noise_level_embed: bool = False
    clip_tokens: int = 0  # ldm.unclip_decoder: the context is a CLIP image embedding, projected to this many tokens

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)  # JSON gives lists back
        self.attention_levels = tuple(self.attention_levels)
        levels = len(self.channel_mult)
        if levels == 0 or any(m <= 0 for m in self.channel_mult):
            raise ValueError(f"UNetConfig: channel_mult must be positive integers, got {self.channel_mult}")
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "num_heads",
                     "transformer_depth", "ff_mult", "norm_groups"):
            if getattr(self, name) <= 0:
                raise ValueError(f"UNetConfig: {name} must be positive, got {getattr(self, name)}")
        bad = [i for i in self.attention_levels if not 0 <= i < levels]
        if bad:
            raise ValueError(f"UNetConfig: attention_levels {self.attention_levels} name levels outside "
                             f"0..{levels - 1} (channel_mult has {levels} levels)")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes <= 0):
            raise ValueError(f"UNetConfig: num_classes must be a positive integer or None, got {self.num_classes}")
        if self.cond_channels < 0 or (self.noise_level_embed and not self.cond_channels):
            raise ValueError(f"UNetConfig: cond_channels must be >= 0 (> 0 with noise_level_embed), "
                             f"got {self.cond_channels}")
        if self.context_dim is not None and self.context_dim <= 0:
            raise ValueError(f"UNetConfig: context_dim must be positive or None, got {self.context_dim}")
        for m in self.channel_mult:
            ch = self.model_channels * m
            if ch % self.norm_groups:
                raise ValueError(f"UNetConfig: {ch} channels (model_channels {self.model_channels} x {m}) "
                                 f"are not divisible by norm_groups={self.norm_groups}")
            if ch % self.num_heads:
                raise ValueError(f"UNetConfig: {ch} channels (model_channels {self.model_channels} x {m}) "
                                 f"are not divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig: dropout must be in [0, 1), got {self.dropout}")


UNET_CONFIGS: dict[str, UNetConfig] = {
    # The CPU demo (1.1M parameters): 8 x 8 latents of 32 x 32 images (train_unet sets in_channels to the
    # VAE's), MiniLM text tokens (384 wide). Two levels, 8 x 8 and 4 x 4; cross-attention at 4 x 4 only: the
    # attention over the 64 tokens of 8 x 8 took half of each step (181 -> 95 ms at batch 64, 2 threads), and
    # twice the steps in the same time read better (docs/wording/NOTES.md section 5). The middle gets ResBlocks
    # only. Width 32, not 64: a third of the step time on the CPU. The pooled prompt in every ResBlock: colour
    # 74.5% vs 65% of samples after 800 steps (the 7-px shapes). 8 heads, 8 wide (with attention at both levels,
    # 400 prompts, seeds 0 / 2: 4 heads 87.2 / 85.2%, 8 heads 93.2 / 93.0%, 16 heads 89.0 / 91.5%). context_norm:
    # docs/wording/NOTES.md (seeds 0 / 1: in-distribution 89.5 / 95.5% -> 93.0 / 97.5%).
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                       mid_attention=False, num_heads=8, context_dim=384, pooled_context=True, context_norm=True),
    # A GPU model for 32 x 32 latents (256 x 256 images) with a CLIP-sized text encoder.
    "small": UNetConfig(model_channels=128, channel_mult=(1, 2, 4), num_res_blocks=2,
                        attention_levels=(1, 2), num_heads=8, context_dim=768),
    # Stable Diffusion 1.x (860M parameters).
    "sd15": UNetConfig(),
}


def unet_config(name: str, **overrides) -> UNetConfig:
    """A copy of the preset ``name`` with fields replaced, e.g. ``unet_config("tiny", context_dim=None)``."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet config {name!r}; expected one of {list(UNET_CONFIGS)}")
    fields = {**UNET_CONFIGS[name].__dict__, **overrides}
    return UNetConfig(**fields)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps, [cos, sin] halves (Vaswani et al. 2017, as in
    DDPM and SD). t (B,) -> (B, dim)."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)  # (half,)
    args = t.to(dtype)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


def masked_mean(context: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean of the first ``lengths[b]`` tokens of each row: context (B, L, C), lengths (B,) or None -> (B, C)."""
    if lengths is None:
        return context.mean(1)
    valid = torch.arange(context.shape[1], device=context.device)[None, :] < lengths[:, None]  # (B, L)
    total = (context * valid[..., None].to(context.dtype)).sum(1)  # (B, C)
    return total / lengths.clamp(min=1)[:, None].to(context.dtype)


def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: residual branches and the output start as identity / zero
    (as in the CompVis LDM code that SD was trained with)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimeEmbedding(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.in_dim).to(self.linear_1.weight.dtype)  # (B, in_dim)
        return self.linear_2(F.silu(self.linear_1(emb)))  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-dropout-conv,
    plus a (1x1-projected) skip. The embedding add is fused into the second norm: norm2(h, shift=emb)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, in_ch, eps=RESNET_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = GroupNormSiLU(groups, out_ch, eps=RESNET_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # emb: (B, emb_dim), already through SiLU (shared by every ResBlock)
        h = self.conv1(self.norm1(x))  # (B, out, H, W)
        h = self.norm2(h, shift=self.emb_proj(emb).to(h.dtype))  # (B, out, H, W)
        h = self.conv2(self.dropout(h))  # (B, out, H, W)
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # rows: [q; k; v], each head-major
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).unbind(2)  # 3 x (B, N, H, D)
        y = attention(q, k, v)  # (B, N, H, D)
        return self.out(y.reshape(B, N, C))  # (B, N, C)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)  # rows: [k; v]
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_lengths: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        L, D = context.shape[1], C // self.heads
        q = self.q(x).view(B, N, self.heads, D)  # (B, N, H, D)
        k, v = self.kv(context).view(B, L, 2, self.heads, D).unbind(2)  # 2 x (B, L, H, D)
        y = attention(q, k, v, key_lengths=context_lengths)  # (B, N, H, D)
        return self.out(y.reshape(B, N, C))  # (B, N, C)


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)  # rows: [value; gate]
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (B, N, mult * dim)
        return self.out(value * F.gelu(gate))  # (B, N, dim)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text (when there is one), GEGLU."""

    def __init__(self, dim: int, heads: int, context_dim: int | None, ff_mult: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim) if context_dim is not None else None
        self.attn2 = CrossAttention(dim, context_dim, heads) if context_dim is not None else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim, ff_mult)

    def forward(self, x, context=None, context_lengths=None):
        x = x + self.attn1(self.norm1(x))  # (B, N, C)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context, context_lengths)  # (B, N, C)
        return x + self.ff(self.norm3(x))  # (B, N, C)


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, transformer blocks over the H*W positions, 1x1 conv out, residual."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.norm = GroupNormSiLU(cfg.norm_groups, ch, eps=TRANSFORMER_NORM_EPS, silu=False)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.blocks = nn.ModuleList(TransformerBlock(ch, cfg.num_heads, cfg.context_dim, cfg.ff_mult)
                                    for _ in range(cfg.transformer_depth))
        self.proj_out = zero_(nn.Conv2d(ch, ch, 1))

    def forward(self, x, context=None, context_lengths=None):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))  # (B, C, H, W)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C), a view when channels_last
        for block in self.blocks:
            h = block(h, context, context_lengths)  # (B, HW, C)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)  # (B, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        # size: the spatial size of the skip this level meets, 2x (H, W) unless the input was odd
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # (B, C, *size)


class Level(nn.Module):
    """One resolution: ResBlocks, each followed by a spatial transformer at attention levels,
    then an optional resampler (down path: Downsample, up path: Upsample)."""

    def __init__(self, res: list[ResBlock], attn: list[SpatialTransformer] | None, resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn) if attn else None
        self.resample = resample


class Mid(nn.Module):
    def __init__(self, ch: int, cfg: UNetConfig, emb_dim: int):
        super().__init__()
        self.res1 = ResBlock(ch, ch, emb_dim, cfg.norm_groups, cfg.dropout)
        self.attn = SpatialTransformer(ch, cfg) if cfg.mid_attention else None
        self.res2 = ResBlock(ch, ch, emb_dim, cfg.norm_groups, cfg.dropout)


class UNet(nn.Module):
    """``unet(x, t, context=None, context_lengths=None, class_labels=None, cond=None, noise_level=None)
    -> (B, out_channels, H, W)``, see the module docstring."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        mc, emb_dim = cfg.model_channels, TIME_EMBED_MULT * cfg.model_channels
        chans = [mc * m for m in cfg.channel_mult]
        self.gradient_checkpointing = cfg.gradient_checkpointing

        def res(i, o):
            return ResBlock(i, o, emb_dim, cfg.norm_groups, cfg.dropout)

        self.time_embed = TimeEmbedding(mc, emb_dim)
        pooled = cfg.pooled_context and cfg.context_dim is not None
        self.context_pool = nn.Linear(cfg.context_dim, emb_dim) if pooled else None
        self.context_norm = nn.LayerNorm(cfg.context_dim) if cfg.context_norm and cfg.context_dim else None
        self.class_embed = None
        if cfg.num_classes is not None:  # row num_classes: the null class
            self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim)
            nn.init.normal_(self.class_embed.weight, std=0.02)  # as DiT's label embedding
        self.noise_level_embed = TimeEmbedding(mc, emb_dim) if cfg.noise_level_embed else None
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.cond_channels, mc, 3, padding=1)

        skip_chans, ch = [mc], mc  # the channels of every tensor the down path leaves for the up path
        self.down = nn.ModuleList()
        for lvl, out in enumerate(chans):
            last = lvl == len(chans) - 1
            blocks = [res(ch if j == 0 else out, out) for j in range(cfg.num_res_blocks)]
            attn = ([SpatialTransformer(out, cfg) for _ in blocks] if lvl in cfg.attention_levels else None)
            self.down.append(Level(blocks, attn, None if last else Downsample(out)))
            ch = out
            skip_chans += [out] * (cfg.num_res_blocks + (0 if last else 1))

        self.mid = Mid(ch, cfg, emb_dim)

        self.up = nn.ModuleList()  # deepest level first, the order they run in
        for lvl in reversed(range(len(chans))):
            out = chans[lvl]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(res(ch + skip_chans.pop(), out))
                ch = out
            attn = ([SpatialTransformer(out, cfg) for _ in blocks] if lvl in cfg.attention_levels else None)
            self.up.append(Level(blocks, attn, Upsample(out) if lvl > 0 else None))

        self.norm_out = GroupNormSiLU(cfg.norm_groups, ch, eps=RESNET_EPS)  # ch: level 0's, mc x channel_mult[0]
        self.conv_out = zero_(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def set_gradient_checkpointing(self, enabled: bool = True) -> UNet:
        """Keep only block inputs and run each ResBlock and spatial transformer again in the backward
        pass: trades activation memory for a second forward. Active in training mode with gradients on."""
        self.gradient_checkpointing = enabled
        return self

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_labels(self, class_labels, B):
        if self.config.num_classes is None:
            if class_labels is not None:
                raise ValueError("UNet: this model takes no class labels (num_classes=None)")
            return
        if not isinstance(class_labels, torch.Tensor) or class_labels.shape != (B,):
            got = tuple(class_labels.shape) if isinstance(class_labels, torch.Tensor) else class_labels
            raise ValueError(f"UNet: this model is class-conditional; class_labels must be a tensor of shape "
                             f"({B},), got {got}")
        if class_labels.is_floating_point() or class_labels.dtype == torch.bool:
            raise ValueError(f"UNet: class_labels must be integers, got {class_labels.dtype}")

    def _check_cond(self, x, cond, noise_level):
        cfg, B = self.config, x.shape[0]
        if not cfg.cond_channels:
            if cond is not None or noise_level is not None:
                raise ValueError("UNet: this model takes no conditioning image (cond_channels=0)")
            return
        if not isinstance(cond, torch.Tensor) or cond.shape != (B, cfg.cond_channels, *x.shape[2:]):
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else cond
            raise ValueError(f"UNet: cond must have shape ({B}, {cfg.cond_channels}, {x.shape[2]}, {x.shape[3]}), "
                             f"got {got}")
        if cfg.noise_level_embed and (not isinstance(noise_level, torch.Tensor) or noise_level.shape != (B,)):
            raise ValueError(f"UNet: this model takes the conditioning's noise_level, a tensor of shape ({B},)")

    def _check_inputs(self, x, t, context, context_lengths, class_labels=None, cond=None, noise_level=None):
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != cfg.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UNet: x must have shape (B, {cfg.in_channels}, H, W), got {got}")
        B = x.shape[0]
        if not isinstance(t, torch.Tensor) or t.shape not in ((B,), ()):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"UNet: t must be a tensor of shape ({B},) matching x's batch, got {got}")
        self._check_labels(class_labels, B)
        self._check_cond(x, cond, noise_level)
        if cfg.context_dim is None:
            if context is not None or context_lengths is not None:
                raise ValueError("UNet: this model is unconditional (context_dim=None) but got a context")
            return
        if context is None:
            raise ValueError(f"UNet: this model attends to a text context of width {cfg.context_dim}; "
                             f"pass context of shape ({B}, L, {cfg.context_dim})")
        if context.dim() != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim or context.shape[1] == 0:
            raise ValueError(f"UNet: context must have shape ({B}, L, {cfg.context_dim}) with L >= 1, "
                             f"got {tuple(context.shape)}")
        if context_lengths is not None:
            if not isinstance(context_lengths, torch.Tensor) or context_lengths.shape != (B,):
                got = tuple(context_lengths.shape) if isinstance(context_lengths, torch.Tensor) else context_lengths
                raise ValueError(f"UNet: context_lengths must be a tensor of shape ({B},), got {got}")
            if context_lengths.is_floating_point() or context_lengths.dtype == torch.bool:
                raise ValueError(f"UNet: context_lengths must be integers, got {context_lengths.dtype}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_lengths: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, noise_level: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, t, context, context_lengths, class_labels, cond, noise_level)
        t = t.expand(x.shape[0])  # (B,)
        emb = self.time_embed(t)  # (B, 4 * mc)
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels).to(emb.dtype)  # (B, 4 * mc)
        if self.context_norm is not None:
            context = self.context_norm(context)  # (B, L, context_dim)
        if self.context_pool is not None:
            emb = emb + self.context_pool(masked_mean(context, context_lengths).to(emb.dtype))  # (B, 4 * mc)
        if self.noise_level_embed is not None:
            emb = emb + self.noise_level_embed(noise_level)  # (B, 4 * mc)
        emb = F.silu(emb)  # the SiLU every ResBlock applies first
        text = (context, context_lengths)

        if cond is not None:
            x = torch.cat([x, cond.to(x.dtype)], dim=1)  # (B, in_channels + cond_channels, H, W)
        h = self.conv_in(x)  # (B, mc, H, W)
        skips = [h]
        for level in self.down:
            for j, res in enumerate(level.res):
                h = self._run(res, h, emb)  # (B, C_level, H_level, W_level)
                if level.attn is not None:
                    h = self._run(level.attn[j], h, *text)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # (B, C_level, H_level / 2, W_level / 2)
                skips.append(h)

        h = self._run(self.mid.res1, h, emb)  # (B, C_deepest, h, w)
        if self.mid.attn is not None:
            h = self._run(self.mid.attn, h, *text)
        h = self._run(self.mid.res2, h, emb)

        for level in self.up:
            for j, res in enumerate(level.res):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H_level, W_level)
                h = self._run(res, h, emb)  # (B, C_level, H_level, W_level)
                if level.attn is not None:
                    h = self._run(level.attn[j], h, *text)
            if level.resample is not None:
                h = level.resample(h, skips[-1].shape[-2:])  # (B, C_level, 2 H_level, 2 W_level)
        return self.conv_out(self.norm_out(h))  # (B, out_channels, H, W)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
