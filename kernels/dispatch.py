"""One place decides which implementation runs each op: Triton, PyTorch or xformers.

Precedence, highest first:
  1. the ``backend=`` argument of a call, when it is not ``"auto"``;
  2. a ``with kernels.use_backend(...)`` block (process-wide, used by tests and benchmarks
     to flip whole models between our kernels and PyTorch);
  3. the environment: ``LDM_ATTENTION_BACKEND`` / ``LDM_GROUPNORM_BACKEND`` for one op,
     ``LDM_BACKEND`` for every op;
  4. ``"auto"``: what measured fastest on a GPU (bench/results/gpu-h200-2026-11-28.md): PyTorch's
     SDPA for attention; our GroupNorm kernel for tensors of at least GROUPNORM_AUTO_MIN_ELEMENTS
     elements on a CUDA device (when Triton imports and the kernel takes the inputs), PyTorch's
     ops below that and everywhere else.

This is the only place that decides. ``kernels.attention`` and ``kernels.group_norm`` run the
implementation ``resolve_backend`` names (a forced backend that cannot take the inputs raises here,
in one line); models never branch on the device, dtype or head dim themselves.
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


_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when Triton imports (it ships with Linux builds of PyTorch). Looked up once, at import:
    a plain read, which torch.compile traces without a cache wrapper to warn about."""
    return _TRITON_FOUND


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


# What the Triton kernels take. The launchers check their inputs against the same rules (through
# triton_refusal), so a forced backend and a direct launcher call fail with the same message.
ATTENTION_GPU_DTYPES = (torch.float16, torch.bfloat16)  # exact fp32 cannot use the tensor cores (attention.md)
ATTENTION_INTERPRETER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the interpreter multiplies exactly
ATTENTION_MAX_HEAD_DIM = 512  # widest row of kernels.attention.CONFIGS (the SD VAE's single 512-wide head)
GROUPNORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT32_MAX = 2**31 - 1  # the kernels index within one (batch, head) slice or one sample in int32

# What "auto" runs on a GPU, from the H200 measurements of 2026-11-28 (kernels/attention.md and
# kernels/groupnorm.md, "Measured on an H200"). Attention: SDPA's flash / cuDNN kernels took 0.75x
# of our forward's GPU time at N = 4096 D = 40, the same at N = 1024 D = 80 and at 77 keys, 0.62x at
# the VAE's D = 512, and launch at 5-8x less CPU time; our kernel stays one backend= away.
# GroupNorm + SiLU: ours takes 2.5-10.7x less GPU time than eager but ~750 us more CPU time per
# forward + backward (5 Triton launches and the custom-op layers against ATen's few), so it only
# pays where the tensor is large enough for the GPU time saved (~25 us per million elements) to
# cover that: the sd15 UNet's training step ran 1.07-1.25x slower with it, the sd VAE's 512-px
# encode and decode 1.55x faster.
GROUPNORM_AUTO_MIN_ELEMENTS = 2**25  # the sd VAE's 128 x 512 x 512 activation of one image


def _on_cuda(tensors: tuple[torch.Tensor, ...]) -> bool:
    return all(t.is_cuda for t in tensors)


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) if t.dim() else "scalar"


def attention_triton_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """Input dtypes the Triton attention takes on ``device``: fp16 and bf16 on a GPU, fp32 as well
    through the CPU interpreter (the tests' near-exact check of the algorithm)."""
    return ATTENTION_GPU_DTYPES if device.type == "cuda" else ATTENTION_INTERPRETER_DTYPES


