"""Section 2: kernel speed at the Stable Diffusion 1.5 shapes, against what a user would run instead.

Attention (batch 2, 8 heads; self N=4096 D=40, 1024/80, 256/160, 64/160 and the same queries against
77 text tokens) against ``scaled_dot_product_attention`` as it dispatches itself ("sdpa", the baseline
of the ratios) and pinned to its flash, cuDNN and memory-efficient backends (``sdpa_kernel``; a backend
with no kernel for the inputs is skipped with PyTorch's reason). GroupNorm + SiLU at the ResBlock norms
of the sd15 UNet against eager ``F.group_norm`` + ``F.silu`` (the baseline) and ``torch.compile`` of it.

Every provider is first checked against a float64 reference on the same inputs (output and
gradients, the correctness section's tolerances); a provider that fails is FAILED and not timed.

The peaks the % columns refer to are measured at the start of this section: a large bf16 matrix
product (FLOP/s) and a device-to-device copy (bytes read + written per second).
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from bench.gpu.common import CUT, FAILED, PASS, SKIPPED, Device, SectionClock, SpeedRow, short_error, time_call, \
    worst_ratio
from bench.gpu.correctness import ATTENTION_TOL, GRAD_TOL_FACTOR, GROUPNORM_TOL, attention_reference, \
    groupnorm_reference

MODES = ("forward", "forward+backward")
ATTENTION_FLOP_FACTOR = {"forward": 1.0, "forward+backward": 3.5}  # x 4 B H Nq Nk D; backward is 2.5x forward
GROUPNORM_ACCESSES = {"forward": 2, "forward+backward": 5}  # tensor-sized reads + writes: x, y; then x, dy, dx
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Sizes:
    batch: int
    heads: int
    attention: tuple[tuple[int, int], ...]  # (N, D) of the self-attentions; cross: the same queries x 77
    attention_dtypes: tuple[str, ...]
    groupnorm: tuple[tuple[int, int, int, int], ...]
    groupnorm_dtypes: tuple[str, ...]
    groups: int
    matmul_n: int  # the peak's square bf16 product
    copy_bytes: int  # the peak's device-to-device copy
    time_s: float  # measured time per row, at most
    compile: bool  # torch.compile provider


SIZES = {
    "gpu": Sizes(batch=2, heads=8, attention=((4096, 40), (1024, 80), (256, 160), (64, 160)),
                 attention_dtypes=("bfloat16", "float16"),
                 groupnorm=((2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)),
                 # bf16 only: fp16 moves the same bytes, and each torch.compile graph costs seconds
                 groupnorm_dtypes=("bfloat16",), groups=32,
                 matmul_n=8192, copy_bytes=1 << 30, time_s=0.15, compile=True),
    # torch.compile: its first compile takes ~15 s on a 2-core CPU, more than the whole dry run
    "dry": Sizes(batch=1, heads=2, attention=((64, 40), (16, 80)), attention_dtypes=("bfloat16",),
                 groupnorm=((1, 64, 8, 8),), groupnorm_dtypes=("bfloat16",), groups=32,
                 matmul_n=256, copy_bytes=8 << 20, time_s=0.02, compile=False),
}


@dataclass
class Peaks:
    tflops: float  # bf16 dense matrix product, 1e12 FLOP/s
    gbps: float  # device-to-device copy, (bytes read + bytes written) / s / 1e9
    how: str


def measure_peaks(dev: Device, sizes: Sizes) -> Peaks:
    n = sizes.matmul_n
    a = torch.randn(n, n, device=dev.torch, dtype=torch.bfloat16)  # random data: zeros run faster (less switching)
    b = torch.randn(n, n, device=dev.torch, dtype=torch.bfloat16)
    t_mm = time_call(functools.partial(torch.matmul, a, b), dev, budget_s=0.3).median_s
    del a, b
    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=dev.torch).random_()
    dst = torch.empty_like(src)
    t_copy = time_call(lambda: dst.copy_(src), dev, budget_s=0.3).median_s
    return Peaks(2 * n**3 / t_mm / 1e12, 2 * sizes.copy_bytes / t_copy / 1e9,
                 f"bf16 {n}x{n}x{n} matrix product (random data), {sizes.copy_bytes / 2**30:g} GiB "
                 f"device-to-device copy, medians, measured in this run")


def quoted_peak(dev: Device) -> str | None:
    """What the pytest suite's table (bench/conftest.py, quoted from the workplace's anchors or from
    datasheets) says of this device, for comparison; None off a GPU or where pytest is missing."""
    if dev.type != "cuda":
        return None
    try:
        from bench.conftest import peak_for
    except ImportError:
        return None
    peak = peak_for(dev.name)
    return peak.describe() if peak else None


def _derive(row: SpeedRow, seconds: float, flops: float, nbytes: float, peaks: Peaks, tensor_cores: bool) -> None:
    row.ms = seconds * 1e3
    row.tflops = flops / seconds / 1e12 if flops else None
    row.gbps = nbytes / seconds / 1e9
    compute = flops / (peaks.tflops * 1e12) if flops and tensor_cores else 0.0
    row.pct_peak = 100 * max(compute, nbytes / (peaks.gbps * 1e9)) / seconds


def _speedups(rows: list[SpeedRow]) -> None:
    """Speedup of each timed row over its baseline's time in the same (op, case, mode, dtype)."""
    base = {(r.op, r.case, r.mode, r.dtype): r.ms for r in rows if r.provider == r.baseline and r.ms}
    for r in rows:
        ref = base.get((r.op, r.case, r.mode, r.dtype))
        if ref and r.ms:
            r.speedup = ref / r.ms


