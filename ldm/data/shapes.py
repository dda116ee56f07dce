"""The built-in captioned dataset: one anti-aliased shape on a plain background, and its reader.

Every image shows one shape (4 kinds) of one colour (6), in one of 2 sizes, at one cell of a
3 x 3 grid, on one of 4 background colours, never the shape's own colour; the caption states all
five attributes in one of several templates ("a small red circle in the top left on a blue
background"). Positions and sizes carry a small jitter, so no two items are the same image, yet
the grid cell stays unambiguous. Geometry is in fractions of the image side, so any resolution
renders the same scene; the default 32 x 32 is what the CPU demo trains on.

Item ``i`` of ``(seed, split)`` is drawn from its own ``numpy`` generator seeded with
``(seed, split, i)``: the same image and caption whatever the worker, batch or order. The
``"eval"`` split draws from a different stream than ``"train"``, so held-out images are new.

``read_attributes(image)`` inverts ``render``: background from the border, shape colour from the
pixels farthest from it, a soft coverage map by projecting every pixel onto the background->shape
colour line, then the grid cell, the shape (nearest rendered template at the same area and
centroid) and the size. It also judges generated images, so it only assumes what the data
guarantees: one shape, a plain background.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # RGB, far apart from each other and from every background they may lie on
    "red": (215, 35, 35),
    "orange": (250, 135, 0),
    "yellow": (245, 225, 30),
    "green": (35, 170, 55),
    "blue": (40, 90, 230),
    "purple": (150, 55, 200),
}
BACKGROUNDS = {
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "blue": COLOURS["blue"],  # a blue shape never lies on it
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right",
             "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # row-major over the 3 x 3 grid
WHERE = {  # how a caption says each position
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
VOCABULARY = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "position": POSITIONS,
              "background": tuple(BACKGROUNDS)}
TEMPLATES = (
    "a {size} {colour} {shape} {where} on a {background} background",
    "{size} {colour} {shape}, {where}, {background} background",
    "a {background} background with a {size} {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where} of the image, on {background}",
    "a picture of a {colour} {shape}, {size}, {where}, over a {background} background",
    "{where}: a {size} {colour} {shape} on {background}",
)

# Geometry, in fractions of the image side.
CELL_CENTRES = (0.24, 0.5, 0.76)  # x (column) and y (row) of the three grid lines
SIZE_FRACTION = {"small": 0.28, "large": 0.42}  # side of the bounding box; see the note below
JITTER_POSITION = 0.025  # the centre moves up to this much along each axis
JITTER_SCALE = 0.08  # the side is scaled by up to 1 +- this
CROSS_ARM = 1 / 3  # arm thickness of the cross, as a fraction of its side
SUPERSAMPLE = 8  # samples per pixel along each axis when rendering coverage
SPLITS = {"train": 0, "eval": 1}
CAPTION_STYLES = ("templates", "varied", "varied-drop")  # ShapesDataset(captions=...): see ldm.data.wording
CAPTION_STREAM = 7  # item i's varied caption draws from (seed, split, i, CAPTION_STREAM), apart from its scene
# The held-out combinations (ldm.data.wording documents the rule): a training scene whose (shape, colour,
# position) has index sum % HELD_OUT_MODULUS == HELD_OUT_RESIDUE is redrawn, so it is never rendered.
HELD_OUT_MODULUS, HELD_OUT_RESIDUE = 9, 4
# Why these sizes: at 32 x 32 a shape must outlast a factor-4 autoencoder, whose latent pixel is
# 4 x 4 image pixels. With small = 0.22 (7 px, a cross's arms 2.3 px) the demo VAE gave back a
# readable small cross in 10 of 50 held-out images and a small square in 35 of 50 (large shapes:
# all); at 0.28 (9 px, arms 3 px): 46 of 50 small crosses and every other shape (99% of 400).
# The grid lines sit at 0.24 / 0.76 so a large, jittered shape in an outer cell stays inside the image.

# Fraction of the bounding box each shape covers, and how far its centroid lies below the
# box centre (in sides): what the reader needs to go from a coverage map to a box.
# Shapes the built-in data never draws, for teaching a trained model something new (ldm.data.new_shapes):
# a five-pointed star, outer radius half the side, the inner vertices at the pentagram's ratio; and a
# heart, a square standing on a corner with a half-disc on each upper edge (side a, so its area is
# a^2 + pi a^2 / 4), as wide as the box and centred in it vertically (it is 0.914 of the box high).
NEW_SHAPES = ("star", "heart")
STAR_INNER = (3 - math.sqrt(5)) / 2  # inner / outer radius of a regular pentagram, 0.382
HEART_SIDE = 1 / (1 + math.sqrt(0.5))  # the heart's square side, in box sides: its width is a (1 + 1/sqrt 2)
HEART_HEIGHT = HEART_SIDE * (1.5 * math.sqrt(0.5) + 0.5)  # top of the lobes to the point: a (3 / (2 sqrt 2) + 1/2)
HEART_CENTRE = 0.5 - HEART_HEIGHT / 2  # the square's centre below the box's; its lobes reach half a side above it
_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 1 - 4 * ((1 - CROSS_ARM) / 2) ** 2,
         "star": 5 * STAR_INNER * math.sin(math.pi / 5) / 4,  # ten triangles of sides R, r R, angle 36 degrees
         "heart": HEART_SIDE ** 2 * (1 + math.pi / 4)}
# The heart's centroid: the square's centre, lifted by the two half-discs, whose centroids lie 4 r / (3 pi)
# (r = a / 2) beyond their edges' midpoints, which are a / (2 sqrt 2) above the square's centre.
_HEART_LIFT = (HEART_SIDE * math.sqrt(0.5) * (0.5 + 2 / (3 * math.pi)) * (math.pi / 4) / (1 + math.pi / 4))
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "cross": 0.0, "star": 0.0,
                  "heart": HEART_CENTRE - _HEART_LIFT}


# ---------------------------------------------------------------- attributes and captions
def sample_jitter(rng: np.random.Generator) -> dict:
    """The renderer's jitter of one scene: {"dx", "dy", "scale"}, drawn in that order."""
    return {"dx": float(rng.uniform(-JITTER_POSITION, JITTER_POSITION)),
            "dy": float(rng.uniform(-JITTER_POSITION, JITTER_POSITION)),
            "scale": float(rng.uniform(1 - JITTER_SCALE, 1 + JITTER_SCALE))}


