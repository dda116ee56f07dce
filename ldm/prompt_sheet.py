"""A picture that labels itself: generated images beside their prompts, grouped by prompt split.

``prompt_sheet(rows)`` draws one line per image: the image (scaled up), the split, the prompt (wrapped)
and what the attribute reader saw in it, marked right or wrong. ``python -m ldm.eval_text --sheet PATH``
writes one from the first images of each split.
"""

from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw

from ldm.metrics import COMBINED, HEADLINE, score
from ldm.runlog import to_uint8_images

SCALE = 3  # image pixels per generated pixel: a 32 x 32 sample becomes 96 x 96
TEXT_WIDTH = 560  # pixels of text beside each image
CHARS_PER_LINE = 88  # PIL's default bitmap font is about 6 px a character
LINE_HEIGHT = 12
PAD = 4


def prompt_sheet(rows: list[dict]) -> Image.Image:
    """rows: {"image": (3, H, W) in [-1, 1], "split": str, "prompt": str, "read": str, "right": bool}
    -> an RGB image with one labelled line per row."""
    if not rows:
        raise ValueError("prompt_sheet: no rows to draw")
    images = to_uint8_images(torch.stack([r["image"] for r in rows]))  # (N, H, W, 3) uint8
    side = images.shape[1] * SCALE
    height = side + 2 * PAD
    sheet = Image.new("RGB", (side + TEXT_WIDTH + 3 * PAD, height * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (row, img) in enumerate(zip(rows, images, strict=True)):
        top = k * height + PAD
        sheet.paste(Image.fromarray(img.numpy()).resize((side, side), Image.NEAREST), (PAD, top))
        lines = [f"[{row['split']}]"] + textwrap.wrap(f'"{row["prompt"]}"', CHARS_PER_LINE)
        lines.append(("right: " if row["right"] else "WRONG, read: ") + row["read"])
        for j, line in enumerate(lines[: side // LINE_HEIGHT]):
            colour = "black" if j < len(lines) - 1 else ("darkgreen" if row["right"] else "red")
            draw.text((side + 2 * PAD, top + j * LINE_HEIGHT), line, fill=colour)
        if k:
            draw.line([(0, k * height), (sheet.width, k * height)], fill=(200, 200, 200))
    return sheet


def sheet_rows(split: str, images, pairs: list[tuple[dict, str]]) -> list[dict]:
    """``prompt_sheet`` rows: each image with its prompt and the reader's shape, colour and position."""
    _, seen = score(images, [a for a, _ in pairs])
    group = COMBINED[HEADLINE]
    return [{"image": img, "split": split, "prompt": text, "read": " ".join(s[a] for a in group),
             "right": all(s[a] == want[a] for a in group)}
            for img, (want, text), s in zip(images, pairs, seen, strict=True)]