# ------------------------------------------------------------------------------------------ attention
# getattr: a torch without one of these backends (cuDNN came last) leaves its column out
SDPA_PINNED = {name: getattr(SDPBackend, attr) for name, attr in (
    ("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION"))
    if hasattr(SDPBackend, attr)}


def _sdpa(q, k, v, backend=None):
    pinned = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
    with pinned, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA warns each reason before it raises
        # (B, N, H, D) -> (B, H, N, D) views, as diffusers' processors pass them
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # (B, Nq, H, D)


def attention_providers(dev: Device) -> dict:
    ours_label = "ours" if dev.type == "cuda" else "ours (PyTorch path: no GPU)"
    out = {ours_label: lambda q, k, v: kernels.attention(q, k, v, backend=dev.ours_backend), "sdpa": _sdpa}
    for name, backend in SDPA_PINNED.items():
        out[name] = lambda q, k, v, backend=backend: _sdpa(q, k, v, backend)
    return out


def _timed_rows(rows_of_case: list[SpeedRow], fn, inputs, dout, dev, clock, sizes, flops: dict, nbytes: dict,
                peaks, tensor_cores: bool) -> None:
    """Time each checked row (one per mode), unless the section's time is spent."""
    for row in rows_of_case:
        if clock.expired():
            row.status, row.note = CUT, "section budget spent"
            continue
        if row.mode == "forward":
            def call():
                with torch.no_grad():
                    fn(*inputs)
        else:
            def call():
                torch.autograd.grad(fn(*inputs), inputs, dout)
        seconds = time_call(call, dev, min(sizes.time_s, clock.share_left(0.5))).median_s
        _derive(row, seconds, flops.get(row.mode, 0.0), nbytes[row.mode], peaks, tensor_cores)
        row.status = PASS


