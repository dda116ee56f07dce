"""`python -m ldm.train_vae`: train the KL autoencoder (on the built-in shapes unless told otherwise).

    python -m ldm.train_vae                                  # the CPU demo: 32 x 32 shapes, `tiny` preset
    python -m ldm.train_vae --out runs/vae --resume          # continue from the last checkpoint
    python -m ldm.train_vae --data digits --resolution 16 --out runs/digits-vae   # real handwritten digits
    python -m ldm.train_vae --data DIR --resolution 256 --preset sd --batch-size 8 --disc-start 50000

The output folder holds ``vae.safetensors`` + ``vae.json`` (config, latent scale factor,
resolution, dataset), ``recon/step_XXXXXXX.png`` (originals above reconstructions of held-out
images), ``metrics.jsonl``, ``loss.png`` and ``checkpoints/`` (model, discriminator, both
optimizers, step, RNG and data position, written atomically). A run killed at any moment resumes
from its last checkpoint with ``--resume``; Ctrl-C writes one first. A shell over
``ldm.vae_training.train``: the flags fill a ``VAETrainConfig``.
"""

from __future__ import annotations

import argparse
import os
import sys

from autoencoder import VAE_CONFIGS
from autoencoder.losses import REC_LOSSES
from ldm.errors import InputError
from ldm.trainer import config_from_args, given_fields
from ldm.vae_training import DEMO, VAETrainConfig, train

DEMO_PRESET, DEMO_RESOLUTION = DEMO.preset, DEMO.resolution


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.train_vae", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None, metavar="DIR",
                      help="image folder (metadata.jsonl or .txt captions), or 'digits' for the real handwritten "
                           "digits (8 x 8, upsampled to --resolution); default: the built-in shapes")
    data.add_argument("--caption-column", default="text", help="caption column of metadata.jsonl (default text)")
    data.add_argument("--crop", choices=("center", "random"), default="random",
                      help="square crop after resizing the short side (default random)")
    data.add_argument("--flip", action="store_true", help="random horizontal flips (off: captions say left/right)")
    data.add_argument("--resolution", type=int, default=DEMO_RESOLUTION,
                      help=f"image side in pixels, divisible by the preset's downsampling factor "
                           f"(default {DEMO_RESOLUTION})")
    data.add_argument("--workers", type=int, default=0, help="data loader processes (default 0: in the main one)")
    model = p.add_argument_group("model and loss")
    model.add_argument("--preset", choices=list(VAE_CONFIGS), default=DEMO_PRESET,
                       help=f"VAE size; {DEMO_PRESET} is the CPU demo, sd is Stable Diffusion 1.x kl-f8 "
                            f"(default {DEMO_PRESET})")
    model.add_argument("--rec-loss", choices=REC_LOSSES, default=None,
                       help="reconstruction loss: l1 (latent diffusion's) or l2 (squared error) (default: l2 on "
                            "the built-in data, where a 1200-step run reached about 6 dB more PSNR with it; "
                            "l1 on a folder)")
    model.add_argument("--kl-weight", type=float, default=DEMO.kl_weight,
                       help=f"weight of the KL term (default {DEMO.kl_weight})")
    model.add_argument("--disc-start", type=int, default=None,
                       help="first step of the PatchGAN loss (default: half of --steps on a folder; "
                            "off on the built-in data, whose short demo run it only costs PSNR)")
    model.add_argument("--disc-weight", type=float, default=DEMO.disc_weight,
                       help=f"scale of the adaptive GAN weight; 0 turns the GAN off (default {DEMO.disc_weight})")
    model.add_argument("--lpips-weights", default=None, metavar="PATH",
                       help="VGG16 weights (.safetensors or .pth) to add LPIPS; default: $LDM_LPIPS_WEIGHTS, else off")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=None,
                       help="total optimizer steps (default: 1500 on the built-in data, 10000 on a folder)")
    train.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of VAE and discriminator "
                       "(default 1e-3)")
    train.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                       help="learning rate after warm-up: cosine decay to 10%% at the last step, or constant "
                            "(default cosine)")
    train.add_argument("--warmup", type=int, default=20, help="steps of linear learning-rate warm-up (default 20)")
    train.add_argument("--seed", type=int, default=0, help="seed of weights, data order and sampling (default 0)")
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    train.add_argument("--threads", type=int, default=os.cpu_count(),
                       help=f"CPU threads for PyTorch (default: all {os.cpu_count()} cores)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="runs/vae", help="output folder (default runs/vae)")
    out.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    out.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints (default 100)")
    out.add_argument("--sample-every", type=int, default=100,
                     help="steps between reconstruction grids (default 100)")
    out.add_argument("--log-every", type=int, default=10, help="steps between metrics rows (default 10)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return train(config_from_args(VAETrainConfig, args), resume=args.resume, given=given_fields(parser, argv),
                     quiet=args.quiet)
    except InputError as e:
        print(f"train_vae: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