def sample_attributes(rng: np.random.Generator) -> dict:
    """Draw one scene: uniform over shapes, sizes, positions and allowed (colour, background) pairs."""
    pairs = [(c, b) for c in COLOURS for b in BACKGROUNDS if COLOURS[c] != BACKGROUNDS[b]]
    colour, background = pairs[rng.integers(len(pairs))]
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": colour,
        "size": SIZES[rng.integers(len(SIZES))],
        "position": POSITIONS[rng.integers(len(POSITIONS))],
        "background": background,
        **sample_jitter(rng),  # drawn here, between the background and the template, as always
        "template": int(rng.integers(len(TEMPLATES))),
    }


def check_attributes(attrs: dict) -> None:
    """Raise a ValueError naming the first attribute outside the vocabulary."""
    for key, allowed in VOCABULARY.items():
        if attrs.get(key) not in allowed:
            raise ValueError(f"attribute {key}={attrs.get(key)!r} is not one of {allowed}")
    if COLOURS[attrs["colour"]] == BACKGROUNDS[attrs["background"]]:
        raise ValueError(f"a {attrs['colour']} shape cannot lie on a {attrs['background']} background")


def caption(attrs: dict, template: int | str | None = None) -> str:
    """The caption of a scene. ``template``: an index into ``TEMPLATES``, a format string with
    fields {size} {colour} {shape} {where} {position} {background}, or None for the scene's own
    ``attrs["template"]`` (template 0 when it has none)."""
    check_attributes(attrs)
    if template is None:
        template = attrs.get("template", 0)
    if isinstance(template, int):
        template = TEMPLATES[template]
    text = template.format(size=attrs["size"], colour=attrs["colour"], shape=attrs["shape"],
                           where=WHERE[attrs["position"]], position=attrs["position"],
                           background=attrs["background"])
    return text[0].lower() + text[1:] if text else text


