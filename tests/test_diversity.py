"""Diversity (``ldm.diversity``): distinct images per prompt and the mean pairwise distance against a direct
float64 computation on fresh random samples, copies counted once, the strict threshold, chains of near-copies,
the data's own reference row, and eval_text --diversity for the text UNet and the unCLIP decoder, with its
one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SESSION_SEED
from scipy.sparse.csgraph import connected_components
from t2i_helpers import RESOLUTION, shared_assets, train_flags

from ldm import eval_text
from ldm.checkpoint import save_model
from ldm.data import eval_prompts, render
from ldm.diversity import (DATA_SEED, DISTINCT_FRACTION, count_distinct, data_diversity, diversity,
                           evaluate_diversity, jitter_median, jittered, pairwise_rms, renders)
from ldm.metrics import PROMPT_SEED


def direct(samples: np.ndarray, threshold: np.ndarray) -> tuple[list[int], list[float]]:
    """Per prompt: scipy's connected components of the pairs closer than its threshold, and the mean RMS over
    pairs, each pair's distance written out in float64."""
    P, K = samples.shape[:2]
    counts, means = [], []
    for p in range(P):
        d = np.zeros((K, K))
        for i in range(K):
            for j in range(K):
                d[i, j] = math.sqrt(np.mean((samples[p, i] - samples[p, j]) ** 2))
        counts.append(connected_components(d < threshold[p], directed=False)[0])
        means.append(float(np.mean([d[i, j] for i in range(K) for j in range(i + 1, K)])))
    return counts, means


@pytest.mark.parametrize("P, K, C, H, W", [(3, 6, 3, 8, 8), (2, 5, 1, 5, 7)])  # odd sizes, one channel
def test_counts_and_distances_match_a_direct_computation(seed, P, K, C, H, W):
    g = torch.Generator().manual_seed(seed)
    # samples near a few centres: ~0.06 apart around one centre, ~0.4 between centres (RMS of uniform noise)
    centres = torch.rand(P, 3, C, H, W, generator=g)
    pick = torch.randint(0, 3, (P, K), generator=g)
    pick[:, :3] = torch.tensor([0, 1, 0])  # two centres at least, one drawn twice: 2 or 3 images of K
    samples = (centres[torch.arange(P)[:, None], pick] + 0.15 * torch.rand(P, K, C, H, W, generator=g)).clamp(0, 1)
    between = 0.15 + 0.1 * torch.rand(P, generator=g, dtype=torch.float64)  # (P,) between the two scales
    d = pairwise_rms(samples)
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool), 1)
    ranked = torch.stack([d[p][upper].sort().values for p in range(P)])  # (P, K (K - 1) / 2)
    m = ranked.shape[1] // 2
    at_median = (ranked[:, m - 1] + ranked[:, m]) / 2  # (P,) half the pairs on each side, none on the edge
    for threshold in (between, at_median):
        r = diversity(samples, threshold)
        counts, means = direct(samples.double().numpy(), threshold.numpy())
        assert r["distinct_per_prompt"] == counts
        np.testing.assert_allclose(r["distance_per_prompt"], means, rtol=1e-12)
        assert r["distinct"] == pytest.approx(sum(counts) / P)
        assert r["mean_distance"] == pytest.approx(np.mean(means))
        assert (r["prompts"], r["k"]) == (P, K)
    counts = diversity(samples, between)["distinct_per_prompt"]
    assert counts == [len(set(pick[p].tolist())) for p in range(P)]  # one image per centre drawn
    # one float threshold acts as the same threshold for every prompt
    assert diversity(samples, 0.2)["distinct_per_prompt"] == direct(samples.double().numpy(), np.full(P, 0.2))[0]


def test_copies_count_once_and_far_apart_images_count_k(seed):
    g = torch.Generator().manual_seed(seed)
    K = 7
    bases = torch.rand(3, 3, 6, 6, generator=g)  # random images lie ~0.4 apart in RMS
    owner = torch.tensor([0, 1, 0, 2, 2, 0, 1])  # three images, each drawn two or three times
    copies = bases[owner] + 1e-4 * torch.rand(K, 3, 6, 6, generator=g)  # copies up to 1e-4 apart
    far = torch.rand(K, 3, 6, 6, generator=g)
    r = diversity(torch.stack([copies, far, bases[[1] * K]]), 0.05)
    assert r["distinct_per_prompt"] == [3, K, 1]
    assert r["distance_per_prompt"][2] == 0.0 and r["distance_per_prompt"][1] > 0.2


