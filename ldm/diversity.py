"""Diversity: how many distinct images a model draws for one prompt, out of K samples from K starting noises.

The rule, the same for every model scored (``diversity``): two samples of one prompt are **the same image**
when their pixel RMS distance (images in [0, 1], over every pixel and channel) is below a threshold, and the
distinct images of a prompt are the connected components of that "same image" graph over its K samples
(order-free: no sample is a cluster centre, and a chain of near-copies is one image). K copies of one image
count 1, K images all farther apart than the threshold count K. Beside the count, the mean of the K (K - 1) / 2
pairwise distances: a continuous measure that does not jump at the threshold.

The threshold comes from the data, never from a model (``jitter_median``): for a fixed prompt the built-in
shapes (``ldm.data.shapes``) vary only by the renderer's jitter: the centre moves up to ``JITTER_POSITION``
(0.8 px at 32 x 32) along each axis and the side scales by up to 1 +- ``JITTER_SCALE``; shape, colour, size,
cell and background are what the prompt says. So two renders of one prompt's attributes differ by a sub-pixel
shift and a few percent of scale, and nothing else. The threshold of a prompt is ``DISTINCT_FRACTION`` (one
half) of the median distance between two such renders (``JITTER_PAIRS`` pairs): two images are copies when
they lie closer than half of what the data's own jitter typically moves them (about 1 pair in 10 of the data's
own renders does: jitter draws that nearly coincide). It is set per prompt because the distance of one jitter
grows with the shape's contrast and outline (0.03 for a small green cross on black, 0.09 for a large red
square on white, over eval_text's first 25 prompts). At a quarter of the median the count saturates (the
data and every model compared read 7.3 to 8 of 8), so the rule takes the half; the mean distance is the
measure that sees finer differences.

Why pixel RMS and not features: the only thing the data varies for a fixed prompt is where the shape's edge
falls, which pixels see directly. The attribute reader returns the five attributes, identical for every
right image; the CLIP image tower was trained on captions that state only those five, so it is built to be
blind to the jitter, and it steers two of the models compared (CLIP guidance; unCLIP's decoder draws its
embeddings), so scoring in its space would not be independent of the model scored.

The reference rows (``data_diversity``): K fresh renders of each prompt's attributes, scored by the same rule:
what a model that draws the data's own spread would get; and the same renders through the model's VAE
(encode, decode), which every sampled image passes through: its decoder softens edges, so the same jitter
moves fewer pixel values (through the demo VAE the median pair of renders lies at 0.83 of the crisp pairs'
median). ``evaluate_diversity`` scores any sampler of K images per prompt on eval_text's first P held-out
prompts (``ldm.data.shapes.eval_prompts`` at ``ldm.metrics.PROMPT_SEED``) beside them. Samples enter
``diversity`` in [0, 1]; ``evaluate_diversity`` takes the models' [-1, 1] and maps it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ldm.data.shapes import eval_prompts, render, sample_jitter
from ldm.errors import InputError
from ldm.metrics import PROMPT_SEED

DISTINCT_FRACTION = 0.5  # same image: closer than this fraction of the data's median jitter distance
JITTER_PAIRS = 64  # render pairs per prompt behind its median
JITTER_SEED = 0  # the threshold's renders: fixed, so a prompt's threshold never changes
DATA_SEED = 1  # the reference row's renders, drawn apart from the threshold's
DEFAULT_PROMPTS = 20  # P: eval_text --diversity-prompts
DEFAULT_K = 8  # K: samples per prompt


def pairwise_rms(samples: torch.Tensor) -> torch.Tensor:
    """RMS distance of every two samples of each prompt: (P, K, C, H, W) -> (P, K, K) float64."""
    if samples.dim() != 5:
        raise ValueError(f"pairwise_rms: expected (P, K, C, H, W) samples, got {tuple(samples.shape)}")
    flat = samples.double().flatten(2)  # (P, K, C*H*W)
    # differences written out, one prompt at a time (cdist's |a|^2 + |b|^2 - 2ab loses digits near copies)
    return torch.stack([(f[:, None] - f[None]).pow(2).mean(-1).sqrt() for f in flat])  # (P, K, K)


def count_distinct(dist: torch.Tensor, threshold: float) -> int:
    """Connected components of the graph joining two samples whose distance (K, K) is below ``threshold``."""
    K = dist.shape[0]
    parent = list(range(K))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*torch.triu_indices(K, K, offset=1).tolist()):
        if dist[i, j] < threshold:
            parent[root(i)] = root(j)
    return len({root(i) for i in range(K)})


def diversity(samples: torch.Tensor, threshold: float | torch.Tensor) -> dict:
    """K samples of each of P prompts, (P, K, 3, H, W) in [0, 1], and the same-image threshold (a float, or
    one per prompt (P,)) -> {"prompts": P, "k": K, "distinct": mean distinct images per prompt (1..K),
    "distinct_per_prompt": [P ints], "mean_distance": mean pairwise RMS over prompts,
    "distance_per_prompt": [P floats]}."""
    if samples.dim() != 5 or samples.shape[1] < 2:
        raise ValueError(f"diversity: expected (P, K >= 2, C, H, W) samples, got {tuple(samples.shape)}")
    P, K = samples.shape[:2]
    thresholds = torch.as_tensor(threshold, dtype=torch.float64).flatten()
    if thresholds.numel() not in (1, P):
        raise ValueError(f"diversity: one threshold or one per prompt ({P}), got {thresholds.numel()}")
    thresholds = thresholds.expand(P)  # (P,)
    if not bool(torch.all(thresholds > 0)):
        raise ValueError(f"diversity: thresholds must be positive, got {thresholds.tolist()}")
    dist = pairwise_rms(samples)  # (P, K, K)
    i, j = torch.triu_indices(K, K, offset=1)
    per_prompt = dist[:, i, j].mean(1)  # (P,) mean of the K (K - 1) / 2 pairs
    distinct = [count_distinct(d, float(t)) for d, t in zip(dist, thresholds, strict=True)]
    return {"prompts": P, "k": K, "distinct": sum(distinct) / P, "distinct_per_prompt": distinct,
            "mean_distance": per_prompt.mean().item(), "distance_per_prompt": per_prompt.tolist()}


def jittered(attrs: dict, rng: np.random.Generator) -> dict:
    """``attrs`` with a fresh draw of the renderer's jitter (ldm.data.shapes.sample_attributes' ranges)."""
    return {**attrs, **sample_jitter(rng)}


def renders(attrs: dict, k: int, resolution: int, rng: np.random.Generator) -> torch.Tensor:
    """``k`` renders of one prompt's attributes, each with its own jitter: (k, 3, H, W) float64 in [0, 1]."""
    return torch.stack([torch.from_numpy(render(jittered(attrs, rng), resolution)).permute(2, 0, 1)
                        for _ in range(k)]).double() / 255.0


