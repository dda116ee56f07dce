"""Scoring generated handwritten digits: a digit reader trained on the real digits, and how generated
digits fare under it.

- ``DigitReader``: a tiny CNN over the 8 x 8 ink grid (``ldm.data.digits.downsample``: any image
  side that is a multiple of 8 is block-averaged back to 8 x 8, the inverse direction of the
  dataset's upsampling) -> 64 features -> 10 logits. ``train_reader`` fits it on the train split only
  (the images at the model's resolution, brought back to 8 x 8 the same way, 1-pixel random shifts),
  in seconds on one CPU core; deterministic by its seed. Its accuracy on the held-out split is part
  of every report: a reader that misreads real digits cannot vouch for generated ones.
- ``frechet_distance``: ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between two sets of
  features (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", the FID, here in the reader's 64-wide penultimate layer instead of Inception's).
- ``evaluate_digits``: ``n`` images per digit from a class-conditional (class labels) or
  text-conditional (prompts in ``EVAL_TEMPLATES``, wording no training caption uses) pipeline; the
  share the reader reads as the asked digit, overall and per digit; the Fréchet distance between
  the generated and the held-out real digits, beside its floor: the distance between the train and
  the held-out real digits (two real samples of about the same sizes, so the finite-sample bias of
  the estimate is in both). The floor is what a model that reproduced the training images exactly
  would score.

The command ``python -m ldm.eval_digits`` is a shell over this module.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import ImageDraw

from ldm.data.digits import EVAL_TEMPLATES, NUM_CLASSES, SOURCE_SIDE, DigitsDataset, digit_caption, downsample
from ldm.pipeline import generate
from ldm.pretrained import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS
from ldm.runlog import image_grid

# 20 epochs of 32, AdamW at 3e-3 decayed to 0 on a cosine, label smoothing 0.1, dropout 0.3 on the features,
# half the images shifted: 98.3 / 98.9 / 98.9% of the held-out digits at 16 px (seeds 0 / 1 / 2), 5-12 s on one
# core by the load. Without the smoothing, dropout and decay (40 epochs of 64 at 2e-3): 94-98.6% by the seed.
READER_EPOCHS = 20
READER_BATCH = 32
READER_LR = 3e-3
READER_WEIGHT_DECAY = 1e-2
READER_SMOOTHING = 0.1
READER_DROPOUT = 0.3
READER_SHIFT = 0.5  # share of the images moved by one pixel
FEATURES = 64  # width of the penultimate layer the Fréchet distance is measured in
DEFAULT_PER_DIGIT = 100


class DigitReader(nn.Module):
    """8 x 8 ink in [0, 1] -> 10 logits: conv 32 - conv 64 - maxpool - conv 64 - 2 x 2 avgpool - fc 64 - fc 10."""

    def __init__(self, width: int = 32, features: int = FEATURES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 4, features)
        self.out = nn.Linear(features, NUM_CLASSES)

    def features(self, ink: torch.Tensor) -> torch.Tensor:
        """ink (N, 64) or (N, 1, 8, 8) in [0, 1] -> (N, FEATURES), the penultimate layer."""
        x = ink.view(-1, 1, SOURCE_SIDE, SOURCE_SIDE) * 2 - 1  # (N, 1, 8, 8)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))  # (N, 2w, 8, 8)
        x = F.relu(self.conv3(F.max_pool2d(x, 2)))  # (N, 2w, 4, 4)
        return F.relu(self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1)))  # (N, FEATURES)

    def forward(self, ink: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(ink))  # (N, 10)

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, R, R) in [-1, 1] -> (digits (N,), features (N, FEATURES)), in eval mode."""
        self.eval()
        feats = self.features(downsample(images))
        return self.out(feats).argmax(1), feats


