"""Training and scoring the small CLIP (``ldm.clip``): the data, the loop, zero-shot and recall.

Held out means held out: on the built-in shapes, one scene in ``HOLDOUT_MOD`` -- a fixed set of
(shape, colour, size, position, background) combinations, chosen by a hash of the five -- never
appears in training; ``heldout_scenes`` draws the evaluation images from the held-out split *and*
only those combinations, so no evaluation image shares its caption or its attribute combination with
a training image. Each attribute value on its own is seen in training; the combination is new.

An image folder (``--data DIR``) holds out every ``HOLDOUT_MOD``-th image instead.

With a VAE the CLIP is noise-aware (GLIDE): the image tower reads a VAE latent, noised to a uniformly
drawn timestep t of the noise schedule, and t: x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, the input
the UNet sees (``ldm.diffusion.Denoiser``).
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ldm.clip import CLIP, CLIPConfig, config_with, contrastive_loss, save_clip
from ldm.data import VOCABULARY, FolderDataset, ShapesDataset, caption, render, sample_attributes, to_tensor
from ldm.data.shapes import COLOURS, BACKGROUNDS, TEMPLATES, WHERE
from ldm.diffusion import NoiseSchedule
from ldm.errors import InputError
from ldm.runlog import MetricsLog
from ldm.text import pad_context
from ldm.trainer import learning_rate

HOLDOUT_MOD = 10  # one combination (built-in) or image (folder) in this many is held out
TEXT_BATCH = 256  # captions per text-encoder call
ENCODE_BATCH = 256  # images per VAE call
ZERO_SHOT_CONTEXTS = 48  # captions averaged into one zero-shot class embedding (prompt ensembling)
COMBO = ("shape", "colour", "size", "position", "background")


@dataclass
class ClipTrainConfig:
    """One run of ``python -m ldm.train_clip``."""

    out: str = "runs/clip"
    data: str | None = None  # None: the built-in shapes; else an image folder
    preset: str = "tiny"
    vae: str | None = None  # a VAE folder: train noise-aware on its latents
    text_encoder: str | None = None  # None: the packaged MiniLM
    images: int = 10000  # training images
    steps: int = 500
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.05
    seed: int = 0
    resolution: int = 32  # pixels of a pixel CLIP (a VAE fixes its own)
    log_every: int = 50


def heldout_combo(attrs: dict) -> bool:
    """True for the combinations of the five attributes that training never sees."""
    key = "|".join(str(attrs[a]) for a in COMBO).encode()
    return zlib.crc32(key) % HOLDOUT_MOD == 0


def training_scenes(n: int, seed: int = 0) -> list[dict]:
    """The first ``n`` train-split scenes whose combination is not held out."""
    ds = ShapesDataset(length=1 << 30, seed=seed, split="train")
    out, i = [], 0
    while len(out) < n:
        a = ds.attributes(i)
        if not heldout_combo(a):
            out.append(a)
        i += 1
    return out


def heldout_scenes(n: int, distinct: bool = False, seed: int = 0) -> list[dict]:
    """The first ``n`` eval-split scenes of held-out combinations (``distinct``: one per combination;
    there are only about a tenth of 1656 such combinations, so fewer may come back)."""
    ds = ShapesDataset(length=1 << 30, seed=seed, split="eval")
    out, seen = [], set()
    for i in range(200_000):
        a = ds.attributes(i)
        key = tuple(a[k] for k in COMBO)
        if heldout_combo(a) and not (distinct and key in seen):
            seen.add(key)
            out.append(a)
            if len(out) == n:
                break
    return out


def render_scenes(scenes: list[dict], resolution: int) -> torch.Tensor:
    return torch.stack([to_tensor(render(a, resolution)) for a in scenes])  # (N, 3, R, R)


def load_pairs(config: ClipTrainConfig) -> tuple[torch.Tensor, list[str], torch.Tensor, list[str], dict]:
    """-> (train images, captions, held-out images, captions, dataset description)."""
    if config.data is None:
        scenes = training_scenes(config.images, config.seed)
        held = heldout_scenes(min(500, config.images))
        return (render_scenes(scenes, config.resolution), [caption(a) for a in scenes],
                render_scenes(held, config.resolution), [caption(a) for a in held],
                {"name": "shapes", "held_out": f"combinations with crc32 % {HOLDOUT_MOD} == 0"})
    try:
        ds = FolderDataset(config.data, config.resolution)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--data: {e}") from None
    idx = range(min(len(ds), config.images + config.images // (HOLDOUT_MOD - 1) + 1))
    train = [i for i in idx if i % HOLDOUT_MOD]
    held = [i for i in idx if not i % HOLDOUT_MOD]
    if len(train) < 2 or not held:
        raise InputError(f"--data {config.data}: {len(ds)} images are too few to train and hold out "
                         f"one in {HOLDOUT_MOD}")
    get = [ds[i] for i in idx]
    images = torch.stack([g["image"] for g in get])
    captions = [g["text"] for g in get]
    return (images[train], [captions[i] for i in train], images[held], [captions[i] for i in held],
            {"name": "folder", "root": str(config.data), "held_out": f"every {HOLDOUT_MOD}th image"})


def encode_captions(encoder, captions: list[str],
                    quiet: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each distinct caption once -> (tokens (U, L, width) fp16, lengths (U,), index (N,) of each caption)."""
    unique = sorted(set(captions))
    where = {c: i for i, c in enumerate(unique)}
    states, lengths = [], []
    for start in range(0, len(unique), TEXT_BATCH):
        ctx, lens = encoder.encode(unique[start:start + TEXT_BATCH])
        states += [c[:n].half() for c, n in zip(ctx, lens, strict=True)]
        lengths.append(lens)
        if not quiet:
            print(f"\rtrain_clip: encoded {min(start + TEXT_BATCH, len(unique))}/{len(unique)} captions",
                  end="", file=sys.stderr)
    if not quiet:
        print(file=sys.stderr)
    return pad_context(states), torch.cat(lengths), torch.tensor([where[c] for c in captions])


