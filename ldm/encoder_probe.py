"""`python -m ldm.encoder_probe`: does the frozen text encoder itself place held-out words near their meaning?

    python -m ldm.encoder_probe                              # the packaged MiniLM, layers 2, 4 and 6
    python -m ldm.encoder_probe --layer 6 --json probe.json
    python -m ldm.encoder_probe --text-encoder PATH          # another local Hugging Face encoder
    python -m ldm.encoder_probe --readout                    # also a linear readout fitted on training captions

For each attribute (shape, colour, size, position, background): the share of the eval-only phrases of
``ldm.data.wording`` whose token states, read in a fixed sentence, lie nearest (cosine) to the mean
state of their own value's training phrases (``ldm.text_probe.probe``). No training: a ceiling on
what a UNet conditioned on those states can carry over to the held-out wording split.

``--readout`` adds a learned ceiling (``ldm.text_probe.readout``): a linear classifier of each attribute,
fitted on the sentence embeddings of 2000 varied training captions (training words only), scored on
200 prompts of each evaluation split. It reads what the encoder's sentence space carries of an
attribute, however it is laid out, where the nearest-mean probe asks for it to lie near its synonyms.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ldm.checkpoint import save_json
from ldm.errors import InputError, command_main
from ldm.text_probe import DEFAULT_LAYERS, TABLES, probe, readout


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.encoder_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--text-encoder", default=None, metavar="PATH",
                   help="local Hugging Face text encoder folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--layer", type=int, action="append", default=None,
                   help=f"encoder layer to read (0: the embeddings); repeatable (default {DEFAULT_LAYERS})")
    p.add_argument("--readout", action="store_true",
                   help="also fit a linear readout of each attribute on training captions' sentence embeddings and "
                        "score it on every evaluation split (about a minute)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    return p


def run(args: argparse.Namespace) -> int:
    from ldm.text import TextEncoder

    torch.set_num_threads(1)  # a few hundred short sentences: one thread is as fast and spares the machine
    try:
        encoder = TextEncoder(args.text_encoder)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise InputError(f"--text-encoder: {e}") from None
    layers = args.layer or list(DEFAULT_LAYERS)
    results = {}
    print(f"{'layer':>5} | " + " ".join(f"{a:>10}" for a in TABLES)
          + " | share of eval-only phrases nearest their value")
    for layer in layers:
        r = probe(encoder, layer)
        results[str(layer)] = r
        print(f"{layer:>5} | " + " ".join(f"{100 * r[a]['accuracy']:>9.0f}%" for a in TABLES))
    for attribute in TABLES:
        print(f"  {attribute} at layer {layers[-1]}, wrong: "
              + ", ".join(f"{p!r}->{v}" for p, v in results[str(layers[-1])][attribute]["wrong"]))
    report = {"text_encoder": encoder.name, "layers": results}
    if args.readout:
        report["readout"] = read = readout(encoder)
        splits = list(next(iter(read.values())))
        print("\nlinear readout of the sentence embedding | " + " | ".join(splits))
        for attribute, shares in read.items():
            print(f"{attribute:>40} | " + " | ".join(f"{100 * shares[s]:>{len(s)}.1f}" for s in splits))
    if args.json:
        save_json(report, args.json, sort_keys=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("encoder_probe", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
