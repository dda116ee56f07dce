"""Section 1: our kernels against float64 references, every variant the models reach, plus a fuzz.

On a GPU the compiled Triton kernels run on CUDA tensors; in a dry run the same kernels run through
Triton's interpreter on the CPU. The reference takes the same (rounded) inputs in float64, so what
is left is the kernel's own error. Each check compares the output and every gradient (for a random
upstream gradient) and records max |ours - ref| / allowed over them: 1 or less passes.

Compiling a kernel variant costs about a second of one CPU core, and the matrix has over a hundred,
so on a GPU the checks run in several processes (``--workers``) that share Triton's cache on disk.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from bench.gpu.common import FAILED, PASS, SKIPPED, CheckRow, Device, SectionClock, inject_fault, short_error, \
    worst_ratio

# Allowed error, as a fraction of max(1, the reference's largest magnitude) plus the same fraction of
# each reference value (see worst_ratio). Attention, from tests/test_attention.py: fp16's 11-bit and
# bf16's 8-bit significands round P and dS before their products, and the result once more; the worst
# seen over 200 fuzz cases was 6.6e-4 (fp16) and 5.3e-3 (bf16), 4.5x inside these.
ATTENTION_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}
# The gradients' reference here is exact float64 autograd, whose delta = rowsum(dO * O) uses the exact
# O rather than the kernel's rounded one (tests/test_attention.py: that alone broke 3e-2 at bf16 once in
# 300 cases, at 3.8%): twice the output's tolerance.
GRAD_TOL_FACTOR = 2.0
# GroupNorm (atol fraction, rtol), from tests/test_groupnorm.py: one rounding of an fp32 result.
GROUPNORM_TOL = {torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2), torch.float32: (1e-5, 1e-5)}
# The sd VAE's single 512-wide head: being added to kernels.attention; until then a refusal is a skip.
PENDING_HEAD_DIMS = (512,)
UNALIGNED_PAD = 1  # elements appended to each row, so rows start off the 16-byte grid (D=40 bf16: 82 bytes)
DTYPES = ("bfloat16", "float16")
TEXT_TOKENS = 77  # cross-attention keys: SD's CLIP context


@dataclass(frozen=True)
class Sizes:
    batch: int  # matrix
    heads: int
    n_self: int  # not a multiple of any block size
    head_dims: tuple[int, ...]
    sd_attention: tuple[tuple[int, int, int], ...]  # (N, heads, D) checked at the models' own sizes, batch 1
    groupnorm: tuple[tuple[tuple[int, int, int, int], int, float], ...]  # (shape, groups, eps)
    fuzz: int  # cases per op
    fuzz_max_tokens: int
    fuzz_max_side: int


SIZES = {
    "gpu": Sizes(
        batch=2, heads=3, n_self=201, head_dims=(40, 64, 80, 160, 512),
        # SD 1.5 at 512 x 512 (8 heads), and the sd VAE's mid attention over 64 x 64 latents (one head)
        sd_attention=((4096, 8, 40), (1024, 8, 80), (256, 8, 160), (64, 8, 160), (4096, 1, 512)),
        groupnorm=(((2, 320, 64, 64), 32, 1e-5), ((2, 640, 32, 32), 32, 1e-5), ((2, 1280, 16, 16), 32, 1e-5),
                   ((3, 96, 13, 11), 32, 1e-5),  # 3 channels per group, odd sides
                   ((1, 128, 512, 512), 32, 1e-6)),  # the sd VAE's first level at 512 px: split reduction
        fuzz=24, fuzz_max_tokens=600, fuzz_max_side=48),
    "dry": Sizes(
        batch=2, heads=2, n_self=19, head_dims=(40, 512),
        sd_attention=((32, 2, 40), (16, 1, 512)),
        groupnorm=(((2, 24, 3, 5), 4, 1e-6),),
        fuzz=2, fuzz_max_tokens=40, fuzz_max_side=6),
}
FUZZ_HEAD_DIMS = (16, 40, 64, 72, 80, 128, 160)  # the kernels' chunked and power-of-two head dims


@dataclass(frozen=True)
class AttentionCase:
    group: str
    kind: str  # "self" | "cross"
    batch: int
    heads: int
    nq: int
    nk: int
    d: int
    dtype: str
    lengths: bool  # per-batch valid-key counts
    aligned: bool  # rows on 16 bytes (else each row padded by UNALIGNED_PAD)
    seed: int

    @property
    def label(self) -> str:
        return (f"{self.kind} {self.batch}x{self.nq}x{self.nk} h{self.heads} d{self.d} {self.dtype} "
                f"{'lengths' if self.lengths else 'all keys'} {'aligned' if self.aligned else 'unaligned'}")


@dataclass(frozen=True)
class GroupNormCase:
    group: str
    shape: tuple[int, ...]
    groups: int
    eps: float
    dtype: str
    silu: bool
    shift: bool  # the ResBlock's timestep shift, (B, C), added before the statistics
    channels_last: bool
    seed: int

    @property
    def label(self) -> str:
        return (f"{'x'.join(map(str, self.shape))} G{self.groups} {self.dtype} "
                f"{'channels_last' if self.channels_last else 'nchw'}{' silu' if self.silu else ''}"
                f"{' shift' if self.shift else ''}")


def build_cases(sizes: Sizes, seed: int) -> list:
    """The models' own shapes first (the slowest checks start first), then the matrix, then the fuzz."""
    cases, n = [], 0

    def seed_of() -> int:
        nonlocal n
        n += 1
        return seed * 100_003 + n

    for nq, heads, d in sizes.sd_attention:
        for kind in ("self", "cross") if d not in PENDING_HEAD_DIMS else ("self",):  # the VAE has no text
            for dtype in DTYPES:
                nk = nq if kind == "self" else TEXT_TOKENS
                cases.append(AttentionCase("sd shapes", kind, 1, heads, nq, nk, d, dtype, False, True, seed_of()))
    for shape, groups, eps in sizes.groupnorm:
        for dtype in DTYPES:
            for channels_last in (False, True):
                for silu in (True, False):
                    for shift in (True, False):
                        cases.append(GroupNormCase("matrix", shape, groups, eps, dtype, silu, shift, channels_last,
                                                   seed_of()))
    for d in sizes.head_dims:
        for kind in ("self", "cross"):
            for dtype in DTYPES:
                for lengths in (False, True):
                    for aligned in (True, False):
                        nk = sizes.n_self if kind == "self" else TEXT_TOKENS
                        cases.append(AttentionCase("matrix", kind, sizes.batch, sizes.heads, sizes.n_self, nk, d,
                                                   dtype, lengths, aligned, seed_of()))
    rng = random.Random(seed)
    for _ in range(sizes.fuzz):
        kind = rng.choice(("self", "cross"))
        nq = rng.randint(1, sizes.fuzz_max_tokens)
        nk = nq if kind == "self" else rng.choice((TEXT_TOKENS, rng.randint(1, sizes.fuzz_max_tokens)))
        cases.append(AttentionCase("fuzz", kind, rng.randint(1, 3), rng.randint(1, 4), nq, nk,
                                   rng.choice(FUZZ_HEAD_DIMS), rng.choice(DTYPES), rng.random() < 0.5,
                                   rng.random() < 0.5, seed_of()))
    for _ in range(sizes.fuzz):
        groups = rng.choice((1, 4, 8, 32))
        shape = (rng.randint(1, 3), groups * rng.randint(1, 12), rng.randint(1, sizes.fuzz_max_side),
                 rng.randint(1, sizes.fuzz_max_side))
        cases.append(GroupNormCase("fuzz", shape, groups, rng.choice((1e-5, 1e-6)), rng.choice(DTYPES),
                                   rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.5, seed_of()))
    return cases


