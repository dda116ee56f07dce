"""`python -m ldm.teach_shape`: the fine-tuning demo on the CPU. Teach the demo model (``make demo``'s
runs/unet, which knows circles, squares, triangles and crosses) a shape it never saw, a heart, with LoRA.

    python -m ldm.teach_shape data --out runs/hearts                      # 40 captioned hearts + 200 old scenes
    python -m ldm.train_unet --text --init-from runs/unet --data runs/hearts --out runs/heart-lora \\
        --lora 8 --lora-targets attn+ff --lr 5e-3 --steps 600 --batch-size 32 --val-every 0 --threads 1
    python -m ldm.teach_shape eval --unet runs/heart-lora --base runs/unet --grid hearts.png

    python -m ldm.teach_shape vae --vae runs/vae           # which new shapes survive the VAE: hearts do, stars not

    # a star: the demo VAE decodes stars as blobs, so its decoder learns them first
    python -m ldm.teach_shape data --shape star --out runs/stars
    python -m ldm.teach_shape decoder --vae runs/vae --data runs/stars --out runs/star-vae
    python -m ldm.teach_shape eval --shape star --unet runs/star-lora

``vae`` renders held-out scenes of each new shape, encodes and decodes them with the VAE and reads them
back: a shape that does not survive the VAE cannot be sampled through it (the demo VAE keeps 200 of 200
hearts and 20 of 200 stars; ``decoder`` teaches it stars). ``data`` writes the scenes of the new shape
(``ldm.data.new_shapes``: the built-in scenes' colours, sizes, positions, backgrounds and caption
templates, with a heart or a star) and, with ``--replay``, ordinary scenes of the built-in training
stream, so the fine-tune keeps seeing the old shapes. ``eval`` samples held-out prompts of the shape (no
colour, size, position and background of a taught scene) and the 200 held-out prompts of ``eval_text``,
and reads them back with the attribute reader that knows the new shape too
(``ldm.metrics.evaluate_prompts``): the share drawn as the new shape, and the old prompts' score
beside the ``--base`` model's.
"""

from __future__ import annotations

import argparse
import sys

from ldm.checkpoint import save_json
from ldm.data.new_shapes import (DEMO_REPLAY, DEMO_SHAPE, DEMO_TAUGHT, held_out_prompts, reader_shapes,
                                 write_shape_folder)
from ldm.data.shapes import NEW_SHAPES
from ldm.distributed import resolve_device
from ldm.errors import InputError, command_main
from ldm.metrics import DEFAULT_N, HEADLINE, evaluate_prompts
from ldm.pipeline import load_pipeline
from ldm.runlog import labelled_rows

