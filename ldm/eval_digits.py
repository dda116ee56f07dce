"""`python -m ldm.eval_digits`: does a model trained on the real handwritten digits draw the digit it is asked for?

    python -m ldm.eval_digits --unet runs/digits-unet                  # 100 images of each digit
    python -m ldm.eval_digits --unet runs/digits-unet --n 50 --cfg 2 --json scores.json --grid digits.png

A digit reader (a tiny CNN, ``ldm.digits_eval.DigitReader``) is trained in seconds on the train split
of the digits only and its accuracy on the held-out split is reported first. Then ``--n`` images of
each digit are drawn (by class label from a class-conditional UNet, ``--data digits --class-cond``;
by prompts in wording no training caption uses from a text-conditional one) and read back: the share
read as the asked digit, overall and per digit. Last, the Fréchet distance in the reader's feature
space between the generated and the held-out real digits, beside its floor, the distance from as many
real train digits to the same held-out ones. A shell over ``ldm.digits_eval`` and ``ldm.pipeline``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ldm.checkpoint import save_json
from ldm.data.digits import NUM_CLASSES
from ldm.digits_eval import (DEFAULT_PER_DIGIT, READER_EPOCHS, evaluate_digits, labelled_grid, real_reference,
                             train_reader)
from ldm.distributed import resolve_device
from ldm.errors import InputError, command_main
from ldm.pipeline import load_pipeline
from ldm.samplers import SAMPLERS
from ldm.trainer import check_positive

GRID_PER_ROW = 10  # images of each digit in the grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.eval_digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--unet", default="runs/digits-unet", metavar="DIR",
                   help="train_unet's output folder, trained with --data digits (default runs/digits-unet)")
    p.add_argument("--vae", default=None, metavar="DIR", help="VAE folder (default: the one unet.json records)")
    p.add_argument("--text-encoder", default=None, metavar="PATH",
                   help="text encoder folder (default: the one unet.json records)")
    p.add_argument("--n", type=int, default=DEFAULT_PER_DIGIT,
                   help=f"images of each digit (default {DEFAULT_PER_DIGIT})")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="default: unet.json's")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: unet.json's)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale, 1 = none (default: unet.json's)")
    p.add_argument("--seed", type=int, default=0, help="image k starts from noise of seed + k (default 0)")
    p.add_argument("--batch-size", type=int, default=100, help="images per sampler run (default 100)")
    p.add_argument("--reader-epochs", type=int, default=READER_EPOCHS,
                   help=f"epochs of the digit reader over the train split (default {READER_EPOCHS})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: every core)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the scores as JSON")
    p.add_argument("--grid", default=None, metavar="PATH",
                   help=f"also write a PNG: a row per digit, labelled, {GRID_PER_ROW} images each")
    p.add_argument("--progress", action="store_true", help="show the sampler's progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    check_positive(args, ("n", "batch_size", "steps", "reader_epochs", "threads"))
    if args.cfg is not None and not args.cfg >= 0:
        raise InputError(f"--cfg must be >= 0 (1: no guidance), got {args.cfg}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    pipe = load_pipeline(args.unet, args.vae, args.text_encoder, device)
    json_path = Path(args.unet) / "unet.json"
    if pipe.num_classes is None and not pipe.conditional:
        raise InputError(f"{json_path} describes an unconditional UNet; eval_digits asks for digits by class "
                         "label or prompt")
    if pipe.num_classes not in (None, NUM_CLASSES):
        raise InputError(f"{json_path} draws {pipe.num_classes} classes; the digits are {NUM_CLASSES}")
    if pipe.resolution % 8:
        raise InputError(f"{json_path}: {pipe.resolution}-px images cannot be read as 8 x 8 digits "
                         "(a multiple of 8 is needed)")
    reader = train_reader(pipe.resolution, epochs=args.reader_epochs)
    reference = real_reference(reader, pipe.resolution, n=args.n)
    print(f"digit reader: {100 * reference['accuracy']:.1f}% of the {reference['n']} held-out real digits "
          f"(trained on the train split only, {args.reader_epochs} epochs)")
    steps = args.steps or pipe.defaults.steps
    sampler = args.sampler or pipe.defaults.sampler
    cfg = args.cfg if args.cfg is not None else pipe.defaults.cfg
    r = evaluate_digits(pipe, reader, reference, args.n, sampler=sampler, steps=steps, cfg=cfg, seed=args.seed,
                        batch_size=args.batch_size, progress=args.progress, return_images=bool(args.grid))
    print(f"generated ({r['mode']}-conditional, {sampler} {steps} steps, cfg {cfg}, {args.n} per digit): "
          f"{100 * r['accuracy']:.1f}% read as the asked digit")
    print("  per digit: " + "  ".join(f"{d}: {100 * a:.0f}%" for d, a in enumerate(r["per_digit"])))
    print(f"Fréchet distance to the held-out digits: {r['fd']:.2f}; real train digits: {r['fd_floor']:.2f} "
          f"(floor); ratio {r['fd_ratio']:.2f}")
    if args.grid:
        R = pipe.resolution
        images = r.pop("images").view(NUM_CLASSES, args.n, 3, R, R)[:, :GRID_PER_ROW]  # (10, k, 3, R, R)
        per_row = images.shape[1]
        grid = labelled_grid(images.reshape(-1, *images.shape[2:]), per_row, [str(d) for d in range(NUM_CLASSES)],
                             scale=max(1, 64 // pipe.resolution))
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.grid)
        print(f"eval_digits: wrote {args.grid}", file=sys.stderr)
    if args.json:
        reader_scores = {k: v for k, v in reference.items() if k != "features"}
        save_json({"unet": str(args.unet), "reader": reader_scores, "generated": r}, args.json, sort_keys=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("eval_digits", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