# ------------------------------------------------------------------------------------------ references


def attention_reference(q, k, v, key_lengths, dout):
    """float64 softmax(q k^T / sqrt(D)) v per head, and its gradients by autograd.
    q (B, Nq, H, D), k and v (B, Nk, H, D), key_lengths (B,) or None -> out, (dq, dk, dv)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])  # (B, H, Nq, Nk)
    if key_lengths is not None:
        valid = torch.arange(k.shape[1], device=k.device)[None, :] < key_lengths[:, None]  # (B, Nk)
        s = s.masked_fill(~valid[:, None, None, :], -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)  # (B, Nq, H, D)
    return out.detach(), torch.autograd.grad(out, (q, k, v), dout.double())


def groupnorm_reference(x, groups, weight, bias, shift, eps, silu, dy):
    """float64 GroupNorm(x + shift) (+ SiLU) and its gradients in x, weight, bias (and shift)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    h = leaves[0]
    if shift is not None:
        leaves.append(shift.detach().double().requires_grad_())
        h = h + leaves[3][:, :, None, None]  # (B, C, H, W)
    y = F.group_norm(h, groups, leaves[1], leaves[2], eps)
    if silu:
        y = F.silu(y)
    return y.detach(), torch.autograd.grad(y, leaves, dy.double())