def attention_rows(dev: Device, sizes: Sizes, peaks: Peaks, clock: SectionClock, seed: int) -> list[SpeedRow]:
    rows: list[SpeedRow] = []
    providers = attention_providers(dev)
    baseline = "sdpa"
    shapes = [(kind, n, n if kind == "self" else TEXT_TOKENS, d) for kind in ("self", "cross")
              for n, d in sizes.attention]
    for kind, nq, nk, d in shapes:
        for dtype_name in sizes.attention_dtypes:
            dtype = getattr(torch, dtype_name)
            case = f"{kind} {nq}x{nk} d{d}"
            gen = torch.Generator().manual_seed(seed)
            B, H = sizes.batch, sizes.heads
            q, k, v = (torch.randn(B, n, H, d, generator=gen).to(dev.torch, dtype).requires_grad_()
                       for n in (nq, nk, nk))
            dout = torch.randn(B, nq, H, d, generator=gen).to(dev.torch, dtype)
            head_bytes = B * H * d * dtype.itemsize  # one token of one tensor, all heads
            fwd_bytes = (2 * nq + 2 * nk) * head_bytes  # read q, k, v; write o
            bwd_bytes = (4 * nq + 4 * nk) * head_bytes  # read q, k, v, o, do; write dq, dk, dv
            flops = {mode: 4 * B * H * nq * nk * d * ATTENTION_FLOP_FACTOR[mode] for mode in MODES}
            nbytes = {"forward": fwd_bytes, "forward+backward": fwd_bytes + bwd_bytes}
            ref_out, ref_grads = attention_reference(q, k, v, None, dout)
            tol = ATTENTION_TOL[dtype]
            for provider, fn in providers.items():
                mine = [SpeedRow("attention", case, mode, dtype_name, provider, baseline, FAILED) for mode in MODES]
                rows += mine
                if clock.expired():
                    for r in mine:
                        r.status, r.note = CUT, "section budget spent"
                    continue
                try:
                    out = fn(q, k, v)
                    grads = torch.autograd.grad(out, (q, k, v), dout)
                except Exception as e:  # a pinned SDPA backend without a kernel for these inputs: skip
                    status = SKIPPED if provider in SDPA_PINNED else FAILED
                    for r in mine:
                        r.status, r.note = status, short_error(e)
                    continue
                worst = max([worst_ratio(out, ref_out, tol, tol)] +
                            [worst_ratio(g, r, tol * GRAD_TOL_FACTOR, tol * GRAD_TOL_FACTOR)
                             for g, r in zip(grads, ref_grads)])
                for r in mine:
                    r.check = worst
                if worst > 1.0:
                    for r in mine:
                        r.note = f"check: {worst:.3g} x the allowed error against float64; not timed"
                    continue
                _timed_rows(mine, fn, (q, k, v), dout, dev, clock, sizes, flops, nbytes, peaks, tensor_cores=True)
            del q, k, v, dout, ref_out, ref_grads
    return rows


# ------------------------------------------------------------------------------------------ GroupNorm + SiLU


def _eager_gn(groups: int, eps: float):
    return lambda x, w, b: F.silu(F.group_norm(x, groups, w, b, eps))


def groupnorm_providers(dev: Device, sizes: Sizes, eps: float) -> dict:
    ours_label = "ours" if dev.type == "cuda" else "ours (PyTorch path: no GPU)"
    g = sizes.groups
    out = {ours_label: lambda x, w, b: kernels.group_norm(x, g, w, b, eps, silu=True, backend=dev.ours_backend),
           "eager": _eager_gn(g, eps)}
    if sizes.compile:
        import torch._dynamo
        import torch._functorch.config

        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), 64))  # every shape is a new graph: never fall back
        out["compile"] = torch.compile(_eager_gn(g, eps), dynamic=False)
    return out


GROUPNORM_EPS = 1e-5  # the UNet ResBlocks'


def groupnorm_rows(dev: Device, sizes: Sizes, peaks: Peaks, clock: SectionClock, seed: int) -> list[SpeedRow]:
    """Ours and eager at every shape first, then torch.compile (seconds of compiling per shape), so that a
    budget that runs short cuts the compiled rows, not the kernel's."""
    providers = groupnorm_providers(dev, sizes, GROUPNORM_EPS)
    compiled = {k: v for k, v in providers.items() if k == "compile"}
    rows = _groupnorm_rows({k: v for k, v in providers.items() if k != "compile"}, dev, sizes, peaks, clock, seed)
    return rows + _groupnorm_rows(compiled, dev, sizes, peaks, clock, seed) if compiled else rows


