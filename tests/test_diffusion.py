"""Schedules, the t <-> sigma map, prediction targets, the Denoiser wrapper and the training loss, in float64
against closed forms."""

import math

import numpy as np
import pytest
import torch

from ldm.diffusion import (
    PREDICTIONS,
    SCHEDULES,
    Denoiser,
    NoiseSchedule,
    append_dims,
    cosine_schedule,
    diffusion_loss,
    linear_schedule,
    loss_weights,
    prediction_target,
    sample_timesteps,
    scaled_linear_schedule,
    x0_from_prediction,
)

T = 1000


# ------------------------------------------------------------------------------------ schedules
def _cumprod_loop(betas):
    """abar_t = prod_{s <= t} (1 - beta_s), one multiplication at a time (independent of torch.cumprod)."""
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return np.array(out)


def test_linear_schedule_is_ddpm():
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    np.testing.assert_allclose(linear_schedule(T).numpy(), _cumprod_loop(betas), rtol=1e-12)
    s = NoiseSchedule(linear_schedule(T))
    # DDPM's abar_T is about 4.0e-5 (Ho et al. 2020: the chain ends close to N(0, I))
    assert 3.9e-5 < s.alphas_cumprod[-1].item() < 4.2e-5


def test_scaled_linear_schedule_matches_stable_diffusion_sigmas():
    betas = [(0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / (T - 1)) ** 2 for i in range(T)]
    np.testing.assert_allclose(scaled_linear_schedule(T).numpy(), _cumprod_loop(betas), rtol=1e-12)
    s = NoiseSchedule.from_name("scaled_linear")
    # the sigma range every SD 1.x k-diffusion sampler uses: 0.0292 .. 14.6146
    assert s.sigma_min == pytest.approx(0.029168, abs=1e-5)
    assert s.sigma_max == pytest.approx(14.614642, abs=1e-5)


def test_cosine_schedule_follows_its_closed_form():
    abar = cosine_schedule(T).numpy()
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    # the product telescopes to f(t+1)/f(0) wherever beta is not clipped at 0.999 (all but the end)
    betas = 1 - np.array([f(t + 1) / f(t) for t in range(T)])
    unclipped = np.cumprod(betas <= 0.999).astype(bool)
    assert unclipped.sum() > T - 5
    np.testing.assert_allclose(abar[unclipped], expected[unclipped], rtol=1e-10)
    assert (np.diff(abar) < 0).all() and abar[-1] > 0


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_t_sigma_map(name, seed):
    s = NoiseSchedule.from_name(name)
    ints = torch.arange(T, dtype=torch.float64)
    # exact at integer timesteps, both ways
    torch.testing.assert_close(s.t_to_sigma(ints), s.sigmas, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.sigma_to_t(s.sigmas), ints, rtol=0, atol=1e-9)
    # fractional t: log sigma is linear between neighbours, and the map inverts
    t = torch.rand(500, dtype=torch.float64) * (T - 1)
    lo = t.floor().long().clamp(max=T - 2)
    w = t - lo
    expected = ((1 - w) * s.sigmas[lo].log() + w * s.sigmas[lo + 1].log()).exp()
    torch.testing.assert_close(s.t_to_sigma(t), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t, rtol=0, atol=1e-8)
    # float32 inputs stay float32 and close
    t32 = s.sigma_to_t(s.t_to_sigma(t).float())
    assert t32.dtype == torch.float32
    torch.testing.assert_close(t32.double(), t, rtol=0, atol=2e-3)
    # outside the schedule's range sigma clamps to the end timesteps
    out = s.sigma_to_t(torch.tensor([s.sigma_min / 10, s.sigma_max * 10], dtype=torch.float64))
    assert out.tolist() == [0.0, T - 1.0]


def test_schedule_bad_inputs():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        NoiseSchedule.from_name("sigmoid")
    with pytest.raises(ValueError, match="decrease strictly"):
        NoiseSchedule(torch.tensor([0.5, 0.6, 0.1]))
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(torch.ones(2, 2) * 0.5)


# -------------------------------------------------------------------------- prediction targets
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_prediction_target_round_trip(prediction, seed):
    x0, noise = torch.randn(2, 6, 4, 4, 4, dtype=torch.float64).unbind(0)
    abar = torch.rand(6, dtype=torch.float64) * 0.98 + 0.01
    alpha, s = append_dims(abar.sqrt(), 4), append_dims((1 - abar).sqrt(), 4)
    x_t = alpha * x0 + s * noise
    target = prediction_target(prediction, x0, noise, alpha, s)
    torch.testing.assert_close(x0_from_prediction(prediction, target, x_t, alpha, s), x0, rtol=0, atol=1e-12)
    if prediction == "v":  # v is the velocity d x_t / d phi for x_t = cos(phi) x0 + sin(phi) noise
        phi = torch.atan2(s, alpha)
        torch.testing.assert_close(target, -torch.sin(phi) * x0 + torch.cos(phi) * noise, rtol=0, atol=1e-12)