# ------------------------------------------------------------------------------------------ checks


def _randn(shape, gen, dev, dtype):
    return torch.randn(shape, generator=gen).to(device=dev, dtype=dtype)  # drawn on the CPU: same values anywhere


def check_attention(case: AttentionCase, dev: Device) -> CheckRow:
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    B, H, D = case.batch, case.heads, case.d
    pad = 0 if case.aligned else UNALIGNED_PAD

    def tokens(n):  # (B, n, H, D), a view of rows D + pad wide when unaligned
        base = _randn((B, n, H, D + pad), gen, dev.torch, dtype).requires_grad_()
        return base[..., :D] if pad else base

    q, k, v = tokens(case.nq), tokens(case.nk), tokens(case.nk)
    lengths = torch.randint(1, case.nk + 1, (B,), generator=gen).to(dev.torch) if case.lengths else None
    dout = _randn((B, case.nq, H, D), gen, dev.torch, dtype)
    row = CheckRow("attention", case.group, case.label, FAILED)
    try:
        out = kernels.attention(q, k, v, key_lengths=lengths, backend=dev.check_backend)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    except Exception as e:
        row.note = short_error(e)
        if case.d in PENDING_HEAD_DIMS:
            row.status, row.note = SKIPPED, f"kernels.attention does not take D={case.d} yet: {row.note}"
        row.seconds = time.perf_counter() - t0
        return row
    ref_out, ref_grads = attention_reference(q, k, v, lengths, dout)
    tol = ATTENTION_TOL[dtype]
    ratios = {"out": worst_ratio(out, ref_out, tol, tol)}
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        ratios[name] = worst_ratio(got, ref, tol * GRAD_TOL_FACTOR, tol * GRAD_TOL_FACTOR)
    return _finish(row, ratios, t0)


