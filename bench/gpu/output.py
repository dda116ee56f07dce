"""The report of ``python -m bench.gpu``: ``gpu-report.md`` (failures first), ``gpu-report.json`` (every
row, every note) and ``gpu-report.png`` (speedups over each baseline, drawn by ``bench.report.chart``)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import asdict, is_dataclass
from pathlib import Path

from bench.gpu.common import ERROR, FAILED, FAILING, PASS, SKIPPED
from bench.report import chart

STEM = "gpu-report"
TITLES = {"correctness": "1. Correctness", "speed": "2. Kernel speed", "e2e": "3. End to end",
          "training": "4. Training run"}
MAX_LISTED = 30  # failures listed at the top; the JSON has them all


def is_ours(provider: str) -> bool:
    return provider.startswith("ours")


def failures(report: dict) -> list[str]:
    """Lines naming every failure of ours: a correctness check, a check before a timing, a section that
    raised. A baseline that fails its check is reported (``warnings``) but does not fail the run."""
    out = []
    for name, sec in report["sections"].items():
        if sec.get("status") in FAILING:
            out.append(f"{name}: section raised {sec.get('error', '').splitlines()[-1] if sec.get('error') else ''}")
        for r in sec.get("rows", []):
            if r["status"] not in FAILING:
                continue
            if name == "correctness":
                out.append(f"correctness: {r['op']} {r['case']}: {r['note']}")
            elif is_ours(r["provider"]):
                what = f"{r['op']} {r['case']} {r['mode']} {r['dtype']}" if name == "speed" else \
                    f"{r['model']} {r['mode']}"
                out.append(f"{name}: {r['provider']} {what}: {r['note']}")
        res = sec.get("result")
        if res and res["status"] in FAILING:
            out.append(f"training: {res['preset']}: {res['note']}")
    return out


def warnings_of(report: dict) -> list[str]:
    out = []
    for name in ("speed", "e2e"):
        for r in report["sections"].get(name, {}).get("rows", []):
            if r["status"] in FAILING and not is_ours(r["provider"]):
                out.append(f"{name}: baseline {r['provider']} failed its check ({r['note']})")
    return out


def to_jsonable(obj):
    if is_dataclass(obj):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None  # NaN is not JSON
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return "inf" if obj > 0 else "-inf"
    return obj


# ------------------------------------------------------------------------------------------ markdown


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def _time_ms(ms: float | None) -> str:
    if ms is None:
        return "–"
    return f"{ms * 1e3:.3g} µs" if ms < 1 else f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1e3:.3g} s"


def _correctness_md(sec: dict) -> list[str]:
    rows = sec["rows"]
    lines = ["| op | group | dtype | passed | FAILED | skipped | worst error / allowed |",
             "|---|---|---|---|---|---|---|"]
    groups = defaultdict(list)
    for r in rows:
        dtype = next((d for d in ("bfloat16", "float16", "float32") if d in r["case"]), "")
        groups[(r["op"], r["group"], dtype)].append(r)
    for (op, group, dtype), rs in groups.items():
        worst = max((r["worst"] for r in rs if isinstance(r["worst"], (int, float))), default=None)
        count = {s: sum(r["status"] == s for r in rs) for s in (PASS, FAILED, ERROR, SKIPPED)}
        lines.append(f"| {op} | {group} | {dtype} | {count[PASS]} | {count[FAILED] + count[ERROR]} | "
                     f"{count[SKIPPED]} | {_num(worst)} |")
    failed = [r for r in rows if r["status"] in FAILING]
    if failed:
        lines += ["", "**Failed:**", "", "| op | case | status | worst / allowed | note |", "|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['case']} | {r['status']} | {_num(r['worst'])} | {r['note']} |" for r in failed]
    skipped = defaultdict(list)  # one line per reason: the shapes in a message vary, the reason does not
    for r in rows:
        if r["status"] == SKIPPED:
            skipped[(r["op"], re.sub(r"\(\d+(x\d+)+\)", "(...)", r["note"]))].append(r["case"])
    if skipped:
        lines += ["", "Skipped:", ""]
        lines += [f"- {op}, {len(cases)} check(s), e.g. {cases[0]}: {note}" for (op, note), cases in skipped.items()]
    lines += ["", f"<details><summary>All {len(rows)} checks</summary>", "",
              "| op | group | case | status | worst / allowed | in | s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['group']} | {r['case']} | {r['status']} | {_num(r['worst'])} | {r['worst_tensor']} | "
              f"{r['seconds']:.2f} |" for r in rows]
    lines += ["", "</details>"]
    return lines


def _speed_md(sec: dict) -> list[str]:
    lines = []
    peaks = sec.get("peaks")
    if peaks:
        lines += [f"Peaks measured in this run: **{_num(peaks['tflops'])} TFLOP/s** bf16, "
                  f"**{_num(peaks['gbps'])} GB/s** copy ({peaks['how']}).", ""]
    tables = defaultdict(list)
    for r in sec["rows"]:
        tables[(r["op"], r["mode"], r["dtype"])].append(r)
    for (op, mode, dtype), rs in tables.items():
        providers = list(dict.fromkeys(r["provider"] for r in rs))
        cases = list(dict.fromkeys(r["case"] for r in rs))
        cell = {(r["case"], r["provider"]): r for r in rs}
        lines += [f"### {op} · {mode} · {dtype}", "",
                  f"Median time · speedup over `{rs[0]['baseline']}` · TFLOP/s · GB/s · % of peak.", "",
                  "| case | " + " | ".join(providers) + " |", "|---|" + "---|" * len(providers)]
        for case in cases:
            cells = []
            for p in providers:
                r = cell.get((case, p))
                if r is None:
                    cells.append("–")
                elif r["status"] != PASS:
                    cells.append(f"**{r['status']}**" if r["status"] in FAILING else r["status"])
                else:
                    parts = [_time_ms(r["ms"])]
                    if r["speedup"]:
                        parts.append(f"×{r['speedup']:.2f}")
                    if r["tflops"]:
                        parts.append(f"{r['tflops']:.3g} TFLOP/s")
                    parts += [f"{r['gbps']:.3g} GB/s", f"{r['pct_peak']:.0f}%"]
                    cells.append(" · ".join(parts))
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        notes = sorted({f"{r['provider']}: {r['status']}: {r['note']}" for r in rs if r["status"] != PASS})
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        lines.append("")
    return lines


def _e2e_md(sec: dict) -> list[str]:
    lines = ["| model | mode | case | provider | status | time | images/s | speedup over diffusers | check "
             "(error / bound) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sec["rows"]:
        status = f"**{r['status']}**" if r["status"] in FAILING else r["status"]
        speedup = f"×{r['speedup']:.2f}" if r["speedup"] else "–"
        lines.append(f"| {r['model']} | {r['mode']} | {r['case']} | {r['provider']} | {status} | {_time_ms(r['ms'])} | "
                     f"{_num(r['images_per_s'])} | {speedup} | {_num(r['check'])} |")
    on_off = {}
    for r in sec["rows"]:
        on_off.setdefault((r["model"], r["mode"]), {})[r["provider"]] = r["ms"]
    for (model, mode), t in on_off.items():
        if t.get("ours") and t.get("ours-torch"):
            lines.append(f"\nDefault dispatch / our kernels off, {model} {mode}: ×{t['ours-torch'] / t['ours']:.2f}")
        if t.get("ours-triton") and t.get("ours-torch"):
            lines.append(f"\nEvery op on our Triton kernels / off, {model} {mode}: "
                         f"×{t['ours-torch'] / t['ours-triton']:.2f}")
    notes = dict.fromkeys(f"- {r['model']} {r['provider']}: {r['note']}" if r["status"] == PASS else
                          f"- {r['model']} {r['mode']} {r['provider']}: {r['status']}: {r['note']}"
                          for r in sec["rows"] if r["note"])  # a provider's check note once per model
    return lines + [""] + list(notes)


def _training_md(sec: dict) -> list[str]:
    r = sec.get("result")
    if not r:
        return []
    status = f"**{r['status']}**" if r["status"] in FAILING else r["status"]
    mem = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else "n/a (CPU)"
    return ["| preset | status | parameters | batch | latents | steps | seconds | images/s | peak memory | loss first "
            "→ last | check |", "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {r['preset']} | {status} | {r['parameters']:,} | {r['batch']} | {r['latent']} | {r['steps']} | "
            f"{r['seconds']:.1f} | {_num(r['images_per_s'])} | {mem} | {_num(r['loss_first'])} → "
            f"{_num(r['loss_last'])} | {_num(r['check'])} |", "",
            f"- data: {r['data']}", f"- text: {r['text']}", f"- {r['note']}" if r["note"] else ""]


def markdown(report: dict) -> str:
    meta = report["meta"]
    fails, warns = report["failures"], report["warnings"]
    title = f"# GPU report: {meta['device']}" + (" (DRY RUN on the CPU: toy sizes, no figure means anything)"
                                                 if meta["dry_run"] else "")
    lines = [title, ""]
    if fails:
        lines += [f"> **FAILED: {len(fails)} failure(s).** The run exits 1. First {min(len(fails), MAX_LISTED)}:", ">"]
        lines += [f"> - {f}" for f in fails[:MAX_LISTED]]
        lines.append("")
    else:
        lines += ["**No failure**: every check of ours passed (cut or skipped rows are listed in their sections).", ""]
    if warns:
        lines += ["Warnings:", ""] + [f"- {w}" for w in warns] + [""]
    lines += [f"{meta['date']} · `{meta['command']}` · torch {meta['torch']} · Triton {meta['triton']} · "
              f"CUDA {meta['cuda']} · diffusers {meta['diffusers']} · {meta['device_detail']}", "",
              f"Budget {meta['budget_s']:.0f} s, spent {meta['elapsed_s']:.0f} s. Sections (allotted / spent s): " +
              ", ".join(f"{k} {v['allotted_s']:.0f} / {v['spent_s']:.0f}" + (f" (cut: {'; '.join(v['cut'])})"
                                                                           if v["cut"] else "")
                        for k, v in meta["sections_time"].items()) + ".", ""]
    for name, sec in report["sections"].items():
        lines += [f"## {TITLES[name]}", ""]
        if sec.get("status") == "not run":
            lines += ["Not run (--sections).", ""]
            continue
        if sec.get("status") in FAILING:
            lines += ["**ERROR**: the section raised:", "", "```", sec.get("error", ""), "```", ""]
            continue
        lines += [f"- {n}" for n in sec.get("notes", [])] + [""]
        body = {"correctness": _correctness_md, "speed": _speed_md, "e2e": _e2e_md, "training": _training_md}[name]
        lines += body(sec) + [""]
    return "\n".join(lines)


def chart_rows(report: dict) -> list[dict]:
    """The timed rows in the form bench.report's chart reads (pytest-benchmark's extra_info + stats)."""
    out = []
    for r in report["sections"].get("speed", {}).get("rows", []):
        if r["ms"]:
            out.append({"extra_info": {"suite": r["op"], "case": r["case"], "mode": r["mode"], "dtype": r["dtype"],
                                       "provider": r["provider"], "baseline": r["baseline"]},
                        "stats": {"median": r["ms"] / 1e3}})
    precision = "fp32 (dry run)" if report["meta"]["dry_run"] else "bf16 autocast"
    for r in report["sections"].get("e2e", {}).get("rows", []):
        if r["ms"]:
            out.append({"extra_info": {"suite": r["model"], "case": r["case"], "mode": r["mode"],
                                       "dtype": precision, "provider": r["provider"], "baseline": r["baseline"]},
                        "stats": {"median": r["ms"] / 1e3}})
    return out


def write(report: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    report = to_jsonable(report)
    report["failures"], report["warnings"] = failures(report), warnings_of(report)
    md, js, png = (folder / f"{STEM}.{ext}" for ext in ("md", "json", "png"))
    js.write_text(json.dumps(report, indent=1))
    md.write_text(markdown(report))
    meta = report["meta"]
    title = f"speedup over each baseline · {meta['device']} · {meta['date']}"
    title += " · DRY RUN" if meta["dry_run"] else ""
    chart(chart_rows(report), png, title=title)
    return [md, js, png]
