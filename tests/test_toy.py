"""The 2-D toy (ldm.toy2d, python -m ldm.toy): the data, the energy distance and its noise floor, the
MLP under the diffusion maths, every sampler, the pictures, and the command.

Statistical checks use the test's fresh seed; their margins were measured over hundreds of seeds.
For two draws of n points of one distribution the V-statistic has mean exactly E|X - X'| * 2 / n
(E|X - X'| ~ 1.75-1.8 here): a mean over 5 pairs came out at 1.0 +- 0.3 times 1.8 * 2 / n, at most 2.3
in 400 seeds (the bound is 3.5); the departures tested score 8 times it or more (a Gaussian with the
swiss roll's mean and scale, the least: 6.7 +- 0.4, bound 4).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm import toy
from ldm.diffusion import Denoiser, NoiseSchedule, diffusion_loss
from ldm.samplers import SAMPLERS
from ldm.toy2d import (
    DATASETS,
    EXTENT,
    MLPDenoiser,
    ToyConfig,
    draw_data,
    energy_distance,
    noise_floor,
    sample,
    sampler_figure,
    scatter,
    snapshot_steps,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("name", list(DATASETS))
def test_each_dataset_is_standardised_seeded_and_inside_the_picture(name, seed):
    g = torch.Generator().manual_seed(seed)
    x = DATASETS[name](20000, g)
    assert x.shape == (20000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    # centred, E|x|^2 = 2: standard errors at 20000 points are ~0.007 and ~0.01
    assert x.mean(0).abs().max() < 0.05, x.mean(0)
    assert abs(x.square().sum(1).mean().item() / 2 - 1) < 0.05
    assert (x.abs() > EXTENT).any(1).float().mean() < 1e-3  # the fixed axes of the pictures hold it
    again = DATASETS[name](20000, torch.Generator().manual_seed(seed))
    assert torch.equal(x, again)  # a seed is a dataset
    assert not torch.equal(x[:100], DATASETS[name](100, torch.Generator().manual_seed(seed + 1)))
    assert torch.equal(draw_data(name, 50, seed), DATASETS[name](50, torch.Generator().manual_seed(seed)))


def test_the_datasets_have_their_shapes(seed):
    g = torch.Generator().manual_seed(seed)
    # eight Gaussians: every point near one of 8 centres on a circle, each centre with ~1/8 of them
    x = DATASETS["gaussians8"](8000, g) * 0.51**0.5  # back to the unit circle
    angles = torch.arange(8) * (torch.pi / 4)
    centres = torch.stack([angles.cos(), angles.sin()], 1)  # (8, 2)
    d, k = torch.cdist(x, centres).min(1)
    assert d.max() < 0.6  # 0.1 standard deviation: 0.6 is 6 of them
    counts = torch.bincount(k, minlength=8).float()
    assert (counts - 1000).abs().max() < 5 * (8000 * (1 / 8) * (7 / 8)) ** 0.5, counts
    # swiss roll: the radius grows with the angle by one turn per 2 pi, so it spans ~[1.5 pi, 4.5 pi]
    r = (DATASETS["swiss_roll"](8000, g) * 6.8065 + torch.tensor([2.0, 0.2122])).norm(dim=1)
    assert 1.5 * torch.pi - 2.5 < r.min() < 1.5 * torch.pi + 0.5
    assert 4.5 * torch.pi - 0.5 < r.max() < 4.5 * torch.pi + 2.5
    # moons: two unit half circles, upper centred at (0, 0), lower at (1, 0.5)
    m = DATASETS["moons"](8000, g) * 0.7096 + torch.tensor([0.5, 0.25])
    to_upper, to_lower = (m.norm(dim=1) - 1).abs(), ((m - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs()
    assert torch.minimum(to_upper, to_lower).max() < 0.5
    assert 0.45 < (to_upper < to_lower).float().mean() < 0.55


# --------------------------------------------------------------------------------------- evaluator
def energy_distance_by_loops(x, y, unbiased):
    """The definition, pair by pair, in float64."""
    x, y = x.double().tolist(), y.double().tolist()

    def dist(a, b):
        return sum((p - q) ** 2 for p, q in zip(a, b)) ** 0.5

    n, m = len(x), len(y)
    xy = sum(dist(a, b) for a in x for b in y) / (n * m)
    xx = sum(dist(a, b) for a in x for b in x) / (n * (n - 1) if unbiased else n * n)
    yy = sum(dist(a, b) for a in y for b in y) / (m * (m - 1) if unbiased else m * m)
    return 2 * xy - xx - yy


@pytest.mark.parametrize("n, m, d", [(7, 5, 2), (2, 2, 2), (13, 9, 3), (6, 11, 1)])
@pytest.mark.parametrize("unbiased", [False, True])
def test_energy_distance_is_the_formula(n, m, d, unbiased, seed):
    x, y = torch.randn(n, d) * 2, torch.randn(m, d) + 0.5
    got = energy_distance(x, y, unbiased=unbiased)
    assert got == pytest.approx(energy_distance_by_loops(x, y, unbiased), rel=1e-12, abs=1e-12)
    assert got == pytest.approx(energy_distance(y, x, unbiased=unbiased), rel=1e-12, abs=1e-12)  # symmetric
    if not unbiased:
        assert got >= 0 and energy_distance(x, x) == pytest.approx(0, abs=1e-12)


def test_energy_distance_refuses_mismatched_points():
    with pytest.raises(ValueError, match=r"\(n, d\) and \(m, d\)"):
        energy_distance(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="at least 2 points"):
        energy_distance(torch.zeros(1, 2), torch.zeros(4, 2))


def mean_energy(name, n, seed, change=lambda x: x, pairs=5):
    """The mean energy distance of ``pairs`` pairs of independent draws, the first of each ``change``d."""
    g = torch.Generator().manual_seed(seed)
    return sum(energy_distance(change(DATASETS[name](n, g)), DATASETS[name](n, g)) for _ in range(pairs)) / pairs


@pytest.mark.parametrize("name", list(DATASETS))
def test_one_distribution_scores_the_floor_and_a_changed_one_far_above(name, seed):
    n = 1000
    floor = 1.8 * 2 / n  # E|X - X'| ~ 1.75-1.8 for these standardised data
    assert mean_energy(name, n, seed) < 3.5 * floor
    shift = torch.tensor([0.3, 0.3])  # 0.42 of the data's scale, along the diagonal
    assert mean_energy(name, n, seed, lambda x: x + shift) > 6 * floor
    assert mean_energy(name, n, seed, lambda x: x * 1.25) > 6 * floor
    g = torch.Generator().manual_seed(seed + 1)
    gauss = lambda x: torch.randn(x.shape, generator=g)  # the data's mean and scale, none of its shape
    assert mean_energy(name, n, seed, gauss) > 4 * floor


def test_noise_floor_is_its_expected_value(seed):
    """E[V] = E|X - X'| (1/n + 1/n) for two draws of n; E|X - X'| from a large draw."""
    big = draw_data("moons", 3000, seed).double()
    mean_dist = torch.cdist(big, big).sum().item() / (3000 * 2999)
    n = 400
    floor = noise_floor("moons", n, seed, repeats=60)
    assert set(floor) == {"n", "repeats", "mean", "p95"} and floor["n"] == n
    assert floor["mean"] == pytest.approx(2 * mean_dist / n, rel=0.4)  # the mean of 60 has ~9% spread
    assert floor["p95"] > floor["mean"]
    assert noise_floor("moons", n, seed, repeats=60) == floor  # seeded


# ------------------------------------------------------------------------------- model and training
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_the_mlp_takes_the_unets_place(prediction, seed):
    net = MLPDenoiser(width=32, depth=2)
    schedule = NoiseSchedule.from_name("linear")
    x, t = torch.randn(5, 2), torch.rand(5) * 999
    assert net(x, t, context=None).shape == (5, 2)  # extra keyword arguments are ignored
    assert torch.equal(net(x, t), torch.zeros(5, 2))  # the output layer starts at zero
    loss = diffusion_loss(net, torch.randn(8, 2), schedule, prediction)  # (B,)
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    denoised = Denoiser(net, schedule, prediction)(torch.randn(5, 2) * 3, torch.full((5,), 3.0))
    assert denoised.shape == (5, 2) and torch.isfinite(denoised).all()


def test_snapshot_steps():
    assert snapshot_steps(ToyConfig(steps=100, snapshots=4)) == [0, 25, 50, 75, 100]
    assert snapshot_steps(ToyConfig(steps=3, snapshots=10)) == [0, 1, 2, 3]
    assert snapshot_steps(ToyConfig(steps=10, snapshots=0)) == [0]


@pytest.fixture(scope="module")
def trained():
    """A 500-step run on the two moons at a high learning rate (a few seconds), and its snapshots."""
    config = ToyConfig(dataset="moons", steps=500, lr=1e-2, snapshots=4, snapshot_n=500, seed=0)
    seen = []
    model, history = train(config, lambda step, points, energy: seen.append((step, points.shape, energy)))
    return config, model, history, seen


def test_training_brings_the_samples_to_the_data(trained):
    config, model, history, seen = trained
    times = history[-1]
    assert set(times) == {"train_seconds", "snapshot_seconds"} and times["train_seconds"] > 0
    snaps = [r for r in history if "energy" in r]
    assert [r["step"] for r in snaps] == [0, 125, 250, 375, 500] == [s for s, _, _ in seen]
    assert all(shape == (500, 2) for _, shape, _ in seen)
    untrained, first, final = snaps[0]["energy"], snaps[1]["energy"], snaps[-1]["energy"]
    # untrained, the zero output layer predicts v = 0, whose probability-flow ODE carries the starting noise
    # to a standard Gaussian: ~0.057, as the Gaussian below; trained 500 steps: ~0.006
    assert final < first and final < untrained / 5, (untrained, first, final)
    # a standard Gaussian (the data's mean and scale, none of its shape) scores ~0.057 at 500 points
    gauss = energy_distance(torch.randn(500, 2, generator=torch.Generator().manual_seed(0)),
                            draw_data("moons", 500, 1))
    trained_ed = energy_distance(sample(model, 500, steps=50, seed=3), draw_data("moons", 500, 7))  # ~0.01
    assert trained_ed < gauss / 2, (trained_ed, gauss)
    losses = [r["loss"] for r in history[:-1] if r["loss"] is not None]
    assert losses[-1] < losses[0]


def test_training_is_seeded():
    config = ToyConfig(dataset="moons", steps=20, snapshots=1, snapshot_n=100, batch_size=32, width=16)
    (a, ha), (b, hb) = train(config), train(config)
    assert [r.get("energy") for r in ha[:-1]] == [r.get("energy") for r in hb[:-1]]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_draws_the_toy(trained, sampler):
    _, model, _, _ = trained
    points = sample(model, 500, sampler, 50, seed=3)
    assert points.shape == (500, 2) and torch.isfinite(points).all()
    assert torch.equal(points, sample(model, 500, sampler, 50, seed=3))  # seeded, the stochastic ones too
    assert energy_distance(points, draw_data("moons", 500, 7)) < 0.03  # 0.008-0.015; a Gaussian's: 0.057


def test_sample_refuses_an_unknown_sampler(trained):
    with pytest.raises(ValueError, match="unknown sampler 'warp'"):
        sample(trained[1], 10, "warp", 5)


# -------------------------------------------------------------------------------------- pictures
def test_scatter_puts_points_on_fixed_axes():
    img = scatter(torch.tensor([[0.0, 0.0], [EXTENT, EXTENT], [-9.0, 0.0]]), size=101, title="")
    assert img.size == (101, 101)
    assert img.getpixel((50, 50)) == (31, 119, 180)  # the origin at the centre
    assert img.getpixel((100, 0)) == (31, 119, 180)  # (EXTENT, EXTENT) in the top-right corner (y up)
    assert img.getpixel((0, 50)) == (214, 39, 40)  # outside the axes: clamped to the frame, in red


def test_sampler_figure_has_a_panel_per_sampler_and_steps(trained):
    _, model, _, _ = trained
    names = list(SAMPLERS)[:2]
    figure, rows = sampler_figure(model, "moons", names, [2, 5], n=100, size=60)
    assert [(r["sampler"], r["steps"]) for r in rows] == [(s, k) for k in (2, 5) for s in names]
    assert figure.size == ((len(names) + 1) * 64 + 4, 2 * 64 + 4)


# --------------------------------------------------------------------------------------- command
FAST = ["--steps", "30", "--snapshots", "2", "--n", "100", "--batch-size", "32", "--width", "16",
        "--sampler-steps", "2", "3"]


def test_the_command_writes_its_files(tmp_path, capsys):
    out = tmp_path / "toy"
    assert toy.main(FAST + ["--data", "moons", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["dataset"] == "moons" and metrics["config"]["steps"] == 30
    assert [s["step"] for s in metrics["snapshots"]] == [0, 15, 30]
    assert {(r["sampler"], r["steps"]) for r in metrics["samplers"]} == {(s, k) for s in SAMPLERS for k in (2, 3)}
    assert metrics["noise_floor"]["n"] == 100 and metrics["train_seconds"] > 0
    with Image.open(out / "toy.gif") as gif:
        assert gif.n_frames == 3
    with Image.open(out / "samplers.png") as png:
        assert png.size[0] > png.size[1]
    assert (out / "curves.png").is_file()
    printed = capsys.readouterr().out
    assert "noise floor" in printed and all(s in printed for s in SAMPLERS)


@pytest.mark.parametrize("argv, message", [
    (["--data", "circles"], "argument --data: invalid choice: 'circles'"),
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--steps", "-3"], "--steps must be positive, got -3"),
    (["--n", "1"], "--n must be at least 2, got 1"),
    (["--sampler-steps", "10", "0"], "--sampler-steps must be positive, got 0"),
    (["--samplers", "warp"], "argument --samplers: invalid choice: 'warp'"),
    (["--snapshots", "0"], "--snapshots must be positive, got 0"),
    (["--lr", "0"], "lr must be positive, got 0.0"),
    (["--batch", "32"], "unrecognized arguments: --batch 32"),  # no abbreviations
])
def test_bad_flags_are_one_line_and_write_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "toy"
    try:
        code = toy.main(argv + ["--out", str(out)])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("toy: error: ") and message in err, err
    assert not out.exists()


def test_a_diverging_run_stops_with_the_step_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "toy"
    assert toy.main(["--lr", "1e30", "--steps", "20", "--snapshots", "1", "--n", "50", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the step-0 snapshot's progress line
    assert re.fullmatch(r"toy: error: the loss became (inf|nan) at step \d+; lower lr \(now 1e\+30\)", last), last
    assert not out.exists()


def test_help_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "ldm.toy", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0 and "usage: python -m ldm.toy" in done.stdout and "samplers.png" in done.stdout


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Toy diffusion in 2-D"):]
    return section[:section.index("\n## ", 1)]


def test_the_readme_and_docstring_commands_parse():
    section = readme_section()
    commands = re.findall(r"^\s*python -m ldm\.toy\b(.*?)(?:\s+#.*)?$", section + "\n" + toy.__doc__, re.M)
    assert len(commands) >= 4
    pictures = re.findall(r'src="([^"]+)"', section)
    assert pictures and all((ROOT / p).is_file() for p in pictures), pictures
    for line in commands:
        toy.build_parser().parse_args(shlex.split(line.strip()))  # a bad flag exits 2


def test_the_readme_python_snippet_runs(capsys):
    """The snippet as written, but a 40-step run."""
    snippet = re.search(r"```python\n(.*?)```", readme_section(), re.S).group(1)
    assert "steps=2000" in snippet
    scope: dict = {}
    exec(compile(snippet.replace("steps=2000", "steps=40, snapshots=1"), "README.md", "exec"), scope)
    assert scope["points"].shape == (2000, 2)
    assert float(capsys.readouterr().out) > 0