GRID_PROMPTS, GRID_N = 6, 6  # the picture: six new-shape prompts and two old ones, six samples each
GRID_SCALE = 3  # screen pixels per image pixel: a small heart is 9 pixels wide


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.teach_shape", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="write the captioned scenes of the new shape (and old ones) as an image folder",
                       allow_abbrev=False)
    d.add_argument("--shape", default=DEMO_SHAPE, choices=NEW_SHAPES, help=f"the new shape (default {DEMO_SHAPE})")
    d.add_argument("--out", required=True, help="the folder to write (PNGs and metadata.jsonl)")
    d.add_argument("--n", type=int, default=DEMO_TAUGHT, help=f"scenes of the new shape (default {DEMO_TAUGHT})")
    d.add_argument("--replay", type=int, default=DEMO_REPLAY,
                   help=f"old scenes of the built-in training stream (default {DEMO_REPLAY})")
    d.add_argument("--resolution", type=int, default=32, help="pixels (default 32, the demo's)")
    r = sub.add_parser("vae", help="how many held-out scenes of each new shape survive the VAE, read back",
                       allow_abbrev=False)
    r.add_argument("--vae", required=True, metavar="DIR", help="the demo's VAE (runs/vae) or a tuned one")
    r.add_argument("--shape", nargs="+", default=list(NEW_SHAPES), choices=NEW_SHAPES,
                   help="the new shapes to try (default: all)")
    r.add_argument("--n", type=int, default=DEFAULT_N, help=f"held-out scenes of each (default {DEFAULT_N})")
    r.add_argument("--taught", type=int, default=DEMO_TAUGHT,
                   help=f"taught scenes whose attributes the held-out ones avoid (default {DEMO_TAUGHT})")
    r.add_argument("--json", default=None, metavar="FILE", help="also write the counts as JSON")
    v = sub.add_parser("decoder", help="teach the VAE's decoder the new pictures (encoder frozen: same latents)",
                       allow_abbrev=False)
    v.add_argument("--vae", required=True, metavar="DIR", help="the demo's VAE (runs/vae)")
    v.add_argument("--data", required=True, metavar="DIR", help="the folder `data` wrote")
    v.add_argument("--out", required=True, metavar="DIR", help="where the tuned VAE goes")
    v.add_argument("--steps", type=int, default=800, help="steps (default 800)")
    v.add_argument("--batch-size", type=int, default=32, help="pictures a step (default 32)")
    v.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    v.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    e = sub.add_parser("eval", help="score the fine-tuned model on held-out prompts of the new shape and the old ones",
                       allow_abbrev=False)
    e.add_argument("--shape", default=DEMO_SHAPE, choices=NEW_SHAPES, help=f"the shape taught (default {DEMO_SHAPE})")
    e.add_argument("--unet", required=True, metavar="DIR", help="the fine-tuned model (train_unet --out)")
    e.add_argument("--base", default=None, metavar="DIR",
                   help="the model before fine-tuning, scored on the old prompts")
    e.add_argument("--n", type=int, default=DEFAULT_N, help=f"prompts of each kind (default {DEFAULT_N})")
    e.add_argument("--taught", type=int, default=DEMO_TAUGHT,
                   help=f"scenes of the shape the model was taught (data --n, default {DEMO_TAUGHT}): the held-out "
                        "prompts avoid their attributes")
    e.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    e.add_argument("--device", default="auto")
    e.add_argument("--grid", default=None, metavar="PNG", help="also draw a labelled picture of new and old prompts")
    e.add_argument("--json", default=None, metavar="FILE", help="also write the scores as JSON")
    return p


def summary(r: dict) -> dict:
    return {k: r[k] for k in ("n", "shape", "colour", "position", "size", HEADLINE, "all", "seconds")}


