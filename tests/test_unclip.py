"""The unCLIP prior: shapes, padding, the x0 contract through the samplers, save/load, a short run, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SESSION_SEED

from ldm import train_prior
from ldm.checkpoint import save_model
from ldm.diffusion import NoiseSchedule
from ldm.unclip import Prior, PriorConfig, load_prior, prior_loss

TINY = PriorConfig(embed_dim=12, text_width=16, width=16, depth=2, heads=2, ff_mult=2)


def inputs(B=3, L=6, seed=SESSION_SEED):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, TINY.embed_dim, generator=g), torch.rand(B, generator=g) * 999,
            torch.randn(B, L, TINY.text_width, generator=g), torch.tensor([6, 2, 4][:B]),
            F.normalize(torch.randn(B, TINY.embed_dim, generator=g), dim=-1))


@pytest.mark.parametrize("B, L", [(1, 1), (3, 6), (5, 11)])
def test_prior_shapes(B, L):
    torch.manual_seed(SESSION_SEED)
    prior = Prior(TINY).eval()
    g = torch.Generator().manual_seed(SESSION_SEED)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    out = prior(torch.randn(B, TINY.embed_dim), torch.rand(B) * 999, torch.randn(B, L, TINY.text_width), lengths,
                torch.randn(B, TINY.embed_dim))
    assert out.shape == (B, TINY.embed_dim) and torch.isfinite(out).all()


def test_padding_tokens_change_nothing_and_every_input_matters():
    torch.manual_seed(SESSION_SEED)
    prior = Prior(TINY).eval()
    x, t, tok, lens, text = inputs()
    with torch.no_grad():
        base = prior(x, t, tok, lens, text)
        tok2 = tok.clone()
        tok2[1, 2:] = 100.0  # beyond prompt 1's two tokens
        torch.testing.assert_close(prior(x, t, tok2, lens, text)[1], base[1])
        for changed in (prior(x + 1, t, tok, lens, text), prior(x, t + 300, tok, lens, text),
                        prior(x, t, tok + 1, lens, text), prior(x, t, tok, lens, text.roll(1, 0))):
            assert (changed - base).abs().max() > 1e-5


def test_the_samplers_run_the_prior_as_an_x0_model():
    from ldm.diffusion import Denoiser
    from ldm.samplers import get_sigmas, sample_ddim

    torch.manual_seed(SESSION_SEED)
    prior = Prior(TINY).eval()
    schedule = NoiseSchedule.from_name("cosine")
    x, t, tok, lens, text = inputs()
    sigma = torch.tensor([0.7, 3.0, 20.0])
    den = Denoiser(prior, schedule, "x0")
    with torch.no_grad():  # the x0 denoiser returns the prior's output on x * c_in at t(sigma)
        want = prior(x / (1 + sigma[:, None] ** 2).sqrt(), schedule.sigma_to_t(sigma), tok, lens, text)
        torch.testing.assert_close(den(x, sigma, tokens=tok, lengths=lens, text_emb=text), want)
        out = sample_ddim(den, x * 10, get_sigmas(schedule, 4), extra_args={"tokens": tok, "lengths": lens,
                                                                              "text_emb": text}, disable=True)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_save_load_and_a_short_fit(tmp_path):
    torch.manual_seed(SESSION_SEED)
    prior = Prior(TINY)
    schedule = NoiseSchedule.from_name("cosine")
    x, t, tok, lens, text = inputs(B=3)
    image = F.normalize(text + 0.1 * torch.randn(text.shape), dim=-1)
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(SESSION_SEED)
    losses = []
    for _ in range(60):
        loss = prior_loss(prior, schedule, image, tok, lens, text, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    save_model(tmp_path / "p", "prior", prior.eval(), prior.config)
    loaded, _ = load_prior(tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, tok, lens, text), prior(x, t, tok, lens, text), rtol=0, atol=0)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be positive"),
    (["--clip", "/nonexistent/clip"], "CLIP folder not found"),
])
def test_train_prior_errors_are_one_line(argv, message, capsys):
    assert train_prior.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_prior: error:") and message in err[0], err
