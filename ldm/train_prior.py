"""`python -m ldm.train_prior`: train the unCLIP diffusion prior (``ldm.unclip``) from prompts to CLIP image embeddings.

    python -m ldm.train_prior --clip runs/clip                  # 5000 training scenes -> runs/prior, then scored
    python -m ldm.train_prior --clip runs/clip --steps 500 --images 2000 --out /tmp/prior --eval 0

The targets are the CLIP's embeddings of the built-in training scenes (held-out combinations
excluded); the inputs the captions' frozen token states and the CLIP text embedding. At the end
(``--eval N``) the prior samples one embedding for each of N held-out prompts: reported are the
cosine with the true image's embedding (beside the text embedding's) and the CLIP's zero-shot
attributes read from the sampled embeddings. Writes ``OUT/prior.safetensors`` + ``OUT/prior.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ldm.checkpoint import save_json
from ldm.clip import load_clip
from ldm.errors import InputError, command_main
from ldm.trainer import check_positive, config_from_args
from ldm.unclip import PriorTrainConfig, evaluate_prior, load_prior, train_prior

DEFAULTS = PriorTrainConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.train_prior", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--clip", default=DEFAULTS.clip, metavar="DIR",
                   help=f"train_clip's folder (default {DEFAULTS.clip})")
    p.add_argument("--out", default=DEFAULTS.out, help=f"output folder (default {DEFAULTS.out})")
    p.add_argument("--images", type=int, default=DEFAULTS.images, help=f"training scenes (default {DEFAULTS.images})")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"optimizer steps (default {DEFAULTS.steps})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help=f"default {DEFAULTS.batch_size}")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help=f"AdamW peak learning rate (default {DEFAULTS.lr})")
    p.add_argument("--warmup", type=int, default=DEFAULTS.warmup, help=f"warm-up steps (default {DEFAULTS.warmup})")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--log-every", type=int, default=DEFAULTS.log_every, help="steps between metrics rows")
    p.add_argument("--eval", type=int, default=200, metavar="N",
                   help="score N held-out prompts at the end, 0: off (default 200; about 170 distinct exist)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run(args: argparse.Namespace) -> int:
    check_positive(args, ("images", "steps", "batch_size", "log_every", "threads"))
    if args.eval < 0 or args.lr <= 0:
        raise InputError("--eval must be >= 0 and --lr positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clip = load_clip(args.clip)
    if getattr(clip, "noise_aware", False) or not hasattr(clip, "text_features"):
        raise InputError(f"--clip {args.clip}: the prior needs one of our pixel CLIPs (train_clip without --vae)")
    result = train_prior(config_from_args(PriorTrainConfig, args), clip, quiet=args.quiet)
    print(f"train_prior: wrote {args.out}/prior.safetensors: {args.steps} steps in {result['seconds']:.0f} s, "
          f"final loss {result['loss']:.4f}", file=sys.stderr)
    if args.eval:
        prior, _ = load_prior(args.out)
        r = evaluate_prior(prior, clip, args.eval, seed=args.seed)
        zs, zt = r["zero_shot_sampled"], r["zero_shot_true"]
        print(f"{r['n']} held-out prompts: cosine with the true image embedding {r['cosine_sampled']:.3f} "
              f"(the text embedding's: {r['cosine_text']:.3f})")
        print("zero-shot attributes of the sampled embeddings: "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in zs.items()))
        print("zero-shot attributes of the true images:        "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in zt.items()))
        save_json(r, Path(args.out) / "eval.json", sort_keys=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("train_prior", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
