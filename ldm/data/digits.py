"""Real handwritten digits: scikit-learn's 1,797 8 x 8 digits (``sklearn.datasets.load_digits``, the UCI
"Optical Recognition of Handwritten Digits" test set of Alpaydin & Kaynak 1998; shipped with
scikit-learn, nothing is downloaded), upsampled for the autoencoder and captioned for text conditioning.

- The split is fixed and stratified: within each digit the items are shuffled by ``SPLIT_SEED`` and
  the first ``EVAL_SHARE`` of them (rounded) are held out. 1,438 train and 359 eval images; no image
  of one split is in the other, whatever the ``seed`` (which only picks the captions).
- Pixels: the 0..16 ink counts as grey in [-1, 1] (ink white on black, as in MNIST), upsampled from
  8 x 8 bilinearly (half-pixel centres, as ``F.interpolate(align_corners=False)``) and repeated over
  3 channels, at any resolution that is a multiple of 8.
- Captions: item ``i`` of ``(seed, split)`` takes one of ``TEMPLATES`` drawn from ``(seed, split, i)``
  ("a handwritten 7", "the digit seven", ...). ``EVAL_TEMPLATES`` are phrasings no training caption
  uses, for prompting a text-conditional model with held-out wording.
- ``labels`` (N,) int64: the digit of each item, for the class-conditional path.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

NAME = "digits"  # what ``--data`` calls it
SOURCE_SIDE = 8
NUM_CLASSES = 10
SPLIT_SEED = 0  # fixed: the held-out images are the same for every run and every seed
EVAL_SHARE = 0.2
SPLITS = ("train", "eval")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {d}",
    "the digit {word}",
    "a {d} written by hand",
    "the handwritten digit {word}",
    "the number {d}",
    "{word}, written by hand",
)
EVAL_TEMPLATES = ("a hand-drawn {word}", "digit {d}, handwritten")


def digit_caption(label: int, template: str | int = 0) -> str:
    """The caption of ``label`` in ``template`` (an index into ``TEMPLATES`` or a format string with
    fields {d} and {word})."""
    if isinstance(template, int):
        template = TEMPLATES[template]
    return template.format(d=int(label), word=WORDS[int(label)])


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images (N, 8, 8) float32 in [0, 1] and labels (N,) int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits dataset needs scikit-learn (pip install 'scikit-learn>=1.2')") from e
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def split_indices() -> dict[str, np.ndarray]:
    """The fixed stratified split: {"train": (1437,), "eval": (360,)} indices into ``load_digits``, sorted."""
    _, labels = _load()
    rng = np.random.default_rng(SPLIT_SEED)
    train, held = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(EVAL_SHARE * len(idx)))
        held.append(idx[:k])
        train.append(idx[k:])
    return {"train": np.sort(np.concatenate(train)), "eval": np.sort(np.concatenate(held))}


def upsample(images: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, 8, 8) ink in [0, 1] -> (N, 3, R, R) float32 in [-1, 1], bilinear with half-pixel centres."""
    x = torch.as_tensor(images, dtype=torch.float32)[:, None]  # (N, 1, 8, 8)
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, R, R)


def downsample(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1], R a multiple of 8 -> (N, 64) ink in [0, 1]: the channel mean averaged
    over R/8 x R/8 blocks, the inverse direction of ``upsample`` (what the digit reader sees)."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2] or images.shape[-1] % SOURCE_SIDE:
        raise ValueError(f"downsample: expected (N, C, R, R) images with R a multiple of {SOURCE_SIDE}, "
                         f"got {tuple(images.shape)}")
    x = (images.detach().float().cpu().mean(1, keepdim=True) + 1) / 2  # (N, 1, R, R)
    x = F.adaptive_avg_pool2d(x, SOURCE_SIDE)  # (N, 1, 8, 8)
    return x.flatten(1).clamp(0, 1)  # (N, 64)


class DigitsDataset(torch.utils.data.Dataset):
    """One split of the real handwritten digits; item ``i`` is ``{"image": (3, R, R) in [-1, 1], "text":
    caption, "label": digit}``. Deterministic by ``(seed, split, i)``."""

    name = NAME
    num_classes = NUM_CLASSES

    def __init__(self, resolution: int = 16, split: str = "train", seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if resolution < SOURCE_SIDE or resolution % SOURCE_SIDE:
            raise ValueError(f"digits: resolution {resolution} must be a multiple of {SOURCE_SIDE} "
                             f"(the images are {SOURCE_SIDE} x {SOURCE_SIDE}, upsampled)")
        self.resolution, self.split, self.seed = resolution, split, seed
        pixels, labels = _load()
        self.indices = split_indices()[split]  # (N,) rows of load_digits
        self.pixels = pixels[self.indices]  # (N, 8, 8) in [0, 1]
        self.labels = labels[self.indices]  # (N,)
        self.images = upsample(self.pixels, resolution)  # (N, 3, R, R)
        split_id = SPLITS.index(split)
        self.templates = [int(np.random.default_rng([seed, split_id, i]).integers(len(TEMPLATES)))
                          for i in range(len(self.indices))]
        self.captions = [digit_caption(c, t) for c, t in zip(self.labels, self.templates, strict=True)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} digits")
        return {"image": self.images[i].clone(), "text": self.captions[i], "label": int(self.labels[i])}

    def get(self, i: int, rng: np.random.Generator | None = None) -> dict:
        """Item ``i``; ``rng`` (augmentation randomness) is unused: the digits take no augmentation."""
        return self[i]

    def prompts(self, count: int) -> list[str]:
        """``count`` validation prompts in held-out wording: digits 0, 1, 2 ... in ``EVAL_TEMPLATES[0]``."""
        return [digit_caption(k % NUM_CLASSES, EVAL_TEMPLATES[0]) for k in range(count)]

    def describe(self) -> dict:
        return {"name": self.name, "resolution": self.resolution, "length": len(self), "seed": self.seed,
                "split": self.split, "split_seed": SPLIT_SEED, "num_classes": NUM_CLASSES}
