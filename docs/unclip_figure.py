"""Draw docs/unclip.png: the unCLIP decoder through the prior (a row per held-out prompt) and its variations
(a row per held-out scene: the source render first, then new images of its CLIP embedding).

    python docs/unclip_figure.py --decoder runs/decoder --prior runs/prior --out docs/unclip.png

Prompts and scenes are the first held-out ones of ldm.eval_text, written on the left of each row; every
image of a row comes from its own prior sample (prompt rows) or its own starting noise (variation rows).
"""

from __future__ import annotations

import argparse
import textwrap

import torch

from ldm.data import eval_prompts
from ldm.data.shapes import render, to_tensor
from ldm.runlog import labelled_rows
from ldm.unclip import load_prior
from ldm.unclip_decoder import generate_unclip, load_decoder, variations

LABEL_CHARS = 50  # characters a label line holds in labelled_rows' 330-px column


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--decoder", required=True)
    p.add_argument("--prior", required=True)
    p.add_argument("--rows", type=int, default=4, help="prompts, and as many scenes")
    p.add_argument("--n", type=int, default=6, help="images a row")
    p.add_argument("--out", default="docs/unclip.png")
    a = p.parse_args()
    torch.set_num_threads(1)
    pipe, clip = load_decoder(a.decoder, text=True)
    pairs = eval_prompts(2 * a.rows)
    prompts = [t for _, t in pairs[:a.rows]]
    drawn = generate_unclip(pipe, clip, load_prior(a.prior)[0], prompts, n=a.n + 1, steps=20, sampler="unipc",
                            cfg=pipe.defaults.cfg)  # (rows * (n + 1), 3, H, W)
    scenes = [at for at, _ in pairs[a.rows:]]
    sources = torch.stack([to_tensor(render(at, pipe.resolution)) for at in scenes])  # (rows, 3, H, W)
    var = variations(pipe, clip, sources, n=a.n, steps=20, sampler="unipc", cfg=pipe.defaults.cfg)
    var_rows = torch.cat([torch.cat([s[None], var[i * a.n:(i + 1) * a.n]]) for i, s in enumerate(sources)])
    wrap = lambda t: "\n".join(textwrap.wrap(t, LABEL_CHARS))  # noqa: E731
    labels = ([f"prior + decoder:\n{wrap(t)}" for t in prompts]
              + [f"the source, then its variations:\n{wrap(t)}" for _, t in pairs[a.rows:]])
    labelled_rows(torch.cat([drawn, var_rows]), labels, scale=3).save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
