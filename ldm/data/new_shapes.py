"""Shapes the demo model never saw (``NEW_SHAPES``: a star, a heart) in the built-in data's scenes, to teach it one.

New-shape scenes are drawn as the built-in ones (``ldm.data.shapes``: colours, sizes, grid positions,
backgrounds, jitter, caption templates) with the shape one of ``NEW_SHAPES``. ``write_shape_folder``
writes ``n`` of them, plus ``replay`` ordinary scenes of the built-in training stream (so a fine-tune
keeps seeing the old shapes), as an image folder that ``train_unet --data`` reads. ``held_out_prompts``
draws held-out prompts of the shape from another stream, none with the (colour, size, position,
background) of a taught scene, to be read back with ``read_attributes(image, reader_shapes(shape))``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.shapes import (BACKGROUNDS, COLOURS, NEW_SHAPES, SHAPES, TEMPLATES, WHERE, ShapesDataset, render,
                             sample_attributes, scene_box, shape_coverage)

DEMO_SHAPE = "heart"  # the CPU demo's: the demo VAE gives back 200 of 200 hearts, 20 of 200 stars (README)
# the demo's folder: scenes of the new shape (the issue asks for 20-50), and old scenes replayed beside them
DEMO_TAUGHT, DEMO_REPLAY = 40, 200
TRAIN_STREAM, PROMPT_STREAM = 101, 102  # seeds of the taught scenes and of the held-out prompts
COMBO = ("colour", "size", "position", "background")


def check_shape(shape: str) -> None:
    if shape not in NEW_SHAPES:
        raise ValueError(f"unknown new shape {shape!r}; expected one of {NEW_SHAPES}")


def reader_shapes(shape: str) -> tuple[str, ...]:
    """The shapes the reader tells apart when scoring a model taught ``shape``: the old four and it."""
    check_shape(shape)
    return SHAPES + (shape,)


def new_attributes(rng: np.random.Generator, shape: str) -> dict:
    return {**sample_attributes(rng), "shape": shape}


def new_caption(attrs: dict, template: int | None = None) -> str:
    t = TEMPLATES[attrs.get("template", 0) if template is None else template]
    return t.format(size=attrs["size"], colour=attrs["colour"], shape=attrs["shape"],
                    where=WHERE[attrs["position"]], position=attrs["position"], background=attrs["background"])


def render_new(attrs: dict, resolution: int = 32) -> np.ndarray:
    """(H, W, 3) uint8, anti-aliased as ``render`` draws the built-in shapes."""
    check_shape(attrs["shape"])
    alpha = shape_coverage(attrs["shape"], *scene_box(attrs), resolution)[..., None]  # (H, W, 1)
    fg = np.asarray(COLOURS[attrs["colour"]], np.float32)
    bg = np.asarray(BACKGROUNDS[attrs["background"]], np.float32)
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)


def training_scenes(n: int, shape: str, seed: int = 0) -> list[dict]:
    """The ``n`` taught scenes of ``shape``: the same colours, sizes, positions and backgrounds whatever the shape."""
    check_shape(shape)
    return [new_attributes(np.random.default_rng([seed, TRAIN_STREAM, i]), shape) for i in range(n)]


def write_shape_folder(out: str | Path, n: int, shape: str, resolution: int = 32, replay: int = 0,
                       seed: int = 0) -> Path:
    """``n`` scenes of ``shape`` and ``replay`` built-in training scenes as PNGs with ``metadata.jsonl``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, attrs in enumerate(training_scenes(n, shape, seed)):
        Image.fromarray(render_new(attrs, resolution)).save(out / f"{shape}_{i:04d}.png")
        rows.append({"file_name": f"{shape}_{i:04d}.png", "text": new_caption(attrs)})
    old = ShapesDataset(resolution, seed=seed)
    for i in range(replay):
        Image.fromarray(render(old.attributes(i), resolution)).save(out / f"old_{i:05d}.png")
        rows.append({"file_name": f"old_{i:05d}.png", "text": old[i]["text"]})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def held_out_prompts(n: int, train_n: int, shape: str, seed: int = 0) -> list[tuple[dict, str]]:
    """``n`` held-out (attributes, caption) prompts of ``shape``: no (colour, size, position, background)
    of the first ``train_n`` taught scenes."""
    seen = {tuple(a[k] for k in COMBO) for a in training_scenes(train_n, shape, seed)}
    out, i = [], 0
    while len(out) < n:
        attrs = new_attributes(np.random.default_rng([seed, PROMPT_STREAM, i]), shape)
        i += 1
        if tuple(attrs[k] for k in COMBO) not in seen:
            out.append((attrs, new_caption(attrs)))
    return out
