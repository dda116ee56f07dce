"""``python -m bench.report results.json [--out STEM]``: pytest-benchmark's ``--benchmark-json`` output
as markdown tables and a PNG chart.

One table per (suite, mode, dtype), one row per case, one column per provider; each cell gives the
median time, the speedup over the section's baseline provider (PyTorch's own path: SDPA, eager
GroupNorm; diffusers end to end), i.e. baseline time / provider time, > 1 faster, and the derived
figures the benchmark recorded (TFLOP/s, GB/s, images/s, % of the device roofline). The chart draws
the same speedups as bars, one panel per table. Prints the markdown, writes ``<stem>.md`` and
``<stem>.png`` (default stem: the JSON's path without ``.json``). Pillow only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

FIGURES = {  # extra_info key -> unit
    "images_per_s": "images/s",
    "tflops": "TFLOP/s",
    "gbps": "GB/s",
}
MACHINE_KEYS = ("device", "peak", "cpu", "torch", "threads", "timer", "date", "load_1m_at_start", "load_1m_at_end",
                "quick")
KERNELS_ON, KERNELS_OFF = "ours", "ours-torch"  # end to end: the same model with our kernels on and off


@dataclass
class Result:
    suite: str
    mode: str
    dtype: str
    case: str
    provider: str
    baseline: str
    median: float  # seconds
    info: dict

    def figures(self) -> list[str]:
        keys = self.info.get("show") or [k for k in FIGURES if k in self.info]
        out = []
        for key in keys:
            if key in self.info and key in FIGURES:
                out.append(f"{format_number(self.info[key])} {FIGURES[key]}")
        if "roofline_fraction" in self.info:
            out.append(f"{100 * self.info['roofline_fraction']:.0f}% of roofline")
        return out


@dataclass
class Section:
    suite: str
    mode: str
    dtype: str
    baseline: str
    cases: list[str] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], Result] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.suite} · {self.mode} · {self.dtype}"

    def ratio(self, case: str, provider: str) -> float | None:
        """Speedup of ``provider`` over the baseline in ``case``: baseline time / provider time."""
        base, this = self.cells.get((case, self.baseline)), self.cells.get((case, provider))
        if base is None or this is None or this.median <= 0:
            return None
        return base.median / this.median


def results(benchmarks: list[dict]) -> list[Result]:
    """The benchmarks that carry the suite's labels (others, e.g. from a foreign file, are left out)."""
    out = []
    for b in benchmarks:
        info, stats = b.get("extra_info") or {}, b.get("stats") or {}
        if not {"suite", "provider", "case", "mode"} <= info.keys() or "median" not in stats:
            continue
        out.append(Result(info["suite"], info["mode"], str(info.get("dtype", "")), info["case"], info["provider"],
                          info.get("baseline", info["provider"]), float(stats["median"]), info))
    return out


def sections(benchmarks: list[dict], suites: tuple[str, ...] | None = None) -> list[Section]:
    """Group the results; the order of first appearance (the run's order) is kept throughout."""
    found: dict[tuple[str, str, str], Section] = {}
    for r in results(benchmarks):
        if suites is not None and r.suite not in suites:
            continue
        key = (r.suite, r.mode, r.dtype)
        sec = found.setdefault(key, Section(r.suite, r.mode, r.dtype, r.baseline))
        if r.case not in sec.cases:
            sec.cases.append(r.case)
        if r.provider not in sec.providers:
            sec.providers.append(r.provider)
        sec.cells[(r.case, r.provider)] = r
    return list(found.values())


def format_number(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def format_time(seconds: float, micro: str = "µs") -> str:
    unit, scale = next(((u, s) for u, s in (("s", 1.0), ("ms", 1e-3)) if seconds >= s), (micro, 1e-6))
    value = seconds / scale
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def format_cell(sec: Section, case: str, provider: str) -> str:
    r = sec.cells.get((case, provider))
    if r is None:
        return "–"
    parts = [format_time(r.median)]
    ratio = sec.ratio(case, provider)
    if ratio is not None:
        parts.append(f"×{ratio:.2f}")
    parts += r.figures()
    return " · ".join(parts)


def markdown(benchmarks: list[dict], suites: tuple[str, ...] | None = None, machine: dict | None = None) -> str:
    lines = []
    if machine:
        ldm = machine.get("ldm", {})
        desc = ", ".join(f"{k} {ldm[k]}" for k in MACHINE_KEYS if ldm.get(k) is not None)
        if desc:
            lines += [f"Machine: {desc}.", ""]
    for sec in sections(benchmarks, suites):
        lines += [f"### {sec.title}", "",
                  f"Median time · speedup over `{sec.baseline}` (its time / this time; > 1 is faster)"
                  " · derived figures.",
                  ""]
        if any(r.info.get("interleaved") for r in sec.cells.values()):
            lines += ["The providers were timed in alternation, one call of each per round, so all saw the same load.",
                      ""]
        lines.append("| case | " + " | ".join(sec.providers) + " |")
        lines.append("|---|" + "---|" * len(sec.providers))
        for case in sec.cases:
            lines.append(f"| {case} | " + " | ".join(format_cell(sec, case, p) for p in sec.providers) + " |")
        if KERNELS_ON in sec.providers and KERNELS_OFF in sec.providers:
            for case in sec.cases:
                on, off = sec.cells.get((case, KERNELS_ON)), sec.cells.get((case, KERNELS_OFF))
                if on and off:
                    note = on.info.get("kernels_note", "")
                    lines.append(f"\nOur kernels on / off ({case}): ×{off.median / on.median:.2f}"
                                 + (f" ({note})" if note else ""))
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ chart
PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
           "#ff7f0e"]
