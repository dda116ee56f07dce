"""One place decides which implementation runs each op: Triton, PyTorch or xformers.

Precedence, highest first:
  1. the ``backend=`` argument of a call, when it is not ``"auto"``;
  2. a ``with kernels.use_backend(...)`` block (process-wide, used by tests and benchmarks
     to flip whole models between our kernels and PyTorch);
  3. the environment: ``LDM_ATTENTION_BACKEND`` / ``LDM_GROUPNORM_BACKEND`` for one op,
     ``LDM_BACKEND`` for every op;
  4. ``"auto"``: Triton when every tensor is on a CUDA device and Triton imports, PyTorch otherwise.

Models never branch on the device themselves; they call ``kernels.attention`` and
``kernels.group_norm`` and this module picks.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch", "xformers")
OPS = ("attention", "groupnorm")
_ENV_ALL = "LDM_BACKEND"
_override: dict[str, str] = {}  # op -> backend, set by use_backend()


def _env_name(op: str) -> str:
    return f"LDM_{op.upper()}_BACKEND"


def _check_name(backend: str, where: str) -> str:
    backend = backend.strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it ships with Linux builds of PyTorch)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def xformers_available() -> bool:
    """True when xformers imports and a CUDA device exists (xformers has no CPU kernels)."""
    if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # a wheel built against another torch fails here, not at find_spec
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton runs kernels through its CPU interpreter (the test session sets this)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend(op: str, backend: str = "auto") -> str:
    """The backend asked for by argument, ``use_backend`` or environment, before ``auto`` resolves."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    backend = _check_name(backend, f"{op} backend argument")
    if backend != "auto":
        return backend
    if op in _override:
        return _override[op]
    for var in (_env_name(op), _ENV_ALL):
        value = os.environ.get(var)
        if value:
            return _check_name(value, f"environment variable {var}")
    return "auto"


def resolve_backend(op: str, backend: str, *tensors: torch.Tensor) -> str:
    """Name the implementation that runs ``op`` on ``tensors``: "triton", "torch" or "xformers"."""
    choice = requested_backend(op, backend)
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' was asked for but Triton is not installed")
        if not on_cuda and not triton_interpreted():
            devices = sorted({str(t.device) for t in tensors})
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors (got {devices}); "
                "set TRITON_INTERPRET=1 to run Triton on the CPU through its interpreter"
            )
    if choice == "xformers" and not xformers_available():
        raise RuntimeError(f"{op}: backend 'xformers' was asked for but xformers cannot run here "
                           "(it needs the package and a CUDA device)")
    return choice


@contextlib.contextmanager
def use_backend(backend: str, ops: tuple[str, ...] = OPS) -> Iterator[None]:
    """Force ``backend`` for ``ops`` inside the block, e.g. ``with use_backend("torch"): model(x)``."""
    backend = _check_name(backend, "use_backend")
    saved = dict(_override)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
        if backend == "auto":
            _override.pop(op, None)
        else:
            _override[op] = backend
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)