class LatentNoiser:
    """Images -> VAE latent moments once; then noisy latents x_t at drawn timesteps, for a noise-aware CLIP."""

    def __init__(self, vae, schedule: NoiseSchedule):
        self.vae, self.schedule = vae, schedule

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for start in range(0, len(images), ENCODE_BATCH):
            m, s = self.vae.latent_moments(images[start:start + ENCODE_BATCH])
            means.append(m)
            stds.append(s)
        return torch.cat(means), torch.cat(stds)  # (N, C, h, w) each

    def noised(self, mean, std, t: torch.Tensor, generator=None) -> torch.Tensor:
        """A fresh latent sample, noised to integer timesteps t (B,) -> x_t (B, C, h, w)."""
        z = mean + std * torch.randn(mean.shape, generator=generator)
        abar = self.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return abar.sqrt() * z + (1 - abar).sqrt() * torch.randn(z.shape, generator=generator)


def train_clip(config: ClipTrainConfig, encoder, vae=None, vae_dir: str | None = None, quiet: bool = False) -> dict:
    """Train, write ``config.out/clip.*`` and ``metrics.jsonl``; -> the final metrics."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = vae.resolution if vae is not None and vae.resolution else config.resolution
    config.resolution = res
    images, captions, held_images, held_captions, described = load_pairs(config)
    tokens, lengths, index = encode_captions(encoder, captions, quiet)
    noiser, model_config = None, None
    if vae is not None:
        noiser = LatentNoiser(vae.eval(), NoiseSchedule.from_name("linear"))
        mean, std = noiser.moments(images)
        model_config = config_with(config.preset, in_channels=mean.shape[1], resolution=mean.shape[-1],
                                   noise_aware=True, text_width=encoder.width)
    else:
        model_config = config_with(config.preset, resolution=res, in_channels=3, noise_aware=False,
                                   text_width=encoder.width)
    if not quiet:
        print(f"train_clip: {len(images)} pairs ({described['name']}), {len(tokens)} distinct captions, "
              f"{time.perf_counter() - t0:.0f} s to prepare", file=sys.stderr)
    model = CLIP(model_config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=config.lr)
    log = MetricsLog(out / "metrics.jsonl")
    N = len(images)
    batch = min(config.batch_size, N)
    t_train = time.perf_counter()
    for step in range(config.steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(config.lr, step, warmup=config.warmup, schedule="cosine", total=config.steps,
                                    floor=0.05)
        pick = torch.randperm(N, generator=gen)[:batch]  # (B,)
        k = index[pick]
        L = int(lengths[k].max())
        tok, lens = tokens[k, :L].float(), lengths[k]  # (B, L, width), (B,)
        if noiser is not None:
            t = torch.randint(0, noiser.schedule.num_timesteps, (batch,), generator=gen)  # (B,)
            x = noiser.noised(mean[pick], std[pick], t, gen)
            img = model.image_features(x, t.float())
        else:
            img = model.image_features(images[pick])
        loss = contrastive_loss(img, model.text_features(tok, lens), model.scale())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not math.isfinite(loss.item()):
            raise InputError(f"train_clip: the loss became {loss.item()} at step {step}; lower --lr")
        if step % config.log_every == 0 or step == config.steps - 1:
            row = {"step": step, "loss": round(loss.item(), 4), "temperature": round(1 / model.scale().item(), 4),
                   "seconds": round(time.perf_counter() - t_train, 1)}
            log.write(**row)
            if not quiet:
                print(f"train_clip: step {step:5d} loss {row['loss']:.4f} temperature {row['temperature']:.4f} "
                      f"{row['seconds']:.0f} s", file=sys.stderr)
    seconds = time.perf_counter() - t_train
    model.eval()
    info = {"created_by": "ldm.train_clip", "text_encoder": config.text_encoder, "vae": vae_dir,
            "dataset": described, "training": {**asdict(config), "seconds": round(seconds, 1),
                                               "final_loss": round(loss.item(), 4)}}
    if noiser is not None:
        info["schedule"] = "linear"
    save_clip(out, model, **info)
    return {"seconds": seconds, "loss": loss.item(), "pairs": N}


# --------------------------------------------------------------------------------------------- scoring
def single_prompts(attribute: str) -> dict[str, str]:
    """One short prompt per value of ``attribute`` ("a red shape", "a shape in the top left", ...)."""
    say = {"shape": "a {v}", "colour": "a {v} shape", "size": "a {v} shape",
           "background": "a shape on a {v} background"}
    values = VOCABULARY[attribute]
    if attribute == "position":
        return {v: f"a shape {WHERE[v]}" for v in values}
    return {v: say[attribute].format(v=v) for v in values}


def ensemble_prompts(attribute: str, value: str, count: int = ZERO_SHOT_CONTEXTS, seed: int = 0) -> list[str]:
    """``count`` full captions that all set ``attribute`` to ``value``, the rest drawn at random (prompt
    ensembling, as CLIP's zero-shot classifiers average 80 templates). Random scenes, not the
    evaluation images: the prompts do not know which combinations are being scored."""
    rng = np.random.default_rng([seed, len(attribute), VOCABULARY[attribute].index(value)])
    out = []
    while len(out) < count:
        a = {**sample_attributes(rng), attribute: value}
        if COLOURS[a["colour"]] == BACKGROUNDS[a["background"]]:
            continue
        out.append(caption(a, int(rng.integers(len(TEMPLATES)))))
    return out


@torch.no_grad()
def zero_shot(clip, image_features: torch.Tensor, scenes: list[dict], ensemble: bool = True) -> dict:
    """Share of images whose every attribute the CLIP names right, by cosine with a prompt per value
    (``ensemble``: the mean embedding of ``ZERO_SHOT_CONTEXTS`` captions per value). -> {attribute: share}."""
    out = {}
    for attribute, values in VOCABULARY.items():
        if ensemble:
            classes = torch.stack([torch.nn.functional.normalize(
                clip.encode_text(ensemble_prompts(attribute, v)).mean(0), dim=-1) for v in values])  # (V, D)
        else:
            classes = clip.encode_text(list(single_prompts(attribute).values()))  # (V, D)
        pred = (image_features @ classes.T).argmax(-1)  # (N,)
        want = torch.tensor([values.index(a[attribute]) for a in scenes])
        out[attribute] = (pred.cpu() == want).float().mean().item()
    out["mean"] = sum(out[a] for a in VOCABULARY) / len(VOCABULARY)
    return out


def recall(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5)) -> dict:
    """Pair i is image i with text i. t2i@k: the text's image ranks in its top k; i2t@k the other way."""
    sims = image_features @ text_features.T  # (N, N)
    target = torch.arange(len(sims), device=sims.device)
    out = {}
    for name, s in (("t2i", sims.T), ("i2t", sims)):
        rank = (s > s[target, target][:, None]).sum(-1)  # (N,) how many beat the right answer
        for k in ks:
            out[f"{name}@{k}"] = (rank < k).float().mean().item()
    return out


@torch.no_grad()
def features_of(clip, images: torch.Tensor, t: int = 0, vae=None, schedule: NoiseSchedule | None = None,
                seed: int = 0, batch: int = 256) -> torch.Tensor:
    """Image features; a noise-aware CLIP reads the images' VAE latents noised to timestep ``t``."""
    gen = torch.Generator().manual_seed(seed)
    feats = []
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        if getattr(clip, "noise_aware", False):
            if vae is None:
                raise InputError("a noise-aware CLIP scores latents: it needs its VAE (clip.json's vae, or --vae)")
            z = vae.encode_latents(x)
            abar = float(schedule.alphas_cumprod[t])
            x_t = math.sqrt(abar) * z + math.sqrt(1 - abar) * torch.randn(z.shape, generator=gen)
            feats.append(clip.encode_image(x_t, torch.full((len(x),), float(t))))
        else:
            feats.append(clip.encode_image(x))
    return torch.cat(feats)


def describe_config(c: CLIPConfig) -> str:
    n = "noise-aware, " if c.noise_aware else ""
    return f"{n}{c.in_channels} x {c.resolution}^2 input, channels {list(c.channels)}, {c.embed_dim}-d embedding"