WIDTH, LABEL_W, MARGIN, CASE_H, BAR_H, GAP = 1100, 200, 20, 15, 13, 8


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def chart(benchmarks: list[dict], path: str | Path, suites: tuple[str, ...] | None = None, title: str = "") -> Path:
    """Horizontal bars: the speedup of every provider over its section's baseline, one panel per
    section, one group of bars per case, a line at 1 (the baseline). Providers keep one colour."""
    from PIL import Image, ImageDraw

    secs = sections(benchmarks, suites)
    providers: list[str] = []
    for sec in secs:
        providers += [p for p in sec.providers if p not in providers]
    colour = {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(providers)}
    font, small = _font(14), _font(11)

    legend_h = 30 + 18 * ((len(providers) + 4) // 5)
    heights = [40 + sum(CASE_H + len(sec.providers) * BAR_H + GAP for _ in sec.cases) + 25 for sec in secs]
    img = Image.new("RGB", (WIDTH, max(legend_h + sum(heights) + MARGIN, 80)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((MARGIN, 8), title or "speedup over the baseline (its time / this time)", fill="black", font=font)
    for i, p in enumerate(providers):
        x, y = MARGIN + (i % 5) * 210, 30 + 18 * (i // 5)
        draw.rectangle([x, y + 2, x + 12, y + 12], fill=colour[p])
        draw.text((x + 18, y), p, fill="black", font=small)

    top = legend_h
    plot_x0, plot_x1 = LABEL_W, WIDTH - MARGIN - 130  # room for the value after the longest bar
    for sec, height in zip(secs, heights):
        ratios = [sec.ratio(c, p) for c in sec.cases for p in sec.providers]
        hi = max([r for r in ratios if r is not None] + [1.0]) * 1.1
        scale = (plot_x1 - plot_x0) / hi
        draw.text((MARGIN, top + 8), f"{sec.title}  (baseline {sec.baseline})", fill="black", font=font)
        y = top + 32
        one = plot_x0 + scale
        for case in sec.cases:
            draw.text((MARGIN, y), case, fill="black", font=small)  # the case on its own line, bars below
            y += CASE_H
            for p in sec.providers:
                r, cell = sec.ratio(case, p), sec.cells.get((case, p))
                if r is not None:
                    draw.rectangle([plot_x0, y + 1, plot_x0 + max(1, r * scale), y + BAR_H - 2], fill=colour[p])
                    draw.text((plot_x0 + r * scale + 4, y - 1), f"x{r:.2f}  ({format_time(cell.median, 'us')})",
                              fill="black", font=small)
                elif cell is not None:
                    draw.text((plot_x0 + 4, y - 1), f"{p}: {format_time(cell.median, 'us')}, no baseline", fill="gray",
                              font=small)
                draw.text((MARGIN + 12, y - 1), p, fill="gray", font=small)
                y += BAR_H
            y += GAP
        draw.line([one, top + 28, one, y], fill="black", width=1)
        draw.line([plot_x0, top + 28, plot_x0, y], fill="gray", width=1)
        top += height
    path = Path(path)
    # a few flat colours and the text's grey levels: a palette image is a quarter of the size
    img.convert("P", palette=Image.Palette.ADAPTIVE, colors=48).save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="the file written by pytest --benchmark-json")
    parser.add_argument("--out", help="stem of the outputs (default: the JSON's path without .json)")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    benchmarks = data.get("benchmarks", [])
    if not results(benchmarks):
        print(f"{args.json}: no benchmark of this suite in it", file=sys.stderr)
        return 1
    stem = Path(args.out) if args.out else Path(args.json).with_suffix("")
    text = markdown(benchmarks, machine=data.get("machine_info"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = stem.with_name(stem.name + ".md")
    md.write_text(text)
    machine = data.get("machine_info", {}).get("ldm", {})
    png = chart(benchmarks, stem.with_name(stem.name + ".png"),
                title=f"speedup over the baseline · {machine.get('device', '')} · {machine.get('date', '')}")
    print(text)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
