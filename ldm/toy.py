"""`python -m ldm.toy`: diffusion on 2-D toy data, trained in seconds on one CPU thread, every sampler compared.

    python -m ldm.toy                                      # swiss roll, 3000 steps, into runs/toy
    python -m ldm.toy --data moons --out runs/toy-moons
    python -m ldm.toy --data gaussians8 --prediction eps --steps 5000 --seed 1
    python -m ldm.toy --samplers ddim dpmpp_2m --sampler-steps 5 10 20 100

An MLP (``ldm.toy2d.MLPDenoiser``) trained with the same loss, schedules and prediction targets as
the UNet, sampled with the same samplers. It writes into --out:

    toy.gif        the samples over training, beside the data (one frame a snapshot)
    samplers.png   every sampler (columns) at each --sampler-steps (rows), same starting noise
    curves.png     the training loss and the snapshots' energy distance
    metrics.json   the energy distance at each snapshot and for each sampler, the noise floor, times

The score is the energy distance (V-statistic) of --n samples to --n fresh data points; the noise
floor is the same statistic between two independent draws of the data (its mean and 95th percentile
over 20 pairs): a model that scores below it cannot be told from the data at this --n. A shell over
``ldm.toy2d``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ldm.diffusion import PREDICTIONS, SCHEDULES
from ldm.errors import InputError
from ldm.pretrained import DEFAULT_STEPS
from ldm.runlog import plot_curves, save_gif
from ldm.samplers import SAMPLERS
from ldm.toy2d import DATASETS, EVAL_SEED, ToyConfig, draw_data, noise_floor, sampler_figure, snapshot_frame, train

DEFAULTS = ToyConfig()
SAMPLER_STEPS = (10, DEFAULT_STEPS, 50)


class _Parser(argparse.ArgumentParser):
    """Bad flags are one line, ``toy: error: ...``, exit status 2 (as every error of this command)."""

    def error(self, message):
        print(f"toy: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ldm.toy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                allow_abbrev=False)
    p.add_argument("--data", choices=list(DATASETS), default=DEFAULTS.dataset,
                   help=f"the 2-D dataset (default {DEFAULTS.dataset})")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps,
                   help=f"optimizer steps, each on a fresh batch (default {DEFAULTS.steps})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help=f"(default {DEFAULTS.batch_size})")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help=f"AdamW learning rate (default {DEFAULTS.lr})")
    p.add_argument("--width", type=int, default=DEFAULTS.width, help=f"MLP width (default {DEFAULTS.width})")
    p.add_argument("--depth", type=int, default=DEFAULTS.depth,
                   help=f"MLP residual blocks (default {DEFAULTS.depth})")
    p.add_argument("--prediction", choices=PREDICTIONS, default=DEFAULTS.prediction,
                   help=f"what the MLP predicts (default {DEFAULTS.prediction})")
    p.add_argument("--schedule", choices=list(SCHEDULES), default=DEFAULTS.schedule,
                   help=f"noise schedule, 1000 steps (default {DEFAULTS.schedule})")
    p.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=list(SAMPLERS), metavar="NAME",
                   help=f"samplers to compare, of {', '.join(SAMPLERS)} (default: all)")
    p.add_argument("--sampler-steps", nargs="+", type=int, default=list(SAMPLER_STEPS), metavar="N",
                   help=f"step counts of the comparison, one row each (default {' '.join(map(str, SAMPLER_STEPS))})")
    p.add_argument("--snapshots", type=int, default=DEFAULTS.snapshots,
                   help=f"GIF frames over training, after step 0 (default {DEFAULTS.snapshots})")
    p.add_argument("--n", type=int, default=DEFAULTS.snapshot_n,
                   help=f"points drawn and scored per panel (default {DEFAULTS.snapshot_n})")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help=f"(default {DEFAULTS.seed})")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch (default 1)")
    p.add_argument("--out", default="runs/toy", help="output folder (default runs/toy)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for flag in ("steps", "batch_size", "width", "depth", "n", "threads"):
            if getattr(args, flag) <= 0:
                raise InputError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
        if args.n < 2:
            raise InputError(f"--n must be at least 2, got {args.n}")
        if min(args.sampler_steps) <= 0:
            raise InputError(f"--sampler-steps must be positive, got {min(args.sampler_steps)}")
        if args.snapshots < 1:
            raise InputError(f"--snapshots must be positive, got {args.snapshots}")
        config = ToyConfig(dataset=args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           width=args.width, depth=args.depth, prediction=args.prediction, schedule=args.schedule,
                           seed=args.seed, snapshots=args.snapshots, snapshot_n=args.n).check()
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file, not a folder")
    except InputError as e:
        print(f"toy: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = draw_data(config.dataset, config.snapshot_n, EVAL_SEED + config.seed)  # the snapshots' eval data
    frames, labels = [], []

    def on_snapshot(step: int, points: torch.Tensor, energy: float) -> None:
        frames.append(snapshot_frame(data, points, f"samples, step {step}\nenergy {energy:.4f}"))
        labels.append(f"{config.dataset}  step {step}/{config.steps}  {config.snapshot_sampler} "
                      f"{config.snapshot_steps} steps")
        print(f"step {step:>6}  energy {energy:.4f}", file=sys.stderr)

    try:
        model, history = train(config, on_snapshot)
    except InputError as e:  # the loss became NaN: nothing is written
        print(f"toy: error: {e}", file=sys.stderr)
        return 2
    times = history.pop()
    floor = noise_floor(config.dataset, config.snapshot_n, config.seed)
    figure, rows = sampler_figure(model, config.dataset, args.samplers, args.sampler_steps, config.snapshot_n,
                                  config.seed, floor=floor)
    out.mkdir(parents=True, exist_ok=True)
    save_gif(frames, out / "toy.gif", duration_ms=300, labels=labels)
    figure.save(out / "samplers.png")
    plot_curves([r for r in history if r["step"] > 0], ["loss", "energy"], out / "curves.png",  # untrained: ~100
                title=f"{config.dataset}: training loss, energy distance of the snapshots")
    metrics = {"config": dataclasses.asdict(config), "threads": args.threads,
               "train_seconds": round(times["train_seconds"], 2),
               "snapshot_seconds": round(times["snapshot_seconds"], 2),
               "total_seconds": round(time.perf_counter() - t_start, 2),
               "noise_floor": floor, "final_energy": [r for r in history if "energy" in r][-1]["energy"],
               "snapshots": [r for r in history if "energy" in r], "samplers": rows}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")

    print(f"{config.dataset}: {config.steps} steps of {config.batch_size} in {times['train_seconds']:.1f} s "
          f"({args.threads} thread{'s' * (args.threads > 1)}), energy distance at {config.snapshot_n} points")
    print(f"noise floor (two data draws): mean {floor['mean']:.4f}, 95th percentile {floor['p95']:.4f}")
    print(f"final snapshot ({config.snapshot_sampler}, {config.snapshot_steps} steps): {metrics['final_energy']:.4f}")
    print(f"{'sampler':<12}" + "".join(f"{k:>10} st" for k in args.sampler_steps))
    for name in args.samplers:
        print(f"{name:<12}" + "".join(f"{r['energy']:>13.4f}" for r in rows if r["sampler"] == name))
    print(f"wrote {out}/toy.gif, samplers.png, curves.png, metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