def _shift(ink: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each (1, 8, 8) image moved by -1, 0 or 1 pixel along each axis, zeros shifted in."""
    padded = F.pad(ink, (1, 1, 1, 1))  # (B, 1, 10, 10)
    crops = torch.stack([padded[:, :, y:y + SOURCE_SIDE, x:x + SOURCE_SIDE] for y in range(3) for x in range(3)],
                        1)  # (B, 9, 1, 8, 8)
    pick = torch.randint(0, 9, (len(ink),), generator=gen)  # (B,)
    return crops[torch.arange(len(ink)), pick]  # (B, 1, 8, 8)


def train_reader(resolution: int = 16, epochs: int = READER_EPOCHS, seed: int = 0, width: int = 32) -> DigitReader:
    """A ``DigitReader`` fitted on the train split of the digits at ``resolution`` (eval mode), in
    ``epochs`` passes of the recipe above; the same weights for the same arguments, and the global
    random state left as it was."""
    train = DigitsDataset(resolution, split="train")
    ink = downsample(train.images).view(-1, 1, SOURCE_SIDE, SOURCE_SIDE)  # (N, 1, 8, 8)
    labels = torch.as_tensor(train.labels)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the weights and the dropout masks
        reader = DigitReader(width)
        opt = torch.optim.AdamW(reader.parameters(), lr=READER_LR, weight_decay=READER_WEIGHT_DECAY)
        reader.train()
        total, step = epochs * math.ceil(len(ink) / READER_BATCH), 0
        for _ in range(epochs):
            perm = torch.randperm(len(ink), generator=gen)
            for start in range(0, len(ink), READER_BATCH):
                for group in opt.param_groups:
                    group["lr"] = READER_LR * 0.5 * (1 + math.cos(math.pi * step / total))
                idx = perm[start:start + READER_BATCH]
                x = ink[idx]  # (b, 1, 8, 8)
                moved = torch.rand(len(idx), generator=gen) < READER_SHIFT  # (b,)
                x = torch.where(moved[:, None, None, None], _shift(x, gen), x)
                feats = F.dropout(reader.features(x), READER_DROPOUT)  # (b, FEATURES)
                loss = F.cross_entropy(reader.out(feats), labels[idx], label_smoothing=READER_SMOOTHING)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    return reader.eval().requires_grad_(False)


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D), in float64;
    tr((S_a S_b)^(1/2)) as the trace of the square root of the symmetric S_a^(1/2) S_b S_a^(1/2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance: expected two (N >= 2, D) feature sets, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D) each
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_a^(1/2)
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)  # eigenvalues of S_a^(1/2) S_b S_a^(1/2)
    trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def real_reference(reader: DigitReader, resolution: int, n: int = DEFAULT_PER_DIGIT, seed: int = 0) -> dict:
    """The reader on the real digits at ``resolution``: held-out accuracy, per digit, the held-out
    features (N, D) every generated set is compared with, and the floor: the Fréchet distance from
    ``n`` train images of each digit (drawn by ``seed``; all of a digit's when it has fewer) to the
    held-out ones. The estimate's finite-sample bias depends on the set sizes (train 700 vs 738 gives
    9.8, 1438 vs the held-out 359 gives 3.5 with the 16-px reader), so the floor uses as many real
    images per digit as the generated set has, and the same held-out set."""
    train, held = DigitsDataset(resolution, split="train"), DigitsDataset(resolution, split="eval")
    pred, feats = reader.read(held.images)
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.permutation(np.flatnonzero(train.labels == d))[:n] for d in range(NUM_CLASSES)])
    _, train_feats = reader.read(train.images[torch.as_tensor(pick)])
    labels = torch.as_tensor(held.labels)
    return {"accuracy": (pred == labels).float().mean().item(), "n": len(held),
            "per_digit": per_digit(pred, labels), "features": feats,
            "fd_floor": frechet_distance(train_feats, feats), "floor_sizes": [len(pick), len(held)]}


def per_digit(pred: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Share of each digit's items read as that digit: (N,) x 2 -> 10 floats (nan for an absent digit)."""
    return [(pred[labels == d] == d).float().mean().item() if (labels == d).any() else math.nan
            for d in range(NUM_CLASSES)]


def digit_prompts(per_digit_n: int) -> tuple[list[str], list[int]]:
    """One prompt per image, digit-major: image k of digit d in ``EVAL_TEMPLATES[k % len]``."""
    prompts, labels = [], []
    for d in range(NUM_CLASSES):
        for k in range(per_digit_n):
            prompts.append(digit_caption(d, EVAL_TEMPLATES[k % len(EVAL_TEMPLATES)]))
            labels.append(d)
    return prompts, labels


@torch.no_grad()
def evaluate_digits(pipe, reader: DigitReader, reference: dict, n: int = DEFAULT_PER_DIGIT, *,
                    sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG,
                    seed: int = 0, batch_size: int = 100, progress: bool = False,
                    return_images: bool = False) -> dict:
    """``n`` images of each digit from ``pipe`` (class labels when it is class-conditional, else
    held-out prompts), read back by ``reader``. -> {"n", "mode", "sampler", "steps", "cfg", "seed",
    "seconds", "accuracy", "per_digit", "fd", "fd_floor", "fd_ratio", "confusions"} (+ "images",
    (10 n, 3, R, R) digit-major, with ``return_images``)."""
    if n <= 0:
        raise ValueError(f"evaluate_digits: n must be positive, got {n}")
    t0 = time.perf_counter()
    if pipe.num_classes is not None:
        if pipe.num_classes != NUM_CLASSES:
            raise ValueError(f"evaluate_digits: the UNet draws {pipe.num_classes} classes, the digits are "
                             f"{NUM_CLASSES}")
        mode, labels = "class", [d for d in range(NUM_CLASSES) for _ in range(n)]
        images = generate(pipe, None, classes=list(range(NUM_CLASSES)), n=n, steps=steps, sampler=sampler,
                          cfg=cfg, seed=seed, batch_size=batch_size, progress=progress)
    elif pipe.conditional:
        mode = "text"
        prompts, labels = digit_prompts(n)
        images = generate(pipe, prompts, n=1, steps=steps, sampler=sampler, cfg=cfg, seed=seed,
                          batch_size=batch_size, progress=progress)
    else:
        raise ValueError("evaluate_digits: the UNet is unconditional; it cannot be asked for a digit")
    seconds = time.perf_counter() - t0
    labels = torch.tensor(labels)
    pred, feats = reader.read(images)
    fd = frechet_distance(feats, reference["features"])
    wrong = (pred != labels).nonzero().flatten().tolist()
    out = {"n": n, "mode": mode, "sampler": sampler, "steps": steps, "cfg": cfg, "seed": seed,
           "seconds": round(seconds, 2), "accuracy": (pred == labels).float().mean().item(),
           "per_digit": per_digit(pred, labels), "fd": fd, "fd_floor": reference["fd_floor"],
           "fd_ratio": fd / reference["fd_floor"],
           "confusions": [{"asked": int(labels[i]), "read": int(pred[i])} for i in wrong[:20]]}
    if return_images:
        out["images"] = images
    return out


def labelled_grid(images: torch.Tensor, per_row: int, labels: list[str], scale: int = 4, pad: int = 2):
    """A grid of ``per_row`` images a row with each row's label written in a margin on its left."""
    grid = image_grid(images, nrow=per_row, pad=pad, scale=scale)
    margin = 12 * max(len(t) for t in labels) // 2 + 8
    from PIL import Image

    out = Image.new("RGB", (grid.width + margin, grid.height), "white")
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    row_h = grid.height / len(labels)
    for r, text in enumerate(labels):
        draw.text((4, int(r * row_h + row_h / 2 - 5)), text, fill="black")
    return out
