"""What every training command shares: the run folder, resume, the learning-rate schedule, signals.

``train_vae`` and ``train_unet`` (``ldm.vae_training``, ``ldm.unet_training``) each describe a run by a
config dataclass, saved into every checkpoint (``parts["run"]["args"]``). ``RunFolder.resume`` returns
the config restored from the latest checkpoint: the fields that define the run come from it (typing
one with another value is an error), the fields a run keeps come from it unless typed again, and a
field the checkpoint predates keeps its current value. ``given_fields`` tells typed flags from defaults;
the commands' parsers take no abbreviations (``allow_abbrev=False``), so ``--batch 32`` is an error,
not a silent ``--batch-size``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint import CheckpointDir
from ldm.errors import InputError

RunError = InputError  # bad input found after parsing: printed as one line, no traceback


def given_fields(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the options typed in ``argv`` (exact option strings: the parser takes no
    abbreviations), to tell them from defaults."""
    given = set()
    for token in argv:
        if token.startswith("--"):
            action = parser._option_string_actions.get(token.split("=", 1)[0])
            if action is not None:
                given.add(action.dest)
    return given


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """The ``cls`` dataclass from the namespace's fields of the same names."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def learning_rate(lr: float, step: int, *, warmup: int, schedule: str, total: int, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then ``constant``, or ``cosine`` decay to ``floor * lr`` at
    step ``total``."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "constant":
        return lr * warm
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected constant or cosine")
    progress = min(1.0, step / max(1, total - 1))
    return lr * warm * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, ``kill -TERM`` raises KeyboardInterrupt as Ctrl-C does (the loop checkpoints)."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RunFolder:
    """A training run's output folder: ``checkpoints/`` (``CheckpointDir``) and whatever the run writes."""

    def __init__(self, out: str | Path, keep: int = 2):
        self.out = Path(out)
        self.ckpt = CheckpointDir(self.out / "checkpoints", keep=keep)

    def resume(self, config, given: Iterable[str], run_fields: tuple[str, ...],
               kept_fields: tuple[str, ...] = ()) -> tuple[Any, int, dict]:
        """(config restored from the latest checkpoint, its step, its parts). Typing a run field with
        another value than the checkpoint's is an InputError naming the flag and both values."""
        if self.ckpt.latest() is None:
            raise InputError(f"--resume: no checkpoint in {self.ckpt.root} (start without --resume, "
                             "or pick the right --out)")
        step, parts = self.ckpt.load()
        saved = parts["run"]["args"]
        given = set(given)
        changes = {}
        for key in run_fields:
            current = getattr(config, key)
            if key in given and key in saved and current != saved[key]:
                raise InputError(f"--{key.replace('_', '-')} {current} differs from the checkpoint's "
                                 f"{saved[key]!r}; drop the flag to resume, or start a new run in another --out")
            changes[key] = saved.get(key, current)
        for key in kept_fields:
            if key not in given:
                changes[key] = saved.get(key, getattr(config, key))
        return dataclasses.replace(config, **changes), step, parts

    def start_new(self, command: str) -> None:
        """A new run in a folder with an earlier run's checkpoints: keep them aside under the first free
        name (``checkpoints.previous``, ``checkpoints.previous.2``, ...), never mix the two runs and never
        delete one. Call only after every input is checked."""
        if self.ckpt.root.is_dir():
            aside, n = self.out / "checkpoints.previous", 1
            while aside.exists():
                n += 1
                aside = self.out / f"checkpoints.previous.{n}"
            self.ckpt.root.rename(aside)
            print(f"{command}: starting a new run in {self.out}; the earlier run's checkpoints moved to {aside} "
                  "(--resume continues a run instead)", file=sys.stderr)


def restore(parts: dict, targets: dict, where: Path) -> None:
    """Load each checkpoint part into its module or optimizer (``targets``: part name -> object); a part
    that is missing or does not fit is an InputError naming the checkpoint, not a traceback."""
    for name, target in targets.items():
        if name not in parts:
            raise InputError(f"the checkpoint in {where} has no {name!r} part; start a new run in another --out")
        try:
            target.load_state_dict(parts[name])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"the checkpoint's {name!r} part in {where} does not fit this run ({first}); "
                             "start a new run in another --out") from None


def check_finite(step: int, *modules: torch.nn.Module) -> None:
    """InputError when any weight is NaN or infinite: such a state is never saved."""
    for m in modules:
        if not all(torch.isfinite(p).all() for p in m.parameters()):
            raise InputError(f"the weights became non-finite by step {step}; nothing was saved past the last "
                             "checkpoint (lower --lr and --resume, or start again)")


def check_positive(config, names: Iterable[str], *, strict: bool = True) -> None:
    """InputError naming the flag when a field is not > 0 (``strict``) or < 0; None fields are skipped."""
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        if (value <= 0) if strict else (value < 0):
            raise InputError(f"--{name.replace('_', '-')} must be {'positive' if strict else '>= 0'}, got {value}")


OPTIMIZERS = ("adamw", "adamw8bit")


def check_optimizer(name: str) -> None:
    """InputError, before a run touches anything, for an optimizer this machine cannot build."""
    if name not in OPTIMIZERS:
        raise InputError(f"--optimizer {name}: expected one of {', '.join(OPTIMIZERS)}")
    if name == "adamw8bit":
        # bitsandbytes' CPU backend looks for a 4-bit GEMM in a package named `kernels` (Hugging Face's), finds
        # ours, and warns; the optimizer never uses that GEMM
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError("--optimizer adamw8bit needs bitsandbytes, which is not installed "
                             "(pip install bitsandbytes), or use --optimizer adamw") from None


def build_optimizer(name: str, groups: list[dict], lr: float, betas: tuple[float, float],
                    device: torch.device) -> torch.optim.Optimizer:
    """``adamw``: PyTorch's AdamW, its fused kernel on CPU and CUDA (on 2 CPU cores the per-tensor loop
    costs ~25x more for the tiny UNet's 1.2M parameters). ``adamw8bit``: bitsandbytes' AdamW8bit (Dettmers
    et al. 2022), both moments block-wise quantised to 8 bits: 2 bytes of optimizer state per parameter
    instead of 8 (tensors under 4096 elements keep 32-bit moments); it runs where bitsandbytes is installed."""
    check_optimizer(name)
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cpu", "cuda"))
