"""``python -m bench.gpu``: flags, and the environment that must be set before torch or Triton import.

Nothing of the project is imported at the top of this module: ``TRITON_INTERPRET`` is read when a
kernel is defined (at ``import kernels``), and the wheels of ``--wheels`` must be on ``sys.path``
before anything imports diffusers. ``main`` sets both, then imports the runner.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench.gpu  # its docstring only: the package's __init__ imports nothing

START = time.monotonic()  # the budget counts from here: imports are part of the 8 minutes
SECTIONS = ("correctness", "speed", "e2e", "training")
DEFAULT_BUDGET_S = 480.0  # "in at most 8 minutes end to end"
DRY_RUN_BUDGET_S = 60.0  # a dry run takes ~30 s on 2 idle cores; on a loaded machine it is cut, not prolonged
DRY_RUN_THREADS = 1  # toy sizes: a second thread per process only waits on the other jobs of a shared machine
FAULT_OPS = ("attention", "groupnorm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=bench.gpu.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu-report.md / .json / .png (created)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"total seconds, imports included (default {DEFAULT_BUDGET_S:g}, {DRY_RUN_BUDGET_S:g} "
                             "with --dry-run); each section gets a share and is cut short, with a note, rather than "
                             "overrun")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code at toy sizes on the CPU: Triton's interpreter for the correctness "
                             "checks, PyTorch's path for the timings, tiny models, 2 s of training")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--wheels", default=None,
                        help="folder of .whl files (diffusers and what it needs) to import from; "
                             "nothing is fetched from the network")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes for the correctness checks (default: 8 on a GPU, where Triton's "
                             "compiles dominate, 2 in a dry run; 1 runs them in this process)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every input and of the fuzz (default 0)")
    parser.add_argument("--inject-fault", choices=FAULT_OPS, default=None,
                        help="self-test of the checks: scale our op's output (and so its gradients) by "
                             "1.5 wherever our kernels run; the run must then report FAILED and exit 1")
    return parser


def parse_sections(text: str, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        parser.error(f"--sections: unknown {unknown or text!r}; choose from {','.join(SECTIONS)}")
    return names


def add_wheels(folder: str | Path) -> list[str]:
    """Make the wheels in ``folder`` importable, without the network: a pure-Python wheel
    (``*-none-any.whl``) is a zip file that Python imports from as it is; any other wheel is
    unpacked by ``pip install --no-index --no-deps --target`` into a temporary folder.
    Returns what was added, for the report."""
    folder = Path(folder)
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"--wheels {folder}: no .whl files there")
    pure = [w for w in wheels if w.name.endswith("-none-any.whl")]
    binary = [w for w in wheels if w not in pure]
    for w in reversed(pure):
        sys.path.insert(0, str(w.resolve()))
    if binary:
        target = tempfile.mkdtemp(prefix="bench-gpu-wheels-")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        "--no-compile", "--target", target, *map(str, binary)], check=True)
        sys.path.insert(0, target)
    return [w.name for w in wheels]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.sections = parse_sections(args.sections, parser)
    if args.dry_run:
        # The correctness checks run the Triton kernels through the interpreter on CPU tensors.
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it, a GPU report must run the compiled kernels "
                     "(--dry-run runs the interpreter on the CPU)")
    args.wheel_names = add_wheels(args.wheels) if args.wheels else []
    if args.budget_s is None:
        args.budget_s = DRY_RUN_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S
    if args.dry_run:
        os.environ.setdefault("OMP_NUM_THREADS", str(DRY_RUN_THREADS))  # read when torch is imported, below
    if args.workers is None:
        args.workers = 1 if args.dry_run else 8
    args.start = START

    from bench.gpu import runner  # after the environment above: imports torch, Triton and the project

    return runner.run(args)
