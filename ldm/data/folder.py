"""Image folders with captions, stored the way people already store them.

Two conventions, picked by what the folder holds:
- imagefolder: a ``metadata.jsonl`` at the root, one JSON object a line with ``file_name`` (a path
  relative to the root) and a caption column (``text`` unless told otherwise);
- sidecar captions: every image, anywhere below the root, with its caption in a ``.txt`` of the same
  stem beside it (``cat.png`` + ``cat.txt``).

PNG, JPEG and WebP in any mode (RGBA on white, L, P, CMYK, 16-bit grey scaled to 8 bits...) become
RGB; each image is resized so its short side is the training resolution, then centre- or randomly
cropped square. Random horizontal flips are off by default: captions say "left" and "right".

Every image is decoded once when the folder is scanned (JPEGs at a reduced scale, which is cheap): a
file that cannot be opened or decoded, a truncated JPEG included, is dropped with its caption, and all
such files are named and counted in one warning. No item ever stands in for another. An image without
a caption gets the empty caption (also counted in one warning). Captions are UTF-8: a caption file or
``metadata.jsonl`` that is not stops with an error naming the file and where. An empty folder, or a
caption column that no row of ``metadata.jsonl`` has, stops with an error that names the path.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldm.data.shapes import to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METADATA = "metadata.jsonl"
CROPS = ("center", "random")


WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit grey PNGs open as one of these
WIDE_GREY_MAX = 65535  # scaled to 255: convert("RGB") alone would clip every value above 255 to white


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white, 16-bit grey is scaled to 8 bits."""
    if img.mode in WIDE_GREY_MODES:
        wide = np.asarray(img, dtype=np.float64)  # (H, W) in 0..65535
        grey = np.clip(np.round(wide * (255 / WIDE_GREY_MAX)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_crop(img: Image.Image, resolution: int, crop: str = "center",
                rng: np.random.Generator | None = None) -> Image.Image:
    """Scale so the short side is ``resolution`` (Lanczos), then crop a square (centre or random)."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.LANCZOS, reducing_gap=3.0)
    if crop == "random":
        rng = rng if rng is not None else np.random.default_rng()
        left, top = int(rng.integers(nw - resolution + 1)), int(rng.integers(nh - resolution + 1))
    else:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _decodable(path: Path, resolution: int) -> bool:
    """True when the whole image decodes. A JPEG decodes at the smallest DCT scale that still covers
    ``resolution`` (draft mode), which is cheap; a truncated file fails here, not in training."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (resolution, resolution))  # a no-op for formats other than JPEG
            img.load()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def read_text_utf8(path: Path) -> str:
    """A caption file's text; a ValueError names the file and the byte where it stops being UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r}); "
                         "save it as UTF-8") from None


class FolderDataset(torch.utils.data.Dataset):
    """Captioned images in ``root``; item ``i`` is ``{"image": (3, R, R) in [-1, 1], "text": str}``."""

    name = "folder"

    def __init__(self, root: str | Path, resolution: int, caption_column: str = "text",
                 crop: str = "center", flip: bool = False, seed: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder not found: {self.root}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        self.resolution, self.caption_column, self.crop, self.flip, self.seed = (
            resolution, caption_column, crop, flip, seed)
        meta = self.root / METADATA
        entries = self._scan_metadata(meta) if meta.is_file() else self._scan_sidecars()
        if not entries:
            raise ValueError(f"no images (PNG, JPEG, WebP) found in {self.root}")
        self.files, self.captions, self.skipped = [], [], []
        for path, text in entries:
            if _decodable(path, resolution):
                self.files.append(path)
                self.captions.append(text)
            else:
                self.skipped.append(path)
        if self.skipped:
            names = ", ".join(p.name for p in self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            warnings.warn(f"{self.root}: skipped {len(self.skipped)} unreadable image file(s): {names}", stacklevel=2)
        if not self.files:
            raise ValueError(f"none of the {len(entries)} image files in {self.root} could be read")
        uncaptioned = sum(c == "" for c in self.captions)
        if uncaptioned:
            warnings.warn(f"{self.root}: {uncaptioned} of {len(self.files)} images have no caption; "
                          "they get the empty caption", stacklevel=2)

    def _scan_metadata(self, meta: Path) -> list[tuple[Path, str]]:
        rows = []
        for n, line in enumerate(read_text_utf8(meta).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta}, line {n}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise ValueError(f"{meta}, line {n}: a row needs a 'file_name' entry")
            rows.append(row)
        if rows and not any(self.caption_column in r for r in rows):
            columns = sorted({k for r in rows for k in r if k != "file_name"})
            raise ValueError(f"{meta}: no row has the caption column {self.caption_column!r} "
                             f"(columns found: {columns})")
        entries = []
        for row in rows:
            path = self.root / row["file_name"]
            if path.suffix.lower() in IMAGE_SUFFIXES:
                entries.append((path, str(row.get(self.caption_column) or "").strip()))
        return entries

    def _scan_sidecars(self) -> list[tuple[Path, str]]:
        entries = []
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            txt = path.with_suffix(".txt")
            entries.append((path, read_text_utf8(txt).strip() if txt.is_file() else ""))
        return entries

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, i: int, rng: np.random.Generator | None = None) -> Image.Image:
        """Image ``i`` as an RGB PIL image at the training resolution (cropped and maybe flipped)."""
        with Image.open(self.files[i]) as img:
            img.load()
            img = resize_crop(to_rgb(img), self.resolution, self.crop, rng)
        if self.flip and rng is not None and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return img

    def get(self, i: int, rng: np.random.Generator | None = None) -> dict:
        """Item ``i``; ``rng`` draws the random crop and flip (a fixed generator per (seed, i) when None).

        Every file decoded when the folder was scanned; one that fails now was changed since, and is an
        error naming it (another item never stands in: its caption would go with the wrong image)."""
        rng = rng if rng is not None else np.random.default_rng([self.seed, i])
        try:
            arr = np.asarray(self.load_image(i, rng))  # (R, R, 3) uint8
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"{self.files[i]} no longer decodes ({e}); it did when {self.root} was scanned") from None
        return {"image": to_tensor(arr.copy()), "text": self.captions[i]}

    def __getitem__(self, i: int) -> dict:
        return self.get(i)

    def describe(self) -> dict:
        return {"name": self.name, "root": str(self.root), "images": len(self.files),
                "skipped": len(self.skipped), "resolution": self.resolution,
                "caption_column": self.caption_column, "crop": self.crop, "flip": self.flip}
