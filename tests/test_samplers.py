"""Samplers against a distribution whose ideal denoiser is known exactly: a 2-D Gaussian mixture.

For data x0 ~ sum_k w_k N(mu_k, S_k) and x = x0 + sigma * noise, the marginal is
sum_k w_k N(mu_k, S_k + sigma^2 I) and the Bayes-optimal denoiser is

    E[x0 | x] = sum_k r_k(x) (mu_k + S_k (S_k + sigma^2 I)^-1 (x - mu_k)),  r_k = posterior of component k.

Plugged in place of a network, a correct sampler must reproduce the mixture: its component weights,
means and covariances. Tolerances are sampling error: with N samples (n_k = w_k N per component) a
statistic's standard error is sqrt(w (1 - w) / N) for a weight, sqrt(S_ii / n_k) for a mean and
sqrt((S_ii S_jj + S_ij^2) / n_k) for a covariance entry (Gaussian data); every check allows Z_TOL = 5
standard errors. Over the ~90 checks of a run a correct sampler fails one with probability ~5e-5.
Step counts are chosen so that a sampler's discretisation bias is below 2 standard errors of N = 10000
(measured with 10^6 samples; at ~3 a 5-sd check fails about one run in a hundred); a wrong step update
shows up as tens of them.

Samplers start from the exact marginal at sigma_max (data + sigma_max * noise) rather than
sigma_max * noise alone: with SD's schedule (sigma_max = 14.6) the missing data term biases a mean
mu by about mu * sd / sigma_max, a property of the schedule (its terminal SNR is not 0), not of the
sampler under test.
"""

import inspect
import math

import pytest
import torch

from ldm.diffusion import Denoiser, NoiseSchedule, append_dims
from ldm.mixture import MU, S, W, draw_mixture, mixture_denoiser
from ldm.samplers import (
    SAMPLERS,
    SIGMA_CAP,
    CFGDenoiser,
    ddim_invert,
    get_sigmas,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_unipc,
)

N = 10_000
Z_TOL = 5.0
SCHEDULE = NoiseSchedule.from_name("scaled_linear")  # Stable Diffusion's: sigma 0.029 .. 14.6

def test_mixture_denoiser_is_the_posterior_mean(seed):
    """The test's oracle against the textbook formulas in matrix form (Gaussian densities, linear solves)."""
    x, sigma = torch.randn(50, 2, dtype=torch.float64) * 3, torch.rand(50, dtype=torch.float64) * 4 + 0.01
    C = S + sigma[:, None, None, None] ** 2 * torch.eye(2, dtype=torch.float64)  # (50, K, 2, 2)
    Cinv_d = torch.linalg.solve(C, (x[:, None, :] - MU)[..., None])[..., 0]  # (50, K, 2)
    # log N(x; mu_k, C_k) + log w_k, up to a constant
    logp = -0.5 * ((x[:, None, :] - MU) * Cinv_d).sum(-1) - 0.5 * torch.logdet(C) + W.log()  # (50, K)
    post = MU + (S @ Cinv_d[..., None])[..., 0]  # (50, K, 2)
    expected = (logp.softmax(1)[..., None] * post).sum(1)  # (50, 2)
    torch.testing.assert_close(mixture_denoiser(x, sigma), expected, rtol=1e-10, atol=1e-12)


def start(x0, sigmas):
    """x0 + sigma_max * noise: a draw from the marginal at sigmas[0]."""
    return x0 + sigmas[0] * torch.randn_like(x0)


def assert_reproduces_mixture(x, label):
    """Assign samples to the most likely component (the components are > 7 sd apart, so mistakes
    are negligible) and compare weights, means and covariances within Z_TOL standard errors."""
    assert torch.isfinite(x).all(), label
    d = x[:, None, :] - MU  # (N, K, 2)
    logp = -0.5 * (d * torch.linalg.solve(S, d[..., None])[..., 0]).sum(-1) - 0.5 * torch.logdet(S) + W.log()
    k = logp.argmax(-1)
    n_total = x.shape[0]
    for j in range(len(W)):
        xs = x[k == j]
        n = xs.shape[0]
        w = n / n_total
        w_se = math.sqrt(W[j] * (1 - W[j]) / n_total)
        assert abs(w - W[j]) < Z_TOL * w_se, f"{label}: weight {j}: {w:.4f} vs {W[j]:.4f} (se {w_se:.4f})"
        var = S[j].diagonal()
        mean_err = (xs.mean(0) - MU[j]).abs()
        mean_se = (var / n).sqrt()
        assert (mean_err < Z_TOL * mean_se).all(), f"{label}: mean {j}: error {mean_err.tolist()} se {mean_se.tolist()}"
        cov_err = (torch.cov(xs.T) - S[j]).abs()
        cov_se = ((var[:, None] * var[None, :] + S[j] ** 2) / n).sqrt()
        assert (cov_err < Z_TOL * cov_se).all(), f"{label}: cov {j}: error {cov_err.tolist()} se {cov_se.tolist()}"