def jitter_median(attributes: list[dict], resolution: int = 32, pairs: int = JITTER_PAIRS,
                  seed: int = JITTER_SEED) -> torch.Tensor:
    """Per prompt, the median RMS distance between two renders of its attributes: (P,) float64."""
    out = []
    for p, attrs in enumerate(attributes):
        rng = np.random.default_rng([seed, p])
        x = renders(attrs, 2 * pairs, resolution, rng)  # (2 * pairs, 3, H, W)
        out.append((x[0::2] - x[1::2]).pow(2).flatten(1).mean(1).sqrt().median())
    return torch.stack(out)


def shapes_diversity(samples: torch.Tensor, median: torch.Tensor) -> dict:
    """``diversity`` at this module's rule: samples (P, K, 3, H, W) in [0, 1], ``median`` (P,) from
    ``jitter_median``. Adds "relative_distance": the mean over prompts of the mean pairwise distance divided
    by the prompt's jitter median (1: as far apart as two renders of the data)."""
    r = diversity(samples, DISTINCT_FRACTION * median)
    r["relative_distance"] = (torch.tensor(r["distance_per_prompt"], dtype=torch.float64) / median).mean().item()
    return r


def data_diversity(attributes: list[dict], k: int, resolution: int = 32, median: torch.Tensor | None = None,
                   seed: int = DATA_SEED, codec=None) -> dict:
    """The reference row: ``k`` fresh renders of each prompt's attributes, scored by the same rule; with
    ``codec`` (images (B, 3, H, W) in [-1, 1] -> the same) the renders pass through it first."""
    median = jitter_median(attributes, resolution) if median is None else median
    samples = torch.stack([renders(a, k, resolution, np.random.default_rng([seed, p]))
                           for p, a in enumerate(attributes)])  # (P, k, 3, H, W) in [0, 1]
    if codec is not None:
        flat = samples.flatten(0, 1).float() * 2 - 1  # (P * k, 3, H, W) in [-1, 1]
        with torch.no_grad():
            samples = ((codec(flat).double().clamp(-1, 1) + 1) / 2).view(samples.shape)
    return shapes_diversity(samples, median)


