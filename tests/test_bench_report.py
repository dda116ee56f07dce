"""bench.report: pytest-benchmark JSON -> markdown tables with the right speedups, and a PNG chart
whose bars have the same proportions; once on a written sample with known times, once on the JSON
of a real (quick) run of the benchmark suite."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench import report

ROOT = Path(__file__).resolve().parents[1]


def _bench(suite, mode, dtype, case, provider, baseline, median, **extra):
    """One benchmark as pytest-benchmark 5 writes it, with the suite's extra_info labels."""
    return {
        "group": f"{suite} {mode} {dtype} {case}",
        "name": f"test_{suite}[{case}-{mode}-{provider}]",
        "fullname": f"bench/test_{suite}.py::test_{suite}[{case}-{mode}-{provider}]",
        "params": {"mode": mode, "provider": provider}, "param": f"{case}-{mode}-{provider}",
        "extra_info": {"suite": suite, "case": case, "mode": mode, "dtype": dtype, "provider": provider,
                       "baseline": baseline, "device": "NVIDIA H100 80GB HBM3", **extra},
        "options": {"disable_gc": False, "timer": "perf_counter", "min_rounds": 5, "max_time": 1.0,
                    "min_time": 5e-06, "precision": None, "confidence": None, "warmup": False},
        "stats": {"min": median * 0.98, "max": median * 1.1, "mean": median * 1.01, "stddev": median * 0.02,
                  "rounds": 10, "median": median, "iqr": median * 0.01, "q1": median * 0.995, "q3": median * 1.005,
                  "iqr_outliers": 0, "stddev_outliers": 1, "outliers": "1;0", "ld15iqr": median * 0.98,
                  "hd15iqr": median * 1.1, "ops": 1 / median, "total": 10 * median, "iterations": 20},
    }


def sample_run() -> dict:
    att = dict(suite="attention", mode="forward", dtype="bfloat16", baseline="sdpa")
    unet = dict(suite="unet", mode="train step", dtype="bfloat16 autocast", baseline="diffusers", show=["images_per_s"],
                interleaved=True)
    benchmarks = [
        _bench(case="self 4096x4096 d40", provider="ours-triton", median=50e-6, tflops=430.0,
               roofline_fraction=0.544, show=["tflops"], **att),
        _bench(case="self 4096x4096 d40", provider="sdpa", median=100e-6, tflops=215.0, show=["tflops"], **att),
        _bench(case="self 4096x4096 d40", provider="eager", median=400e-6, tflops=53.7, show=["tflops"], **att),
        _bench(case="cross 4096x77 d40", provider="ours-triton", median=8e-6, gbps=2600.0, show=["gbps"], **att),
        # the baseline of this case was skipped: no ratio in its row
        _bench(case="cross 4096x77 d40", provider="eager", median=30e-6, gbps=690.0, show=["gbps"], **att),
        _bench(case="sd15 64x64 latents, batch 8", provider="ours", median=0.25, images_per_s=32.0, **unet),
        _bench(case="sd15 64x64 latents, batch 8", provider="ours-torch", median=0.30, images_per_s=26.7, **unet),
        _bench(case="sd15 64x64 latents, batch 8", provider="diffusers", median=0.40, images_per_s=20.0, **unet),
        # a benchmark without the labels (another suite's) is left out
        {**_bench(case="x", provider="y", median=1.0, **att), "extra_info": {}},
    ]
    return {"machine_info": {"node": "gpu1", "ldm": {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-21",
                                                     "peak": "790 TFLOP/s bf16 dense, 3 TB/s copy (as measured)"}},
            "commit_info": {"id": "0" * 40, "dirty": False, "branch": "bench"},
            "benchmarks": benchmarks, "datetime": "2026-11-21T23:00:00+00:00", "version": "5.3.1"}


