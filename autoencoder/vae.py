"""The KL autoencoder of latent diffusion: images <-> latents through a diagonal Gaussian.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", the "KL-reg"
first stage. Encoder and decoder are stacks of ResNet blocks with a self-attention block in the
middle; each level of the encoder halves the resolution, each level of the decoder doubles it.
The encoder predicts the mean and log-variance of the latent; the decoder maps a latent back.

Every GroupNorm(+SiLU) is ``kernels.GroupNormSiLU`` and the mid-block attention runs through
``kernels.attention``, so both take our fused Triton kernels on a GPU. Layer for layer, the
parameters are those of diffusers' ``AutoencoderKL`` with the same settings (convolutions, norms
with their biases, the q/k/v/out projections of the mid attention as linear layers, quant_conv and
post_quant_conv), so the ``sd`` preset takes Stable Diffusion 1.x weights by renaming keys.

The model is channels_last friendly: convolutions and norms keep the memory format, and the
attention reads q, k, v as (B, N, H, D) views of the projections without copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import GroupNormSiLU, attention


@dataclass
class VAEConfig:
    in_channels: int = 3  # image channels
    channels: int = 32  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width of each level in multiples of `channels`
    num_res_blocks: int = 1  # ResNet blocks per encoder level (the decoder has one more)
    latent_channels: int = 4
    norm_groups: int = 8
    norm_eps: float = 1e-6
    mid_attention: bool = True
    attention_heads: int = 1  # SD uses one head over all channels
    init_logvar: float = 0.0  # initial posterior log-variance (bias of quant_conv's second half)

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        for c in self.widths:
            if c % self.norm_groups:
                raise ValueError(f"VAEConfig: width {c} is not divisible by norm_groups={self.norm_groups}")
        if self.widths[-1] % self.attention_heads:
            raise ValueError(f"VAEConfig: mid width {self.widths[-1]} is not divisible by "
                             f"attention_heads={self.attention_heads}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        """How many image pixels one latent pixel covers along each side."""
        return 2 ** (len(self.channel_mult) - 1)


VAE_CONFIGS = {
    # CPU demo: 32 x 32 images -> 8 x 8 x 8 latents, 0.69M parameters, ~135 images/s of training on 2 cores.
    # A low initial posterior variance matters on a short budget: at log-variance 0 the sampling noise
    # (std 1) drowns the early latents, and 1500 steps reached 25.1 dB PSNR; at -8, 32.5 dB. Eight latent
    # channels rather than four keep the shapes: after 1500 steps the dataset's attribute reader names
    # the shape of 82% of reconstructions against 61% with four (16 channels: 74%, slower to train), on
    # the built-in shapes when the small ones were 7 px; at today's 9 px, 99% with eight (ldm/data/shapes.py).
    "tiny": VAEConfig(channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, latent_channels=8, norm_groups=8,
                      init_logvar=-8.0),
    # a bigger f4 for 64 x 64 or more on a GPU
    "small": VAEConfig(channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, latent_channels=4, norm_groups=32),
    # latent diffusion's kl-f4 (3 latent channels)
    "f4": VAEConfig(channels=128, channel_mult=(1, 2, 4), num_res_blocks=2, latent_channels=3, norm_groups=32),
    # Stable Diffusion 1.x kl-f8
    "sd": VAEConfig(channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4, norm_groups=32),
}


@dataclass
class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))), from moments (B, 2 * C, h, w)."""

    moments: torch.Tensor
    mean: torch.Tensor = field(init=False)
    logvar: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.mean, logvar = self.moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise  # (B, C, h, w)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per item, summed over latent elements: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def zero_init(layer: nn.Module) -> None:
    """Start a residual branch at zero, so every block begins as the identity (as ADM's UNet does):
    a freshly built VAE trains from a shallow network that deepens as the branches grow."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


class ResBlock(nn.Module):
    """norm-SiLU-conv, norm-SiLU-conv, plus a (1x1-projected when widths differ) skip."""

    def __init__(self, cin: int, cout: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = GroupNormSiLU(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNormSiLU(cfg.norm_groups, cout, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        zero_init(self.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))  # (B, cout, H, W)
        h = self.conv2(self.norm2(h))
        return self.skip(x) + h


class Attention(nn.Module):
    """Self-attention over the h * w positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.heads = cfg.attention_heads
        self.norm = GroupNormSiLU(cfg.norm_groups, channels, eps=cfg.norm_eps, silu=False)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)
        zero_init(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N, D = H * W, C // self.heads
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, N, C)  # (B, N, C), a view when channels_last
        q = self.q(h).view(B, N, self.heads, D)  # (B, N, heads, D)
        k = self.k(h).view(B, N, self.heads, D)
        v = self.v(h).view(B, N, self.heads, D)
        o = attention(q, k, v)  # (B, N, heads, D); kernels.dispatch picks the implementation, any head dim
        o = self.out(o.reshape(B, N, C))  # (B, N, C)
        return x + o.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last strides


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.res1 = ResBlock(channels, channels, cfg)
        self.attn = Attention(channels, cfg) if cfg.mid_attention else nn.Identity()
        self.res2 = ResBlock(channels, channels, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Downsample(nn.Module):
    """3x3 stride-2 convolution, padded on the right and bottom only (as SD's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H / 2, W / 2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """ResNet blocks at one resolution, then an optional change of resolution."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.resample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.widths
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        levels, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks = [ResBlock(cin if j == 0 else cout, cout, cfg) for j in range(cfg.num_res_blocks)]
            levels.append(Level(blocks, Downsample(cout) if i < len(widths) - 1 else None))
            cin = cout
        self.levels = nn.ModuleList(levels)
        self.mid = MidBlock(widths[-1], cfg)
        self.norm_out = GroupNormSiLU(cfg.norm_groups, widths[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, widths[0], H, W)
        for level in self.levels:
            h = level(h)  # (B, widths[-1], H / f, W / f) after the last
        return self.conv_out(self.norm_out(self.mid(h)))  # (B, 2 * latent, H / f, W / f)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.widths[::-1]  # deepest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid = MidBlock(widths[0], cfg)
        levels, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks = [ResBlock(cin if j == 0 else cout, cout, cfg) for j in range(cfg.num_res_blocks + 1)]
            levels.append(Level(blocks, Upsample(cout) if i < len(widths) - 1 else None))
            cin = cout
        self.levels = nn.ModuleList(levels)
        self.norm_out = GroupNormSiLU(cfg.norm_groups, widths[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, widths[-1], h, w)
        for level in self.levels:
            h = level(h)  # (B, widths[0], H, W) after the last
        return self.conv_out(self.norm_out(h))  # (B, 3, H, W)


class VAE(nn.Module):
    """``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``; images in [-1, 1], (B, 3, H, W),
    H and W divisible by ``config.downsample_factor``.

    The latent codec: a diffusion model works on ``z = (latent - latent_shift) * latent_scale``, unit
    variance over the training data. ``encode_latents`` / ``decode_latents`` / ``latent_moments`` apply
    it, so no caller repeats the formula. The scale and shift are measured by ``train_vae`` and set from
    ``vae.json`` by ``ldm.pretrained.load_vae`` (a fresh VAE has 1 and 0)."""

    def __init__(self, config: VAEConfig, latent_scale: float = 1.0, latent_shift: float = 0.0,
                 resolution: int | None = None):
        super().__init__()
        self.config = config
        self.latent_scale = float(latent_scale)
        self.latent_shift = float(latent_shift)
        self.resolution = resolution  # the image side it was trained at, None when unknown
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)
        with torch.no_grad():  # a low start keeps early decoders from learning on pure sampling noise
            self.quant_conv.bias[config.latent_channels:] += config.init_logvar

    def check_input(self, x: torch.Tensor) -> None:
        f, c = self.config.downsample_factor, self.config.in_channels
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"VAE.encode: expected images (B, {c}, H, W), got shape {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"VAE.encode: height and width {tuple(x.shape[2:])} must be divisible by "
                             f"the downsampling factor {f}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self.check_input(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # moments (B, 2 * latent, H / f, W / f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))  # (B, 3, H, W)

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a posterior sample (or its mean); returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def latent_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) -> the posterior's mean and std in the diffusion model's units, float32,
        (B, C, h, w) each (what a latent cache stores, to draw a fresh sample every step)."""
        posterior = self.encode(x)
        mean = (posterior.mean.float() - self.latent_shift) * self.latent_scale
        return mean, posterior.std.float() * self.latent_scale

    def encode_latents(self, x: torch.Tensor, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the diffusion model's latents (B, C, h, w) float32: the
        posterior mean, or a sample of it with ``sample``."""
        posterior = self.encode(x)
        z = (posterior.sample(generator) if sample else posterior.mode()).float()
        return (z - self.latent_shift) * self.latent_scale

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents (B, C, h, w) -> images (B, 3, H, W), unclamped."""
        return self.decode(z / self.latent_scale + self.latent_shift)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a square image of side ``resolution`` (default: the trained one)."""
        resolution = resolution or self.resolution
        if resolution is None:
            raise ValueError("VAE.latent_shape: no resolution given and none recorded")
        return latent_shape(self.config, resolution)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight: where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def latent_shape(config: VAEConfig, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of the latent of a square image of side ``resolution``."""
    f = config.downsample_factor
    if resolution % f:
        raise ValueError(f"resolution {resolution} is not divisible by the downsampling factor {f}")
    return config.latent_channels, resolution // f, resolution // f

