"""The unCLIP diffusion prior (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with
CLIP Latents", section 2.1): a diffusion model over CLIP image embeddings, conditioned on the prompt.

A small transformer reads the sequence [the prompt's token states (L, projected), the CLIP text
embedding, the timestep embedding, the noised image embedding, a learned query] and predicts the
*clean* image embedding at the query's output, as the paper's prior does (it predicts x0, not the
noise). The embedding is unit-norm; the diffusion runs on it scaled by sqrt(D), so each component has
about unit variance, like the latents the UNet diffuses. Sampling goes through ``ldm.samplers`` with
the x0 ``Denoiser``: any sampler of ``SAMPLERS``.

    prior = load_prior("runs/prior")                       # + its CLIP (prior.json names it)
    emb = sample_prior(prior, clip, ["a red circle ..."], steps=20)   # (B, D) unit-norm image embeddings
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.checkpoint import load_model_files, load_state_dict_strict, save_model
from ldm.diffusion import Denoiser, NoiseSchedule
from ldm.errors import InputError
from ldm.runlog import MetricsLog
from ldm.samplers import SAMPLERS, get_sigmas
from ldm.trainer import learning_rate
from ldm.unet import timestep_embedding

PRIOR_NAME = "prior"  # prior.safetensors + prior.json


@dataclass(frozen=True)
class PriorConfig:
    embed_dim: int = 128  # the CLIP's embedding width
    text_width: int = 384  # the frozen text encoder's token width
    width: int = 128
    depth: int = 4
    heads: int = 4
    ff_mult: int = 4
    schedule: str = "cosine"
    num_timesteps: int = 1000

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"PriorConfig: width {self.width} does not split into {self.heads} heads")


class Prior(nn.Module):
    """``prior(x_t (B, D), t (B,), tokens (B, L, text_width), lengths (B,), text_emb (B, D)) -> x0 (B, D)``,
    the model contract of ``ldm.diffusion.Denoiser`` (extra_args: tokens, lengths, text_emb)."""

    def __init__(self, c: PriorConfig):
        super().__init__()
        self.config = c
        self.token_proj = nn.Linear(c.text_width, c.width)
        self.text_proj = nn.Linear(c.embed_dim, c.width)
        self.x_proj = nn.Linear(c.embed_dim, c.width)
        self.time_mlp = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.query = nn.Parameter(torch.randn(c.width) * 0.02)
        self.kind = nn.Parameter(torch.randn(5, c.width) * 0.02)  # which of the five parts a position holds
        layer = nn.TransformerEncoderLayer(c.width, c.heads, c.ff_mult * c.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, c.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.width)
        self.out = nn.Linear(c.width, c.embed_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                text_emb: torch.Tensor) -> torch.Tensor:
        B, L, _ = tokens.shape
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        parts = [self.token_proj(tokens) + self.kind[0],  # (B, L, W)
                 (self.text_proj(text_emb) + self.kind[1])[:, None],  # (B, 1, W)
                 (self.time_mlp(timestep_embedding(t, self.config.width).to(x.dtype)) + self.kind[2])[:, None],
                 (self.x_proj(x) + self.kind[3])[:, None],
                 (self.query + self.kind[4]).expand(B, 1, -1)]
        seq = torch.cat(parts, 1)  # (B, L + 4, W)
        pad = torch.arange(L + 4, device=x.device)[None, :] >= lengths[:, None]  # (B, L + 4) padding tokens
        pad[:, L:] = False  # the four summary positions are always there
        h = self.blocks(seq, src_key_padding_mask=pad)  # (B, L + 4, W)
        return self.out(self.norm(h[:, -1]))  # (B, D): the query's output, the clean embedding


# --------------------------------------------------------------------------------------------- training
@dataclass
class PriorTrainConfig:
    out: str = "runs/prior"
    clip: str = "runs/clip"
    images: int = 5000
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 100


def prior_data(clip, images: int, seed: int = 0, quiet: bool = True) -> dict:
    """The CLIP's image embeddings of ``images`` training scenes (held-out combinations excluded), the
    captions' token states and text embeddings: {"image" (N, D), "tokens" (N, L, W), "lengths", "text"}."""
    from ldm.clip_training import encode_captions, render_scenes, training_scenes
    from ldm.data import caption

    scenes = training_scenes(images, seed)
    with torch.no_grad():
        pixels = render_scenes(scenes, clip.config.resolution)
        image = torch.cat([clip.encode_image(pixels[s:s + 256]) for s in range(0, len(pixels), 256)])
        tokens, lengths, index = encode_captions(clip.encoder, [caption(a) for a in scenes], quiet)
        text = torch.cat([clip.text_features(tokens[index[s:s + 256]].float(), lengths[index[s:s + 256]])
                          for s in range(0, len(index), 256)])
    return {"image": image, "tokens": tokens, "lengths": lengths, "index": index, "text": text}