def test_the_threshold_is_strict_and_a_chain_of_near_copies_is_one_image():
    a = torch.zeros(3, 4, 4, dtype=torch.float64)
    b = a.clone()
    b[0, 0, 0] = 0.5  # RMS 0.5 / sqrt(48)
    d = pairwise_rms(torch.stack([a, b])[None])[0, 0, 1].item()
    assert d == pytest.approx(0.5 / math.sqrt(48), rel=1e-15)
    assert diversity(torch.stack([a, b])[None], d)["distinct"] == 2  # at the threshold: two images
    assert diversity(torch.stack([a, b])[None], math.nextafter(d, math.inf))["distinct"] == 1  # just below it
    # x0 - x1 - x2 each a step apart, x0 - x2 two steps: one image, whatever the order
    step = torch.full((1, 1, 1), 0.1, dtype=torch.float64)
    chain = torch.stack([0 * step, step, 2 * step])  # (3, 1, 1, 1)
    dist = pairwise_rms(chain[None])[0]
    assert count_distinct(dist, 0.15) == 1 and count_distinct(dist[[0, 2, 1]][:, [0, 2, 1]], 0.15) == 1
    assert count_distinct(dist, 0.05) == 3


@pytest.mark.parametrize("samples, threshold, message", [
    (torch.rand(3, 1, 3, 4, 4), 0.1, r"K >= 2"),
    (torch.rand(6, 3, 4, 4), 0.1, r"\(P, K >= 2, C, H, W\)"),
    (torch.rand(2, 3, 3, 4, 4), torch.tensor([0.1, 0.0]), "thresholds must be positive"),
    (torch.rand(2, 3, 3, 4, 4), torch.tensor([0.1, 0.2, 0.3]), r"one threshold or one per prompt \(2\), got 3"),
])
def test_bad_samples_and_thresholds_are_refused(samples, threshold, message):
    with pytest.raises(ValueError, match=message):
        diversity(samples, threshold)


def test_the_threshold_comes_from_renders_of_the_prompts_own_attributes(seed):
    attributes = [a for a, _ in eval_prompts(3, seed)]
    median = jitter_median(attributes, 16, pairs=9)
    torch.testing.assert_close(median, jitter_median(attributes, 16, pairs=9), rtol=0, atol=0)  # fixed seed
    rng = np.random.default_rng(seed)
    for p, attrs in enumerate(attributes):  # the median of (its own) render pairs, recomputed directly
        x = renders(attrs, 18, 16, np.random.default_rng([0, p])).numpy()
        want = np.median([math.sqrt(np.mean((x[2 * i] - x[2 * i + 1]) ** 2)) for i in range(9)])
        assert median[p].item() == pytest.approx(want, rel=1e-12)
        # jitter moves the shape only: what the prompt states is what every render draws
        j = jittered(attrs, rng)
        assert {k: j[k] for k in attrs if k not in ("dx", "dy", "scale")} == \
            {k: attrs[k] for k in attrs if k not in ("dx", "dy", "scale")}
    assert (median > 0).all()


def test_evaluate_diversity_reads_prompt_major_samples_against_the_data(seed):
    P, K = 3, 4
    pairs = eval_prompts(P, PROMPT_SEED)
    calls = []

    def draw_data(asked, k):  # the reference row's own renders, as a model would return them, in [-1, 1]
        calls.append((asked, k))
        return torch.cat([renders(a, k, 16, np.random.default_rng([DATA_SEED, p])) for p, (a, _) in
                          enumerate(asked)]).float() * 2 - 1

    r = evaluate_diversity(draw_data, P, K)
    assert calls == [(pairs, K)]
    assert r["distinct_per_prompt"] == r["data"]["distinct_per_prompt"]
    assert r["mean_distance"] == pytest.approx(r["data"]["mean_distance"], rel=1e-6)
    median = jitter_median([a for a, _ in pairs], 16)
    assert r["data"] == data_diversity([a for a, _ in pairs], K, 16, median)

    def draw_one(asked, k):  # every sample the same render: one image per prompt
        return torch.cat([torch.from_numpy(render(a, 16)).permute(2, 0, 1)[None].expand(k, -1, -1, -1)
                          for a, _ in asked]).float() / 127.5 - 1

    one = evaluate_diversity(draw_one, P, K, codec=lambda x: x.flip(-1))
    assert one["distinct"] == 1 and one["mean_distance"] == 0 and one["relative_distance"] == 0
    assert one["data_vae"]["mean_distance"] == pytest.approx(one["data"]["mean_distance"])  # a flip moves no pair
    for prompts, k in ((0, 4), (3, 1)):
        with pytest.raises(ValueError, match="needs prompts >= 1 and k >= 2"):
            evaluate_diversity(draw_one, prompts, k)
    with pytest.raises(ValueError, match="draw gave 3 images for 3 prompts x 4"):
        evaluate_diversity(lambda asked, k: torch.zeros(3, 3, 16, 16), P, K)
    assert DISTINCT_FRACTION * median.min() > 0