def test_unknown_prediction_is_named():
    with pytest.raises(ValueError, match="'score'"):
        Denoiser(torch.nn.Identity(), NoiseSchedule.from_name("linear"), prediction="score")


class GaussianOracle(torch.nn.Module):
    """The Bayes-optimal network for data x0 ~ N(m, v) elementwise, trained on ``schedule`` to predict
    ``prediction``: from (x_t, t) it computes E[x0 | x_t] and reports it as its target, by definition."""

    def __init__(self, m, v, schedule, prediction):
        super().__init__()
        self.m, self.v, self.schedule, self.prediction = m, v, schedule, prediction
        self.seen = []

    def posterior_mean(self, x, sigma):  # x = x0 + sigma * noise
        s2 = append_dims(sigma, x.dim()) ** 2
        return self.m + self.v / (self.v + s2) * (x - self.m)

    def forward(self, x_t, t, **extra):
        self.seen.append(extra)
        sigma = self.schedule.t_to_sigma(t)
        alpha = append_dims((1 + sigma**2).rsqrt(), x_t.dim())
        s = alpha * append_dims(sigma, x_t.dim())
        x0 = self.posterior_mean(x_t / alpha, sigma)
        eps = (x_t - alpha * x0) / s
        return {"x0": x0, "eps": eps, "v": alpha * eps - s * x0}[self.prediction]