def prior_loss(prior: Prior, schedule: NoiseSchedule, image: torch.Tensor, tokens, lengths, text,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE of the predicted clean embedding (scaled by sqrt(D)) at uniform timesteps."""
    D = image.shape[-1]
    x0 = image * math.sqrt(D)  # (B, D), unit variance per component
    t = torch.randint(0, schedule.num_timesteps, (len(x0),), generator=generator)  # (B,)
    abar = schedule.alphas_cumprod[t].to(x0.dtype)[:, None]  # (B, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return F.mse_loss(prior(x_t, t.to(x0.dtype), tokens, lengths, text), x0)


def train_prior(config: PriorTrainConfig, clip, quiet: bool = False) -> dict:
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    data = prior_data(clip, config.images, config.seed, quiet)
    prior = Prior(PriorConfig(embed_dim=clip.config.embed_dim, text_width=clip.config.text_width))
    schedule = NoiseSchedule.from_name(prior.config.schedule, prior.config.num_timesteps)
    opt = torch.optim.AdamW(prior.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    out = Path(config.out)
    log = MetricsLog(out / "metrics.jsonl")
    if not quiet:
        print(f"train_prior: {len(data['image'])} embeddings in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    t_train = time.perf_counter()
    N = len(data["image"])
    for step in range(config.steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(config.lr, step, warmup=config.warmup, schedule="cosine", total=config.steps,
                                    floor=0.05)
        pick = torch.randperm(N, generator=gen)[:config.batch_size]
        k = data["index"][pick]
        L = int(data["lengths"][k].max())
        loss = prior_loss(prior, schedule, data["image"][pick], data["tokens"][k, :L].float(), data["lengths"][k],
                          data["text"][pick], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % config.log_every == 0 or step == config.steps - 1:
            log.write(step=step, loss=round(loss.item(), 5), seconds=round(time.perf_counter() - t_train, 1))
            if not quiet:
                print(f"train_prior: step {step:5d} loss {loss.item():.4f}", file=sys.stderr)
    seconds = time.perf_counter() - t_train
    prior.eval()
    save_model(out, PRIOR_NAME, prior, prior.config, created_by="ldm.train_prior", clip=str(config.clip),
               training={**asdict(config), "seconds": round(seconds, 1), "final_loss": round(loss.item(), 5)})
    return {"seconds": seconds, "loss": loss.item()}


# --------------------------------------------------------------------------------------------- use
def load_prior(folder: str | Path) -> tuple[Prior, dict]:
    folder = Path(folder)
    try:
        state, meta = load_model_files(folder, PRIOR_NAME)
        prior = Prior(PriorConfig(**meta["config"]))
        load_state_dict_strict(prior, state, str(folder / f"{PRIOR_NAME}.safetensors"))
    except (FileNotFoundError, TypeError, ValueError) as e:
        raise InputError(f"prior {folder}: {e}") from None
    return prior.eval().requires_grad_(False), meta


@torch.no_grad()
def sample_prior(prior: Prior, clip, prompts: list[str], *, steps: int = 20, sampler: str = "ddim", seed: int = 0,
                 n: int = 1) -> torch.Tensor:
    """``n`` image embeddings per prompt (prompt-major), unit norm: (P * n, D)."""
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}")
    c = prior.config
    tokens, lengths = clip.encoder.encode(list(prompts))
    text = clip.text_features(tokens, lengths)
    rows = torch.arange(len(prompts)).repeat_interleave(n)
    schedule = NoiseSchedule.from_name(c.schedule, c.num_timesteps)
    sigmas = get_sigmas(schedule, steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(rows), c.embed_dim, generator=gen) * sigmas[0]
    x0 = SAMPLERS[sampler](Denoiser(prior, schedule, "x0"), x, sigmas, disable=True,
                           extra_args={"tokens": tokens[rows], "lengths": lengths[rows], "text_emb": text[rows]})
    return F.normalize(x0, dim=-1)


@torch.no_grad()
def evaluate_prior(prior: Prior, clip, n: int = 200, steps: int = 20, seed: int = 0) -> dict:
    """On held-out prompts (combinations training never saw, one per combination): the mean cosine of
    the sampled embedding with the true image's, beside the text embedding's; and the CLIP's zero-shot
    attributes read from the sampled embeddings, beside those read from the true images."""
    from ldm.clip_training import heldout_scenes, render_scenes, zero_shot
    from ldm.data import caption

    scenes = heldout_scenes(n, distinct=True)
    prompts = [caption(a) for a in scenes]
    true = clip.encode_image(render_scenes(scenes, clip.config.resolution))  # (N, D)
    sampled = sample_prior(prior, clip, prompts, steps=steps, seed=seed)  # (N, D)
    text = clip.encode_text(prompts)
    return {"n": len(scenes), "cosine_sampled": (sampled * true).sum(-1).mean().item(),
            "cosine_text": (text * true).sum(-1).mean().item(),
            "zero_shot_sampled": zero_shot(clip, sampled, scenes), "zero_shot_true": zero_shot(clip, true, scenes)}
