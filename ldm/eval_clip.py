"""`python -m ldm.eval_clip`: how well a CLIP ties images to captions, on held-out data.

    python -m ldm.eval_clip --clip runs/clip                   # zero-shot attributes + recall, held-out shapes
    python -m ldm.eval_clip --clip runs/clip-noisy --t 0 --t 300 --t 600   # a noise-aware CLIP at three noise levels
    python -m ldm.eval_clip --clip PATH/clip-vit                # a transformers CLIPModel folder
    python -m ldm.eval_clip --clip runs/clip-folder --data DIR  # recall on an image folder's held-out tenth
    python -m ldm.eval_clip --clip runs/clip --json clip.json

Zero-shot attribute accuracy (built-in shapes): each held-out image is classified, one attribute at a
time, by its cosine with a text embedding per attribute value, two ways: "ensemble" averages the
embeddings of 48 full captions that set the value (the rest random), "single" embeds one short
prompt ("a red shape", "a shape in the top left"). Recall: among held-out pairs with distinct
attribute combinations, t2i@k is the share of captions whose image ranks in the top k of all the
images, i2t@k the other way. The held-out images come from combinations training never saw
(``ldm.clip_training``). A noise-aware CLIP reads the images' VAE latents noised to ``--t``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ldm.checkpoint import save_json
from ldm.clip import load_clip
from ldm.clip_training import (ClipTrainConfig, features_of, heldout_scenes, load_pairs, recall, render_scenes,
                               zero_shot)
from ldm.data import VOCABULARY, caption
from ldm.diffusion import NoiseSchedule
from ldm.errors import InputError, command_main
from ldm.trainer import check_positive

DEFAULT_ZERO_SHOT_N = 1000  # held-out images classified zero-shot


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.eval_clip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--clip", default="runs/clip", metavar="DIR",
                   help="train_clip's folder or a transformers CLIPModel folder (default runs/clip)")
    p.add_argument("--vae", default=None, metavar="DIR", help="a noise-aware CLIP's VAE (default: clip.json's)")
    p.add_argument("--data", default=None, metavar="DIR", help="score recall on this image folder's held-out tenth")
    p.add_argument("--n", type=int, default=DEFAULT_ZERO_SHOT_N,
                   help=f"held-out images classified zero-shot (default {DEFAULT_ZERO_SHOT_N})")
    p.add_argument("--recall-n", type=int, default=500,
                   help="held-out pairs ranked for recall, at most one per attribute combination (default 500: "
                        "all there are, about 160)")
    p.add_argument("--t", type=int, action="append", default=None, metavar="T",
                   help="a noise-aware CLIP: score at this timestep (repeatable; default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent noise (default 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the scores as JSON")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    return p


def run(args: argparse.Namespace) -> int:
    if args.n <= 0 or args.recall_n < 2:
        raise InputError("--n must be positive and --recall-n at least 2")
    check_positive(args, ("threads",))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clip = load_clip(args.clip)
    vae = schedule = None
    steps = args.t or [0]
    if getattr(clip, "noise_aware", False):
        from ldm.pretrained import load_vae

        vae_dir = args.vae or clip.meta.get("vae")
        if not vae_dir:
            raise InputError(f"{args.clip}/clip.json records no VAE for its noise-aware CLIP; pass --vae DIR")
        try:
            vae, _ = load_vae(vae_dir)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"--vae: {e}") from None
        vae.eval()
        schedule = NoiseSchedule.from_name(clip.meta.get("schedule", "linear"))
        bad = [t for t in steps if not 0 <= t < schedule.num_timesteps]
        if bad:
            raise InputError(f"--t {bad[0]}: timesteps lie in 0..{schedule.num_timesteps - 1}")
    elif args.t:
        raise InputError(f"--t: {args.clip} is not noise-aware; it reads clean images only")
    resolution = vae.resolution if vae is not None else (32 if clip.config.in_channels != 3 else
                                                         (clip.config.resolution if args.data else 32))
    results = {"clip": str(args.clip), "runs": []}
    if args.data is None:
        scenes = heldout_scenes(args.n)
        pairs = heldout_scenes(args.recall_n, distinct=True)
        images, pair_images = render_scenes(scenes, resolution), render_scenes(pairs, resolution)
        pair_texts = [caption(a) for a in pairs]
    else:
        _, _, pair_images, pair_texts, _ = load_pairs(ClipTrainConfig(data=args.data, resolution=resolution))
        pair_images, pair_texts = pair_images[:args.recall_n], pair_texts[:args.recall_n]
        if len(pair_texts) < 2:
            raise InputError(f"--data {args.data}: fewer than 2 held-out images to rank")
        scenes = images = None
    text = clip.encode_text(pair_texts)
    header = " ".join(f"{a:>10}" for a in VOCABULARY)
    for t in steps:
        row = {"t": t}
        if scenes is not None:
            feats = features_of(clip, images, t, vae, schedule, args.seed)
            row["zero_shot"] = zero_shot(clip, feats, scenes, ensemble=True)
            row["zero_shot_single"] = zero_shot(clip, feats, scenes, ensemble=False)
            print(f"t={t}: zero-shot on {len(scenes)} held-out images  | {header} | mean")
            for name in ("zero_shot", "zero_shot_single"):
                z = row[name]
                label = "ensemble" if name == "zero_shot" else "single prompt"
                print(f"  {label:>40} | " + " ".join(f"{100 * z[a]:>9.1f}%" for a in VOCABULARY)
                      + f" | {100 * z['mean']:.1f}%")
        row["recall"] = recall(features_of(clip, pair_images, t, vae, schedule, args.seed), text)
        print(f"t={t}: recall on {len(pair_texts)} held-out pairs: "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in row["recall"].items()))
        results["runs"].append(row)
    if args.json:
        save_json(results, args.json, sort_keys=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("eval_clip", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
