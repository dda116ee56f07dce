"""Runs the sections of ``python -m bench.gpu`` in order within the budget and writes the report."""

from __future__ import annotations

import datetime
import importlib.metadata
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.gpu import correctness, end_to_end, output, speed, training
from bench.gpu.common import ERROR, PASS, Budget, detect_device, inject_fault

SECTIONS = {"correctness": correctness, "speed": speed, "e2e": end_to_end, "training": training}
# Shares of the budget. Correctness is mostly Triton compiling the kernel variants (in parallel);
# end to end builds two 860M-parameter UNets and times the slowest units of work; training needs its
# 60 s plus the data and the model.
SHARES = {"correctness": 0.22, "speed": 0.26, "e2e": 0.35, "training": 0.17}
REPORT_RESERVE_S = 5.0  # kept back to write the report (the PNG takes a second)


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def meta(dev, args) -> dict:
    detail = (f"{dev.sm_count} SMs, {dev.memory_bytes / 2**30:.0f} GiB, L2 {dev.l2_bytes / 2**20:.0f} MiB"
              if dev.type == "cuda" else f"{dev.sm_count} CPU cores, torch threads: {torch.get_num_threads()}")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"device": dev.name, "device_detail": detail, "dry_run": dev.dry_run,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m bench.gpu " + shlex.join(sys.argv[1:]), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda if dev.type == "cuda" else None,
            "diffusers": version("diffusers"), "wheels": args.wheel_names, "seed": args.seed,
            "budget_s": args.budget_s, "sections": list(args.sections), "inject_fault": args.inject_fault}


def run(args) -> int:
    dev = detect_device(args.dry_run)
    if args.inject_fault:
        inject_fault(args.inject_fault)  # after the models' modules imported the op by name
    shares = {name: SHARES[name] for name in SECTIONS if name in args.sections}
    budget = Budget(args.budget_s, args.start, shares, REPORT_RESERVE_S)
    report = {"meta": meta(dev, args), "sections": {}}
    for name, module in SECTIONS.items():
        if name not in args.sections:
            report["sections"][name] = {"status": "not run"}
            continue
        clock = budget.section(name)
        print(f"[bench.gpu] {name}: {clock.deadline - clock.start:.0f} s allotted", flush=True)
        try:
            result = module.run(dev, clock, args)
            result["status"] = PASS
        except Exception:
            result = {"status": ERROR, "error": traceback.format_exc(limit=6)}
            print(result["error"], file=sys.stderr, flush=True)
        info = clock.close()
        print(f"[bench.gpu] {name}: done in {info['spent_s']:.0f} s" +
              (f", cut: {'; '.join(info['cut'])}" if info["cut"] else ""), flush=True)
        report["sections"][name] = result
    report["meta"]["sections_time"] = budget.used
    report["meta"]["elapsed_s"] = time.monotonic() - args.start
    paths = output.write(report, Path(args.out))
    fails = output.failures(output.to_jsonable(report))
    print(f"[bench.gpu] wrote {', '.join(map(str, paths))} in {time.monotonic() - args.start:.0f} s")
    if fails:
        print(f"[bench.gpu] FAILED: {len(fails)} failure(s), first: {fails[0]}", file=sys.stderr)
        return 1
    return 0
