"""Compile every kernel and config for sm_80 and sm_90 without a GPU and print what the cubin holds.

    python -m kernels.inspect                # table for both architectures
    python -m kernels.inspect --arch 90 --kernel attn --json out.json
    python -m kernels.inspect --core         # only the representative subset (tests/test_inspect.py)

Every specialization the models can reach is built (attention: each model head dim, key lengths on
and off, aligned and unaligned rows; group norm: SiLU, shift, NCHW / channels_last, whole / split
groups): see ``aot_specs()`` in each kernel module.

Columns: registers per thread, local memory per thread (anything above 0 is a spill or a stack
array), shared memory per program, and the tensor-core instruction counts (HMMA on sm_80, HGMMA
on sm_90). Exits 1 when any config spills, needs more shared memory than the chip gives one program
(kernels.aot.MAX_SHARED_BYTES), or a matmul kernel has no tensor-core instruction.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys


def _selected(kernel: str, core: bool) -> list:
    from kernels.aot import all_specs

    return [s for s in all_specs() if kernel in s.kernel and (s.core or not core)]


def _inspect_one(job: tuple[str, bool, int, int]) -> dict:
    """Worker: compile spec number ``i`` of those selected for ``arch``; plain data back."""
    from kernels.aot import inspect_spec

    kernel, core, i, arch = job
    r = inspect_spec(_selected(kernel, core)[i], arch)
    return {"registers": r.registers, "local_bytes": r.local_bytes, "shared_bytes": r.shared_bytes,
            "hmma": r.hmma, "hgmma": r.hgmma, "ok": r.ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90],
                        help="compute capabilities to compile for (80 = A100, 90 = H100/H200)")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this text")
    parser.add_argument("--json", default="", help="also write the table to this JSON file")
    parser.add_argument("--core", action="store_true",
                        help="only the representative subset (AotSpec.core), as tests/test_inspect.py builds")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile this many configs at once (default: one per CPU core)")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled for a GPU")

    specs = _selected(args.kernel, args.core)
    if not specs:
        print(f"no kernel matches {args.kernel!r}", file=sys.stderr)
        return 1
    header = (f"{'kernel':<26} {'config':<52} {'arch':>5} {'regs':>5} {'local':>6} {'smem':>7} "
              f"{'HMMA':>5} {'HGMMA':>6}  ok")
    print(header)
    print("-" * len(header))
    jobs = [(i, arch) for i in range(len(specs)) for arch in args.arch]
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        results = pool.map(_inspect_one, [(args.kernel, args.core, i, arch) for i, arch in jobs])
        rows = []
        for (i, arch), r in zip(jobs, results):
            spec = specs[i]
            print(f"{spec.kernel:<26} {spec.config:<52} sm_{arch:<2} {r['registers']:>5} {r['local_bytes']:>6} "
                  f"{r['shared_bytes']:>7} {r['hmma']:>5} {r['hgmma']:>6}  {'yes' if r['ok'] else 'NO'}", flush=True)
            rows.append({"kernel": spec.kernel, "config": spec.config, "arch": arch, **r, "uses_dot": spec.uses_dot,
                         "core": spec.core})
    failed = sum(not r["ok"] for r in rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if failed:
        print(f"{failed} config(s) spill, overflow shared memory or miss tensor cores", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