def _row(text: str, case: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {case} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def _bar_lengths(png: Path, colour: str) -> list[int]:
    """The lengths of the horizontal runs of ``colour`` in the chart, top to bottom, one per bar."""
    img = Image.open(png).convert("RGB")
    rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    w, h = img.size
    px = img.load()
    lengths, prev = [], 0
    for y in range(h):
        run = sum(1 for x in range(w) if px[x, y] == rgb)
        if run and not prev:
            lengths.append(run)
        prev = run
    return lengths


def test_report_tables_ratios_and_chart(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(sample_run()))
    assert report.main([str(path)]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "results.md").read_text()
    assert md in printed and "Machine: device NVIDIA H100 80GB HBM3" in md

    assert "### attention · forward · bfloat16" in md and "### unet · train step · bfloat16 autocast" in md
    assert "| case | ours-triton | sdpa | eager |" in md
    ours, sdpa, eager = _row(md, "self 4096x4096 d40")
    assert ours == "50 µs · ×2.00 · 430 TFLOP/s · 54% of roofline"
    assert sdpa.startswith("100 µs · ×1.00") and eager.startswith("400 µs · ×0.25 · 53.7 TFLOP/s")
    ours, sdpa, eager = _row(md, "cross 4096x77 d40")
    assert ours == "8 µs · 2600 GB/s" and sdpa == "–" and eager == "30 µs · 690 GB/s"  # no baseline, no ratio
    ours, off, diffusers = _row(md, "sd15 64x64 latents, batch 8")
    assert ours == "250 ms · ×1.60 · 32 images/s" and off == "300 ms · ×1.33 · 26.7 images/s"
    assert diffusers == "400 ms · ×1.00 · 20 images/s"
    assert "Our kernels on / off (sd15 64x64 latents, batch 8): ×1.20" in md
    assert md.count("timed in alternation") == 1  # the unet table's providers were, attention's not
    assert "| x |" not in md

    png = tmp_path / "results.png"
    assert Image.open(png).size[0] == report.WIDTH
    # attention panel, first case: ours-triton (first colour) twice as long as sdpa (second), eager a
    # quarter; the first run of each colour is its legend swatch
    ours_bar, sdpa_bar, eager_bar = (_bar_lengths(png, report.PALETTE[i])[1] for i in range(3))
    assert abs(ours_bar / sdpa_bar - 2.0) < 0.02 and abs(eager_bar / sdpa_bar - 0.25) < 0.02
    # unet panel: ours 1.6x, ours-torch 1.33x the length of diffusers' bar
    ours_bar, off_bar, diffusers_bar = (_bar_lengths(png, report.PALETTE[i])[-1] for i in (3, 4, 5))
    assert abs(ours_bar / diffusers_bar - 1.6) < 0.02 and abs(off_bar / diffusers_bar - 4 / 3) < 0.02


def test_report_out_stem_and_foreign_json(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(sample_run()))
    assert report.main([str(path), "--out", str(tmp_path / "out" / "h100")]) == 0
    assert (tmp_path / "out" / "h100.md").exists() and (tmp_path / "out" / "h100.png").exists()
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"benchmarks": [{"name": "test_x", "stats": {"median": 1.0}, "extra_info": {}}]}))
    assert report.main([str(foreign)]) == 1
    assert "no benchmark of this suite" in capsys.readouterr().err


@pytest.mark.slow
def test_report_of_a_recorded_quick_run(tmp_path):
    """A real quick run of a slice of the attention benchmarks (the Triton providers skip: no GPU here,
    and this session sets TRITON_INTERPRET), then the report: every ratio is the JSON's medians' ratio."""
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "pytest", "bench/test_attention_kernels.py", "--bench-quick", "--benchmark-only",
           "-k", "cross and forward", "--benchmark-json", str(out), "-q", "-p", "no:cacheprovider"]
    # not an xdist worker: pytest-benchmark reads PYTEST_XDIST_WORKER and would turn the timings off
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "TRITON_INTERPRET=1 is set: the Triton interpreter is never timed" in done.stdout + done.stderr \
        or "need a CUDA GPU" in done.stdout

    data = json.loads(out.read_text())
    medians = {b["extra_info"]["provider"]: b["stats"]["median"] for b in data["benchmarks"]}
    assert {"sdpa", "sdpa-math", "eager"} <= medians.keys() and "ours-triton" not in medians
    done = subprocess.run([sys.executable, "-m", "bench.report", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "run.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| case |"))
    providers = [c.strip() for c in header.strip("|").split("|")][1:]
    case = data["benchmarks"][0]["extra_info"]["case"]
    for provider, cell in zip(providers, _row(md, case)):
        ratio = float(re.search(r"×([0-9.]+)", cell).group(1))
        assert ratio == pytest.approx(medians["sdpa"] / medians[provider], abs=0.006), (provider, cell)
    assert Image.open(tmp_path / "run.png").size[0] == report.WIDTH