@pytest.mark.parametrize("schedule", ["scaled_linear", "cosine"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_denoiser_recovers_the_exact_posterior_mean(prediction, schedule, seed):
    sched = NoiseSchedule.from_name(schedule)
    m = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    v = torch.rand(1, 3, 4, 4, dtype=torch.float64) + 0.2
    oracle = GaussianOracle(m, v, sched, prediction)
    denoiser = Denoiser(oracle, sched, prediction)
    # sigmas across the whole range, including fractional timesteps, one per sample
    sigma = sched.t_to_sigma(torch.rand(8, dtype=torch.float64) * (T - 1))
    x = m + (v + append_dims(sigma, 4) ** 2).sqrt() * torch.randn(8, 3, 4, 4, dtype=torch.float64)
    ctx = torch.randn(8, 2, 5)
    out = denoiser(x, sigma, context=ctx)
    torch.testing.assert_close(out, oracle.posterior_mean(x, sigma), rtol=1e-9, atol=1e-9)
    assert oracle.seen[-1]["context"] is ctx  # extra_args reach the network untouched
    # a scalar sigma broadcasts over the batch
    torch.testing.assert_close(denoiser(x, sigma[0].item()), oracle.posterior_mean(x, sigma[:1].expand(8)))


# ---------------------------------------------------------------------------------- training loss
class PointMassOracle(torch.nn.Module):
    """Exact network for data that is always ``x0``: E[x0 | x_t] = x0, so the right answer is known."""

    def __init__(self, x0, schedule, prediction, delta=None):
        super().__init__()
        self.x0, self.schedule, self.prediction = x0, schedule, prediction
        self.delta = 0 if delta is None else delta  # an error added to the x0 estimate
        self.seen = []

    def forward(self, x_t, t, **extra):
        self.seen.append((t, extra))
        abar = self.schedule.alphas_cumprod_at(t.long(), x_t)
        alpha, s = append_dims(abar.sqrt(), x_t.dim()), append_dims((1 - abar).sqrt(), x_t.dim())
        x0 = self.x0 + self.delta
        eps = (x_t - alpha * x0) / s
        return {"x0": x0, "eps": eps, "v": alpha * eps - s * x0}[self.prediction]


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_is_zero_for_the_exact_model_and_passes_the_context(prediction, seed):
    sched = NoiseSchedule.from_name("linear")
    x0 = torch.randn(6, 4, 8, 8, dtype=torch.float64)
    model = PointMassOracle(x0, sched, prediction)
    ctx, lengths = torch.randn(6, 7, 16, dtype=torch.float64), torch.randint(1, 8, (6,))
    loss = diffusion_loss(model, x0, sched, prediction, context=ctx, context_lengths=lengths, min_snr_gamma=5.0)
    assert loss.shape == (6,) and loss.dtype == torch.float64
    assert loss.max().item() < 1e-20
    t, extra = model.seen[-1]
    assert t.dtype == torch.float64 and t.shape == (6,) and ((t >= 0) & (t < T)).all()
    assert extra["context"] is ctx and extra["context_lengths"] is lengths


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_of_a_zero_model_is_the_target_energy(prediction, seed):
    sched = NoiseSchedule.from_name("cosine")
    x0, noise = torch.randn(2, 5, 3, 4, 4, dtype=torch.float64).unbind(0)
    t = torch.randint(0, T, (5,))
    zero = lambda x_t, t: torch.zeros_like(x_t)
    loss = diffusion_loss(zero, x0, sched, prediction, t=t, noise=noise)
    abar = sched.alphas_cumprod[t]
    alpha, s = append_dims(abar.sqrt(), 4), append_dims((1 - abar).sqrt(), 4)
    target = {"eps": noise, "x0": x0, "v": alpha * noise - s * x0}[prediction]
    torch.testing.assert_close(loss, target.square().mean((1, 2, 3)), rtol=1e-12, atol=0)


def test_min_snr_weights_give_every_target_the_same_loss(seed):
    """With min-SNR-gamma every target's weighted loss is min(SNR, gamma) |x0 error|^2 (Hang et al. 2023),
    so one model error costs the same whichever target the network predicts."""
    sched = NoiseSchedule.from_name("scaled_linear")
    gamma = 5.0
    x0, noise, delta = torch.randn(3, 16, 4, 4, 4, dtype=torch.float64).unbind(0)
    t = torch.cat([torch.randint(0, 30, (8,)), torch.randint(30, T, (8,))])  # SNR on both sides of gamma
    abar = sched.alphas_cumprod[t]
    snr = abar / (1 - abar)
    assert (snr > gamma).any() and (snr < gamma).any()
    expected = snr.clamp(max=gamma) * delta.square().mean((1, 2, 3))
    for prediction in PREDICTIONS:
        model = PointMassOracle(x0, sched, prediction, delta=delta)
        loss = diffusion_loss(model, x0, sched, prediction, t=t, noise=noise, min_snr_gamma=gamma)
        torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0, msg=f"prediction={prediction}")
    torch.testing.assert_close(loss_weights("x0", snr), torch.ones_like(snr))  # no gamma: plain MSE


def _timestep_chi2(t: torch.Tensor, focus: float, mean: float, std: float, bins: int = 40) -> float:
    """Chi-square of timesteps against the exact bin probabilities (float64) of t = floor(T f),
    f ~ focus * logit-normal(mean, std) + (1 - focus) * uniform, over ``bins`` equal bins of t."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)  # (bins + 1,) in t / T
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), normal.cdf(torch.logit(edges[1:-1])),
                     torch.ones(1, dtype=torch.float64)])  # (bins + 1,)
    p = focus * cdf.diff() + (1 - focus) / bins  # (bins,)
    counts = torch.bincount(t // (T // bins), minlength=bins).double()
    return ((counts - t.numel() * p) ** 2 / (t.numel() * p)).sum().item()


def test_timesteps_are_uniform(seed):
    t = sample_timesteps(200_000, T)
    assert t.dtype == torch.int64 and t.min() == 0 and t.max() == T - 1
    # chi-square over every timestep, T-1 dof: mean 999, sd 44.7; 6 sd above the mean fails one run in ~1e9
    assert _timestep_chi2(t, 0.0, 0.0, 1.0, bins=T) < 999 + 6 * 44.7


@pytest.mark.parametrize("focus,mean,std", [(1.0, -0.85, 1.0), (0.7, -0.85, 1.0), (0.3, 0.5, 0.6)])
def test_focused_timesteps_follow_the_logit_normal_mixture(focus, mean, std, seed):
    t = sample_timesteps(200_000, T, focus=focus, focus_mean=mean, focus_std=std)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= T - 1
    bound = 39 + 6 * math.sqrt(2 * 39)  # chi-square with 39 dof: 6 sd above its mean
    assert _timestep_chi2(t, focus, mean, std) < bound
    # the check can tell: the same draws fail against a centre moved by 0.2 or a uniform law
    assert _timestep_chi2(t, focus, mean + 0.2, std) > bound
    assert _timestep_chi2(t, 0.0, mean, std) > bound


def test_timestep_focus_bad_inputs():
    with pytest.raises(ValueError, match="focus must lie"):
        sample_timesteps(4, T, focus=1.5)
    with pytest.raises(ValueError, match="focus_std"):
        sample_timesteps(4, T, focus=0.5, focus_std=0.0)


def test_loss_bad_inputs():
    sched = NoiseSchedule.from_name("linear")
    x0 = torch.randn(2, 4, 8, 8)
    model = lambda x_t, t: x_t
    with pytest.raises(ValueError, match="integer timesteps"):
        diffusion_loss(model, x0, sched, t=torch.rand(2))
    with pytest.raises(ValueError, match="noise"):
        diffusion_loss(model, x0, sched, noise=torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        diffusion_loss(model, x0, sched, min_snr_gamma=0.0)
    with pytest.raises(ValueError, match="prediction target"):
        diffusion_loss(model, x0, sched, prediction="epsilon")
