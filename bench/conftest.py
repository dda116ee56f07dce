"""Benchmark session set-up: the device and its peak rates, quick mode, the timing helper, and the
guard that keeps the Triton interpreter out of every timing.

Every benchmark takes the ``bench`` fixture. ``bench.label(...)`` names the result (the keys that
``bench.report`` groups by: suite, case, mode, dtype, provider, baseline) and ``bench.time(build, ...)``
times one unit of work under pytest-benchmark, then writes the derived figures (TFLOP/s, GB/s,
images/s, fraction of the device roofline) beside the time in ``benchmark.extra_info``. End to end,
``bench.interleave`` times every provider's call in alternation and ``bench.replay`` records one
provider's rounds in its own test, so that providers compared on a shared machine saw the same load.

On a CPU torch runs one thread and the clock is the process's CPU time (see ``cpu_time_timer``).

Quick mode (``--bench-quick`` or ``LDM_BENCH_QUICK=1``) keeps only the cases marked ``quick`` (the
smallest sizes) and times two rounds each, so that CI can run the whole matrix of providers and
modes in well under two minutes on a 2-core CPU.

This file never sets ``TRITON_INTERPRET``: when the environment has it (the test session sets it),
every Triton provider is skipped with that reason rather than timing the interpreter.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import kernels
from bench.report import KERNELS_OFF, KERNELS_ON, markdown
from kernels.dispatch import triton_available, triton_interpreted

QUICK_ENV = "LDM_BENCH_QUICK"
THREADS_ENV = "LDM_BENCH_THREADS"
# CPU threads. One by default: on a shared 2-core machine two OpenMP threads that wait on each other
# behind other people's jobs ran the tiny UNet's forward at a median of 90-170 ms, with 3.3 s outliers,
# against 25 ms on one thread (load average 4.4). 0 keeps PyTorch's default (one per core).
DEFAULT_CPU_THREADS = 1
HALF_DTYPES = (torch.float16, torch.bfloat16)  # the dtypes the tensor-core peak applies to
E2E_AMP_DTYPE = torch.bfloat16  # end to end on a GPU: bf16 autocast over fp32 weights (diffusers' mixed precision)


@dataclass(frozen=True)
class Peak:
    tflops: float  # dense fp16/bf16 tensor-core rate, 1e12 FLOP/s
    gbps: float  # device copy bandwidth, bytes read + bytes written per second / 1e9
    source: str

    def describe(self) -> str:
        return f"{self.tflops:g} TFLOP/s bf16 dense, {self.gbps / 1000:g} TB/s copy ({self.source})"


# First match wins: every substring of the key occurs in the device name (case-insensitive).
# H100 SXM and H200: quoted from the workplace's anchors (ANCHORS.md: "This workplace measured an H100 at
# about 790-800 TFLOP/s bf16 dense and about 3.0 TB/s device copy (H200: 4.3 TB/s)"), not measured by this
# suite; the rest are datasheet figures. `python -m bench.gpu` measures both peaks in each of its runs
# (a bf16 matmul and a device copy) and its report's % of peak uses those, which supersede this table.
ANCHORS_SOURCE = "quoted from ANCHORS.md (workplace measurement, not this run)"
PEAKS: tuple[tuple[tuple[str, ...], Peak], ...] = (
    (("h200",), Peak(790, 4300, ANCHORS_SOURCE)),
    (("h100", "pcie"), Peak(756, 2000, "datasheet")),
    (("h100", "nvl"), Peak(835, 3900, "datasheet")),
    (("h100",), Peak(790, 3000, ANCHORS_SOURCE)),
    (("a100", "80gb", "pcie"), Peak(312, 1935, "datasheet")),
    (("a100", "80gb"), Peak(312, 2039, "datasheet")),
    (("a100",), Peak(312, 1555, "datasheet, 40 GB")),
)


def peak_for(name: str) -> Peak | None:
    lowered = name.lower()
    for keys, peak in PEAKS:
        if all(k in lowered for k in keys):
            return peak
    return None


@dataclass(frozen=True)
class Device:
    type: str  # "cuda" or "cpu"
    name: str  # the GPU's name, or "cpu"
    peak: Peak | None  # None: not in PEAKS (every CPU), no roofline fractions
    l2_bytes: int  # last-level cache that repeated calls would otherwise run from (GPU L2; 0 on the CPU)

    def sync(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize()


def detect_device() -> Device:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Device("cuda", props.name, peak_for(props.name), int(getattr(props, "L2_cache_size", 50 << 20)))
    return Device("cpu", "cpu", None, 0)


DEVICE = detect_device()


def triton_skip_reason(device: Device = DEVICE) -> str | None:
    """Why our Triton kernels cannot be timed here, or None when they can."""
    if triton_interpreted():
        return "TRITON_INTERPRET=1 is set: the Triton interpreter is never timed (unset it to bench the kernels)"
    if device.type != "cuda":
        return "our Triton kernels need a CUDA GPU (on the CPU our ops run PyTorch's, which the torch providers time)"
    if not triton_available():
        return "Triton is not installed"
    return None


def quick_mode(config: pytest.Config) -> bool:
    return bool(config.getoption("--bench-quick", default=False)) or os.environ.get(QUICK_ENV, "0") not in ("", "0")


def cpu_threads(config: pytest.Config) -> int:
    value = config.getoption("--bench-threads", default=None)
    if value is None:
        value = os.environ.get(THREADS_ENV, "") or DEFAULT_CPU_THREADS
    return int(value)


def load_1m() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not on every platform
        return None


# ------------------------------------------------------------------------------------ pytest hooks
def pytest_addoption(parser):
    parser.getgroup("ldm bench").addoption(
        "--bench-quick", action="store_true", default=False,
        help=f"quick mode: the smallest case of each benchmark, two rounds (same as {QUICK_ENV}=1)")
    parser.getgroup("ldm bench").addoption(
        "--bench-threads", type=int, default=None,
        help=f"CPU threads for torch (default {DEFAULT_CPU_THREADS}, or {THREADS_ENV}; 0: one per core)")


START_LOAD = pytest.StashKey[float | None]()
NOTES = pytest.StashKey[list]()


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: part of the quick subset (--bench-quick)")
    config.stash[START_LOAD] = load_1m()
    threads = cpu_threads(config)
    if DEVICE.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)


def cpu_time_timer(config: pytest.Config) -> bool:
    """On a CPU with one torch thread, time with the process's CPU time (``time.process_time``)
    rather than the wall clock, unless ``--benchmark-timer`` names another: on a shared machine the
    wall clock counts the time other people's jobs hold the core; the CPU time of one thread does not."""
    args = [*config.invocation_params.args, *os.environ.get("PYTEST_ADDOPTS", "").split()]
    named = any(str(a).startswith("--benchmark-timer") for a in args)
    return DEVICE.type == "cpu" and cpu_threads(config) == 1 and not named


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent.resolve()
    ours = [item for item in items if here in Path(str(item.path)).resolve().parents]
    if cpu_time_timer(config):
        for item in ours:
            if item.get_closest_marker("benchmark") is None:
                item.add_marker(pytest.mark.benchmark(timer=time.process_time))
    if quick_mode(config):
        drop = [item for item in ours if item.get_closest_marker("quick") is None]
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = [item for item in items if item not in set(drop)]


