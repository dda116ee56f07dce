"""Aspect-ratio buckets: pictures keep their framing instead of being cropped square.

``bucket_sizes(resolution, step)`` lists sizes (height, width), multiples of ``step``, whose pixel count
is about ``resolution ** 2`` and whose sides differ by at most ``MAX_RATIO``; ``BucketedFolder`` puts
every image of a folder in the bucket nearest its own aspect ratio (in log ratio) and scales it to
cover that size, centre-cropping the small rest. The training draws every batch from one bucket
(``ldm.latent_cache``). As NovelAI's bucketing for Stable Diffusion (2022), without their per-bucket
batch sizes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ldm.data.folder import FolderDataset, to_rgb
from ldm.data.shapes import to_tensor

MAX_RATIO = 2.0  # the longest side at most twice the shortest: beyond, too few pixels across
AREA_TOLERANCE = 0.15  # a bucket's pixel count within 15% of resolution ** 2


def bucket_sizes(resolution: int, step: int, max_ratio: float = MAX_RATIO) -> list[tuple[int, int]]:
    """(height, width) sizes, multiples of ``step``, about ``resolution ** 2`` pixels, square included."""
    if step <= 0 or resolution % step:
        raise ValueError(f"the resolution {resolution} is not a multiple of the bucket step {step}")
    area = resolution * resolution
    sizes = set()
    for h in range(step, int(resolution * math.sqrt(max_ratio)) + step, step):
        w = max(step, round(area / h / step) * step)
        if max(h, w) / min(h, w) <= max_ratio and abs(h * w - area) <= AREA_TOLERANCE * area:
            sizes |= {(h, w), (w, h)}  # landscape and portrait alike
    return sorted(sizes, key=lambda s: s[1] / s[0])


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> int:
    """The index of the size whose aspect ratio is nearest (in log ratio) to width / height."""
    a = math.log(width / height)
    return min(range(len(sizes)), key=lambda k: abs(math.log(sizes[k][1] / sizes[k][0]) - a))


def cover_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Scale to cover height x width (Lanczos), then centre-crop it."""
    w, h = img.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    img = img.resize((nw, nh), Image.LANCZOS, reducing_gap=3.0)
    left, top = (nw - width) // 2, (nh - height) // 2
    return img.crop((left, top, left + width, top + height))


class BucketedFolder:
    """An image folder (``FolderDataset``) whose item i is image i at its bucket's size:
    ``{"image": (3, h, w) in [-1, 1], "text": caption}``; ``bucket[i]`` is its index into ``sizes``."""

    def __init__(self, folder: FolderDataset, step: int, max_ratio: float = MAX_RATIO):
        self.folder = folder
        self.sizes = bucket_sizes(folder.resolution, step, max_ratio)
        self.captions = folder.captions
        self.bucket = []
        for path in folder.files:
            with Image.open(path) as img:  # the header only: no decode
                w, h = img.size
            self.bucket.append(nearest_bucket(w, h, self.sizes))
        self.bucket = np.asarray(self.bucket, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> dict:
        h, w = self.sizes[self.bucket[i]]
        with Image.open(self.folder.files[i]) as img:
            img.load()
            arr = np.asarray(cover_crop(to_rgb(img), h, w))  # (h, w, 3) uint8
        return {"image": to_tensor(arr.copy()), "text": self.captions[i]}

    def describe(self) -> dict:
        counts = np.bincount(self.bucket, minlength=len(self.sizes)).tolist()
        return {**self.folder.describe(), "buckets": [[h, w, n] for (h, w), n in zip(self.sizes, counts)]}
