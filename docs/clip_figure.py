"""Draw docs/clip-guidance.png: held-out prompts (rows) x models (columns), each model from the same noise.

    python docs/clip_figure.py --unet runs/unet --uncond runs/uncond --guide-clip runs/clip-noisy \
        --scale 30 --text-scale 10 --out docs/clip-guidance.png

Columns: the text UNet (CFG 2), the text UNet + CLIP guidance, the unconditional UNet, the unconditional
UNet + CLIP guidance; two samples each (seeds 0 and 1). The prompts are the first held-out prompts of
ldm.eval_text, written on the left.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image, ImageDraw

from ldm.clip import load_clip
from ldm.clip_guidance import clip_guide
from ldm.data import eval_prompts
from ldm.pipeline import Pipeline, generate
from ldm.runlog import to_uint8_images

CELL = 96  # pixels a side of each image in the figure
LABEL_W = 330  # the prompt column
HEAD_H = 34  # the header row


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--unet", required=True)
    p.add_argument("--uncond", required=True)
    p.add_argument("--guide-clip", required=True)
    p.add_argument("--scale", type=float, default=30.0)
    p.add_argument("--text-scale", type=float, default=10.0)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--out", default="docs/clip-guidance.png")
    a = p.parse_args()
    torch.set_num_threads(1)
    prompts = [t for _, t in eval_prompts(a.prompts)]
    text, uncond = Pipeline.from_pretrained(a.unet), Pipeline.from_pretrained(a.uncond)
    clip = load_clip(a.guide_clip)
    columns = []
    for name, pipe, scale in (("text UNet", text, None), (f"+ CLIP guid. {a.text_scale:g}", text, a.text_scale),
                              ("uncond. UNet", uncond, None), (f"+ CLIP guid. {a.scale:g}", uncond, a.scale)):
        guide = None if scale is None else clip_guide(clip, prompts, scale, pipe.schedule, pipe.latent_shape, "cpu")
        images = generate(pipe, prompts if pipe.conditional or guide else None, n=2 if (pipe.conditional or guide)
                          else 2 * len(prompts), steps=20, sampler="unipc", cfg=2.0, seed=0, guide=guide)
        columns.append((name, to_uint8_images(images).numpy()))  # (P * 2, H, W, 3) prompt-major
    W = LABEL_W + len(columns) * 2 * CELL
    H = HEAD_H + len(prompts) * CELL
    fig = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(fig)
    for c, (name, arr) in enumerate(columns):
        draw.text((LABEL_W + c * 2 * CELL + 6, 10), name, fill="black")
        for r in range(len(prompts)):
            for k in range(2):
                img = Image.fromarray(arr[2 * r + k]).resize((CELL - 4, CELL - 4), Image.NEAREST)
                fig.paste(img, (LABEL_W + (2 * c + k) * CELL + 2, HEAD_H + r * CELL + 2))
    for r, prompt in enumerate(prompts):
        words, lines = prompt.split(), [""]
        for w in words:  # wrap the prompt to the label column
            lines[-1] = (lines[-1] + " " + w).strip() if len(lines[-1]) + len(w) < 50 else lines[-1]
            if not lines[-1].endswith(w):
                lines.append(w)
        draw.multiline_text((6, HEAD_H + r * CELL + 30), "\n".join(lines), fill="black")
    fig.save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
