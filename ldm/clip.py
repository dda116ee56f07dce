"""A small CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"): an image tower trained from scratch and a trainable head on the frozen text encoder,
both ending in one unit-norm embedding space, trained with the symmetric InfoNCE loss at a learned
temperature.

    from ldm.clip import load_clip
    clip = load_clip("runs/clip")                        # ours (clip.json), or a transformers CLIPModel folder
    img = clip.encode_image(images)                      # (B, 3, H, W) in [-1, 1] -> (B, D), unit norm
    txt = clip.encode_text(["a red circle ..."])         # prompts -> (B, D), unit norm
    score = (img * txt).sum(-1)                          # the cosine: CLIP score

The image tower is a small ResNet whose last feature map is flattened rather than pooled, so where a
shape lies survives into the embedding. With ``noise_aware`` it reads noisy latents x_t of a diffusion
model instead of pixels, and the timestep t enters every residual block as a bias (GLIDE's noised
CLIP, Nichol et al. 2022), for CLIP guidance (``ldm.clip_guidance``). The text head attends over the
frozen encoder's token states with one learned query and adds their mean, then an MLP: only the
head trains, so training caches the token states once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.checkpoint import load_model_files, load_state_dict_strict, save_model
from ldm.errors import InputError
from ldm.unet import timestep_embedding

CLIP_NAME = "clip"  # clip.safetensors + clip.json
INIT_TEMPERATURE = 0.07  # CLIP's initial softmax temperature
MAX_LOGIT_SCALE = 100.0  # CLIP clips the learned 1 / temperature here, to keep training stable


@dataclass(frozen=True)
class CLIPConfig:
    """Both towers. ``in_channels`` x ``resolution``^2 is what the image tower reads: RGB pixels, or a
    VAE's latents when ``noise_aware`` (then t is an input too); ``text_width`` is the frozen text
    encoder's token width."""

    in_channels: int = 3
    resolution: int = 32
    channels: tuple[int, ...] = (32, 64, 128)  # one stage each; every stage after the first halves the side
    stem_stride: int = 2  # the stem's patch size: 32 x 32 pixels are read as 16 x 16 patches, 4x cheaper
    norm_groups: int = 8
    embed_dim: int = 128
    text_width: int = 384
    text_hidden: int = 256
    noise_aware: bool = False
    time_dim: int = 128

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        halvings = len(self.channels) - 1
        side = self.resolution // self.stem_stride >> halvings
        if self.stem_stride < 1 or side < 1 or (side << halvings) * self.stem_stride != self.resolution:
            raise ValueError(f"CLIPConfig: resolution {self.resolution} does not divide by the stem stride "
                             f"{self.stem_stride} and then halve {halvings} times (channels {self.channels})")
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"CLIPConfig: channels {self.channels} must divide into {self.norm_groups} groups")

    @property
    def final_side(self) -> int:
        return self.resolution // self.stem_stride >> (len(self.channels) - 1)


CLIP_CONFIGS = {
    "tiny": CLIPConfig(),  # 32 x 32 RGB pixels of the built-in shapes
    "latent": CLIPConfig(in_channels=8, resolution=8, channels=(64, 128), stem_stride=1,
                         noise_aware=True),  # noisy demo latents
}


