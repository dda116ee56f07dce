"""Draw docs/diversity.png: K samples of one held-out prompt per row, for the data and the four models of the
CLIP / unCLIP table, each row labelled with its distinct images and mean pairwise distance (ldm.diversity).

    python docs/diversity_figure.py --unet runs/unet --uncond runs/uncond --guide-clip runs/clip-noisy \
        --decoder runs/decoder --prior runs/prior --out docs/diversity.png

Rows, for each of the first --prompts held-out prompts of ldm.eval_text: K fresh renders of the prompt's
attributes (the data), the text UNet (CFG 2), + CLIP guidance 10, the unconditional UNet + CLIP guidance 100,
unCLIP (prior + decoder); UniPC 20 steps, seed 0, sample k from starting noise k.
"""

from __future__ import annotations

import argparse
import textwrap

import numpy as np
import torch

from ldm.clip import load_clip
from ldm.clip_guidance import clip_guide
from ldm.data import eval_prompts
from ldm.diversity import DATA_SEED, jitter_median, renders, shapes_diversity
from ldm.metrics import PROMPT_SEED
from ldm.pipeline import Pipeline, generate
from ldm.runlog import labelled_rows
from ldm.unclip import load_prior
from ldm.unclip_decoder import generate_unclip, load_decoder

LABEL_CHARS = 50  # characters a label line holds in labelled_rows' 330-px column


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    for flag in ("--unet", "--uncond", "--guide-clip", "--decoder", "--prior"):
        p.add_argument(flag, required=True)
    p.add_argument("--scale", type=float, default=100.0, help="CLIP guidance of the unconditional UNet")
    p.add_argument("--text-scale", type=float, default=10.0, help="CLIP guidance of the text UNet")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--out", default="docs/diversity.png")
    a = p.parse_args()
    torch.set_num_threads(1)
    pairs = eval_prompts(a.prompts, PROMPT_SEED)
    texts, attributes = [t for _, t in pairs], [at for at, _ in pairs]
    kw = dict(n=a.k, steps=20, sampler="unipc", cfg=2.0, seed=0)
    text, uncond = Pipeline.from_pretrained(a.unet), Pipeline.from_pretrained(a.uncond)
    noisy = load_clip(a.guide_clip)
    guide = lambda pipe, s: clip_guide(noisy, texts, s, pipe.schedule, pipe.latent_shape, "cpu")  # noqa: E731
    decoder, clip = load_decoder(a.decoder, text=True)
    data = torch.cat([renders(at, a.k, text.resolution, np.random.default_rng([DATA_SEED, i]))
                      for i, at in enumerate(attributes)]).float() * 2 - 1  # (P * k, 3, H, W)
    models = [
        ("data: fresh renders", data),
        ("text UNet (CFG 2)", generate(text, texts, **kw)),
        (f"text UNet + CLIP guidance {a.text_scale:g}", generate(text, texts, guide=guide(text, a.text_scale), **kw)),
        (f"uncond. UNet + CLIP guidance {a.scale:g}", generate(uncond, texts, guide=guide(uncond, a.scale), **kw)),
        ("unCLIP: prior + decoder", generate_unclip(decoder, clip, load_prior(a.prior)[0], texts, **kw)),
    ]
    median = jitter_median(attributes, text.resolution)
    rows, labels = [], []
    for i, prompt in enumerate(texts):
        for name, images in models:
            mine = images[i * a.k:(i + 1) * a.k]  # (k, 3, H, W) in [-1, 1]
            r = shapes_diversity(((mine.double() + 1) / 2)[None], median[i:i + 1])
            rows.append(mine)
            labels.append(f"{name}: {r['distinct_per_prompt'][0]} distinct of {a.k},\n"
                          f"{r['relative_distance']:.2f} x the data's jitter apart\n"
                          + "\n".join(textwrap.wrap(prompt, LABEL_CHARS)))
    labelled_rows(torch.cat(rows), labels, scale=3).save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