def test_the_check_itself_accepts_true_samples_and_rejects_a_shifted_mixture(seed):
    assert_reproduces_mixture(draw_mixture(N), "exact samples")
    with pytest.raises(AssertionError, match="cov"):
        assert_reproduces_mixture(draw_mixture(N, spread=1.1), "spread samples")


SAMPLER_CASES = [
    # (sampler, steps, karras, options)
    ("ddpm", 1000, False, {}),  # DDPM's own discretisation: every one of the T timesteps
    # 2M's bias at 20 Karras steps is up to 2.7 standard errors (a covariance entry, measured with 10^6
    # samples), so a 5-sd check failed about one run in a hundred; at 30 steps it is 1.1
    ("dpmpp_2m", 30, True, {}),
    # first order: needs more steps than DPM-Solver++. At 200 steps the bias is 2.2 SE (eta 0.5: 2.95, and a
    # CI run failed a 5.6-SE covariance entry); at 400 it is 1.4 (eta 0.5: 1.8), measured as above
    ("ddim", 400, False, {}),
    ("ddim", 400, False, {"eta": 0.5}),
    ("euler", 200, True, {}),
    ("euler", 200, True, {"s_churn": 5.0}),  # stochastic (Karras et al. 2022, Alg. 2); churn needs more steps
]


@pytest.mark.parametrize("name,steps,karras,options", SAMPLER_CASES,
                         ids=[f"{c[0]}-{c[1]}{'-karras' if c[2] else ''}{'-' + str(c[3]) if c[3] else ''}"
                              for c in SAMPLER_CASES])
def test_sampler_reproduces_the_mixture(name, steps, karras, options, seed):
    sigmas = get_sigmas(SCHEDULE, steps, karras=karras, dtype=torch.float64)
    x = start(draw_mixture(N), sigmas)
    if name != "dpmpp_2m":
        options = {**options, "generator": torch.Generator().manual_seed(seed)}
    out = SAMPLERS[name](mixture_denoiser, x, sigmas, disable=True, **options)
    assert_reproduces_mixture(out, f"{name} at {steps} steps")


