"""What every section of ``python -m bench.gpu`` shares: the device, the time budget, the timers,
the report rows, the comparison helpers and the fault hook that proves the checks bite."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import kernels

# ------------------------------------------------------------------------------------------ statuses
PASS, FAILED, SKIPPED, CUT, ERROR = "pass", "FAILED", "skipped", "cut", "ERROR"
FAILING = (FAILED, ERROR)  # statuses that fail the run (exit 1, listed first in the report)

# ------------------------------------------------------------------------------------------ device


@dataclass(frozen=True)
class Device:
    type: str  # "cuda" or "cpu"
    name: str  # the GPU's name, or the CPU's model
    torch: torch.device
    dry_run: bool
    l2_bytes: int  # last-level cache the timer flushes between calls (0 on the CPU: nothing flushed)
    sm_count: int
    memory_bytes: int

    def sync(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize()

    @property
    def ours_backend(self) -> str:
        """The backend of the timed "ours" rows: Triton on a GPU; on the CPU PyTorch's path (auto),
        never the interpreter, whose times mean nothing."""
        return "triton" if self.type == "cuda" else "auto"

    @property
    def check_backend(self) -> str:
        """The backend of the correctness checks: the compiled kernels on a GPU, the interpreter on
        the CPU (the dry run sets TRITON_INTERPRET=1), PyTorch's path where Triton is missing."""
        return "triton" if kernels.triton_available() else "torch"


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "cpu"