def check_groupnorm(case: GroupNormCase, dev: Device) -> CheckRow:
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    B, C = case.shape[:2]
    # unit noise around a per-channel offset: a group's mean is not 0, as after a convolution
    x = _randn(case.shape, gen, dev.torch, torch.float32) + _randn((1, C, 1, 1), gen, dev.torch, torch.float32)
    x = x.to(dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (1 + 0.1 * _randn((C,), gen, dev.torch, torch.float32)).to(dtype).requires_grad_()
    bias = (0.1 * _randn((C,), gen, dev.torch, torch.float32)).to(dtype).requires_grad_()
    shift = (0.5 * _randn((B, C), gen, dev.torch, torch.float32)).to(dtype).requires_grad_() if case.shift else None
    dy = _randn(case.shape, gen, dev.torch, dtype)
    row = CheckRow("groupnorm", case.group, case.label, FAILED)
    inputs = [x, weight, bias] + ([shift] if shift is not None else [])
    try:
        y = kernels.group_norm(x, case.groups, weight, bias, case.eps, case.silu, shift=shift,
                               backend=dev.check_backend)
        grads = torch.autograd.grad(y, inputs, dy)
    except Exception as e:
        row.note, row.seconds = short_error(e), time.perf_counter() - t0
        return row
    ref_y, ref_grads = groupnorm_reference(x, case.groups, weight, bias, shift, case.eps, case.silu, dy)
    atol, rtol = GROUPNORM_TOL[dtype]
    ratios = {"y": worst_ratio(y, ref_y, atol, rtol)}
    for name, got, ref in zip(("dx", "dweight", "dbias", "dshift"), grads, ref_grads):
        ratios[name] = worst_ratio(got, ref, atol, rtol)
    return _finish(row, ratios, t0)


def _finish(row: CheckRow, ratios: dict[str, float], t0: float) -> CheckRow:
    row.worst_tensor = max(ratios, key=ratios.get)
    row.worst = ratios[row.worst_tensor]
    row.status = PASS if row.worst <= 1.0 else FAILED
    if row.status == FAILED:
        row.note = ", ".join(f"{k} {v:.3g}" for k, v in ratios.items() if v > 1.0) + " x the allowed error"
    row.seconds = time.perf_counter() - t0
    return row


def check_case(case, dev: Device) -> CheckRow:
    try:
        if isinstance(case, AttentionCase):
            return check_attention(case, dev)
        return check_groupnorm(case, dev)
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the float64 references of the large shapes: give them back


# ------------------------------------------------------------------------------------------ worker processes
_worker = {}


def _init_worker(dev: Device, fault: str | None) -> None:
    torch.set_num_threads(1)  # several processes share the cores; each mostly waits on Triton or the GPU
    if fault:
        inject_fault(fault)
    _worker["dev"] = dev


def _run_indexed(job):
    i, case = job
    return i, check_case(case, _worker["dev"])


def run_checks(cases: list, dev: Device, clock: SectionClock, workers: int, fault: str | None) -> list[CheckRow]:
    """Every case, in ``workers`` processes (spawned: CUDA cannot fork) or in this one; the cases not
    finished by the section's deadline are listed as cut."""
    rows: list[CheckRow | None] = [None] * len(cases)
    if workers <= 1:
        for i, case in enumerate(cases):
            if clock.expired():
                break
            rows[i] = check_case(case, dev)
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (dev, fault))
        try:
            results = pool.imap_unordered(_run_indexed, list(enumerate(cases)))
            for _ in cases:
                i, row = results.next(timeout=max(0.01, clock.left()))
                rows[i] = row
        except multiprocessing.TimeoutError:
            pass
        finally:
            pool.terminate()  # a check still running at the deadline is abandoned
            pool.join()
    cut = [case for case, row in zip(cases, rows) if row is None]
    if cut:
        clock.cut(f"{len(cut)} of {len(cases)} checks not run (budget), from '{cut[0].label}'")
    return [row for row in rows if row is not None]


def run(dev: Device, clock: SectionClock, args) -> dict:
    sizes = SIZES["dry" if dev.dry_run else "gpu"]
    cases = build_cases(sizes, args.seed)
    rows = run_checks(cases, dev, clock, args.workers, args.inject_fault)
    how = ("the compiled Triton kernels on CUDA tensors" if dev.type == "cuda" else
           "the Triton kernels through Triton's interpreter on the CPU" if dev.check_backend == "triton" else
           "PyTorch's path (Triton is not installed): this checks the harness, not the kernels")
    return {"rows": rows, "cases": len(cases), "notes": [
        f"Ran {how}, against float64 references on the same inputs; gradients for a random upstream "
        f"gradient. A check passes when max |ours - ref| / allowed <= 1 over the output and every "
        f"gradient (allowed: a per-dtype fraction of max(1, max |ref|) plus of |ref|; attention "
        f"fp16 {ATTENTION_TOL[torch.float16]:g}, bf16 {ATTENTION_TOL[torch.bfloat16]:g}, gradients x"
        f"{GRAD_TOL_FACTOR:g}; GroupNorm (atol, rtol) fp16 {GROUPNORM_TOL[torch.float16]}, bf16 "
        f"{GROUPNORM_TOL[torch.bfloat16]}).",
        f"{args.workers} worker process(es); fuzz seed {args.seed}."]}