def test_ddim_eta_1_is_the_ddpm_posterior_and_eta_0_is_euler(seed):
    sigmas = get_sigmas(SCHEDULE, 25, dtype=torch.float64)
    x = torch.randn(500, 2, dtype=torch.float64) * sigmas[0]
    a = sample_ddim(mixture_denoiser, x, sigmas, disable=True, eta=1.0, generator=torch.Generator().manual_seed(seed))
    b = sample_ddpm(mixture_denoiser, x, sigmas, disable=True, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    c = sample_ddim(mixture_denoiser, x, sigmas, disable=True)
    e = sample_euler(mixture_denoiser, x, sigmas, disable=True)
    torch.testing.assert_close(c, e, rtol=0, atol=1e-9)
    assert (a - c).abs().max() > 0.1  # and the stochastic one is not the deterministic one


def _paper_step(name, abar_t, abar_s, x0, x_t):
    """One step t -> s with the true x0, as the papers write it in the network's coordinates
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: (mean, variance) of x_s."""
    eps = (x_t - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5
    if name == "ddpm":  # Ho et al. 2020, eq. 7, with alpha = abar_t / abar_s and beta = 1 - alpha
        alpha, beta = abar_t / abar_s, 1 - abar_t / abar_s
        mean = abar_s**0.5 * beta / (1 - abar_t) * x0 + alpha**0.5 * (1 - abar_s) / (1 - abar_t) * x_t
        return mean, (1 - abar_s) / (1 - abar_t) * beta
    eta = float(name.split("=")[1])  # Song et al. 2021, eq. 12 with sigma_t(eta) of eq. 16
    var = eta**2 * (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)
    return abar_s**0.5 * x0 + (1 - abar_s - var) ** 0.5 * eps, var


@pytest.mark.parametrize("name", ["ddpm", "ddim eta=0.5", "ddim eta=1"])
def test_one_step_is_the_papers_step(name, seed):
    """One step from timestep 700 to 650 with a denoiser that knows x0, over 40000 draws: mean and
    variance in the network's coordinates against the paper's formula (5 standard errors)."""
    i, j, n = 700, 650, 40_000
    abar_t, abar_s = SCHEDULE.alphas_cumprod[i].item(), SCHEDULE.alphas_cumprod[j].item()
    sigmas = SCHEDULE.sigmas[[i, j]]
    x0 = torch.randn(1, 2, dtype=torch.float64)
    x = x0 + sigmas[0] * torch.randn(1, 2, dtype=torch.float64)  # sampler coordinates
    know_x0 = lambda x, sigma: x0.expand_as(x)
    g = torch.Generator().manual_seed(seed)
    if name == "ddpm":
        out = sample_ddpm(know_x0, x.expand(n, 2), sigmas, disable=True, generator=g)
    else:
        out = sample_ddim(know_x0, x.expand(n, 2), sigmas, disable=True, generator=g, eta=float(name.split("=")[1]))
    mean, var = _paper_step(name, abar_t, abar_s, x0[0], x[0] * abar_t**0.5)
    out_s = out * abar_s**0.5  # to the network's coordinates at s
    assert ((out_s.mean(0) - mean).abs() < Z_TOL * (var / n) ** 0.5 + 1e-12).all()
    assert ((out_s.var(0) - var).abs() < Z_TOL * var * (2 / n) ** 0.5).all()  # se of a sample variance


def test_euler_churn_step_is_karras_algorithm_2(seed):
    """One churned Euler step with a denoiser that knows x0 (Karras et al. 2022, Alg. 2): noise raises
    sigma to sigma_hat = sigma (1 + gamma), gamma = min(s_churn / steps, sqrt 2 - 1), then the Euler
    step gives x0 + (sigma_next / sigma_hat) (x_hat - x0): mean x0 + (sigma_next / sigma_hat) (x - x0),
    variance (sigma_next / sigma_hat)^2 (sigma_hat^2 - sigma^2) s_noise^2."""
    n, sigma, sigma_next, s_churn, s_noise = 40_000, 3.0, 2.0, 0.3, 0.9
    x0 = torch.randn(1, 2, dtype=torch.float64)
    x = x0 + sigma * torch.randn(1, 2, dtype=torch.float64)
    seen, g = [], torch.Generator().manual_seed(seed)
    out = sample_euler(lambda x, s: x0.expand_as(x), x.expand(n, 2), torch.tensor([sigma, sigma_next]), disable=True,
                       callback=seen.append, s_churn=s_churn, s_noise=s_noise, generator=g)
    sigma_hat = sigma * (1 + s_churn)
    assert seen[0]["sigma"] == pytest.approx(sigma_hat)
    mean = x0[0] + sigma_next / sigma_hat * (x[0] - x0[0])
    var = (sigma_next / sigma_hat) ** 2 * (sigma_hat**2 - sigma**2) * s_noise**2
    assert ((out.mean(0) - mean).abs() < Z_TOL * (var / n) ** 0.5).all()
    assert ((out.var(0) - var).abs() < Z_TOL * var * (2 / n) ** 0.5).all()
    # outside [s_tmin, s_tmax] there is no churn: the deterministic Euler step
    out = sample_euler(lambda x, s: x0.expand_as(x), x, torch.tensor([sigma, sigma_next]), disable=True,
                       s_churn=s_churn, s_tmax=2.5)
    torch.testing.assert_close(out, x0 + sigma_next / sigma * (x - x0))


def test_ddim_inversion_round_trips(seed):
    """Data -> noise -> data with the exact model (100 steps). Plain inversion evaluates the model at
    the wrong end of each step (first-order error, large where a point sits near a boundary between
    components); with fixed-point iterations the round trip is exact up to the iteration's residual."""
    x0 = draw_mixture(2000)
    sigmas = get_sigmas(SCHEDULE, 100, dtype=torch.float64)
    rms = {}
    for iters in (0, 3):
        noise = ddim_invert(mixture_denoiser, x0, sigmas, disable=True, fixed_point_iters=iters)
        back = sample_ddim(mixture_denoiser, noise, sigmas, disable=True)
        rms[iters] = (back - x0).square().sum(1).mean().sqrt().item()
        # the noise has the marginal's scale: data variance (~2.3 per axis) + sigma_max^2
        assert 0.9 * sigmas[0] < noise.std(0).min() and noise.std(0).max() < 1.1 * sigmas[0]
    print(f"round-trip rms error: plain {rms[0]:.2e}, 3 fixed-point iterations {rms[3]:.2e} (data sd ~1.5)")
    assert rms[3] < 2e-3  # measured ~2e-4
    assert rms[0] < 0.25  # measured ~0.1
    assert rms[3] < rms[0] / 20
    # noise -> data -> noise: DDIM's own samples invert back onto their noise
    z = torch.randn(2000, 2, dtype=torch.float64) * sigmas[0]
    x = sample_ddim(mixture_denoiser, z, sigmas, disable=True)
    z_back = ddim_invert(mixture_denoiser, x, sigmas, disable=True, fixed_point_iters=3)
    assert ((z_back - z).square().sum(1).mean().sqrt() / sigmas[0]) < 2e-3


def test_samplers_run_a_network_through_the_denoiser_on_image_shapes(seed):
    """An eps-predicting network (the exact one for data x0 ~ N(m, v) per pixel) on (B, C, H, W) latents,
    behind ``Denoiser``: DPM-Solver++ reproduces every pixel's mean and variance."""
    m = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    v = torch.rand(1, 2, 3, 3, dtype=torch.float64) + 0.3

    def eps_net(x_t, t):
        sigma = append_dims(SCHEDULE.t_to_sigma(t), 4)
        alpha = (1 + sigma**2).rsqrt()
        x = x_t / alpha
        x0 = m + v / (v + sigma**2) * (x - m)
        return (x - x0) / sigma  # eps = (x_t - alpha x0) / (alpha sigma)

    sigmas = get_sigmas(SCHEDULE, 20, karras=True, dtype=torch.float64)
    x0 = m + v.sqrt() * torch.randn(4000, 2, 3, 3, dtype=torch.float64)
    out = sample_dpmpp_2m(Denoiser(eps_net, SCHEDULE, "eps"), start(x0, sigmas), sigmas, disable=True)
    se_mean, se_var = (v / 4000).sqrt(), v * (2 / 4000) ** 0.5
    assert ((out.mean(0) - m[0]).abs() < Z_TOL * se_mean[0]).all()
    assert ((out.var(0) - v[0]).abs() < Z_TOL * se_var[0]).all()


# ------------------------------------------------------------------------------ guidance
def class_denoiser(calls):
    """The exact conditional denoiser: context tokens (B, L, K) are summed over the first
    context_lengths[b] tokens; a one-hot picks that component, all zeros means no condition."""

    def model(x, sigma, context, context_lengths=None):
        calls.append((x.shape[0], context.shape))
        L = context.shape[1]
        lengths = torch.full((x.shape[0],), L) if context_lengths is None else context_lengths
        valid = (torch.arange(L)[None, :] < lengths[:, None]).to(context.dtype)  # (B, L)
        tok = (context * valid[..., None]).sum(1)  # (B, K)
        prior = torch.where(tok.sum(-1, keepdim=True) > 0, tok, W)
        return mixture_denoiser(x, sigma, prior)

    return model


def test_cfg_is_one_batched_call_and_scale_1_is_the_conditional_model(seed):
    B = 6
    calls = []
    model = class_denoiser(calls)
    x, sigma = torch.randn(B, 2, dtype=torch.float64) * 2, torch.full((B,), 1.5, dtype=torch.float64)
    cond = torch.nn.functional.one_hot(torch.randint(0, 3, (B,)), 3).double()[:, None, :]  # (B, 1, K)
    # the empty prompt: batch 1, 3 tokens of which 2 are valid; the third is garbage that must be masked
    uncond = torch.zeros(1, 3, 3, dtype=torch.float64)
    uncond[0, 2, 0] = 1.0
    uncond_lengths = torch.tensor([2])
    extra = {"context": cond, "uncond_context": uncond, "uncond_context_lengths": uncond_lengths}
    out_cond = model(x, sigma, cond)
    out_uncond = model(x, sigma, torch.zeros(B, 2, 3, dtype=torch.float64))
    assert (out_cond - out_uncond).abs().max() > 1e-3  # the condition matters at this sigma

    calls.clear()
    torch.testing.assert_close(CFGDenoiser(model, 1.0)(x, sigma, **extra), out_cond, rtol=0, atol=1e-12)
    assert calls == [(2 * B, torch.Size([2 * B, 3, 3]))]  # one forward, both halves, padded to 3 tokens
    guided = CFGDenoiser(model, 4.0)(x, sigma, **extra)
    torch.testing.assert_close(guided, out_uncond + 4.0 * (out_cond - out_uncond), rtol=0, atol=1e-12)


def test_cfg_drives_a_sampler_and_checks_its_inputs(seed):
    """Guidance at scale 1 with class labels samples each class's component."""
    calls = []
    model = CFGDenoiser(class_denoiser(calls), 1.0)
    labels = torch.randint(0, 3, (3000,))
    cond = torch.nn.functional.one_hot(labels, 3).double()[:, None, :]
    sigmas = get_sigmas(SCHEDULE, 20, karras=True, dtype=torch.float64)
    out = sample_dpmpp_2m(model, start(MU[labels], sigmas), sigmas, disable=True,
                          extra_args={"context": cond, "uncond_context": torch.zeros(1, 1, 3, dtype=torch.float64)})
    assert len(calls) == 20
    for j in range(3):
        xs = out[labels == j]
        se = (S[j].diagonal() / xs.shape[0]).sqrt()
        assert ((xs.mean(0) - MU[j]).abs() < Z_TOL * se).all()
    with pytest.raises(ValueError, match="uncond_context"):
        model(out[:4], sigmas[0], context=cond[:4], uncond_context=torch.zeros(1, 1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="context"):
        model(out[:4], sigmas[0], context=cond[:3], uncond_context=torch.zeros(1, 1, 3, dtype=torch.float64))


# ------------------------------------------------------------------------------ schedules and API
def test_get_sigmas():
    s = get_sigmas(SCHEDULE, 1000, dtype=torch.float64)
    assert s.shape == (1001,) and s[-1] == 0
    torch.testing.assert_close(s[:-1], SCHEDULE.sigmas.flip(0), rtol=1e-12, atol=0)  # DDPM's own timesteps
    k = get_sigmas(SCHEDULE, 10, karras=True, rho=7.0, dtype=torch.float64)
    assert k.shape == (11,) and k[-1] == 0 and (k[1:] < k[:-1]).all()
    assert k[0].item() == pytest.approx(SCHEDULE.sigma_max) and k[-2].item() == pytest.approx(SCHEDULE.sigma_min)
    roots = k[:-1] ** (1 / 7)
    torch.testing.assert_close(roots.diff(), roots.diff()[:1].expand(9), rtol=1e-9, atol=0)  # even in sigma^(1/rho)
    k2 = get_sigmas(SCHEDULE, 5, karras=True, sigma_min=0.1, sigma_max=10.0)
    assert k2.dtype == torch.float32 and k2[0].item() == pytest.approx(10.0) and k2[-2].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="steps"):
        get_sigmas(SCHEDULE, 0)
    with pytest.raises(ValueError, match="karras"):
        get_sigmas(SCHEDULE, 10, sigma_min=0.1)


def test_every_sampler_has_the_shared_signature_and_reports_each_step(seed):
    sigmas = get_sigmas(SCHEDULE, 7, karras=True, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64) * sigmas[0]
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp_2m", "euler", "unipc"}
    for name, fn in {**SAMPLERS, "ddim_invert": ddim_invert}.items():
        params = list(inspect.signature(fn).parameters)
        assert params[:6] == ["model", "x", "sigmas", "extra_args", "callback", "disable"], name
        assert fn.__doc__ and fn.__doc__.strip(), name
        seen = []
        fn(lambda x, sigma, **kw: mixture_denoiser(x, sigma), x, sigmas, callback=seen.append, disable=True)
        assert [d["i"] for d in seen] == list(range(7)), name
        assert all(d["x"].shape == x.shape and d["denoised"].shape == x.shape for d in seen), name


def test_samplers_reject_bad_schedules():
    x = torch.randn(3, 2)
    for fn in [*SAMPLERS.values(), ddim_invert]:
        with pytest.raises(ValueError, match="decrease"):
            fn(lambda x, s: x, x, torch.tensor([0.0, 1.0, 2.0]), disable=True)
        with pytest.raises(ValueError, match="1-D"):
            fn(lambda x, s: x, x, torch.ones(2, 2), disable=True)
    with pytest.raises(ValueError, match="fixed_point_iters"):
        ddim_invert(lambda x, s: x, x, torch.tensor([1.0, 0.0]), fixed_point_iters=-1)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_unipc_at_20_calls_reproduces_the_mixture(schedule, seed):
    """The default sampler and spacing (``ldm.pipeline``): UniPC, Karras ramp capped at SIGMA_CAP. Its bias
    at 20 model calls is 2.5 / 1.5 standard errors of 20000 samples on the linear / scaled-linear
    schedule (1.7 / 1.0 of the N = 10000 here; measured with 10^6 samples by python -m bench.samplers)."""
    sched = NoiseSchedule.from_name(schedule)
    sigmas = get_sigmas(sched, 20, karras=True, sigma_cap=SIGMA_CAP, dtype=torch.float64)
    assert len(sigmas) == 21  # 20 model calls
    out = sample_unipc(mixture_denoiser, start(draw_mixture(N), sigmas), sigmas, disable=True)
    assert_reproduces_mixture(out, f"unipc at 20 steps on {schedule}")


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_converges_at_its_order(order):
    """On Gaussian data x0 ~ N(m, v) the denoiser is linear and the probability-flow ODE has the closed
    form x(s) = m + sqrt((v + s^2) / (v + s0^2)) (x(s0) - m). Doubling the steps (evenly in log sigma)
    must divide the error by about 2^(order + 1): the corrector lifts the predictor's order by one."""
    m, v = 0.7, 0.3
    denoiser = lambda x, s: m + v / (v + s[:, None] ** 2) * (x - m)
    x = torch.linspace(-20, 20, 41, dtype=torch.float64)[:, None]  # (41, 1)
    s0, s1 = 10.0, 0.05
    exact = m + math.sqrt((v + s1**2) / (v + s0**2)) * (x - m)

    def error(steps, **kw):
        sigmas = torch.exp(torch.linspace(math.log(s0), math.log(s1), steps + 1, dtype=torch.float64))
        out = sample_unipc(denoiser, x, sigmas, disable=True, order=order, lower_order_final=False, **kw)
        return (out - exact).abs().max().item()

    rate = math.log2(error(20) / error(40))
    assert order + 0.4 < rate < order + 1.6, rate  # the corrector adds one order (measured 2.0, 3.0, 3.5)
    if order == 2:  # the predictor alone: second order (1.94); at order 3 it cancels erratically
        plain = math.log2(error(20, corrector=False) / error(40, corrector=False))
        assert order - 0.4 < plain < order + 0.6, plain


def test_capped_karras_sigmas():
    sched = NoiseSchedule.from_name("linear")  # sigma_max 157
    capped = get_sigmas(sched, 20, karras=True, sigma_cap=SIGMA_CAP, dtype=torch.float64)
    plain = get_sigmas(sched, 19, karras=True, sigma_max=SIGMA_CAP, dtype=torch.float64)
    assert capped[0].item() == pytest.approx(sched.sigma_max) and torch.equal(capped[1:], plain)
    low = NoiseSchedule.from_name("scaled_linear")  # sigma_max 14.6 > 10 too; a cap above it changes nothing
    assert torch.equal(get_sigmas(low, 8, karras=True, sigma_cap=100.0), get_sigmas(low, 8, karras=True))
    with pytest.raises(ValueError, match="sigma_cap"):
        get_sigmas(sched, 8, sigma_cap=10.0)
    with pytest.raises(ValueError, match="sigma_cap must exceed"):
        get_sigmas(sched, 8, karras=True, sigma_cap=0.001)
