"""`python -m ldm.eval_image2image`: score an image-conditioned model on held-out scenes, one report per task.

    python -m ldm.eval_image2image --unet runs/inpaint --task inpaint            # erase the shape, draw it again
    python -m ldm.eval_image2image --unet runs/palette --task outpaint --task colorize --task sr
    python -m ldm.eval_image2image --unet runs/palette --task sr --factor 2 --strip sr.png
    python -m ldm.eval_image2image --unet runs/unet --task inpaint --repaint     # RePaint with a plain text model
    python -m ldm.eval_image2image --unet runs/inpaint --task inpaint --json scores.json --n 500
    python -m ldm.eval_image2image --unet runs/unet --upscaler runs/sr64     # a cascade, read at every stage

The held-out scenes of the built-in shapes (``ldm.i2i_eval``): inpaint masks the shape's box and reads the
shape, colour and position drawn in it; outpaint masks a half; colorize reads the colour back from the
greyscale image's output; sr gives PSNR and SSIM against the true render beside bicubic. Masked tasks also
report the largest change of a kept pixel after compositing (0: identical) and the kept pixels' PSNR in
the raw output. ``--repaint`` scores a plain text model with RePaint (``ldm.repaint``) as the baseline.
``--upscaler DIR`` (repeatable) scores a cascade instead: the text model's images of the held-out prompts
of ``ldm.eval_text`` and each upscaler's, the attributes read at every resolution.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.checkpoint import save_json
from ldm.distributed import resolve_device
from ldm.errors import InputError, command_main
from ldm.i2i_eval import cascade_strip, evaluate_cascade, evaluate_task, strip
from ldm.image2image import SAMPLE_AUG_LEVEL, SR_FACTORS, TASKS
from ldm.metrics import HEADLINE
from ldm.pipeline import Pipeline
from ldm.samplers import SAMPLERS
from ldm.trainer import check_positive

DEFAULT_N = 200


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.eval_image2image", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--unet", default="runs/inpaint", metavar="DIR", help="train_unet --task's folder "
                   "(or convert's; with --repaint a plain text model's) (default runs/inpaint)")
    p.add_argument("--task", action="append", choices=TASKS, default=[], help="the task to score (repeatable)")
    p.add_argument("--upscaler", action="append", default=[], metavar="DIR",
                   help="score a cascade: --unet's text-to-image samples refined by these sr models")
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"held-out scenes per task (default {DEFAULT_N})")
    p.add_argument("--factor", type=int, choices=SR_FACTORS, default=SR_FACTORS[-1],
                   help=f"sr: the low-res image is 1/factor of the side (default {SR_FACTORS[-1]})")
    p.add_argument("--noise-level", type=int, default=SAMPLE_AUG_LEVEL,
                   help=f"sr: noise-augmentation level of the low-res input (default {SAMPLE_AUG_LEVEL})")
    p.add_argument("--repaint", action="store_true", help="inpaint/outpaint a plain text model with RePaint")
    p.add_argument("--resample", type=int, default=None, help="--repaint: passes per step (default 2)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="default: unet.json's")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: unet.json's; --repaint 50)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: unet.json's)")
    p.add_argument("--seed", type=int, default=0, help="image k starts from noise of seed + k (default 0)")
    p.add_argument("--batch-size", type=int, default=50, help="images per sampler run (default 50)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the reports as JSON")
    p.add_argument("--strip", default=None, metavar="PNG",
                   help="also write a labelled picture of the first examples (one file per task: PNG gets -TASK)")
    return p


def run(args: argparse.Namespace) -> int:
    check_positive(args, ("n", "batch_size", "steps", "resample", "threads"))
    if bool(args.task) == bool(args.upscaler):
        raise InputError("give --task TASK (one or more) or --upscaler DIR (a cascade), not both or neither")
    if args.resample is not None and not args.repaint:
        raise InputError("--resample is a --repaint setting")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.unet, device=resolve_device(args.device))
    reports = []
    if args.upscaler:
        reports.append(run_cascade(args, pipe))
    for task in args.task:
        try:
            r = evaluate_task(pipe, task, args.n, factor=args.factor, steps=args.steps, sampler=args.sampler,
                              cfg=args.cfg, seed=args.seed, batch_size=args.batch_size, noise_level=args.noise_level,
                              repaint=args.repaint, repaint_resample=args.resample)
        except ValueError as e:
            raise InputError(str(e)) from None
        if args.strip:
            path = Path(args.strip)
            path = path if len(args.task) == 1 else path.with_name(f"{path.stem}-{task}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            strip(r).save(path)
        for key in ("images", "inputs", "masks", "outputs", "prompts"):
            r.pop(key)
        reports.append(r)
        read = r["read"]
        line = (f"{task}{' (RePaint)' if args.repaint else ''}: {HEADLINE} {100 * read[HEADLINE]:.1f}%, shape "
                f"{100 * read['shape']:.1f}%, colour {100 * read['colour']:.1f}%, "
                f"position {100 * read['position']:.1f}%, "
                f"background {100 * read['background']:.1f}%")
        if "kept_max_abs_diff" in r:
            line += (f"; kept pixels: max change {r['kept_max_abs_diff']:.3g} composited, "
                     f"{r['kept_psnr_raw']:.1f} dB raw")
        if task == "sr":
            line += (f"; x{r['factor']}: PSNR {r['psnr']:.2f} dB (bicubic {r['bicubic_psnr']:.2f}, bicubic made to "
                     f"agree with the input {r['bicubic_consistent_psnr']:.2f}; raw output {r['psnr_raw']:.2f}, "
                     f"read {100 * r['read_raw'][HEADLINE]:.1f}%), SSIM {r['ssim']:.4f} (bicubic "
                     f"{r['bicubic_ssim']:.4f}); bicubic read {100 * r['bicubic_read'][HEADLINE]:.1f}%")
        print(f"{line}; {r['n']} held-out scenes, {r['seconds']:.0f} s", flush=True)
    if args.json:
        save_json({"unet": str(args.unet), "reports": reports}, args.json, sort_keys=False)
    return 0


def run_cascade(args: argparse.Namespace, pipe: Pipeline) -> dict:
    ups = [Pipeline.from_pretrained(u, device=pipe.device) for u in args.upscaler]
    try:
        r = evaluate_cascade(pipe, ups, args.n, seed=args.seed, batch_size=args.batch_size,
                             noise_level=args.noise_level, steps=args.steps, cfg=args.cfg)
    except ValueError as e:
        raise InputError(str(e)) from None
    if args.strip:
        Path(args.strip).parent.mkdir(parents=True, exist_ok=True)
        cascade_strip(r).save(args.strip)
    r.pop("images")
    r.pop("prompts")
    stages = ", ".join(f"{s['resolution']} px {HEADLINE} {100 * s['read'][HEADLINE]:.1f}%" for s in r["stages"])
    print(f"cascade: {stages}; {r['n']} held-out prompts, {r['seconds']:.0f} s", flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    return command_main("eval_image2image", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