def session_info(config: pytest.Config) -> dict:
    """What a result depends on beyond its own parameters; goes into the JSON's machine_info."""
    info = {
        "device": DEVICE.name,
        "peak": DEVICE.peak.describe() if DEVICE.peak else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if DEVICE.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "timer": "process_time (CPU time, one thread)" if cpu_time_timer(config) else "perf_counter (wall clock)",
        "quick": quick_mode(config),
        "triton_interpret": triton_interpreted(),
        "load_1m_at_start": config.stash.get(START_LOAD, None),
        "date": datetime.date.today().isoformat(),
    }
    if DEVICE.type == "cpu":
        try:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                               if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["cores"] = os.cpu_count()
    return info


def pytest_report_header(config):
    info = session_info(config)
    lines = [f"ldm bench: device {info['device']}, peak {info['peak'] or 'not in the table (no roofline fractions)'}",
             f"ldm bench: quick mode {'on' if info['quick'] else 'off'}, torch {info['torch']}, "
             f"threads {info['threads']}, timer {info['timer']}, load average {info['load_1m_at_start']}"]
    reason = triton_skip_reason()
    if reason:
        lines.append(f"ldm bench: Triton providers skipped: {reason}")
    return lines


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["ldm"] = {**session_info(config), "load_1m_at_end": load_1m()}  # called as the JSON is written


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The notes the benchmarks left (parameter counts side by side) and the end-to-end ratios."""
    notes = config.stash.get(NOTES, [])
    session = getattr(config, "_benchmarksession", None)
    results = [b.as_dict(include_data=False) for b in getattr(session, "benchmarks", []) if not b.has_error]
    table = markdown(results, suites=("unet", "vae"), machine=None) if results else ""
    if not notes and not table.strip():
        return
    terminalreporter.section("ldm bench: end to end")
    for line in notes:
        terminalreporter.write_line(line)
    if table.strip():
        terminalreporter.write_line(table)
    terminalreporter.write_line(f"load average at the end: {load_1m()}")


# ------------------------------------------------------------------------------------ timing
ROUND_S = {"cuda": 2e-3, "cpu": 5e-3}  # a round is k calls with one sync at the end, k so it lasts this long
BUDGET_S = {"cuda": 0.5, "cpu": 0.3}  # time measured per benchmark (full mode) ...
MIN_ROUNDS = {"cuda": 10, "cpu": 3}  # ... within these bounds
MAX_ROUNDS = 200
QUICK_ROUNDS = 2
MAX_CALLS_PER_ROUND = 1000
MAX_COPIES = 64  # input sets cycled through on a GPU so that repeated calls do not run out of L2
SLOW_CALL_S = 0.5  # a warm-up call this slow is its own calibration


def _cycle(calls, k: int, sync):
    """The timed function: one call per invocation, cycling through the input copies; every k-th
    invocation (the last of a round: pytest-benchmark runs k per round) waits for the device."""
    state = {"i": 0, "n": 0}

    def target():
        calls[state["i"]]()
        state["i"] = (state["i"] + 1) % len(calls)
        state["n"] += 1
        if state["n"] == k:
            state["n"] = 0
            sync()

    return target


def mode_call(mode: str, fn, inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor | None = None):
    """One unit of work of a differentiable op ``fn(*inputs)`` whose inputs require grad:
    "forward" (a training forward: the graph is built, then dropped), "backward" (gradients of every
    input from a graph built once, outside the timing; ``retain_graph`` so it can run again),
    "full" (forward then backward). ``grad_out`` defaults to a fixed random tensor like the output."""
    if mode == "forward":
        return lambda: fn(*inputs)
    if mode not in ("backward", "full"):
        raise ValueError(f"unknown mode {mode!r}")
    out = fn(*inputs)
    dout = torch.randn_like(out) if grad_out is None else grad_out
    if mode == "backward":
        return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*inputs), inputs, dout)


class Bench:
    """What a benchmark needs beside pytest-benchmark's fixture: the device, quick mode, labels,
    the interpreter guard and the timing helper."""

    def __init__(self, benchmark, config: pytest.Config):
        self.benchmark = benchmark
        self.config = config
        self.device = DEVICE
        self.quick = quick_mode(config)
        self.torch_device = torch.device(DEVICE.type)
        self.clock = time.process_time if cpu_time_timer(config) else time.perf_counter  # as the marker's

    mode_call = staticmethod(mode_call)

    def skip_unless_triton(self) -> None:
        reason = triton_skip_reason(self.device)
        if reason:
            pytest.skip(reason)

    def note(self, line: str) -> None:
        """A line for the end-of-session summary (printed once however many tests note it)."""
        notes = self.config.stash.setdefault(NOTES, [])
        if line not in notes:
            notes.append(line)

    def label(self, *, suite: str, case: str, mode: str, dtype: str, provider: str, baseline: str, **extra) -> None:
        """Name the result: ``bench.report`` makes one table per (suite, mode, dtype), one row per
        case, one column per provider, ratios against ``baseline`` (a provider of the same case)."""
        self.benchmark.group = f"{suite} {mode} {dtype} {case}"
        self.benchmark.extra_info.update(suite=suite, case=case, mode=mode, dtype=dtype, provider=provider,
                                         baseline=baseline, device=self.device.name, **extra)

    # ------------------------------------------------------------------ end to end (UNet, VAE)
    @property
    def e2e_dtype(self) -> str:
        return "bfloat16 autocast" if self.device.type == "cuda" else "float32"

    def autocast(self):
        """The end-to-end runs' precision: bf16 autocast on a GPU, plain fp32 on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=E2E_AMP_DTYPE)
        return contextlib.nullcontext()

    def provider_skip_reason(self, provider: str) -> str | None:
        """Why ``provider`` cannot be timed here: our kernels on (``KERNELS_ON``) on a GPU need Triton,
        not its interpreter."""
        if provider == KERNELS_ON and self.device.type == "cuda":
            return triton_skip_reason(self.device)
        return None

    def check_provider(self, provider: str) -> None:
        reason = self.provider_skip_reason(provider)
        if reason:
            pytest.skip(reason)

    def as_provider(self, provider: str, fn):
        """``fn`` as ``provider`` runs it: with our kernels off (``KERNELS_OFF``) inside
        ``kernels.use_backend("torch")``, as it is otherwise."""
        if provider != KERNELS_OFF:
            return fn

        def run():
            with kernels.use_backend("torch"):
                fn()

        return run

    def kernels_info(self, provider: str) -> dict:
        """What runs under ``provider`` (for extra_info), and what the on / off ratio means here."""
        if provider not in (KERNELS_ON, KERNELS_OFF):
            return {"backends": f"{provider}: its own modules (PyTorch ops)"}
        # what the models hand the ops under bf16 autocast: q, k, v (B, N, H, D) and a feature map (B, C, H, W)
        qkv = torch.zeros(1, 16, 1, 64, device=self.torch_device, dtype=torch.bfloat16)
        probes = {"attention": (qkv, qkv, qkv),
                  "groupnorm": (torch.zeros(1, 32, 4, 4, device=self.torch_device, dtype=torch.bfloat16),)}
        with kernels.use_backend("torch") if provider == KERNELS_OFF else contextlib.nullcontext():
            backends = ", ".join(f"{op} {kernels.resolve_backend(op, 'auto', *probes[op])}"
                                 for op in kernels.dispatch.OPS)
        note = ("CPU: on and off both run PyTorch's ops (the Triton kernels need CUDA); the ratio is noise"
                if self.device.type == "cpu" else "GPU: on = Triton attention + GroupNorm, off = SDPA + F.group_norm")
        return {"backends": backends, "kernels_note": note}

    @staticmethod
    def free_memory() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def time(self, build, *, flops: float = 0.0, nbytes: float = 0.0, items: float = 0.0,
             item_unit: str = "images", dtype: torch.dtype | None = None, budget_s: float | None = None,
             min_rounds: int | None = None, copies: bool = True) -> float | None:
        """Time ``build()``'s callable (one unit of work; each ``build()`` makes a fresh set of
        inputs) and derive figures from the median: TFLOP/s from ``flops``, GB/s from ``nbytes`` (the
        minimum bytes the work must move), ``item_unit``/s from ``items``, and the fraction of the
        device roofline, max(flops / peak rate, bytes / peak bandwidth) / time, when the device is
        in PEAKS (the compute roof only for fp16/bf16). Returns the median in seconds (None when
        benchmarks are disabled)."""
        dev, info = self.device, self.benchmark.extra_info
        info["load_1m"] = load_1m()
        n = 1
        if copies and dev.type == "cuda" and nbytes:
            n = max(1, min(MAX_COPIES, math.ceil(2 * dev.l2_bytes / nbytes)))
        calls = [build() for _ in range(n)]

        t0 = time.perf_counter()  # warm-up: compiles, autotunes, allocates
        for call in calls:
            call()
        dev.sync()
        per_call = (time.perf_counter() - t0) / n
        if per_call < SLOW_CALL_S:  # calibrate on a warm pass
            t0 = time.perf_counter()
            for call in calls:
                call()
            dev.sync()
            per_call = max((time.perf_counter() - t0) / n, 1e-9)
        k = min(MAX_CALLS_PER_ROUND, max(1, math.ceil(ROUND_S[dev.type] / per_call)))
        if self.quick:
            rounds = QUICK_ROUNDS
        else:
            budget = BUDGET_S[dev.type] if budget_s is None else budget_s
            lo = MIN_ROUNDS[dev.type] if min_rounds is None else min_rounds
            rounds = int(min(MAX_ROUNDS, max(lo, round(budget / (k * per_call)))))
        info.update(calls_per_round=k, input_copies=n)

        self.benchmark.pedantic(_cycle(calls, k, dev.sync), rounds=rounds, iterations=k, warmup_rounds=0)
        return self._derive(flops=flops, nbytes=nbytes, items=items, item_unit=item_unit, dtype=dtype)

    def interleave(self, calls: dict, *, budget_s: float, min_rounds: int) -> dict[str, list[float]]:
        """Time several providers' calls (name -> callable, one unit of work each) in alternation:
        one call of each per round, the order rotating from round to round, so that every provider
        sees the same stretch of a shared machine's load. A warm-up call of each first. Returns the
        seconds of every timed call per provider; hand them to ``replay`` in each provider's test."""
        dev, clock = self.device, self.clock
        for call in calls.values():  # warm-up: compiles, autotunes, allocates
            call()
        dev.sync()
        names, out = list(calls), {name: [] for name in calls}
        rounds, r = None, 0
        while rounds is None or r < rounds:
            for name in names[r % len(names):] + names[:r % len(names)]:
                dev.sync()
                t0 = clock()
                calls[name]()
                dev.sync()
                out[name].append(clock() - t0)
            if rounds is None:  # the first round, warm, sets the count
                per_round = max(sum(times[-1] for times in out.values()), 1e-9)
                wanted = round(budget_s / per_round)
                rounds = QUICK_ROUNDS if self.quick else int(min(MAX_ROUNDS, max(min_rounds, wanted)))
            r += 1
        return out

    def replay(self, durations: list[float], *, items: float = 0.0, item_unit: str = "images") -> float | None:
        """Record durations measured by ``interleave`` as this test's rounds (pytest-benchmark times a
        no-op against a clock that advances by one duration per round), then derive the figures."""
        self.benchmark.extra_info.update(load_1m=load_1m(), interleaved=True)
        self.benchmark._timer = _Replay(durations, f"interleaved {self.clock.__name__}")  # read per round
        self.benchmark.pedantic(lambda: None, rounds=len(durations), iterations=1, warmup_rounds=0)
        return self._derive(items=items, item_unit=item_unit)

    def _derive(self, *, flops: float = 0.0, nbytes: float = 0.0, items: float = 0.0, item_unit: str = "images",
                dtype: torch.dtype | None = None) -> float | None:
        stats, info = self.benchmark.stats, self.benchmark.extra_info
        if stats is None:  # --benchmark-disable: the target ran once, untimed
            return None
        t = stats.stats.median
        if flops:
            info["tflops"] = flops / t / 1e12
        if nbytes:
            info["gbps"] = nbytes / t / 1e9
        if items:
            info[f"{item_unit}_per_s"] = items / t
        peak = self.device.peak
        if peak is not None:
            compute = flops / (peak.tflops * 1e12) if flops and dtype in HALF_DTYPES else 0.0
            memory = nbytes / (peak.gbps * 1e9) if nbytes else 0.0
            if compute or (memory and not flops):
                info["roofline_fraction"] = max(compute, memory) / t
        return t


class _Replay:
    """A clock for pytest-benchmark that replays measured durations: its runner reads the clock
    before and after each round, and the k-th round comes out as durations[k]."""

    def __init__(self, durations: list[float], name: str):
        self.durations, self.now, self.inside, self.__name__ = iter(durations), 0.0, False, name

    def __call__(self) -> float:
        if self.inside:
            self.now += next(self.durations)
        self.inside = not self.inside
        return self.now


@pytest.fixture
def bench(benchmark, request) -> Bench:
    return Bench(benchmark, request.config)
