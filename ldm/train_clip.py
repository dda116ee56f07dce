"""`python -m ldm.train_clip`: train the small CLIP (``ldm.clip``) on captioned images.

    python -m ldm.train_clip                                   # built-in shapes, 10000 pairs -> runs/clip
    python -m ldm.train_clip --vae runs/vae --out runs/clip-noisy   # noise-aware, on noisy latents (guidance)
    python -m ldm.train_clip --data DIR --resolution 64 --out runs/clip-folder   # an image folder
    python -m ldm.train_clip --steps 200 --images 2000 --out /tmp/clip   # a quick run

The image tower trains from scratch; the text side is the frozen text encoder (default the packaged
all-MiniLM-L6-v2) with a trainable head; the loss is the symmetric InfoNCE at a learned temperature.
On the built-in shapes a tenth of the attribute combinations is held out of training
(``ldm.clip_training``) for ``python -m ldm.eval_clip``. Writes ``OUT/clip.safetensors`` +
``OUT/clip.json`` and ``OUT/metrics.jsonl``. A shell over ``ldm.clip_training.train_clip``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ldm.clip import CLIP_CONFIGS
from ldm.clip_training import ClipTrainConfig, train_clip
from ldm.errors import InputError, command_main
from ldm.trainer import check_positive, config_from_args

DEFAULTS = ClipTrainConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.train_clip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--out", default=DEFAULTS.out, help=f"output folder (default {DEFAULTS.out})")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="captioned image folder (metadata.jsonl or .txt captions); default: the built-in shapes")
    p.add_argument("--preset", choices=list(CLIP_CONFIGS), default=DEFAULTS.preset,
                   help=f"image tower size (default {DEFAULTS.preset}; with --vae the latent preset fits the demo VAE)")
    p.add_argument("--vae", default=None, metavar="DIR",
                   help="train noise-aware on this VAE's latents, noised to random timesteps (for CLIP guidance)")
    p.add_argument("--text-encoder", default=None, metavar="PATH",
                   help="local Hugging Face text encoder folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--images", type=int, default=DEFAULTS.images, help=f"training pairs (default {DEFAULTS.images})")
    p.add_argument("--resolution", type=int, default=DEFAULTS.resolution,
                   help=f"image side in pixels without --vae (default {DEFAULTS.resolution})")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"optimizer steps (default {DEFAULTS.steps})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help=f"pairs per step, each the others' negatives (default {DEFAULTS.batch_size})")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help=f"AdamW peak learning rate (default {DEFAULTS.lr})")
    p.add_argument("--warmup", type=int, default=DEFAULTS.warmup, help=f"warm-up steps (default {DEFAULTS.warmup})")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay,
                   help=f"AdamW weight decay of weight matrices (default {DEFAULTS.weight_decay})")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and noise (default 0)")
    p.add_argument("--log-every", type=int, default=DEFAULTS.log_every, help="steps between metrics rows")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run(args: argparse.Namespace) -> int:
    check_positive(args, ("images", "steps", "batch_size", "log_every", "resolution", "threads"))
    if args.batch_size < 2:
        raise InputError("--batch-size must be at least 2: each pair needs another as its negative")
    if args.lr <= 0 or args.warmup < 0 or args.weight_decay < 0:
        raise InputError("--lr must be positive, --warmup and --weight-decay non-negative")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from ldm.pretrained import load_vae
    from ldm.text import TextEncoder

    vae = None
    if args.vae is not None:
        try:
            vae, _ = load_vae(args.vae)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"--vae: {e}") from None
    try:
        encoder = TextEncoder(args.text_encoder)
    except (FileNotFoundError, ImportError, OSError, ValueError) as e:
        raise InputError(f"--text-encoder: {e}") from None
    config = config_from_args(ClipTrainConfig, args)
    if vae is not None and args.preset == DEFAULTS.preset:
        config.preset = "latent"
    result = train_clip(config, encoder, vae=vae, vae_dir=args.vae, quiet=args.quiet)
    print(f"train_clip: wrote {args.out}/clip.safetensors: {result['pairs']} pairs, {args.steps} steps in "
          f"{result['seconds']:.0f} s, final loss {result['loss']:.4f}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("train_clip", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