def evaluate_diversity(draw, prompts: int = DEFAULT_PROMPTS, k: int = DEFAULT_K, codec=None) -> dict:
    """``draw(pairs, k)`` -> (P * k, 3, H, W) in [-1, 1], prompt-major: ``k`` samples (k starting noises) of each
    (attributes, prompt) pair of eval_text's first ``prompts`` held-out prompts. -> the model's ``shapes_diversity``
    with "seconds", and under "data" the reference row of the same prompts; ``codec(images) -> images`` (both
    (B, 3, H, W) in [-1, 1]: the model's VAE, encode then decode) adds "data_vae", those renders through it."""
    if prompts <= 0 or k < 2:
        raise ValueError(f"evaluate_diversity: needs prompts >= 1 and k >= 2 samples per prompt, got {prompts}, {k}")
    pairs = eval_prompts(prompts, PROMPT_SEED)
    attributes = [a for a, _ in pairs]
    t0 = time.perf_counter()
    images = draw(pairs, k)  # (P * k, 3, H, W)
    seconds = time.perf_counter() - t0
    if images.shape[0] != prompts * k:
        raise ValueError(f"evaluate_diversity: draw gave {images.shape[0]} images for {prompts} prompts x {k}")
    samples = ((images.double().clamp(-1, 1) + 1) / 2).view(prompts, k, *images.shape[1:])  # (P, k, 3, H, W)
    median = jitter_median(attributes, images.shape[-1])
    out = {**shapes_diversity(samples, median), "seconds": round(seconds, 1),
           "data": data_diversity(attributes, k, images.shape[-1], median)}
    if codec is not None:
        out["data_vae"] = data_diversity(attributes, k, images.shape[-1], median, codec=codec)
    return out


def report(r: dict, what: str) -> str:
    """The printed lines: the model's diversity beside the data's (and the data's through the VAE)."""
    def line(name: str, d: dict) -> str:
        return (f"{name:>28}: {d['distinct']:.2f} distinct of {d['k']} per prompt, mean pairwise RMS "
                f"{d['mean_distance']:.4f} ({d['relative_distance']:.2f} x the data's jitter)")

    rows = [line(what, r), line("data (fresh renders)", r["data"])]
    if "data_vae" in r:
        rows.append(line("data through the VAE", r["data_vae"]))
    return (f"diversity on {r['prompts']} prompts x {r['k']} samples (same image: RMS < {DISTINCT_FRACTION} x "
            f"the prompt's median jitter distance)\n" + "\n".join(rows))


def vae_codec(pipe):
    """The ``codec`` of ``evaluate_diversity`` for an ``ldm.Pipeline``: images through its VAE and back."""
    return lambda images: pipe.decode_latents(pipe.encode_images(images)).cpu()


# --------------------------------------------------------------------------------------------- ldm.eval_text
def add_arguments(p) -> None:
    """``ldm.eval_text``'s diversity flags."""
    g = p.add_argument_group("diversity (ldm.diversity)")
    g.add_argument("--diversity", type=int, default=None, metavar="K",
                   help=f"also draw K samples (K starting noises) of each of the first --diversity-prompts held-out "
                        f"prompts and report distinct images per prompt and their mean pairwise distance, beside "
                        f"K fresh renders of the data (typical K: {DEFAULT_K})")
    g.add_argument("--diversity-prompts", type=int, default=None, metavar="P",
                   help=f"with --diversity: how many prompts (default {DEFAULT_PROMPTS})")


def check_args(args) -> None:
    """InputError for a --diversity K under 2 or --diversity-prompts P under 1 (or without --diversity)."""
    if args.diversity_prompts is not None:
        if args.diversity is None:
            raise InputError("--diversity-prompts needs --diversity K (samples per prompt)")
        if args.diversity_prompts <= 0:
            raise InputError(f"--diversity-prompts must be positive, got {args.diversity_prompts}")
    if args.diversity is not None and args.diversity < 2:
        raise InputError(f"--diversity {args.diversity}: needs at least 2 samples per prompt (one sample has "
                         "nothing to differ from)")
    if args.diversity_prompts is None:
        args.diversity_prompts = DEFAULT_PROMPTS
