"""2-D toy diffusion: the project's diffusion maths and samplers on point clouds a reader can see.

Three datasets (a swiss roll, two moons, eight Gaussians on a circle), an MLP that honours the UNet's
contract ``model(x_t, t) -> prediction`` so that ``ldm.diffusion.Denoiser`` wraps it and
``ldm.diffusion.diffusion_loss`` trains it exactly as it does the UNet, and every sampler of
``ldm.samplers.SAMPLERS`` on the result. The score is the energy distance (Szekely & Rizzo 2013,
"Energy statistics: A class of statistics based on distances") between samples and fresh data, read
against its noise floor: the same statistic between two independent draws of the data.

    from ldm.toy2d import ToyConfig, train, sample, energy_distance, DATASETS
    model, history = train(ToyConfig(dataset="moons", steps=2000))
    points = sample(model, 2000, "ddim", 50)                               # (2000, 2)
    energy_distance(points, DATASETS["moons"](2000, torch.Generator().manual_seed(1)))

Pictures are drawn with Pillow on fixed axes (``EXTENT``), so frames of a run line up.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from ldm.diffusion import PREDICTIONS, SCHEDULES, Denoiser, NoiseSchedule, diffusion_loss
from ldm.errors import InputError
from ldm.pipeline import DEFAULT_SPACING, sampling_sigmas
from ldm.pretrained import DEFAULT_SAMPLER, DEFAULT_STEPS
from ldm.samplers import SAMPLERS
from ldm.trainer import learning_rate
from ldm.unet import timestep_embedding

EXTENT = 2.75  # the pictures show [-EXTENT, EXTENT]^2; every dataset lies inside (standardised below)
EVAL_SEED = 1_000_003  # fresh data for scores comes from seeds offset by this, never the training stream


# ------------------------------------------------------------------------------------------- data
# Each dataset: sample(n, generator) -> (n, 2) float32, centred and divided by one scale (the root
# mean square distance from the mean over both axes, so E|x|^2 = 2), shapes kept. The constants are
# exact where marked, otherwise measured on 2 * 10^6 draws.
def _standardise(p: torch.Tensor, mean: tuple[float, float], scale: float) -> torch.Tensor:
    return ((p - torch.tensor(mean, dtype=p.dtype)) / scale).float()  # (n, 2)


def swiss_roll(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The 2-D swiss roll: angle t ~ U(1.5 pi, 4.5 pi), point t (cos t, sin t) + N(0, 0.5^2 I)
    (scikit-learn's ``make_swiss_roll`` seen from its side)."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))  # (n,)
    p = torch.stack([t * t.cos(), t * t.sin()], 1) + 0.5 * torch.randn(n, 2, generator=generator,
                                                                       dtype=torch.float64)  # (n, 2)
    # exact: E[t cos t] = 2, E[t sin t] = 2 / (3 pi); E|p - mean|^2 = 9.75 pi^2 + 0.5 - 4 - 4 / (9 pi^2)
    scale = math.sqrt((9.75 * math.pi**2 + 0.5 - 4 - 4 / (9 * math.pi**2)) / 2)  # 6.8065
    return _standardise(p, (2.0, 2 / (3 * math.pi)), scale)


def moons(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Two interleaved half circles, (cos a, sin a) and (1 - cos a, 1/2 - sin a), a ~ U(0, pi), each
    point on either with probability 1/2, + N(0, 0.08^2 I) (scikit-learn's ``make_moons``)."""
    a = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)  # (n,)
    inner = torch.rand(n, generator=generator) < 0.5  # (n,)
    p = torch.stack([torch.where(inner, 1 - a.cos(), a.cos()), torch.where(inner, 0.5 - a.sin(), a.sin())], 1)
    p = p + 0.08 * torch.randn(n, 2, generator=generator, dtype=torch.float64)  # (n, 2)
    return _standardise(p, (0.5, 0.25), 0.7096)  # mean exact, scale measured