def _attention_refusal(gpu: bool, q: torch.Tensor, *kv: torch.Tensor) -> str | None:
    dtypes = attention_triton_dtypes(torch.device("cuda" if gpu else "cpu"))
    if q.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        return f"takes {names} on {'cuda' if gpu else 'cpu'}, got {q.dtype} for q ({_shape(q)})"
    if q.dim() != 4:  # a probe (bench, tests) rather than a (B, N, H, D) input: dtype and device only
        return None
    if q.shape[3] > ATTENTION_MAX_HEAD_DIM:
        return f"takes head dims up to {ATTENTION_MAX_HEAD_DIM}, got {q.shape[3]} for q ({_shape(q)})"
    for name, t in zip("qkv", (q, *kv)):
        if t.dim() == 4 and (t.shape[1] - 1) * abs(t.stride(1)) + (t.shape[3] - 1) * abs(t.stride(3)) > INT32_MAX:
            return f"cannot index q, k, v: one (batch, head) slice of {name} ({_shape(t)}, strides " \
                   f"{t.stride()}) spans more than 2**31 elements"
    return None


def _groupnorm_refusal(gpu: bool, x: torch.Tensor, *params: torch.Tensor) -> str | None:
    if x.dtype not in GROUPNORM_DTYPES:
        return f"takes float16, bfloat16 or float32, got {x.dtype} for x ({_shape(x)})"
    if x.numel() == 0:
        return f"takes no empty x ({_shape(x)})"
    if x.dim() and x.numel() // x.shape[0] > INT32_MAX:  # sizes only: no tensor op for a traced graph
        return f"needs one sample of x ({_shape(x)}) within 2**31 elements (32-bit offsets)"
    return None


_REFUSALS = {"attention": _attention_refusal, "groupnorm": _groupnorm_refusal}


def triton_refusal(op: str, *tensors: torch.Tensor, gpu: bool | None = None) -> str | None:
    """Why the Triton kernels of ``op`` cannot take these inputs (dtype, head dim, size), or None.
    ``tensors`` are the op's inputs in order: q, k, v for attention; x, then the parameters, for
    group norm; ``gpu``: judge them for a GPU (default: whether they are on one) or for the CPU
    interpreter. Device and installation are resolve_backend's business."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if not tensors:
        return None
    return _REFUSALS[op](_on_cuda(tensors) if gpu is None else gpu, *tensors)


def auto_prefers_triton(op: str, *tensors: torch.Tensor) -> bool:
    """Whether ``auto`` should run our kernel for these inputs on a GPU: the measured rule above
    (sizes only, so a traced graph decides the same way)."""
    return op == "groupnorm" and bool(tensors) and tensors[0].numel() >= GROUPNORM_AUTO_MIN_ELEMENTS


def resolve_backend(op: str, backend: str, *tensors: torch.Tensor) -> str:
    """The one place that decides which implementation runs ``op`` on ``tensors`` (its inputs, in
    order: q, k, v for attention, x and the parameters for group norm): "triton", "torch" or
    "xformers". The ops run what this returns; the models never decide.

    ``auto`` picks Triton when auto_prefers_triton (the measured rule: GroupNorm on tensors of at
    least GROUPNORM_AUTO_MIN_ELEMENTS elements), every tensor is on a CUDA device, Triton imports and
    the kernels take the inputs (dtype, head dim: triton_refusal), PyTorch otherwise. A forced backend that cannot run
    raises one line: RuntimeError when it cannot run on this machine or device, ValueError when it
    cannot take these inputs. xformers has no GroupNorm: asked for it, group norm runs PyTorch's.
    """
    choice = requested_backend(op, backend)
    on_cuda = _on_cuda(tensors)
    if choice == "auto":
        if on_cuda and auto_prefers_triton(op, *tensors) and triton_available() \
                and triton_refusal(op, *tensors, gpu=True) is None:
            return "triton"
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' was asked for but Triton is not installed")
        if not on_cuda and not triton_interpreted():
            devices = sorted({str(t.device) for t in tensors})
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors (got {devices}); "
                "set TRITON_INTERPRET=1 to run Triton on the CPU through its interpreter"
            )
        why = triton_refusal(op, *tensors, gpu=on_cuda)
        if why is not None:
            raise ValueError(f"{op}: backend 'triton' {why}; use backend='torch'")
    if choice == "xformers":
        if not xformers_available():
            raise RuntimeError(f"{op}: backend 'xformers' was asked for but xformers cannot run here "
                               "(it needs the package and a CUDA device)")
        if op == "groupnorm":
            return "torch"
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
