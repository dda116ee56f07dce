"""A 2-D Gaussian mixture whose ideal denoiser is known exactly: the answer samplers are held to.

For data x0 ~ sum_k w_k N(mu_k, S_k) and x = x0 + sigma * noise, the marginal is
sum_k w_k N(mu_k, S_k + sigma^2 I) and the Bayes-optimal denoiser is

    E[x0 | x] = sum_k r_k(x) (mu_k + S_k (S_k + sigma^2 I)^-1 (x - mu_k)),  r_k = posterior of component k.

Plugged in place of a network, a correct sampler must reproduce the mixture: its component weights,
means and covariances. ``bias_in_se`` measures how far a set of samples is from them, in standard
errors of ``n_ref`` samples (weight sqrt(w (1 - w) / n), mean sqrt(S_ii / n_k), covariance entry
sqrt((S_ii S_jj + S_ij^2) / n_k) for Gaussian data): drawn with many more samples than ``n_ref``, it
reads a sampler's discretisation bias as the test at ``n_ref`` samples would see it.
"""

from __future__ import annotations

import math

import torch

W = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # (K,) component weights
_MU = torch.tensor([[-2.0, 0.0], [2.0, 1.5], [0.5, -3.0]], dtype=torch.float64)
MU = _MU - W @ _MU  # (K, 2) centred, as latents are


def _cov(sx, sy, rho):
    return torch.tensor([[sx * sx, rho * sx * sy], [rho * sx * sy, sy * sy]], dtype=torch.float64)


S = torch.stack([_cov(0.5, 0.3, 0.6), _cov(0.4, 0.6, -0.5), _cov(0.3, 0.3, 0.0)])  # (K, 2, 2)


def mixture_denoiser(x, sigma, prior=None):
    """E[x0 | x0 + sigma noise = x] for the mixture, 2x2 algebra written out. x (N, 2), sigma (N,),
    prior (N, K) component weights (default W) -> (N, 2)."""
    s2 = (sigma**2)[:, None]  # (N, 1)
    a, b, d = S[:, 0, 0] + s2, S[:, 0, 1], S[:, 1, 1] + s2  # entries of C_k = S_k + sigma^2 I, (N, K)
    det = a * d - b * b
    dx0, dx1 = x[:, :1] - MU[:, 0], x[:, 1:] - MU[:, 1]  # (N, K)
    m0, m1 = (d * dx0 - b * dx1) / det, (a * dx1 - b * dx0) / det  # C_k^-1 (x - mu_k)
    prior = W if prior is None else prior
    r = (prior.log() - 0.5 * (dx0 * m0 + dx1 * m1) - 0.5 * det.log()).softmax(-1)  # (N, K)
    p0 = MU[:, 0] + S[:, 0, 0] * m0 + S[:, 0, 1] * m1  # (N, K)
    p1 = MU[:, 1] + S[:, 0, 1] * m0 + S[:, 1, 1] * m1
    return torch.stack([(r * p0).sum(1), (r * p1).sum(1)], dim=-1)


def draw_mixture(n, spread=1.0, generator=None):
    """n samples of the mixture (with ``spread`` != 1: every component's covariance times spread^2)."""
    k = torch.multinomial(W, n, replacement=True, generator=generator)
    z = torch.randn(n, 2, dtype=torch.float64, generator=generator)
    return MU[k] + spread * torch.einsum("nij,nj->ni", torch.linalg.cholesky(S)[k], z)


def components(x):
    """The most likely component of each sample (the components are > 7 sd apart: mistakes are negligible)."""
    d = x[:, None, :] - MU  # (N, K, 2)
    logp = -0.5 * (d * torch.linalg.solve(S, d[..., None])[..., 0]).sum(-1) - 0.5 * torch.logdet(S) + W.log()
    return logp.argmax(-1)  # (N,)


def errors_in_se(x, n_ref: int) -> dict[str, float]:
    """|statistic - truth| / its standard error at ``n_ref`` samples, for every component's weight
    ("w0"), mean entries ("m01": component 0, axis 1) and covariance entries ("c011")."""
    k = components(x)
    out = {}
    for j in range(len(W)):
        xs = x[k == j]
        w = W[j].item()
        out[f"w{j}"] = abs(xs.shape[0] / x.shape[0] - w) / math.sqrt(w * (1 - w) / n_ref)
        var = S[j].diagonal()
        n_k = w * n_ref
        mean = (xs.mean(0) - MU[j]).abs() / (var / n_k).sqrt()
        cov = (torch.cov(xs.T) - S[j]).abs() / ((var[:, None] * var[None, :] + S[j] ** 2) / n_k).sqrt()
        for a in range(2):
            out[f"m{j}{a}"] = mean[a].item()
            for b in range(a, 2):
                out[f"c{j}{a}{b}"] = cov[a, b].item()
    return out


def bias_in_se(x, n_ref: int = 20_000) -> tuple[float, str]:
    """The largest error of ``errors_in_se`` and which statistic it is."""
    errors = errors_in_se(x, n_ref)
    worst = max(errors, key=errors.get)
    return errors[worst], worst
