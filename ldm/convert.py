"""`python -m ldm.convert`: Stable Diffusion 1.x weights (diffusers layout) <-> our models.

    python -m ldm.convert from-diffusers PATH --out DIR   # SD folder -> DIR/unet.*, DIR/vae.*
    python -m ldm.convert to-diffusers DIR --out PATH     # our folder -> diffusers layout

``from-diffusers`` writes ``unet.safetensors`` + ``unet.json`` (the one ``UNetFile`` schema of
``ldm.pretrained``: config, prediction, the scheduler's betas, latent shape, the folder's CLIP text
encoder and how SD tokenizes, guidance 7.5, diffusers' own config for the way back) and
``vae.safetensors`` + ``vae.json`` (config, ``latent_scale_factor`` = the config's scaling_factor,
``latent_mean`` 0, resolution). ``python -m ldm.sample --unet DIR`` and ``ldm.Pipeline.from_pretrained(DIR)``
open the result. ``to-diffusers`` writes ``unet/``, ``vae/``, ``scheduler/`` (and with a CLIP text
encoder ``text_encoder/``, ``tokenizer/``, ``model_index.json``), which diffusers' ``from_pretrained``
opens. The key maps are ``ldm.sd_format``, the folders ``ldm.sd_folder``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ldm.pretrained import UNET_NAME, VAE_NAME
from ldm.sd_folder import convert_from_diffusers, convert_to_diffusers

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ldm.convert", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="examples:\n  python -m ldm.convert from-diffusers PATH --out DIR\n"
               "  python -m ldm.convert to-diffusers DIR --out PATH",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dtypes = ["keep", *DTYPES]
    a = sub.add_parser("from-diffusers", allow_abbrev=False,
                       help="SD 1.x folder in diffusers layout -> our unet.* and vae.*")
    a.add_argument("path", help="the diffusers folder (unet/, vae/, scheduler/, text_encoder/)")
    a.add_argument("--out", required=True, help="folder to write unet.safetensors/json and vae.safetensors/json")
    a.add_argument("--dtype", choices=dtypes, default="keep", help="precision of the written weights")
    a.add_argument("--variant", default=None, help="read diffusion_pytorch_model.VARIANT.safetensors, e.g. fp16")
    b = sub.add_parser("to-diffusers", allow_abbrev=False, help="our unet.* and vae.* -> diffusers layout")
    b.add_argument("folder", help="folder holding unet.safetensors/json (and vae.*, unless --vae)")
    b.add_argument("--out", required=True, help="diffusers folder to write")
    b.add_argument("--vae", default=None, help="folder holding vae.safetensors/json (default: FOLDER)")
    b.add_argument("--text-encoder", default=None,
                   help="CLIP text encoder to copy in (default: the one unet.json names)")
    b.add_argument("--sample-size", type=int, default=None,
                   help="latent side length for the configs (default: from unet.json / vae.json)")
    b.add_argument("--dtype", choices=dtypes, default="keep", help="precision of the written weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = DTYPES.get(args.dtype)
    try:
        if args.command == "from-diffusers":
            out = convert_from_diffusers(args.path, args.out, dtype, args.variant)
            print(f"convert: wrote {out / (UNET_NAME + '.safetensors')} and {out / (VAE_NAME + '.safetensors')}",
                  file=sys.stderr)
        else:
            out = convert_to_diffusers(args.folder, args.out, args.vae, args.text_encoder, args.sample_size, dtype)
            print(f"convert: wrote the diffusers layout in {out}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
