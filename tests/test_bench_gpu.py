"""``python -m bench.gpu --dry-run``: the GPU report's code path at toy sizes on the CPU.

Two runs of the command: a clean one, which must pass and write the markdown, JSON and PNG with every
section, and one with a wrong attention kernel injected (``--inject-fault attention``: our op's output
and gradients 1.5x too large, wherever our kernels run), which must fail loudly, with every check that
reaches the op FAILED and no FAILED row timed. Plus the helpers the checks rest on.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.gpu.common import Budget, worst_ratio
from bench.gpu.correctness import SIZES, build_cases

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("correctness", "speed", "e2e", "training")
RUN_TIMEOUT_S = 600  # a dry run takes ~30 s on two idle cores; its own budget cuts it at a few minutes
BUDGET_S = "240"  # generous: on a loaded CI machine sections are cut rather than failed, and these tests read them


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--out", str(out), "--budget-s", BUDGET_S,
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    t0 = time.perf_counter()
    proc = _run(out)
    print(f"dry run: {time.perf_counter() - t0:.1f} s")
    return proc, out, json.loads((out / "gpu-report.json").read_text())


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    out = tmp_path_factory.mktemp("fault")
    proc = _run(out, "--inject-fault", "attention", "--workers", "2")  # the fault must reach worker processes too
    return proc, out, json.loads((out / "gpu-report.json").read_text())


def test_dry_run_passes_and_writes_every_section(clean):
    proc, out, report = clean
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for ext in ("md", "json", "png"):
        assert (out / f"gpu-report.{ext}").stat().st_size > 0
    with Image.open(out / "gpu-report.png") as img:
        assert img.width > 500 and img.height > 500  # panels drawn, not an empty canvas
    assert report["meta"]["dry_run"] is True
    assert report["failures"] == []
    for name in SECTIONS:
        assert report["sections"][name]["status"] == "pass", report["sections"][name].get("error")
    md = (out / "gpu-report.md").read_text()
    assert md.startswith("# GPU report") and "No failure" in md.splitlines()[2]
    for title in ("## 1. Correctness", "## 2. Kernel speed", "## 3. End to end", "## 4. Training run"):
        assert title in md


def test_dry_run_rows(clean):
    _, _, report = clean
    sec = report["sections"]
    checks = sec["correctness"]["rows"]
    assert {r["op"] for r in checks} == {"attention", "groupnorm"}
    assert {r["group"] for r in checks} == {"sd shapes", "matrix", "fuzz"}
    assert all(r["status"] in ("pass", "skipped") for r in checks)
    skipped = [r for r in checks if r["status"] == "skipped"]
    assert all(" d512 " in r["case"] and "D=512" in r["note"] for r in skipped)  # only the pending head dim
    assert sum(r["status"] == "pass" for r in checks) >= 40
    assert all(r["worst"] <= 1 for r in checks if r["status"] == "pass")

    speed = sec["speed"]["rows"]
    assert sec["speed"]["peaks"]["tflops"] > 0 and sec["speed"]["peaks"]["gbps"] > 0
    providers = {r["provider"] for r in speed}
    assert {"sdpa", "sdpa-flash", "eager"} <= providers and any(p.startswith("ours") for p in providers)
    timed = [r for r in speed if r["status"] == "pass"]
    assert timed and all(r["ms"] > 0 and r["gbps"] > 0 and r["check"] <= 1 for r in timed)
    assert all(r["speedup"] == pytest.approx(1.0) for r in timed if r["provider"] == r["baseline"])

    e2e = sec["e2e"]["rows"]
    assert {(r["model"], r["mode"]) for r in e2e} == {("unet", "train step"), ("unet", "sample"),
                                                       ("vae", "encode"), ("vae", "decode")}
    ours = [r for r in e2e if r["provider"] == "ours"]
    assert all(r["status"] == "pass" and r["images_per_s"] > 0 for r in ours)

    train = sec["training"]["result"]
    assert train["status"] == "pass" and train["steps"] > 3 and train["images_per_s"] > 0
    assert math.isfinite(train["loss_last"])


def test_the_matrix_covers_every_variant():
    cases = build_cases(SIZES["gpu"], seed=0)
    attention = [c for c in cases if c.group == "matrix" and hasattr(c, "kind")]
    assert {(c.kind, c.dtype, c.lengths, c.aligned, c.d) for c in attention} == {
        (kind, dtype, lengths, aligned, d) for kind in ("self", "cross") for dtype in ("bfloat16", "float16")
        for lengths in (False, True) for aligned in (True, False) for d in (40, 64, 80, 160, 512)}
    assert all(c.nk == 77 for c in attention if c.kind == "cross")
    norms = [c for c in cases if c.group == "matrix" and hasattr(c, "silu")]
    assert {(c.silu, c.shift, c.channels_last, c.dtype) for c in norms} == {
        (silu, shift, cl, dtype) for silu in (False, True) for shift in (False, True) for cl in (False, True)
        for dtype in ("bfloat16", "float16")}
    assert len({c.seed for c in cases}) == len(cases)
    assert build_cases(SIZES["gpu"], seed=0) == cases  # the fuzz is seeded


def test_injected_fault_fails_loudly_and_is_never_timed(faulty):
    proc, out, report = faulty
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "FAILED" in proc.stderr
    md = (out / "gpu-report.md").read_text().splitlines()
    assert md[2].startswith("> **FAILED:")  # right under the title
    assert report["failures"]
    sec = report["sections"]

    checks = sec["correctness"]["rows"]
    attention = [r for r in checks if r["op"] == "attention" and r["status"] != "skipped"]
    assert attention and all(r["status"] == "FAILED" for r in attention)
    assert all(r["status"] == "pass" for r in checks if r["op"] == "groupnorm")

    speed = sec["speed"]["rows"]
    ours_attention = [r for r in speed if r["op"] == "attention" and r["provider"].startswith("ours")]
    assert ours_attention and all(r["status"] == "FAILED" and r["ms"] is None and r["check"] > 1
                                  for r in ours_attention)
    assert all(r["status"] == "pass" and r["ms"] > 0 for r in speed if r["provider"] in ("sdpa", "eager"))
    assert all(r["status"] == "pass" for r in speed if r["op"] != "attention" and r["provider"].startswith("ours"))

    e2e = sec["e2e"]["rows"]
    ours = [r for r in e2e if r["provider"] == "ours"]
    assert ours and all(r["status"] == "FAILED" and r["ms"] is None for r in ours)
    assert all(r["status"] == "pass" and r["ms"] > 0 for r in e2e if r["provider"] == "ours-torch")

    train = sec["training"]["result"]
    assert train["status"] == "FAILED" and train["steps"] == 0 and train["images_per_s"] is None


def test_help():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "--wheels" in proc.stdout


def test_worst_ratio():
    ref = torch.tensor([0.0, 2.0, -4.0])
    assert worst_ratio(ref.clone(), ref, 1e-2, 1e-2) == 0.0
    # allowed at the last entry: 1e-2 * 4 (scale) + 1e-2 * 4 = 0.08
    assert worst_ratio(ref + torch.tensor([0.0, 0.0, 0.04]), ref, 1e-2, 1e-2) == pytest.approx(0.5)
    assert worst_ratio(torch.tensor([0.0, float("nan"), -4.0]), ref, 1e-2, 1e-2) == math.inf
    assert worst_ratio(ref[:2], ref, 1e-2, 1e-2) == math.inf


def test_budget_shares_what_is_left():
    start = time.monotonic()
    budget = Budget(100.0, start, {"a": 1.0, "b": 1.0, "c": 2.0}, reserve_s=0.0)
    a = budget.section("a")
    assert a.deadline - a.start == pytest.approx(25.0, abs=0.5)
    a.close()  # a used almost nothing: b and c share the rest as 1 : 2
    b = budget.section("b")
    assert b.deadline - b.start == pytest.approx(100.0 / 3, abs=0.5)
    b.close()
    c = budget.section("c")
    assert c.deadline == pytest.approx(start + 100.0, abs=1e-6)