def held_out(attrs: dict) -> bool:
    """True for the (shape, colour, position) combinations the training split never renders."""
    total = SHAPES.index(attrs["shape"]) + list(COLOURS).index(attrs["colour"]) + POSITIONS.index(attrs["position"])
    return total % HELD_OUT_MODULUS == HELD_OUT_RESIDUE


# ---------------------------------------------------------------- rendering
def _grid(resolution: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample points in image fractions: x (1, W*s) and y (H*s, 1), at sub-pixel centres."""
    t = (np.arange(resolution * supersample) + 0.5) / (resolution * supersample)
    return t[None, :], t[:, None]


def shape_coverage(shape: str, cx: float, cy: float, side: float, resolution: int,
                   supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel the shape covers, (H, W) float32 in [0, 1]. ``cx, cy, side`` are
    the centre and side of its square bounding box, in fractions of the image side."""
    x, y = _grid(resolution, supersample)
    u, v, h = x - cx, y - cy, side / 2  # offsets from the centre, half side
    if shape == "circle":
        inside = u * u + v * v <= h * h
    elif shape == "square":
        inside = (np.abs(u) <= h) & (np.abs(v) <= h)
    elif shape == "triangle":  # apex up, base at the bottom of the box
        inside = (v <= h) & (np.abs(u) <= (v + h) / 2)
    elif shape == "cross":
        arm = side * CROSS_ARM / 2
        inside = ((np.abs(u) <= arm) & (np.abs(v) <= h)) | ((np.abs(v) <= arm) & (np.abs(u) <= h))
    elif shape == "star":  # point up; even-odd rule over the ten edges
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, h, h * STAR_INNER)
        px, py = radii * np.cos(angles), radii * np.sin(angles)  # (10,) vertices
        inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        for i in range(10):
            x1, y1, x2, y2 = px[i], py[i], px[(i + 1) % 10], py[(i + 1) % 10]
            crosses = (y1 > v) != (y2 > v)
            inside ^= crosses & (u < x1 + (v - y1) * (x2 - x1) / (y2 - y1 + 1e-30))
    elif shape == "heart":  # point down; the square's half-diagonal d, its centre HEART_CENTRE sides below the box's
        side_a = HEART_SIDE * side
        d, yc = side_a * math.sqrt(0.5), HEART_CENTRE * side
        w = v - yc  # offsets from the square's centre
        square = np.abs(u) + np.abs(w) <= d
        lobes = [((u - sx * d / 2) ** 2 + (w + d / 2) ** 2 <= (side_a / 2) ** 2) & (w - sx * u <= -d)
                 for sx in (-1, 1)]  # each half-disc: within a / 2 of its edge's midpoint, beyond the edge
        inside = square | lobes[0] | lobes[1]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + NEW_SHAPES}")
    n = resolution
    return inside.reshape(n, supersample, n, supersample).mean(axis=(1, 3), dtype=np.float32)


def scene_box(attrs: dict) -> tuple[float, float, float]:
    """Centre x, centre y and side of the shape's bounding box, in fractions of the image side."""
    row, col = divmod(POSITIONS.index(attrs["position"]), 3)
    side = SIZE_FRACTION[attrs["size"]] * attrs.get("scale", 1.0)
    return CELL_CENTRES[col] + attrs.get("dx", 0.0), CELL_CENTRES[row] + attrs.get("dy", 0.0), side


