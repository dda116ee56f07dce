"""The losses that train the autoencoder, as in latent diffusion's first stage.

- L1 reconstruction (or squared error, ``rec_loss="l2"``), plus LPIPS (Zhang et al. 2018) when VGG16
  weights are on disk;
- KL of the posterior to N(0, I) with a small weight (the "KL-reg" of Rombach et al. 2022);
- a PatchGAN discriminator (Isola et al. 2017) with the hinge loss, switched on at a given step,
  its weight set adaptively from the gradient norms at the decoder's last layer (Esser et al.
  2021, "Taming Transformers"): ``|grad rec| / |grad gan|``, so the GAN never drowns the
  reconstruction.

Reconstruction and KL are summed over each image's elements and averaged over the batch, as in
the latent diffusion code, so ``kl_weight`` means what it means there (1e-6).

Nothing downloads. LPIPS needs a file with VGG16 features (torchvision's ``vgg16`` state dict,
``features.N.*`` keys, as .safetensors or .pth) and optionally LPIPS' linear heads
(``lin0.model.1.weight`` ... or ``lin0.weight`` ...); without the heads every channel weighs the
same. Without a file, LPIPS is off and ``lpips_notice`` says so in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

LPIPS_ENV = "LDM_LPIPS_WEIGHTS"
REC_LOSSES = ("l1", "l2")


@dataclass
class LossConfig:
    rec_loss: str = "l1"  # "l1" (latent diffusion's) or "l2" (squared error: optimises PSNR directly)
    kl_weight: float = 1e-6
    disc_start: int = 0  # first step with the GAN loss (and discriminator updates)
    disc_weight: float = 0.5  # multiplies the adaptive weight
    disc_layers: int = 2  # stride-2 layers of the PatchGAN; 3 for 256 x 256 images
    disc_channels: int = 32
    perceptual_weight: float = 1.0  # LPIPS weight, when LPIPS is on
    lpips_weights: str | None = None  # VGG16 weights file; None: the LDM_LPIPS_WEIGHTS variable


# ---------------------------------------------------------------- PatchGAN
class PatchDiscriminator(nn.Module):
    """Conv-BatchNorm-LeakyReLU stack that scores overlapping patches: (B, 3, H, W) -> (B, 1, h, w)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = channels
        for i in range(1, layers + 1):
            c_next = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(c, c_next, 4, stride, 1, bias=False), nn.BatchNorm2d(c_next), nn.LeakyReLU(0.2, True)]
            c = c_next
        seq.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():  # the DCGAN initialisation pix2pix uses
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


# ---------------------------------------------------------------- LPIPS
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's numbering
# LPIPS' input scaling: images in [-1, 1] are shifted and scaled to what VGG saw in training
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never code


class LPIPS(nn.Module):
    """Learned perceptual distance on frozen VGG16 features: (B, 3, H, W) x 2 -> (B,)."""

    def __init__(self, weights: str | os.PathLike):
        super().__init__()
        layers, c = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers[: _LPIPS_TAPS[-1] + 1])
        widths = (64, 128, 256, 512, 512)
        self.lin = nn.ParameterList([nn.Parameter(torch.full((w,), 1.0 / w)) for w in widths])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self._load(Path(weights))
        self.requires_grad_(False).eval()

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS: VGG16 weights file not found: {path}")
        state = _read_weights(path)
        own = {k: v for k, v in state.items() if k.startswith("features.") and k.split(".")[1].isdigit()
               and int(k.split(".")[1]) <= _LPIPS_TAPS[-1]}
        try:
            self.features.load_state_dict({k[len("features."):]: v for k, v in own.items()})
        except RuntimeError as e:
            raise ValueError(f"LPIPS: {path} does not hold VGG16 'features.N' weights: {e}") from None
        for i, lin in enumerate(self.lin):
            for key in (f"lin{i}.model.1.weight", f"lin{i}.weight"):
                if key in state:
                    lin.data.copy_(state[key].reshape(-1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)  # (2B, 3, H, W)
        total, taps = 0.0, set(_LPIPS_TAPS)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in taps:
                f = h / (h.norm(dim=1, keepdim=True) + 1e-10)  # unit feature vector per position
                fx, fy = f.chunk(2)
                w = self.lin[_LPIPS_TAPS.index(i)].view(1, -1, 1, 1)
                total = total + ((fx - fy).pow(2) * w).sum(1).mean((1, 2))  # (B,)
        return total


def lpips_from_config(cfg: LossConfig) -> tuple[LPIPS | None, str]:
    """The LPIPS module when weights are given (argument or environment), and a one-line notice."""
    path = cfg.lpips_weights or os.environ.get(LPIPS_ENV)
    if cfg.perceptual_weight <= 0:
        return None, "LPIPS off: perceptual weight is 0"
    if not path:
        return None, f"LPIPS off: no VGG16 weights given (--lpips-weights PATH or {LPIPS_ENV}=PATH)"
    return LPIPS(path), f"LPIPS on: VGG16 weights from {path}"


# ---------------------------------------------------------------- the whole loss
class VAELoss(nn.Module):
    """Reconstruction + KL + adaptive-weight hinge GAN; owns the discriminator (and LPIPS)."""

    def __init__(self, cfg: LossConfig, in_channels: int = 3):
        super().__init__()
        if cfg.rec_loss not in REC_LOSSES:
            raise ValueError(f"VAELoss: rec_loss must be one of {REC_LOSSES}, got {cfg.rec_loss!r}")
        self.cfg = cfg
        self.discriminator = PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers)
        self.lpips, self.lpips_notice = lpips_from_config(cfg)

    def gan_on(self, step: int) -> bool:
        return step >= self.cfg.disc_start

    def reconstruction(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-image L1 or squared error summed over elements (+ weighted LPIPS per element): (B,)."""
        rec = (x - recon).abs() if self.cfg.rec_loss == "l1" else (x - recon).square()  # (B, 3, H, W)
        if self.lpips is not None:
            rec = rec + self.cfg.perceptual_weight * self.lpips(x, recon).view(-1, 1, 1, 1)
        return rec.sum(dim=(1, 2, 3))

    def adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """|d rec / d last| / |d gan / d last|, clamped, times ``disc_weight``; no gradient flows through it."""
        g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        w = (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        return w * self.cfg.disc_weight

    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor, posterior, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The autoencoder's loss at ``step``, and its parts for the log (per-pixel L1 among them)."""
        rec = self.reconstruction(x, recon).mean()
        kl = posterior.kl().mean()
        loss = rec + self.cfg.kl_weight * kl
        logs = {"l1": (x - recon).abs().mean().item(), "rec": rec.item(), "kl": kl.item()}
        if self.gan_on(step):
            self.discriminator.requires_grad_(False)
            g_loss = -self.discriminator(recon).mean()
            self.discriminator.requires_grad_(True)
            if last_layer is not None and torch.is_grad_enabled():
                d_weight = self.adaptive_weight(rec, g_loss, last_layer)
            else:
                d_weight = torch.tensor(self.cfg.disc_weight)
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss.item(), d_weight=d_weight.item())
        logs["loss"] = loss.item()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss of the discriminator on real images and (detached) reconstructions."""
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(recon.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {"d_loss": loss.item(), "logits_real": logits_real.mean().item(),
                      "logits_fake": logits_fake.mean().item()}
