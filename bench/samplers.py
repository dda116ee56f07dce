"""`python -m bench.samplers`: every sampler against an exact answer, the Gaussian mixture of ``ldm.mixture``.

    python -m bench.samplers                      # 10^6 samples, the table in markdown on stdout
    python -m bench.samplers --n 200000 --out bench/results/samplers.md

The mixture's ideal denoiser stands in for a network, so what is left is each sampler's discretisation
error. For every sampler, spacing and number of model calls (10, 20, 50) on the linear and the
scaled-linear schedules, the largest error over the mixture's weights, means and covariance entries,
in standard errors of 20000 samples (``ldm.mixture.bias_in_se``), drawn with ``--n`` samples so that
the figure is the bias a 20000-sample test would see (the row "exact samples" is the same measure on
true draws: the noise floor of the measurement). Samplers start from the exact marginal at sigma_max.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ldm.diffusion import NoiseSchedule
from ldm.mixture import bias_in_se, draw_mixture, mixture_denoiser
from ldm.samplers import SAMPLERS, SIGMA_CAP, get_sigmas

SCHEDULES = ("linear", "scaled_linear")
CALLS = (10, 20, 50)
N_REF = 20_000  # the errors are in standard errors of this many samples
# (label, sampler, spacing): "capped" is the default Karras ramp under SIGMA_CAP, "karras" the plain
# ramp from sigma_max, "uniform" evenly spaced timesteps
CONFIGS = (
    ("UniPC-3 (default)", "unipc", "capped"),
    ("UniPC-3", "unipc", "karras"),
    ("DPM-Solver++(2M)", "dpmpp_2m", "capped"),
    ("DPM-Solver++(2M)", "dpmpp_2m", "karras"),
    ("Euler", "euler", "capped"),
    ("DDIM", "ddim", "uniform"),
    ("DDPM", "ddpm", "uniform"),
)


def sigmas_for(schedule: NoiseSchedule, calls: int, spacing: str) -> torch.Tensor:
    if spacing == "uniform":
        return get_sigmas(schedule, calls, dtype=torch.float64)
    cap = SIGMA_CAP if spacing == "capped" else None
    return get_sigmas(schedule, calls, karras=True, sigma_cap=cap, dtype=torch.float64)


def measure(n: int, seed: int) -> list[dict]:
    rows = []
    for name in SCHEDULES:
        schedule = NoiseSchedule.from_name(name)
        g = torch.Generator().manual_seed(seed)
        x0 = draw_mixture(n, generator=g)
        noise = torch.randn(x0.shape, dtype=torch.float64, generator=g)
        z, which = bias_in_se(draw_mixture(n, generator=g), N_REF)
        rows.append({"schedule": name, "sampler": "exact samples", "spacing": "", "errors": {c: (z, which)
                                                                                             for c in CALLS}})
        for label, sampler, spacing in CONFIGS:
            errors = {}
            for calls in CALLS:
                sigmas = sigmas_for(schedule, calls, spacing)
                options = {"generator": torch.Generator().manual_seed(seed + calls)} if sampler in ("ddim", "ddpm") \
                    else {}
                out = SAMPLERS[sampler](mixture_denoiser, x0 + sigmas[0] * noise, sigmas, disable=True, **options)
                errors[calls] = bias_in_se(out, N_REF)
            rows.append({"schedule": name, "sampler": label, "spacing": spacing, "errors": errors})
    return rows


def markdown(rows: list[dict], n: int, seconds: float) -> str:
    lines = [f"Largest error over the mixture's statistics, in standard errors of {N_REF} samples "
             f"(measured with {n} samples, {seconds:.0f} s); the statistic in brackets.", "",
             "| schedule | sampler | spacing | " + " | ".join(f"{c} calls" for c in CALLS) + " |",
             "|---|---|---|" + "---|" * len(CALLS)]
    for r in rows:
        cells = " | ".join(f"{z:.1f} ({w})" for z, w in (r["errors"][c] for c in CALLS))
        lines.append(f"| {r['schedule']} | {r['sampler']} | {r['spacing']} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.samplers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--n", type=int, default=1_000_000, help="samples per run (default 10^6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.n < N_REF:
        p.error(f"--n must be at least {N_REF} (the errors are in standard errors of {N_REF} samples)")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    table = markdown(measure(args.n, args.seed), args.n, time.perf_counter() - t0)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