def render(attrs: dict, resolution: int = 32) -> np.ndarray:
    """Draw a scene: (H, W, 3) uint8, the shape anti-aliased by its exact pixel coverage."""
    check_attributes(attrs)
    alpha = shape_coverage(attrs["shape"], *scene_box(attrs), resolution)[..., None]  # (H, W, 1)
    fg = np.asarray(COLOURS[attrs["colour"]], np.float32)
    bg = np.asarray(BACKGROUNDS[attrs["background"]], np.float32)
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1], the range every model here takes."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------- the dataset
class ShapesDataset(torch.utils.data.Dataset):
    """``length`` procedurally drawn scenes; item ``i`` is ``{"image": (3, H, W) in [-1, 1], "text": str}``.

    Deterministic by ``(seed, split, i)``. ``split="eval"`` is the held-out stream. ``holdout`` (default:
    True for the training split) redraws the scenes ``held_out`` names; ``captions="varied"`` writes each
    item's caption with ``ldm.data.wording.varied_caption`` instead of the scene's template."""

    name = "shapes"

    def __init__(self, resolution: int = 32, length: int = 50_000, seed: int = 0, split: str = "train",
                 captions: str = "templates", holdout: bool | None = None):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
        if resolution < 8:
            raise ValueError(f"resolution {resolution} is too small to draw a shape (at least 8)")
        if captions not in CAPTION_STYLES:
            raise ValueError(f"unknown caption style {captions!r}; expected one of {CAPTION_STYLES}")
        self.resolution, self.length, self.seed, self.split = resolution, length, seed, split
        self.caption_style, self.holdout = captions, split == "train" if holdout is None else holdout

    def __len__(self) -> int:
        return self.length

    def attributes(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"item {i} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        attrs = sample_attributes(rng)
        while self.holdout and held_out(attrs):  # redrawn from the same stream: still one scene per index
            attrs = sample_attributes(rng)
        return attrs

    def caption(self, i: int, attrs: dict | None = None) -> str:
        """Item ``i``'s caption (``attrs``: its scene, when already drawn)."""
        attrs = self.attributes(i) if attrs is None else attrs
        if self.caption_style == "templates":
            return caption(attrs)
        from ldm.data.wording import varied_caption  # wording builds on this module

        rng = np.random.default_rng([self.seed, SPLITS[self.split], i, CAPTION_STREAM])
        return varied_caption(attrs, rng, drop=self.caption_style == "varied-drop")

    def __getitem__(self, i: int) -> dict:
        attrs = self.attributes(i)
        return {"image": to_tensor(render(attrs, self.resolution)), "text": self.caption(i, attrs)}

    def get(self, i: int, rng: np.random.Generator | None = None) -> dict:
        """Item ``i``; ``rng`` (augmentation randomness) is unused: the scenes take no augmentation."""
        return self[i]

    def describe(self) -> dict:
        out = {"name": self.name, "resolution": self.resolution, "length": self.length,
               "seed": self.seed, "split": self.split}
        if self.caption_style != "templates" or self.holdout:  # what earlier caches recorded stays as it was
            out.update(captions=self.caption_style, holdout=self.holdout)
        return out


def eval_prompts(n: int, seed: int = 0) -> list[tuple[dict, str]]:
    """``n`` held-out (attributes, caption) pairs, e.g. to score a text-to-image model."""
    ds = ShapesDataset(length=n, seed=seed, split="eval")
    return [(a, caption(a)) for a in (ds.attributes(i) for i in range(n))]


# ---------------------------------------------------------------- the reader
def _as_float_image(image) -> np.ndarray:
    """PIL image, (H, W, 3) uint8/float array or (3, H, W) tensor in [-1, 1] -> (H, W, 3) float in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"read_attributes: a tensor image must be (3, H, W), got {tuple(image.shape)}")
        return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"read_attributes: expected an (H, W, 3) image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _nearest(colour: np.ndarray, palette: dict, exclude: tuple = ()) -> str:
    names = [k for k in palette if palette[k] not in exclude]
    d = [np.sum((colour - np.asarray(palette[k], np.float32) / 255.0) ** 2) for k in names]
    return names[int(np.argmin(d))]


def _nearest_along(colour: np.ndarray, bg: np.ndarray, palette: dict, exclude: tuple) -> str:
    """The palette colour c whose mix ``bg + t (c - bg)``, t in [0.4, 1], comes nearest to ``colour``:
    a shape blurred into its background keeps its hue direction even where it loses saturation."""
    best, best_d = None, math.inf
    for name, rgb in palette.items():
        if rgb in exclude:
            continue
        line = np.asarray(rgb, np.float32) / 255.0 - bg
        t = np.clip((colour - bg) @ line / max(float(line @ line), 1e-6), 0.4, 1.0)
        d = float(np.sum((bg + t * line - colour) ** 2))
        if d < best_d:
            best, best_d = name, d
    return best


def _box_blur(a: np.ndarray) -> np.ndarray:
    """3 x 3 mean over the first two axes, edges replicated."""
    p = np.pad(a, [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    H, W = a.shape[:2]
    return sum(p[i:i + H, j:j + W] for i in range(3) for j in range(3)) / 9.0


@functools.lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix that blurs a length-n signal with a Gaussian of ``sigma`` pixels, edges replicated."""
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma * sigma))
    k /= k.sum()
    m = np.zeros((n, n), np.float32)
    for i in range(n):
        for j, w in zip(range(i - r, i + r + 1), k, strict=True):
            m[i, min(max(j, 0), n - 1)] += w
    return m


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a square (N, N) map; sigma in pixels (0: unchanged)."""
    if sigma <= 0:
        return a
    m = _blur_matrix(a.shape[0], round(sigma, 3))
    return m @ a @ m.T


def _cell(t: float) -> int:
    """Grid index (0, 1, 2) of a centre coordinate: the boundaries lie midway between cell centres."""
    return int(t >= (CELL_CENTRES[0] + CELL_CENTRES[1]) / 2) + int(t >= (CELL_CENTRES[1] + CELL_CENTRES[2]) / 2)


_BLURS = (0.0, 0.6, 1.0)  # template blurs tried by the reader, in pixels at 32 x 32
# half the side of the window the reader looks through: the largest shape, jittered, and a margin
_WINDOW = SIZE_FRACTION["large"] * (1 + JITTER_SCALE) / 2 + 0.06


def read_attributes(image, shapes: tuple[str, ...] = SHAPES) -> dict:
    """Recover ``shape``, ``colour``, ``position``, ``size`` and ``background`` from a scene image.

    Accepts a PIL image, an (H, W, 3) array (uint8, or float in [0, 1]) or a (3, H, W) tensor in
    [-1, 1], square. Also returns ``coverage``, the shape's area in fractions of the image (near 0
    when there is no shape). Noise is never thresholded away: the coverage map is signed, so
    background noise averages out of the area and the centroid, and it adds the same expected
    error to every template it is compared with."""
    img = _as_float_image(image)
    H, W, _ = img.shape
    if H != W:
        raise ValueError(f"read_attributes: expected a square image, got {H} x {W}")
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (4N, 3)
    bg = np.median(border, axis=0)
    background = _nearest(bg, BACKGROUNDS)
    smooth = _box_blur(img)  # (H, W, 3), noise / 3
    dist = np.linalg.norm(smooth - bg, axis=-1)  # (H, W)
    fg = np.median(smooth[dist >= 0.7 * dist.max()], axis=0)
    colour = _nearest_along(fg, bg, COLOURS, exclude=(BACKGROUNDS[background],))
    line = np.asarray(COLOURS[colour], np.float32) / 255.0 - bg
    alpha = (img - bg) @ line / float(line @ line)  # (H, W) signed coverage
    # look through a window around the brightest smoothed spot, then centre it on the centroid
    t = (np.arange(H) + 0.5) / H
    peak_y, peak_x = np.unravel_index(np.argmax(_box_blur(alpha)), alpha.shape)
    cx, cy = t[peak_x], t[peak_y]
    for _ in range(2):
        win = (np.abs(t[:, None] - cy) <= _WINDOW) & (np.abs(t[None, :] - cx) <= _WINDOW)  # (H, W)
        a = np.where(win, alpha, 0.0)
        mass = max(float(a.sum()), 1e-6)
        cx, cy = float(a.sum(0) @ t) / mass, float(a.sum(1) @ t) / mass
    area = mass / (H * W)
    best, best_err, best_box = None, math.inf, None
    for shape in shapes:  # SHAPES + NEW_SHAPES: the reader that knows the star too
        for f in (0.9, 1.0, 1.1):
            side = f * math.sqrt(area / _AREA[shape])
            box = (cx, cy - _CENTROID_DROP[shape] * side, side)
            template = shape_coverage(shape, *box, H, supersample=4)
            for sigma in _BLURS:  # decoded images are a little soft: compare with softened templates too
                err = float(np.sum(((_gaussian_blur(template, sigma * H / 32) - alpha) * win) ** 2))
                if err < best_err:
                    best, best_err, best_box = shape, err, box
    bx, by, side = best_box
    threshold = math.sqrt(SIZE_FRACTION["small"] * SIZE_FRACTION["large"])
    return {
        "shape": best,
        "colour": colour,
        "position": POSITIONS[3 * _cell(by) + _cell(bx)],
        "size": "large" if side >= threshold else "small",
        "background": background,
        "coverage": area,
    }