# --------------------------------------------------------------------------------------------- towers
class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, a residual; an optional time embedding adds a per-channel bias."""

    def __init__(self, c_in: int, c_out: int, groups: int, time_dim: int | None):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out) if time_dim else None
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        if self.time is not None:
            h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ImageTower(nn.Module):
    """(B, in_channels, R, R) [, t (B,)] -> (B, embed_dim), not normalized."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.config = c
        self.time_mlp = (nn.Sequential(nn.Linear(c.time_dim, c.time_dim), nn.SiLU(), nn.Linear(c.time_dim, c.time_dim))
                         if c.noise_aware else None)
        time_dim = c.time_dim if c.noise_aware else None
        self.stem = (nn.Conv2d(c.in_channels, c.channels[0], c.stem_stride, stride=c.stem_stride)
                     if c.stem_stride > 1 else nn.Conv2d(c.in_channels, c.channels[0], 3, padding=1))
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, ch in enumerate(c.channels):
            prev = c.channels[max(i - 1, 0)]
            self.downs.append(nn.Conv2d(prev, prev, 3, stride=2, padding=1) if i else nn.Identity())
            self.blocks.append(ResBlock(prev, ch, c.norm_groups, time_dim))
        self.norm = nn.GroupNorm(c.norm_groups, c.channels[-1])
        self.proj = nn.Linear(c.channels[-1] * c.final_side ** 2, c.embed_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        temb = None
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("a noise-aware CLIP image tower needs the timestep t")
            temb = self.time_mlp(timestep_embedding(t.reshape(-1).expand(x.shape[0]), self.config.time_dim).to(x.dtype))
        h = self.stem(x)  # (B, C0, R / stem, R / stem)
        for down, block in zip(self.downs, self.blocks, strict=True):
            h = block(down(h), temb)  # (B, Ci, R / 2^i, R / 2^i)
        return self.proj(F.silu(self.norm(h)).flatten(1))  # (B, D): flattened, so position survives


class TextHead(nn.Module):
    """Frozen token states (B, L, width) + valid lengths (B,) -> (B, embed_dim), not normalized."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.query = nn.Parameter(torch.randn(c.text_width) / math.sqrt(c.text_width))
        self.key = nn.Linear(c.text_width, c.text_width)
        self.mlp = nn.Sequential(nn.Linear(2 * c.text_width, c.text_hidden), nn.GELU(),
                                 nn.Linear(c.text_hidden, c.embed_dim))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, L, W = tokens.shape
        valid = torch.arange(L, device=tokens.device)[None, :] < lengths[:, None]  # (B, L)
        scores = (self.key(tokens) @ self.query) / math.sqrt(W)  # (B, L)
        weights = scores.masked_fill(~valid, float("-inf")).softmax(-1)  # (B, L)
        attended = (weights[:, :, None] * tokens).sum(1)  # (B, W)
        mean = (tokens * valid[:, :, None]).sum(1) / lengths.clamp_min(1)[:, None].to(tokens.dtype)  # (B, W)
        return self.mlp(torch.cat([attended, mean], -1))  # (B, D)


class CLIP(nn.Module):
    """Image tower + text head + learned log(1 / temperature). The frozen text encoder
    (``ldm.text.TextEncoder``) is attached with ``attach_encoder`` and is not part of the weights."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.image = ImageTower(config)
        self.text = TextHead(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))
        self.encoder = None  # set by attach_encoder; a plain attribute, so its weights stay out of ours
        self.meta: dict = {}

    def attach_encoder(self, encoder) -> CLIP:
        object.__setattr__(self, "encoder", encoder)
        return self

    @property
    def noise_aware(self) -> bool:
        return self.config.noise_aware

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def image_features(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_channels, R, R) -> (B, D) unit norm."""
        return F.normalize(self.image(x, t), dim=-1)

    def text_features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L, width), (B,) -> (B, D) unit norm."""
        return F.normalize(self.text(tokens, lengths), dim=-1)

    def encode_image(self, images: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        check_input(images, self.config)
        return self.image_features(images.to(self.logit_scale.device), t)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        if self.encoder is None:
            raise ValueError("CLIP.encode_text: no text encoder attached (attach_encoder)")
        tokens, lengths = self.encoder.encode(list(prompts))
        device = self.logit_scale.device
        return self.text_features(tokens.to(device), lengths.to(device))


def check_input(x: torch.Tensor, c: CLIPConfig) -> None:
    want = (c.in_channels, c.resolution, c.resolution)
    if x.dim() != 4 or tuple(x.shape[1:]) != want:
        what = "latents" if c.noise_aware else "images"
        raise InputError(f"the CLIP image tower reads {what} (B, {', '.join(map(str, want))}), "
                         f"got {tuple(x.shape)}")


@torch.no_grad()
def clip_score(clip, images: torch.Tensor, prompts: list[str], batch: int = 256) -> torch.Tensor:
    """CLIP score (Hessel et al. 2021, without their 2.5 weight and clipping at 0): the cosine of each
    image's embedding and its prompt's. images (N, 3, H, W) in [-1, 1], N prompts -> (N,)."""
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
    if getattr(clip, "noise_aware", False):
        raise InputError(f"{clip.meta.get('source', 'the CLIP')} is noise-aware (it reads latents); "
                         "CLIP score needs a CLIP of pixels (python -m ldm.train_clip without --vae)")
    out = []
    for s in range(0, len(images), batch):
        img = clip.encode_image(images[s:s + batch])  # (b, D)
        out.append((img * clip.encode_text(prompts[s:s + batch])).sum(-1).cpu())
    return torch.cat(out)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: pair i is the positive of row i and of column i among the batch's B pairs.
    image, text (B, D) unit norm; logit_scale 1 / temperature -> scalar loss."""
    logits = logit_scale * image @ text.T  # (B, B): image i against text j
    target = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# --------------------------------------------------------------------------------------------- a HF CLIP
class HFCLIP(nn.Module):
    """A local ``transformers.CLIPModel`` folder behind the same interface (pixels only, not noise-aware)."""

    def __init__(self, path: Path, device="cpu"):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False).to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        v = self.model.config.vision_config
        pre = path / "preprocessor_config.json"
        norm = json_or_empty(pre)
        # the image processor's normalisation when the folder has one, else the one CLIPModel was trained with
        mean = norm.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
        std = norm.get("image_std", [0.26862954, 0.26130258, 0.27577711])
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.config = CLIPConfig(in_channels=3, resolution=v.image_size, channels=(v.hidden_size,),
                                 norm_groups=1, embed_dim=self.model.config.projection_dim)
        self.meta = {"source": str(path), "kind": "transformers.CLIPModel"}

    noise_aware = False

    def encode_image(self, images: torch.Tensor, t=None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"CLIP: images must be (B, 3, H, W), got {tuple(images.shape)}")
        side = self.config.resolution
        x = F.interpolate(images.float(), size=(side, side), mode="bicubic", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std  # (B, 3, side, side)
        return F.normalize(projected(self.model.get_image_features(pixel_values=x.to(self.mean.device))), dim=-1)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        batch = {k: v.to(self.mean.device) for k, v in batch.items()}
        return F.normalize(projected(self.model.get_text_features(**batch)), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()


def projected(out) -> torch.Tensor:
    """``get_*_features`` returns the projected embedding (B, D): a tensor before transformers 5, the
    output's ``pooler_output`` since."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def json_or_empty(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------------------------- files
def save_clip(folder: str | Path, model: CLIP, **extra) -> Path:
    """``folder/clip.safetensors`` + ``folder/clip.json`` (config, text encoder, ``extra``), atomically."""
    return save_model(folder, CLIP_NAME, model, model.config, **extra)


def load_clip(folder: str | Path, device="cpu", *, text_encoder: str | Path | None = None,
              load_text_encoder: bool = True):
    """Ours (``clip.json`` in ``folder``) or a Hugging Face CLIP folder (``config.json`` of model_type
    clip). Errors (InputError) name the folder and what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"CLIP folder not found: {folder}")
    if not (folder / f"{CLIP_NAME}.json").is_file():
        if json_or_empty(folder / "config.json").get("model_type") == "clip":
            try:
                return HFCLIP(folder, device)
            except (OSError, ValueError) as e:
                raise InputError(f"{folder}: not a loadable transformers CLIPModel folder ({e})") from None
        raise InputError(f"{folder} holds neither {CLIP_NAME}.json (python -m ldm.train_clip) nor a "
                         "transformers CLIP config.json")
    try:
        state, meta = load_model_files(folder, CLIP_NAME)
        config = CLIPConfig(**meta["config"])
        model = CLIP(config)
        load_state_dict_strict(model, state, str(folder / f"{CLIP_NAME}.safetensors"))
    except (FileNotFoundError, TypeError, ValueError) as e:
        raise InputError(f"{folder}: {e}") from None
    model.meta = {k: v for k, v in meta.items() if k != "config"}
    model.meta["source"] = str(folder)
    model.eval().requires_grad_(False).to(device)
    if load_text_encoder:
        from ldm.text import TextEncoder

        path = text_encoder if text_encoder is not None else model.meta.get("text_encoder")
        try:
            encoder = TextEncoder(path, device=device)
        except (FileNotFoundError, ImportError, OSError, ValueError) as e:
            raise InputError(f"text encoder of {folder}: {e}") from None
        if encoder.width != config.text_width:
            raise InputError(f"text encoder {encoder.path} gives {encoder.width}-wide tokens but "
                             f"{folder / 'clip.json'} expects text_width {config.text_width}")
        model.attach_encoder(encoder)
    return model


def config_with(preset: str, **overrides) -> CLIPConfig:
    if preset not in CLIP_CONFIGS:
        raise InputError(f"unknown CLIP preset {preset!r}; expected one of {list(CLIP_CONFIGS)}")
    return replace(CLIP_CONFIGS[preset], **overrides)


__all__ = ["CLIP", "CLIPConfig", "CLIP_CONFIGS", "HFCLIP", "contrastive_loss", "load_clip", "save_clip",
           "config_with"]