def gaussians8(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Eight equal Gaussians, standard deviation 0.1, centred on the unit circle at multiples of 45
    degrees (the mode-coverage test of Metz et al. 2017, "Unrolled GANs")."""
    angle = torch.randint(0, 8, (n,), generator=generator).double() * (math.pi / 4)  # (n,)
    p = torch.stack([angle.cos(), angle.sin()], 1) + 0.1 * torch.randn(n, 2, generator=generator,
                                                                      dtype=torch.float64)  # (n, 2)
    return _standardise(p, (0.0, 0.0), math.sqrt(0.51))  # exact: E|p|^2 = 1 + 2 * 0.1^2


DATASETS: dict[str, Callable[..., torch.Tensor]] = {
    "swiss_roll": swiss_roll,
    "moons": moons,
    "gaussians8": gaussians8,
}


def draw_data(dataset: str, n: int, seed: int) -> torch.Tensor:
    """``n`` points of ``dataset`` from CPU seed ``seed``. -> (n, 2) float32."""
    if dataset not in DATASETS:
        raise InputError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")
    return DATASETS[dataset](n, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ model
class MLPDenoiser(nn.Module):
    """An MLP with the UNet's contract, ``model(x_t, t, **ignored) -> (B, dim)``: x_t (B, dim) noisy
    points, t (B,) fractional timesteps. The timestep's sinusoidal embedding is the UNet's
    (``ldm.unet.timestep_embedding``); each of ``depth`` residual blocks adds it, projected, to its
    hidden layer; the output layer starts at zero. Each coordinate also enters as sinusoids of
    ``fourier_scale`` * x (the same embedding, ``fourier_dim`` wide): Fourier features let an MLP draw
    sharp detail in low dimensions (Tancik et al. 2020, "Fourier Features Let Networks Learn High
    Frequency Functions"); on the eight Gaussians (eps prediction, DPM-Solver++(2M) at 50 steps on the
    uncapped Karras ramp) they cut the samples between the modes from 6% to 3.5% (the data: 1.2%)."""

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, emb_dim: int = 64, fourier_dim: int = 32,
                 fourier_scale: float = 25.0):
        super().__init__()
        self.emb_dim, self.fourier_dim, self.fourier_scale = emb_dim, fourier_dim, fourier_scale
        self.time_embed = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(dim * (1 + fourier_dim), width)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm": nn.LayerNorm(width), "fc1": nn.Linear(width, width), "emb": nn.Linear(width, width),
            "fc2": nn.Linear(width, width)}) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **ignored) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.emb_dim).to(x.dtype))  # (B, width)
        features = [x] + [timestep_embedding(x[:, i] * self.fourier_scale, self.fourier_dim, max_period=1000)
                          .to(x.dtype) for i in range(x.shape[1]) if self.fourier_dim]  # (B, dim), (B, F) each
        h = self.inp(torch.cat(features, 1))  # (B, width)
        for b in self.blocks:
            r = nn.functional.silu(b["fc1"](b["norm"](h)) + b["emb"](emb))  # (B, width)
            h = h + b["fc2"](r)
        return self.out(h)  # (B, dim)


# --------------------------------------------------------------------------------------- training
@dataclass
class ToyConfig:
    dataset: str = "swiss_roll"
    steps: int = 3000  # optimizer steps; every batch is a fresh draw of the data
    batch_size: int = 256
    lr: float = 2e-3  # AdamW; linear warm-up, then cosine decay to 10%
    warmup: int = 100
    width: int = 128
    depth: int = 3
    prediction: str = "v"  # v, eps or x0 (ldm.diffusion.PREDICTIONS); v as the UNet demo
    schedule: str = "linear"  # ldm.diffusion.SCHEDULES, 1000 timesteps
    num_timesteps: int = 1000
    ema_decay: float = 0.99  # the model returned and sampled is the EMA copy
    seed: int = 0  # weights, data and noise
    snapshots: int = 20  # samples drawn this many times over training (and at step 0)
    snapshot_n: int = 2000  # points a snapshot draws and scores
    snapshot_sampler: str = DEFAULT_SAMPLER  # the project's default sampler and steps (ldm.pretrained)
    snapshot_steps: int = DEFAULT_STEPS

    def check(self) -> ToyConfig:
        if self.dataset not in DATASETS:
            raise InputError(f"unknown dataset {self.dataset!r}; expected one of {list(DATASETS)}")
        for name in ("steps", "batch_size", "width", "depth", "snapshot_n", "snapshot_steps", "num_timesteps"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.snapshots < 0 or self.warmup < 0:
            raise InputError(f"snapshots and warmup must be >= 0, got {self.snapshots} and {self.warmup}")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.prediction not in PREDICTIONS:
            raise InputError(f"unknown prediction {self.prediction!r}; expected one of {list(PREDICTIONS)}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; expected one of {list(SCHEDULES)}")
        if self.snapshot_sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.snapshot_sampler!r}; expected one of {list(SAMPLERS)}")
        return self


def build(config: ToyConfig) -> Denoiser:
    """The untrained model of ``config``, seeded, wrapped as the samplers' denoiser."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = MLPDenoiser(width=config.width, depth=config.depth)
    schedule = NoiseSchedule.from_name(config.schedule, config.num_timesteps)
    return Denoiser(net, schedule, config.prediction)


def snapshot_steps(config: ToyConfig) -> list[int]:
    """The steps after which a snapshot is taken: 0 (the untrained model) and ``snapshots`` evenly
    spaced ones ending at the last step."""
    k = min(config.snapshots, config.steps)
    return sorted({0} | {round(config.steps * (i + 1) / k) for i in range(k)})


def train(config: ToyConfig, on_snapshot: Callable[[int, torch.Tensor, float], None] | None = None
          ) -> tuple[Denoiser, list[dict]]:
    """Train an ``MLPDenoiser`` on ``config.dataset`` with ``diffusion_loss``; on the CPU, in the
    calling thread's torch settings. -> (the EMA model wrapped as a ``Denoiser``, history).

    history: a row {"step", "loss"} every 10% of the run and at each snapshot {"step", "loss", "energy"}
    (the energy distance of ``snapshot_n`` samples to ``snapshot_n`` fresh data points, the same noise
    and data at every snapshot), then one {"train_seconds", "snapshot_seconds"} row: the time of the
    optimizer steps alone and of the snapshots. ``on_snapshot(step, points (snapshot_n, 2), energy)``
    is called at each snapshot."""
    c = config.check()
    model = build(c)
    ema = copy.deepcopy(model).requires_grad_(False)
    net = model.inner_model
    opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(c.seed)
    eval_data = draw_data(c.dataset, c.snapshot_n, EVAL_SEED + c.seed)  # (n, 2)
    at = set(snapshot_steps(c))
    every = max(1, c.steps // 10)
    history: list[dict] = []
    train_s = snap_s = 0.0
    running, count = 0.0, 0

    def snapshot(step: int, loss: float | None) -> None:
        nonlocal snap_s
        t0 = time.perf_counter()
        points = sample(ema, c.snapshot_n, c.snapshot_sampler, c.snapshot_steps, seed=c.seed)
        energy = energy_distance(points, eval_data)
        snap_s += time.perf_counter() - t0
        history.append({"step": step, "loss": loss, "energy": energy})
        if on_snapshot is not None:
            on_snapshot(step, points, energy)

    if 0 in at:
        snapshot(0, None)
    for step in range(1, c.steps + 1):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = learning_rate(c.lr, step - 1, warmup=c.warmup, schedule="cosine", total=c.steps, floor=0.1)
        x0 = DATASETS[c.dataset](c.batch_size, gen)  # (B, 2)
        loss = diffusion_loss(net, x0, model.schedule, c.prediction, generator=gen).mean()
        value = loss.item()
        if not math.isfinite(value):
            raise InputError(f"the loss became {value} at step {step}; lower lr (now {c.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(c.ema_decay, (1 + step) / (10 + step))  # warmed up as in ldm.unet_training
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
        train_s += time.perf_counter() - t0
        running, count = running + value, count + 1
        if step % every == 0 or step in at:
            mean_loss, running, count = running / count, 0.0, 0
            if step in at:
                snapshot(step, mean_loss)
            else:
                history.append({"step": step, "loss": mean_loss})
    history.append({"train_seconds": train_s, "snapshot_seconds": snap_s})
    return ema.eval(), history


# --------------------------------------------------------------------------------------- sampling
def default_spacing(sampler: str) -> str:
    """The sigma spacing ``sampler`` runs at unless told: ``ldm.pipeline.DEFAULT_SPACING``'s, Karras
    for a sampler it does not name."""
    return DEFAULT_SPACING.get(sampler, "karras")


@torch.no_grad()
def sample(model: Denoiser, n: int, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, *, seed: int = 0,
           spacing: str | None = None) -> torch.Tensor:
    """``n`` points from ``model`` (a ``Denoiser``) with ``ldm.samplers.SAMPLERS[sampler]`` in ``steps``
    steps, the sigmas of ``ldm.pipeline.sampling_sigmas`` at ``spacing`` (None: the sampler's default,
    Karras for a sampler that names none). Starting noise and a stochastic sampler's noise come from
    CPU seed ``seed``. -> (n, 2) float32."""
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}")
    if steps <= 0 or n <= 0:
        raise InputError(f"steps and n must be positive, got {steps} and {n}")
    gen = torch.Generator().manual_seed(seed)
    sigmas = sampling_sigmas(model.schedule, steps, sampler, spacing or default_spacing(sampler))
    noise = torch.randn(n, 2, generator=gen)  # (n, 2)
    fn = SAMPLERS[sampler]
    options = {"generator": gen} if "generator" in inspect.signature(fn).parameters else {}
    return fn(model, noise * sigmas[0], sigmas, disable=True, **options).float()  # (n, 2)


# ------------------------------------------------------------------------------------------ score
def energy_distance(x: torch.Tensor, y: torch.Tensor, unbiased: bool = False) -> float:
    """The energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between the samples x (n, d) and y (m, d),
    in float64 (Szekely & Rizzo 2013). Default: the V-statistic, every mean over all pairs including
    a point with itself; it is >= 0 and for two draws of one distribution its mean is about
    E|X - X'| (1/n + 1/m), hence the noise floor. ``unbiased``: the U-statistic, the within-sample
    means over distinct pairs only (divided by n (n - 1)); its mean is exactly the population value,
    0 for one distribution, and it can be negative."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise InputError(f"energy_distance: need (n, d) and (m, d) points, got {tuple(x.shape)} and {tuple(y.shape)}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise InputError(f"energy_distance: need at least 2 points a side, got {n} and {m}")
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    exact = "donot_use_mm_for_euclid_dist"  # |a - b| directly: no cancellation for nearby points
    xy = torch.cdist(x, y, compute_mode=exact).mean()
    xx, yy = torch.cdist(x, x, compute_mode=exact).sum(), torch.cdist(y, y, compute_mode=exact).sum()
    within = (n * (n - 1), m * (m - 1)) if unbiased else (n * n, m * m)
    return (2 * xy - xx / within[0] - yy / within[1]).item()


def noise_floor(dataset: str, n: int, seed: int = 0, repeats: int = 20) -> dict:
    """The energy distance (V-statistic) between two independent draws of ``n`` points of ``dataset``,
    over ``repeats`` pairs of fresh data. -> {"n", "repeats", "mean", "p95"}: its mean and its 95th
    percentile (the statistic is skewed, a weighted sum of chi-squares). A model whose samples score
    below ``p95`` at this ``n`` cannot be told from the data by this test."""
    if repeats < 1:
        raise InputError(f"noise_floor: repeats must be >= 1, got {repeats}")
    base = EVAL_SEED + 7919 * (seed + 1)  # apart from the snapshots' eval data
    values = torch.tensor([energy_distance(draw_data(dataset, n, base + 2 * i), draw_data(dataset, n, base + 2 * i + 1))
                           for i in range(repeats)], dtype=torch.float64)
    return {"n": n, "repeats": repeats, "mean": values.mean().item(), "p95": values.quantile(0.95).item()}


# --------------------------------------------------------------------------------------- pictures
DATA_COLOR, SAMPLE_COLOR = (150, 150, 150), (31, 119, 180)


def scatter(points: torch.Tensor, size: int = 200, color: tuple[int, int, int] = SAMPLE_COLOR,
            title: str = "", extent: float = EXTENT) -> Image.Image:
    """Points (n, 2) on the square [-extent, extent]^2 as a ``size`` x ``size`` RGB image (y up),
    axes through 0, ``title`` in the top-left corner; points outside are clamped to the frame, in red."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    mid = (size - 1) / 2
    draw.line([0, mid, size, mid], fill=(230, 230, 230))
    draw.line([mid, 0, mid, size], fill=(230, 230, 230))
    draw.rectangle([0, 0, size - 1, size - 1], outline=(200, 200, 200))
    p = points.detach().double().cpu()
    outside = (p.abs() > extent).any(1)  # (n,)
    px = ((p.clamp(-extent, extent) / extent + 1) * mid).round().long()  # (n, 2)
    for (u, v), out in zip(px.tolist(), outside.tolist()):
        draw.rectangle([u, size - 1 - v - 1, u + 1, size - 1 - v], fill=(214, 39, 40) if out else color)
    if title:
        for i, line in enumerate(title.split("\n")):
            box = draw.textbbox((4, 3 + 12 * i), line)
            draw.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], fill="white")  # readable over points
            draw.text((4, 3 + 12 * i), line, fill="black")
    return img