@pytest.mark.parametrize("argv, message", [
    (["--diversity", "1"], "--diversity 1: needs at least 2 samples per prompt"),
    (["--diversity", "0"], "--diversity 0: needs at least 2 samples per prompt"),
    (["--diversity", "-3"], "--diversity -3: needs at least 2 samples per prompt"),
    (["--diversity", "8", "--diversity-prompts", "0"], "--diversity-prompts must be positive, got 0"),
    (["--diversity-prompts", "5"], "--diversity-prompts needs --diversity K"),
    (["--decoder", "d", "--variations", "--diversity", "1"], "--diversity 1: needs at least 2"),
])
def test_eval_text_diversity_errors_are_one_line(argv, message, capsys):
    assert eval_text.main(["--unet", "/nonexistent/unet"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(message in line for line in err), err
    assert "Traceback" not in "\n".join(err) and sum(": error:" in line for line in err) == 1, err


def test_a_diversity_that_is_not_a_number_is_argparses_error(capsys):
    with pytest.raises(SystemExit) as e:
        eval_text.main(["--diversity", "two"])
    assert e.value.code == 2 and "argument --diversity: invalid int value: 'two'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory, SESSION_SEED % 1000)


def test_eval_text_reports_diversity_in_print_and_json(assets, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert eval_text.main(["--unet", str(assets["unet"]), "--n", "2", "--split", "in-distribution",
                           "--sampler", "ddim:2", "--diversity", "3", "--diversity-prompts", "2",
                           "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())["diversity"]
    assert (d["prompts"], d["k"]) == (2, 3) and len(d["distinct_per_prompt"]) == 2
    assert all(1 <= c <= 3 for c in d["distinct_per_prompt"] + d["data"]["distinct_per_prompt"])
    assert d["data_vae"]["k"] == 3 and d["mean_distance"] > 0
    assert f"{d['distinct']:.2f} distinct of 3 per prompt" in printed and "data (fresh renders)" in printed


def test_eval_text_unclip_paths_report_diversity(tmp_path, capsys):
    """A 4-step decoder of a random tiny CLIP and a random prior: the path, not the quality."""
    EMBED = 12  # the tiny CLIP's embedding width
    from t2i_helpers import ENCODER_WIDTH as TEXT_WIDTH, make_text_encoder, make_vae

    from ldm import train_unet
    from ldm.clip import CLIP, CLIPConfig, save_clip
    from ldm.unclip import Prior, PriorConfig

    encoder = make_text_encoder(tmp_path / "encoder", SESSION_SEED, TEXT_WIDTH)
    torch.manual_seed(SESSION_SEED)
    clip = CLIP(CLIPConfig(resolution=RESOLUTION, channels=(8, 16), norm_groups=4, embed_dim=EMBED,
                           text_width=TEXT_WIDTH, text_hidden=16, time_dim=16)).eval()
    save_clip(tmp_path / "clip", clip, text_encoder=str(encoder))
    vae = make_vae(tmp_path / "vae", SESSION_SEED)
    dec = tmp_path / "decoder"
    assert train_unet.main(train_flags(vae, 4, SESSION_SEED, cache_images=16)
                           + ["--cond", "clip-image", "--clip", str(tmp_path / "clip"), "--out", str(dec)]) == 0
    prior = Prior(PriorConfig(embed_dim=EMBED, text_width=TEXT_WIDTH, width=16, depth=1, heads=2, ff_mult=2))
    save_model(tmp_path / "prior", "prior", prior.eval(), prior.config)
    capsys.readouterr()
    for how in (["--prior", str(tmp_path / "prior")], ["--variations"]):
        out = tmp_path / "u.json"
        assert eval_text.main(["--decoder", str(dec), *how, "--n", "2", "--steps", "2", "--diversity", "2",
                               "--diversity-prompts", "2", "--json", str(out)]) == 0
        d = json.loads(out.read_text())["diversity"]
        assert (d["prompts"], d["k"], len(d["distinct_per_prompt"])) == (2, 2, 2) and "data_vae" in d
        assert ("unCLIP: " if how[0] == "--prior" else "variations: ") in capsys.readouterr().out
