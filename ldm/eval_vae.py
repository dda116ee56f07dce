"""`python -m ldm.eval_vae --ckpt DIR`: PSNR and SSIM of a trained VAE's reconstructions.

    python -m ldm.eval_vae --ckpt runs/vae                 # held-out built-in images (the eval split)
    python -m ldm.eval_vae --ckpt runs/vae --data DIR      # the images of a folder

Reconstructions go through the posterior mean; the scores are ``ldm.metrics.evaluate_vae``.
"""

from __future__ import annotations

import argparse
import json
import sys


from ldm.data import open_dataset
from ldm.distributed import resolve_device
from ldm.metrics import evaluate_vae
from ldm.pretrained import load_vae


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.eval_vae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--ckpt", required=True, help="folder holding vae.safetensors and vae.json (train_vae's --out)")
    parser.add_argument("--data", default=None,
                        help="image folder to evaluate on (default: the built-in dataset's held-out eval split)")
    parser.add_argument("--caption-column", default="text", help="caption column of metadata.jsonl (with --data)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side (default: the resolution the VAE was trained at)")
    parser.add_argument("--n", type=int, default=512, help="how many images to evaluate (default 512)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in eval split (default 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    if args.n <= 0 or args.batch_size <= 0:
        parser.error("--n and --batch-size must be positive")

    try:
        device = resolve_device(args.device)
        vae, meta = load_vae(args.ckpt, device)
        resolution = args.resolution or meta.get("resolution")
        f = vae.config.downsample_factor
        if not resolution or resolution % f:
            raise ValueError(f"--resolution {resolution} is not divisible by the VAE's downsampling factor {f}")
        dataset = open_dataset(args.data, resolution, split="eval", seed=args.seed,
                               caption_column=args.caption_column)
        result = evaluate_vae(vae, dataset, args.n, args.batch_size, device)
    except (FileNotFoundError, ValueError) as e:  # InputError is a ValueError
        print(f"eval_vae: error: {e}", file=sys.stderr)
        return 2
    where = f"folder {args.data}" if args.data else f"built-in eval split (seed {args.seed})"
    result.update(ckpt=str(args.ckpt), data=where, resolution=resolution)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"PSNR {result['psnr']:.2f} dB   SSIM {result['ssim']:.4f}   "
              f"on {result['images']} images of the {where}, {resolution} x {resolution}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