def detect_device(dry_run: bool) -> Device:
    if dry_run:
        return Device("cpu", cpu_name(), torch.device("cpu"), True, 0, os.cpu_count() or 1, 0)
    if not torch.cuda.is_available():
        raise SystemExit("python -m bench.gpu needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "--dry-run runs the same code on the CPU")
    props = torch.cuda.get_device_properties(0)
    return Device("cuda", props.name, torch.device("cuda", 0), False,
                  int(getattr(props, "L2_cache_size", 50 << 20)), props.multi_processor_count, props.total_memory)


# ------------------------------------------------------------------------------------------ budget


class Budget:
    """The run's deadline, shared out among the sections. A section's deadline is set when it
    starts: its share of what is left, against the shares of the sections still to come, so time a
    section leaves unused goes to the later ones and an overrun is taken from them."""

    def __init__(self, total_s: float, start: float, shares: dict[str, float], reserve_s: float):
        self.start, self.total_s = start, total_s
        self.deadline = start + total_s - reserve_s  # the reserve writes the report
        self.pending = dict(shares)
        self.used: dict[str, dict] = {}

    def section(self, name: str) -> SectionClock:
        share = self.pending.pop(name)
        now = time.monotonic()
        left = max(0.0, self.deadline - now)
        allotted = left * share / (share + sum(self.pending.values()))
        return SectionClock(name, now, now + allotted, self)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


@dataclass
class SectionClock:
    name: str
    start: float
    deadline: float
    budget: Budget
    cuts: list[str] = field(default_factory=list)  # what was cut short, for the report

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0

    def share_left(self, fraction: float) -> float:
        """Seconds for the next part when it may take ``fraction`` of what is left."""
        return max(0.0, self.left()) * fraction

    def cut(self, what: str) -> None:
        self.cuts.append(what)

    def close(self) -> dict:
        spent = time.monotonic() - self.start
        info = {"allotted_s": round(self.deadline - self.start, 1), "spent_s": round(spent, 1), "cut": self.cuts}
        self.budget.used[self.name] = info
        return info


# ------------------------------------------------------------------------------------------ timing
WARMUP_S = 0.05  # do_bench's default is 25 ms; a little more settles clocks after a compile
MIN_REPS, MAX_REPS = 5, 200
L2_FLUSH_FACTOR = 4  # the flush buffer is this many times the L2: nothing of the last call survives it


@dataclass
class Timing:
    median_s: float
    reps: int


def time_call(fn, dev: Device, budget_s: float) -> Timing:
    """Median seconds of ``fn()`` (after one call outside the timing, which compiles, autotunes and
    allocates). On a GPU in the style of ``triton.testing.do_bench``: the L2 is overwritten before
    every call and each call is timed between two CUDA events, so that neither the cache nor the
    host's launch queue flatters small shapes. On the CPU, the wall clock around each call."""
    fn()
    dev.sync()
    t0 = time.perf_counter()
    fn()
    dev.sync()
    estimate = max(time.perf_counter() - t0, 1e-7)
    reps = int(min(MAX_REPS, max(MIN_REPS, budget_s / estimate)))
    if dev.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return Timing(statistics.median(times), reps)
    flush = torch.empty(L2_FLUSH_FACTOR * dev.l2_bytes, dtype=torch.int8, device=dev.torch)
    for _ in range(max(1, int(WARMUP_S / estimate))):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return Timing(statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3, reps)


def interleave(calls: dict, dev: Device, *, seconds: float, min_rounds: int, max_rounds: int,
               warmup: bool = True) -> dict[str, list[float]]:
    """End to end: one call of each provider per round, the order rotating, each between two
    synchronizations on the wall clock, so that every provider sees the same stretch of the
    machine's state (clocks, other processes). A warm-up call of each first, unless the caller made
    it. Stops after ``seconds`` once ``min_rounds`` are done. Returns the seconds of every timed call."""
    if warmup:
        for call in calls.values():
            call()
    dev.sync()
    names, out = list(calls), {name: [] for name in calls}
    stop = time.monotonic() + seconds
    r = 0
    while r < max_rounds and (r < min_rounds or time.monotonic() < stop):
        for name in names[r % len(names):] + names[:r % len(names)]:
            dev.sync()
            t0 = time.perf_counter()
            calls[name]()
            dev.sync()
            out[name].append(time.perf_counter() - t0)
        r += 1
    return out


# ------------------------------------------------------------------------------------------ rows


@dataclass
class CheckRow:
    """One correctness check: ours against a float64 reference."""
    op: str  # "attention" | "groupnorm"
    group: str  # "matrix" | "sd shapes" | "fuzz"
    case: str  # the variant, readable: "cross 201x77 d40 bf16 lengths unaligned"
    status: str
    worst: float | None = None  # max over outputs and gradients of |ours - ref| / allowed; <= 1 passes
    worst_tensor: str = ""  # which of them ("out", "dq", ...)
    note: str = ""
    seconds: float = 0.0


@dataclass
class SpeedRow:
    """One timed kernel: a provider at a shape, dtype and mode, checked before it is timed."""
    op: str
    case: str
    mode: str  # "forward" | "forward+backward"
    dtype: str
    provider: str
    baseline: str
    status: str
    check: float | None = None  # worst error / allowed of this provider's check (<= 1 passes)
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    pct_peak: float | None = None  # max(FLOPs / peak FLOP/s, bytes / peak bandwidth) / time, in %
    speedup: float | None = None  # baseline time / this time
    note: str = ""


@dataclass
class E2ERow:
    """One end-to-end provider at one model and mode."""
    model: str
    case: str
    mode: str
    provider: str
    baseline: str
    status: str
    check: float | None = None  # error against the fp32 reference / the bound the baseline sets
    ms: float | None = None
    images_per_s: float | None = None
    speedup: float | None = None
    rounds: int = 0
    note: str = ""


# ------------------------------------------------------------------------------------------ comparisons


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def worst_ratio(got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> float:
    """max |got - ref| / (atol * max(1, max |ref|) + rtol * |ref|): <= 1 passes. atol is taken on the
    scale of the reference (at least 1, the scale of the unit-normal inputs), so that a tensor whose
    entries are all tiny is judged on its inputs' scale. NaN or inf anywhere fails."""
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        return math.inf
    if not torch.isfinite(got).all():
        return math.inf
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    allowed = atol * scale + rtol * ref.abs()
    return ((got - ref).abs() / allowed).max().item() if ref.numel() else 0.0


def unzero_(model: nn.Module) -> nn.Module:
    """Give every all-zero weight matrix random values (from torch's seeded generator). A fresh model
    zero-initializes the last layer of each block (so that training starts from the identity); with
    those zero, the output would not depend on attention at all, and an end-to-end check could not
    see a broken kernel. A trained network has no such zeros. Scaled like PyTorch's default init."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))  # std 1 / sqrt(fan_in)
    return model


# ------------------------------------------------------------------------------------------ our kernels on / off
_off = {"depth": 0}


@contextlib.contextmanager
def kernels_off():
    """Our models with PyTorch's ops in place of our kernels (``kernels.use_backend("torch")``), and
    outside the reach of ``inject_fault``: the reference a broken kernel is caught against."""
    _off["depth"] += 1
    try:
        with kernels.use_backend("torch"):
            yield
    finally:
        _off["depth"] -= 1


def triton_call(fn):
    """``fn`` run with every op on our Triton kernels (``kernels.use_backend("triton")``), whatever
    ``auto`` would pick: what the kernels do to a whole model."""
    def call(*args, **kwargs):
        with kernels.use_backend("triton"):
            return fn(*args, **kwargs)
    return call


def off_call(fn):
    """``fn`` run inside ``kernels_off()`` at every call."""
    def call(*args, **kwargs):
        with kernels_off():
            return fn(*args, **kwargs)
    return call


FAULT_SCALE = 0.5  # --inject-fault multiplies our op's output by 1 + FAULT_SCALE


def inject_fault(op: str) -> None:
    """Replace our op (``kernels.attention`` or ``kernels.group_norm``) everywhere it is bound, in
    every loaded module (the models import it by name), by one whose output is 1.5 times too large,
    gradients included, except inside ``kernels_off()``. Modules imported later take it from
    ``kernels``. The run must then report FAILED rows and time none of them."""
    name = {"attention": "attention", "groupnorm": "group_norm"}[op]
    original = getattr(kernels, name)

    def wrong(*args, **kwargs):
        out = original(*args, **kwargs)
        return out if _off["depth"] else out * (1 + FAULT_SCALE)

    for module in list(sys.modules.values()):
        try:
            names = [k for k, v in vars(module).items() if v is original]
        except TypeError:  # a module without a __dict__
            continue
        for k in names:
            setattr(module, k, wrong)


def short_error(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
