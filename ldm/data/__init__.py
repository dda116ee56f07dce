"""Training data: the built-in captioned shapes, real handwritten digits, image folders, and a resumable
shuffled stream.

Every dataset here yields ``{"image": (3, R, R) float in [-1, 1], "text": caption}`` and has
``get(i, rng)`` (``rng`` draws any augmentation) and ``describe()`` (what a checkpoint records).
The data code imports no model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ldm.data.digits import DigitsDataset
from ldm.data.folder import FolderDataset
from ldm.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    VOCABULARY,
    ShapesDataset,
    caption,
    eval_prompts,
    read_attributes,
    render,
    sample_attributes,
    to_tensor,
)

__all__ = ["ShapesDataset", "DigitsDataset", "FolderDataset", "BUILTIN", "ShuffledStream", "open_dataset",
           "is_builtin", "read_attributes", "caption", "render", "sample_attributes", "eval_prompts", "to_tensor",
           "VOCABULARY", "SHAPES", "COLOURS", "SIZES", "POSITIONS", "BACKGROUNDS", "TEMPLATES"]


BUILTIN = ("digits",)  # names ``--data`` takes besides a folder (a folder of that name: pass ./digits)


def is_builtin(data: str | Path | None) -> bool:
    """True for the built-in shapes (None) and the built-in datasets named in ``BUILTIN``."""
    return data is None or (isinstance(data, str) and data in BUILTIN)


def open_dataset(data: str | Path | None, resolution: int, *, split: str = "train", seed: int = 0,
                 caption_column: str = "text", crop: str = "center", flip: bool = False,
                 captions: str = "templates"):
    """The built-in shapes (``data`` None; ``captions``: "templates" or "varied", see ``ShapesDataset``),
    the real handwritten digits (``data`` "digits"), both with ``split`` "train" or "eval", or an image folder."""
    if data is None:
        return ShapesDataset(resolution, seed=seed, split=split, captions=captions)
    if data == "digits":
        return DigitsDataset(resolution, split=split, seed=seed)
    return FolderDataset(data, resolution, caption_column=caption_column, crop=crop, flip=flip, seed=seed)


class ShuffledStream(torch.utils.data.Dataset):
    """An endless stream over ``dataset``: position ``k`` is item ``perm_e[k % n]`` of epoch
    ``e = k // n``, each epoch in its own order drawn from ``(seed, e)``, with augmentation drawn
    from ``(seed, k)``. Position ``k`` always gives the same sample, whatever the workers or batch
    size, so a run resumes mid-epoch by starting its sampler at ``step * batch_size``."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return 2**62  # endless; the sampler decides where to start and stop

    def __getitem__(self, k: int) -> dict:
        n = len(self.dataset)
        epoch, offset = divmod(int(k), n)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(n)
        return self.dataset.get(int(self._perm[offset]), np.random.default_rng([self.seed, 1, int(k)]))

    def loader(self, batch_size: int, start: int, workers: int = 0) -> torch.utils.data.DataLoader:
        """Batches of positions ``start, start + 1, ...`` (one step = ``batch_size`` positions).

        The loader gets its own generator: it draws a worker seed from it on every ``iter()``,
        which must not move the global RNG that training (and its exact resume) depends on."""
        return torch.utils.data.DataLoader(self, batch_size=batch_size, sampler=range(start, len(self)),
                                           num_workers=workers, persistent_workers=workers > 0,
                                           generator=torch.Generator().manual_seed(self.seed))
