"""`python -m ldm.eval_text`: does a text-to-image model draw what its prompts say? Scored on the built-in shapes.

    python -m ldm.eval_text                                       # runs/unet, 200 held-out prompts, DPM++ 20 steps
    python -m ldm.eval_text --sampler dpmpp_2m:20 --sampler ddpm:1000    # the two samplers on the same prompts
    python -m ldm.eval_text --n 500 --cfg 4 --json scores.json --grid samples.png
    python -m ldm.eval_text --clip runs/clip      # also the CLIP score: cosine of image and prompt embeddings
    python -m ldm.eval_text --unet runs/uncond --guide-clip runs/clip-noisy --clip-guidance 30 --clip runs/clip
    python -m ldm.eval_text --split "held-out wording" --split noisy   # two of the four splits
    python -m ldm.eval_text --decoder runs/decoder --prior runs/prior       # unCLIP: prior + decoder
    python -m ldm.eval_text --decoder runs/decoder --variations            # variations keep the source's attributes
    python -m ldm.eval_text --split in-distribution --diversity 8          # + distinct images of 8 per prompt

Four splits of prompts (``ldm.data.wording.split_prompts``), each on its own line, all scenes from the
held-out image stream: "in-distribution" (the training templates, combinations seen in training),
"held-out wording" (eval-only synonyms and sentence frames), "held-out combinations" (the (shape,
colour, position) triples the training split never renders, in the templates) and "noisy" (training
words with eval-only style phrases, requests, second sentences, other clause orders, capitals,
punctuation). One image per prompt, read back with the dataset's own attribute
reader (``read_attributes``); the scoring is ``ldm.metrics.evaluate_prompts``. Reported: the share
of images whose shape, colour, size, position
and background match the prompt, each on its own; the headline "shape+colour+position" (all
three right in the same image); and "all" five. ``--sampler NAME:STEPS`` may repeat: every run
uses the same prompts and the same starting noise, so the rows differ by the sampler only.
``--diversity K`` also draws K samples of each of the first ``--diversity-prompts`` held-out prompts
and reports how many distinct images each gets and how far apart they lie, beside K fresh renders of
the data (``ldm.diversity``; the first --sampler; with --guide-clip guided, with --decoder through
the prior or as variations).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm import diversity, unclip_decoder
from ldm.checkpoint import save_json
from ldm.data.wording import EVAL_SPLITS, split_prompts
from ldm.distributed import resolve_device
from ldm.errors import InputError, command_main
from ldm.metrics import ATTRIBUTES, DEFAULT_N, HEADLINE, evaluate_prompts
from ldm.pipeline import generate, load_pipeline
from ldm.pretrained import DEFAULT_SAMPLER, DEFAULT_STEPS
from ldm.prompt_sheet import prompt_sheet, sheet_rows
from ldm.runlog import image_grid
from ldm.samplers import SAMPLERS

SHEET_PER_SPLIT = 3  # images of each split on the --sheet picture


def parse_run(text: str, steps: int) -> tuple[str, int]:
    name, _, count = text.partition(":")
    if name not in SAMPLERS:
        raise InputError(f"--sampler {text!r}: unknown sampler {name!r}; expected one of {list(SAMPLERS)}")
    try:
        count = int(count) if count else steps
    except ValueError:
        raise InputError(f"--sampler {text!r}: steps must be an integer (NAME:STEPS)") from None
    if count <= 0:
        raise InputError(f"--sampler {text!r}: steps must be positive")
    return name, count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.eval_text", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--unet", default="runs/unet", metavar="DIR", help="train_unet's output folder (default runs/unet)")
    p.add_argument("--vae", default=None, metavar="DIR", help="VAE folder (default: the one unet.json records)")
    p.add_argument("--text-encoder", default=None, metavar="PATH",
                   help="text encoder folder (default: the one unet.json records)")
    p.add_argument("--n", type=int, default=DEFAULT_N,
                   help=f"prompts per split, one image each (default {DEFAULT_N})")
    p.add_argument("--split", action="append", default=None, choices=EVAL_SPLITS, metavar="NAME",
                   help=f"prompt split to score; repeat for several (default: all of {', '.join(EVAL_SPLITS)})")
    p.add_argument("--sampler", action="append", default=None, metavar="NAME[:STEPS]",
                   help=f"sampler and steps; repeat to compare on the same prompts and noise "
                        f"(default {DEFAULT_SAMPLER}:{DEFAULT_STEPS}; names: {', '.join(SAMPLERS)})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"steps of a --sampler given without :STEPS (default {DEFAULT_STEPS})")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: unet.json's)")
    p.add_argument("--seed", type=int, default=0, help="image k starts from noise of seed + k (default 0)")
    p.add_argument("--batch-size", type=int, default=100, help="images per sampler run (default 100)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the scores as JSON to PATH")
    p.add_argument("--grid", default=None, metavar="PATH", help="also write the first run's images as a grid PNG")
    p.add_argument("--sheet", default=None, metavar="PATH",
                   help=f"also write a labelled PNG: the first {SHEET_PER_SPLIT} images of each split beside their "
                        "prompts and what the reader saw")
    p.add_argument("--progress", action="store_true", help="show the sampler's progress bar")
    p.add_argument("--clip", default=None, metavar="DIR",
                   help="also report the CLIP score (mean cosine of image and prompt) with this CLIP "
                        "(train_clip's folder or a transformers CLIPModel folder)")
    p.add_argument("--guide-clip", default=None, metavar="DIR",
                   help="sample with CLIP guidance by this noise-aware CLIP (train_clip --vae); then an "
                        "unconditional UNet can be scored too")
    p.add_argument("--clip-guidance", type=float, default=10.0, metavar="S",
                   help="with --guide-clip: the guidance scale (default 10)")
    unclip_decoder.add_eval_arguments(p)
    diversity.add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    diversity.check_args(args)
    if args.decoder or args.prior or args.variations:
        return unclip_decoder.run_eval(args)
    if args.n <= 0 or args.batch_size <= 0 or args.steps <= 0:
        raise InputError("--n, --batch-size and --steps must be positive")
    runs = [parse_run(r, args.steps) for r in (args.sampler or [f"{DEFAULT_SAMPLER}:{DEFAULT_STEPS}"])]
    if args.cfg is not None and args.cfg < 0:
        raise InputError(f"--cfg must be >= 0 (1: no guidance), got {args.cfg}")
    device = resolve_device(args.device)
    unclip_decoder.refuse_as_unet(args.unet)
    pipe = load_pipeline(args.unet, args.vae, args.text_encoder, device)
    guide_clip = None
    if args.guide_clip is not None:
        from ldm.clip import load_clip
        from ldm.clip_guidance import clip_guide

        if args.clip_guidance < 0:
            raise InputError(f"--clip-guidance must be >= 0, got {args.clip_guidance}")
        guide_clip = load_clip(args.guide_clip, device)
    if not pipe.conditional and guide_clip is None:
        raise InputError(f"{Path(args.unet) / 'unet.json'} describes an unconditional UNet; "
                          "eval_text scores text-conditional models (or CLIP-guided ones: --guide-clip)")
    cfg = args.cfg if args.cfg is not None else pipe.defaults.cfg
    clip = None
    if args.clip is not None:
        from ldm.clip import clip_score, load_clip

        clip = load_clip(args.clip, device)
        if getattr(clip, "noise_aware", False):
            raise InputError(f"--clip {args.clip}: a noise-aware CLIP reads latents; the CLIP score needs one "
                             "of pixels (train_clip without --vae)")
    splits = list(dict.fromkeys(args.split or EVAL_SPLITS))
    results, sheet = [], []
    print(f"{'split':>21} {'sampler':>10} {'steps':>5} | " + " ".join(f"{a:>10}" for a in ATTRIBUTES)
          + f" | {HEADLINE:>21} {'all':>6} | seconds")
    for split in splits:
        pairs = split_prompts(split, args.n)
        texts = [t for _, t in pairs]
        guide = None if guide_clip is None else clip_guide(guide_clip, texts, args.clip_guidance, pipe.schedule,
                                                           pipe.latent_shape, device)  # steers to this split's prompts
        for k, (sampler, steps) in enumerate(runs):
            first = not results
            r = evaluate_prompts(pipe, args.n, sampler=sampler, steps=steps, cfg=cfg, seed=args.seed,
                                 batch_size=args.batch_size, progress=args.progress,
                                 return_images=first or (k == 0 and args.sheet is not None) or clip is not None,
                                 pairs=pairs, guide=guide)
            if clip is not None:
                r["clip_score"] = clip_score(clip, r["images"], texts).mean().item()
            if first and args.grid:
                image_grid(r["images"], nrow=20).save(args.grid)
            if k == 0 and args.sheet:
                sheet += sheet_rows(split, r["images"][:SHEET_PER_SPLIT], pairs[:SHEET_PER_SPLIT])
            r.pop("images", None)
            results.append({"split": split, **r})
            print(f"{split:>21} {sampler:>10} {steps:>5} | " + " ".join(f"{100 * r[a]:>9.1f}%" for a in ATTRIBUTES)
                  + f" | {100 * r[HEADLINE]:>20.1f}% {100 * r['all']:>5.1f}% | {r['seconds']:.1f}"
                  + (f" | CLIP score {r['clip_score']:.4f}" if "clip_score" in r else ""))
    guided = f", CLIP guidance {args.clip_guidance} by {args.guide_clip}" if guide_clip is not None else ""
    print(f"{args.n} prompts per split of the built-in shapes, cfg {cfg}, seed {args.seed}, model {args.unet}{guided}")
    spread = None
    if args.diversity:  # K samples of eval_text's first P held-out prompts, with the first --sampler
        def draw(pairs, k):
            texts = [t for _, t in pairs]
            guide = None if guide_clip is None else clip_guide(guide_clip, texts, args.clip_guidance, pipe.schedule,
                                                               pipe.latent_shape, device)
            return generate(pipe, texts, n=k, sampler=runs[0][0], steps=runs[0][1], cfg=cfg, seed=args.seed,
                            batch_size=args.batch_size, progress=args.progress,
                            **({"guide": guide} if guide is not None else {}))

        spread = diversity.evaluate_diversity(draw, args.diversity_prompts, args.diversity, diversity.vae_codec(pipe))
        print(diversity.report(spread, "the model"))
    if args.sheet:
        Path(args.sheet).parent.mkdir(parents=True, exist_ok=True)
        prompt_sheet(sheet).save(args.sheet)
    if args.json:
        save_json({"unet": str(args.unet), "runs": results, **({"diversity": spread} if spread else {})}, args.json,
                  sort_keys=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("eval_text", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
