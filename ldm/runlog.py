"""What a training run shows and leaves behind: progress bar, metrics JSONL, curve PNG, image grids."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm


class MetricsLog:
    """Append-only JSONL of dicts with a "step" key; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.read() if resume_step is not None else []
        kept = [r for r in rows if r.get("step", 0) <= resume_step] if resume_step is not None else []
        with open(self.path, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")

    def write(self, **row) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut short by a kill
                        pass
        return rows


def plot_curves(rows: list[dict], keys: list[str], path: str | Path, title: str = "",
                size: tuple[int, int] = (640, 400), log_y: bool = True) -> None:
    """Draw ``keys`` against "step" as a PNG line chart (Pillow only, no plotting library)."""
    W, H = size
    left, right, top, bottom = 64, 16, 28, 36
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    series = []
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None
               and math.isfinite(r[key]) and (r[key] > 0 or not log_y)]
        if pts:
            series.append((key, pts))
    draw.text((left, 6), title, fill="black")
    if not series:
        draw.text((left, H // 2), "no data yet", fill="black")
        img.save(path)
        return
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs = [x for _, pts in series for x, _ in pts]
    ys = [f(y) for _, pts in series for _, y in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (f(y) - y0) / (y1 - y0) * (H - top - bottom))

    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        yp = H - bottom - (H - top - bottom) * i / 4
        draw.line([left - 4, yp, left, yp], fill="black")
        label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
        draw.text((4, yp - 6), label, fill="black")
    draw.text((left, H - bottom + 6), f"step {x0}", fill="black")
    draw.text((W - right - 90, H - bottom + 6), f"step {x1}", fill="black")
    for i, (key, pts) in enumerate(series):
        c = colors[i % len(colors)]
        if len(pts) > 1:
            draw.line([px(x, y) for x, y in pts], fill=c, width=2)
        else:
            x, y = px(*pts[0])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
        draw.text((W - right - 150, top + 6 + 14 * i), key, fill=c)
    img.save(path)


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_grid(x: torch.Tensor, nrow: int = 8, pad: int = 2, scale: int = 1) -> Image.Image:
    """(N, 3, H, W) in [-1, 1] -> one PIL image, ``nrow`` images a row, optionally upscaled."""
    imgs = to_uint8_images(x)
    n, h, w, _ = imgs.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = imgs[i]
    img = Image.fromarray(grid.numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


LABEL_WIDTH = 330  # pixels of text before each labelled row: a caption of the built-in data fits


def labelled_rows(x: torch.Tensor, labels: list[str], scale: int = 2, pad: int = 2) -> Image.Image:
    """(R * n, 3, H, W) in [-1, 1], row-major, and R labels -> one PIL image, each row's label written
    to its left (a picture that says what it shows)."""
    n = len(x) // len(labels)
    rows = [image_grid(x[r * n:(r + 1) * n], nrow=n, pad=pad, scale=scale) for r in range(len(labels))]
    out = Image.new("RGB", (LABEL_WIDTH + rows[0].width, sum(r.height for r in rows)), "white")
    draw, y = ImageDraw.Draw(out), 0
    for label, row in zip(labels, rows):
        out.paste(row, (LABEL_WIDTH, y))
        draw.text((4, y + row.height // 2 - 6), label, fill="black")
        y += row.height
    return out


class Progress:
    """tqdm bar over training steps with loss and images/s; ETA comes from tqdm."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                        dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        self.t_last = time.perf_counter()
        self.images = 0

    def update(self, images: int, **postfix) -> float:
        """Advance one step that processed ``images``; returns the images/s since the last call."""
        now = time.perf_counter()
        rate = images / max(now - self.t_last, 1e-9)
        self.t_last = now
        self.images += images
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        shown["img/s"] = f"{rate:.1f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        return rate

    def close(self) -> None:
        self.bar.close()


def save_gif(frames: list, path: str | Path, duration_ms: int = 400, labels: list[str] | None = None) -> None:
    """An animated GIF of ``frames`` (PIL images or image files), looping, each shown ``duration_ms``;
    ``labels`` (one a frame, e.g. "step 200") are drawn in the top-left corner on a white strip."""
    if not frames:
        raise ValueError("save_gif: no frames")
    if labels is not None and len(labels) != len(frames):
        raise ValueError(f"save_gif: {len(labels)} labels for {len(frames)} frames")
    images = []
    for i, frame in enumerate(frames):
        img = (Image.open(frame) if isinstance(frame, (str, Path)) else frame).convert("RGB")
        if labels is not None:
            strip = Image.new("RGB", (img.width, 14), "white")
            ImageDraw.Draw(strip).text((2, 1), labels[i], fill="black")
            labelled = Image.new("RGB", (img.width, img.height + strip.height), "white")
            labelled.paste(strip, (0, 0))
            labelled.paste(img, (0, strip.height))
            img = labelled
        images.append(img)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