def _groupnorm_rows(providers: dict, dev: Device, sizes: Sizes, peaks: Peaks, clock: SectionClock,
                    seed: int) -> list[SpeedRow]:
    rows: list[SpeedRow] = []
    for shape in sizes.groupnorm:
        for layout in ("nchw", "channels_last"):
            for dtype_name in sizes.groupnorm_dtypes:
                dtype = getattr(torch, dtype_name)
                case = f"{'x'.join(map(str, shape))} {layout}"
                gen = torch.Generator().manual_seed(seed)
                x = torch.randn(shape, generator=gen).to(dev.torch, dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_()
                w = (1 + 0.1 * torch.randn(shape[1], generator=gen)).to(dev.torch, dtype).requires_grad_()
                b = (0.1 * torch.randn(shape[1], generator=gen)).to(dev.torch, dtype).requires_grad_()
                dy = torch.randn(shape, generator=gen).to(dev.torch, dtype)
                numel_bytes = x.numel() * dtype.itemsize
                ref_y, ref_grads = groupnorm_reference(x, sizes.groups, w, b, None, GROUPNORM_EPS, True, dy)
                atol, rtol = GROUPNORM_TOL[dtype]
                for provider, fn in providers.items():
                    mine = [SpeedRow("groupnorm+silu", case, mode, dtype_name, provider, "eager", FAILED)
                            for mode in MODES]
                    rows += mine
                    if clock.expired():
                        for r in mine:
                            r.status, r.note = CUT, "section budget spent"
                        continue
                    try:  # for torch.compile: compiles this shape's forward and backward, outside the timing
                        y = fn(x, w, b)
                        grads = torch.autograd.grad(y, (x, w, b), dy)
                    except Exception as e:
                        status = SKIPPED if provider == "compile" else FAILED  # compile: the machine, not ours
                        for r in mine:
                            r.status, r.note = status, short_error(e)
                        continue
                    worst = max([worst_ratio(y, ref_y, atol, rtol)] +
                                [worst_ratio(g, r, atol, rtol) for g, r in zip(grads, ref_grads)])
                    for r in mine:
                        r.check = worst
                    if worst > 1.0:
                        for r in mine:
                            r.note = f"check: {worst:.3g} x the allowed error against float64; not timed"
                        continue
                    nbytes = {mode: GROUPNORM_ACCESSES[mode] * numel_bytes for mode in MODES}
                    _timed_rows(mine, fn, (x, w, b), dy, dev, clock, sizes, {}, nbytes, peaks, tensor_cores=False)
    return rows


def run(dev: Device, clock: SectionClock, args) -> dict:
    sizes = SIZES["dry" if dev.dry_run else "gpu"]
    t0 = time.perf_counter()
    peaks = measure_peaks(dev, sizes)
    notes = [f"Peaks measured in {time.perf_counter() - t0:.1f} s. % of peak = max(FLOPs / peak FLOP/s, "
             "bytes / peak bandwidth) / time: for attention the FLOPs 4 B H Nq Nk D (x3.5 with the backward) "
             "at the tensor-core rate and the minimum traffic (forward reads q, k, v and writes o; the backward "
             "reads q, k, v, o, dO and writes dq, dk, dv); for GroupNorm + SiLU the traffic alone (2 "
             "tensor-sized accesses forward, 5 forward+backward).",
             "Times are medians of calls timed between CUDA events with the L2 overwritten before each "
             "(triton.testing.do_bench's method), after a warm-up; each provider was checked against float64 "
             "first." if dev.type == "cuda" else
             "Dry run: CPU wall-clock medians of toy shapes, ours on PyTorch's path; the figures mean nothing."]
    quoted = quoted_peak(dev)
    if quoted:
        notes.append(f"bench/conftest.py's table gives this device {quoted}; the figures here use the peaks "
                     "measured above instead.")
    if not sizes.compile:
        notes.append("torch.compile not run in the dry run: its first compile takes ~15 s on a 2-core CPU.")
    rows = attention_rows(dev, sizes, peaks, clock, args.seed)
    rows += groupnorm_rows(dev, sizes, peaks, clock, args.seed)
    _speedups(rows)
    cut = sum(r.status == CUT for r in rows)
    if cut:
        clock.cut(f"{cut} of {len(rows)} kernel timings (budget)")
    return {"rows": rows, "peaks": {"tflops": peaks.tflops, "gbps": peaks.gbps, "how": peaks.how}, "notes": notes}