def vae_ceiling(args: argparse.Namespace) -> int:
    """``vae``: each new shape's held-out scenes and as many old ones, rendered, through the VAE, read back."""
    import torch

    from ldm.data.new_shapes import render_new
    from ldm.data.shapes import ShapesDataset, read_attributes, render, to_tensor
    from ldm.finetune import round_trip
    from ldm.pretrained import load_vae

    if args.taught < 0:
        raise InputError(f"--taught must be >= 0, got {args.taught}")
    try:
        vae, meta = load_vae(args.vae)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    res = meta["resolution"]
    old = ShapesDataset(res, seed=0, split="eval")
    old_attrs = [old.attributes(i) for i in range(args.n)]
    old_back = round_trip(vae, torch.stack([to_tensor(render(a, res)) for a in old_attrs]))  # (n, 3, H, W)
    result = {}
    for shape in args.shape:
        reader = reader_shapes(shape)
        attrs = [a for a, _ in held_out_prompts(args.n, args.taught, shape)]
        images = [render_new(a, res) for a in attrs]
        back = round_trip(vae, torch.stack([to_tensor(x) for x in images]))  # (n, 3, H, W)
        small = [a["size"] == "small" for a in attrs]
        read = [read_attributes(x, reader)["shape"] == shape for x in back]
        result[shape] = {"n": args.n, "rendered": sum(read_attributes(x, reader)["shape"] == shape for x in images),
                         "after_vae": sum(read), "small": sum(small),
                         "small_after_vae": sum(r and s for r, s in zip(read, small, strict=True)),
                         "old_after_vae": sum(read_attributes(x, reader)["shape"] == a["shape"]
                                              for x, a in zip(old_back, old_attrs, strict=True))}
        r = result[shape]
        print(f"teach_shape: {shape}: {r['after_vae']} of {args.n} held-out scenes read as a {shape} after {args.vae} "
              f"(small ones {r['small_after_vae']} of {r['small']}; rendered {r['rendered']}); old shapes "
              f"{r['old_after_vae']} of {args.n}", file=sys.stderr)
    if args.json:
        save_json(result, args.json, sort_keys=False)
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "n", 1) <= 0:
        raise InputError(f"--n must be positive, got {args.n}")
    if args.what == "data":
        if args.replay < 0:
            raise InputError(f"--replay must be >= 0, got {args.replay}")
        out = write_shape_folder(args.out, args.n, args.shape, args.resolution, args.replay)
        print(f"teach_shape: wrote {args.n} {args.shape} scenes and {args.replay} old ones to {out}", file=sys.stderr)
        return 0
    if args.what == "vae":
        return vae_ceiling(args)
    if args.what == "decoder":
        import torch

        from ldm.data import open_dataset
        from ldm.finetune import tune_decoder
        from ldm.pretrained import load_vae

        if args.steps <= 0 or args.batch_size <= 0 or args.lr <= 0:
            raise InputError("--steps, --batch-size and --lr must be positive")
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            _, meta = load_vae(args.vae)
            dataset = open_dataset(args.data, meta["resolution"])
        except (FileNotFoundError, ValueError) as e:
            raise InputError(str(e)) from None
        out = tune_decoder(args.vae, dataset, args.out, args.steps, args.batch_size, args.lr)
        print(f"teach_shape: wrote {out} (the decoder tuned {args.steps} steps on {len(dataset)} pictures)",
              file=sys.stderr)
        return 0
    device = resolve_device(args.device)
    pipe = load_pipeline(args.unet, device=device)
    if args.taught < 0:
        raise InputError(f"--taught must be >= 0, got {args.taught}")
    reader = reader_shapes(args.shape)
    prompts = held_out_prompts(args.n, args.taught, args.shape)
    new = evaluate_prompts(pipe, args.n, seed=args.seed, pairs=prompts, shapes=reader)
    old = evaluate_prompts(pipe, args.n, seed=args.seed, shapes=reader)
    result = {"shape": args.shape, "new": summary(new), "old": summary(old)}
    print(f"teach_shape: held-out {args.shape} prompts drawn as a {args.shape} {100 * new['shape']:.1f}% of {args.n} "
          f"({HEADLINE} {100 * new[HEADLINE]:.1f}%); old prompts {HEADLINE} {100 * old[HEADLINE]:.1f}%",
          file=sys.stderr)
    base = load_pipeline(args.base, device=device) if args.base is not None else None
    if base is not None:
        before = evaluate_prompts(base, args.n, seed=args.seed, shapes=reader)
        result["old_before"] = summary(before)
        print(f"teach_shape: old prompts before {100 * before[HEADLINE]:.1f}%, a change of "
              f"{100 * (old[HEADLINE] - before[HEADLINE]):+.1f} points", file=sys.stderr)
    if args.grid:
        import torch

        from ldm.data.shapes import eval_prompts
        rows = [(pipe, t, t) for _, t in prompts[:GRID_PROMPTS]]  # (model, prompt, label)
        if base is not None:  # each new-shape prompt drawn by the model before the fine-tune too, the row above
            rows = [r for _, t in prompts[:GRID_PROMPTS]
                    for r in ((base, t, f"{t}\n(before the fine-tune)"), (pipe, t, f"{t}\n(after)"))]
        rows += [(pipe, t, t) for _, t in eval_prompts(2)]
        images = torch.cat([p(t, n=GRID_N, seed=args.seed, output="pt") for p, t, _ in rows])  # (rows * n, 3, H, W)
        labelled_rows(images, [label for _, _, label in rows], scale=GRID_SCALE).save(args.grid)
        print(f"teach_shape: wrote {args.grid}", file=sys.stderr)
    if args.json:
        save_json(result, args.json, sort_keys=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("teach_shape", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
