"""A shape the demo model never saw: five-pointed stars in the built-in data's scenes, to teach it one.

Star scenes are drawn as the built-in ones (``ldm.data.shapes``: colours, sizes, grid positions,
backgrounds, jitter, caption templates) with the shape a ``"star"``. ``write_star_folder`` writes
``n`` of them, plus ``replay`` ordinary scenes of the built-in training stream (so a fine-tune keeps
seeing the old shapes), as an image folder that ``train_unet --data`` reads. ``star_prompts`` draws
held-out star prompts from another stream, none with the (colour, size, position, background) of a
training star, to be read back with ``read_attributes(image, SHAPES + NEW_SHAPES)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.shapes import (BACKGROUNDS, COLOURS, TEMPLATES, WHERE, ShapesDataset, render, sample_attributes,
                             scene_box, shape_coverage)

STAR = "star"
STAR_STREAM, PROMPT_STREAM = 101, 102  # seeds of the training stars and of the held-out prompts
COMBO = ("colour", "size", "position", "background")


def star_attributes(rng: np.random.Generator) -> dict:
    return {**sample_attributes(rng), "shape": STAR}


def star_caption(attrs: dict, template: int | None = None) -> str:
    t = TEMPLATES[attrs.get("template", 0) if template is None else template]
    return t.format(size=attrs["size"], colour=attrs["colour"], shape=attrs["shape"],
                    where=WHERE[attrs["position"]], position=attrs["position"], background=attrs["background"])


def render_star(attrs: dict, resolution: int = 32) -> np.ndarray:
    """(H, W, 3) uint8, anti-aliased as ``render`` draws the built-in shapes."""
    alpha = shape_coverage(STAR, *scene_box(attrs), resolution)[..., None]  # (H, W, 1)
    fg = np.asarray(COLOURS[attrs["colour"]], np.float32)
    bg = np.asarray(BACKGROUNDS[attrs["background"]], np.float32)
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)


def training_stars(n: int, seed: int = 0) -> list[dict]:
    return [star_attributes(np.random.default_rng([seed, STAR_STREAM, i])) for i in range(n)]


def write_star_folder(out: str | Path, n: int, resolution: int = 32, replay: int = 0, seed: int = 0) -> Path:
    """``n`` star scenes and ``replay`` built-in training scenes as PNGs with ``metadata.jsonl``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, attrs in enumerate(training_stars(n, seed)):
        Image.fromarray(render_star(attrs, resolution)).save(out / f"star_{i:04d}.png")
        rows.append({"file_name": f"star_{i:04d}.png", "text": star_caption(attrs)})
    old = ShapesDataset(resolution, seed=seed)
    for i in range(replay):
        Image.fromarray(render(old.attributes(i), resolution)).save(out / f"old_{i:05d}.png")
        rows.append({"file_name": f"old_{i:05d}.png", "text": old[i]["text"]})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def star_prompts(n: int, train_n: int, seed: int = 0) -> list[tuple[dict, str]]:
    """``n`` held-out (attributes, caption) star prompts: no (colour, size, position, background) of the
    first ``train_n`` training stars."""
    seen = {tuple(a[k] for k in COMBO) for a in training_stars(train_n, seed)}
    out, i = [], 0
    while len(out) < n:
        attrs = star_attributes(np.random.default_rng([seed, PROMPT_STREAM, i]))
        i += 1
        if tuple(attrs[k] for k in COMBO) not in seen:
            out.append((attrs, star_caption(attrs)))
    return out