def side_by_side(images: list[Image.Image], columns: int | None = None, pad: int = 4) -> Image.Image:
    """Equal-size images in rows of ``columns`` (default: one row), ``pad`` pixels apart."""
    if not images:
        raise ValueError("side_by_side: no images")
    columns = columns or len(images)
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        sheet.paste(img, (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet


def snapshot_frame(data: torch.Tensor, points: torch.Tensor, title: str, size: int = 200) -> Image.Image:
    """One GIF frame: the data beside the samples of a snapshot."""
    return side_by_side([scatter(data, size, DATA_COLOR, "data"), scatter(points, size, SAMPLE_COLOR, title)])


def sampler_figure(model: Denoiser, dataset: str, samplers: list[str], steps: list[int], n: int = 2000,
                   seed: int = 0, size: int = 200, floor: dict | None = None) -> tuple[Image.Image, list[dict]]:
    """Every sampler of ``samplers`` (columns) at each step count of ``steps`` (rows), from the same
    starting noise, each panel titled with its sampler, steps and energy distance to ``n`` fresh data
    points; a first column shows those data (and ``floor``, a ``noise_floor``, when given).
    -> (the figure, [{"sampler", "steps", "spacing", "energy"}] row by row)."""
    data = draw_data(dataset, n, EVAL_SEED + 2 * seed + 1)  # (n, 2)
    panels, rows = [], []
    for k in steps:
        if not panels:
            title = f"data: {dataset}, {n} points"
            if floor is not None:
                title += f"\nnoise floor {floor['mean']:.4f}\n(95th percentile {floor['p95']:.4f})"
            panels.append(scatter(data, size, DATA_COLOR, title))
        else:
            panels.append(Image.new("RGB", (size, size), "white"))
            ImageDraw.Draw(panels[-1]).text((size // 2 - 24, size // 2 - 6), f"{k} steps", fill="black")
        for name in samplers:
            points = sample(model, n, name, k, seed=seed)
            energy = energy_distance(points, data)
            rows.append({"sampler": name, "steps": k, "spacing": default_spacing(name), "energy": energy})
            panels.append(scatter(points, size, SAMPLE_COLOR, f"{name}, {k} steps\nenergy {energy:.4f}"))
    return side_by_side(panels, columns=len(samplers) + 1), rows
