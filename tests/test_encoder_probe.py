"""`python -m ldm.encoder_probe`: the nearest-mean probe finds a phrase's own value when the encoder gives
it the same states, and the other value when the words are swapped; the command prints and writes JSON."""

import json
import re
import zlib

import pytest
import torch
from t2i_helpers import make_text_encoder

from ldm import encoder_probe, text_probe
from ldm.data import COLOURS, POSITIONS
from ldm.text import TextEncoder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_text_encoder(tmp_path_factory.mktemp("probe") / "encoder", seed=3)


@pytest.mark.parametrize("layer", [0, 1])
def test_probe_finds_own_words_and_misses_swapped_ones(encoder, layer):
    enc = TextEncoder(encoder)
    names = list(COLOURS)
    same = {"colour": {c: ((c,), (c,)) for c in names}}  # the eval phrase is the training phrase
    r = text_probe.probe(enc, layer, same)
    assert r["colour"] == {"accuracy": 1.0, "wrong": []}
    shifted = {"colour": {c: ((c,), (names[(i + 1) % len(names)],)) for i, c in enumerate(names)}}
    r = text_probe.probe(enc, layer, shifted)
    assert r["colour"]["accuracy"] == 0.0
    assert r["colour"]["wrong"] == [[names[(i + 1) % len(names)], names[(i + 1) % len(names)]]
                                    for i in range(len(names))]
    where = {"position": {p: ((f"in the {p}",), (f"at the {p}",)) for p in POSITIONS}}  # two-token phrases
    assert 0.0 <= text_probe.probe(enc, layer, where)["position"]["accuracy"] <= 1.0


def test_command_reports_every_attribute(encoder, tmp_path, capsys):
    assert encoder_probe.main(["--text-encoder", str(encoder), "--layer", "1", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "p.json").read_text())["layers"]["1"]
    assert set(result) == set(text_probe.TABLES)
    assert all(0.0 <= v["accuracy"] <= 1.0 for v in result.values())
    assert "colour at layer 1, wrong:" in out
    assert encoder_probe.main(["--text-encoder", str(encoder), "--layer", "9"]) == 2
    assert "--layer 9: the encoder has hidden states 0..1" in capsys.readouterr().err
    assert encoder_probe.main(["--text-encoder", str(tmp_path / "nowhere")]) == 2
    assert "--text-encoder" in capsys.readouterr().err


def test_fit_readout_matches_a_float64_logistic_regression():
    """The readout against scikit-learn's multinomial logistic regression at the same penalty, on fresh
    random clusters: sum of cross-entropies + |W|^2 / (2C) is N x (mean + l2 |W|^2) with C = 1 / (2 N l2)."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    n, width, classes, l2 = 300, 12, 4, 1e-2
    centres = torch.randn(classes, width, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centres[labels] + 1.5 * torch.randn(n, width, generator=g, dtype=torch.float64)
    w, b = text_probe.fit_readout(x, labels, classes, l2=l2, iters=500)
    ref = sklearn.LogisticRegression(C=1 / (2 * n * l2), tol=1e-12, max_iter=10_000).fit(x.numpy(), labels.numpy())
    ours = torch.softmax(x @ w + b, 1)
    theirs = torch.from_numpy(ref.predict_proba(x.numpy()))
    assert (ours - theirs).abs().max() < 1e-5
    assert 0.5 < (ours.argmax(1) == labels).double().mean() < 1.0  # a problem with errors, not a trivial one


class _BagOfWords:
    """An encoder whose token states are a fixed random vector per word: the sentence embedding is the mean
    of the words', so training words are readable and unseen words carry nothing about their meaning."""

    def __init__(self, width: int = 64, seed: int = 0):
        self.width, self.seed, self.vectors = width, seed, {}

    def _vector(self, word: str) -> torch.Tensor:
        if word not in self.vectors:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(word.encode()))
            self.vectors[word] = torch.randn(self.width, generator=g)
        return self.vectors[word]

    def encode(self, texts):
        rows = [[self._vector(w) for w in re.findall(r"[a-z]+", t.lower())] or [torch.zeros(self.width)]
                for t in texts]
        length = max(len(r) for r in rows)
        states = torch.zeros(len(rows), length, self.width)
        for i, r in enumerate(rows):
            states[i, :len(r)] = torch.stack(r)
        return states, torch.tensor([len(r) for r in rows])


def test_readout_reads_training_words_not_unseen_ones():
    r = text_probe.readout(_BagOfWords(seed=int(torch.randint(0, 1000, ()).item())), n_train=600, n_eval=100)
    assert set(r) == set(text_probe.TABLES)
    # a bag of words cannot bind "blue" to the shape or the background: colour sits lower than shape and size
    for attribute, floor in (("shape", 0.9), ("size", 0.9), ("colour", 0.75)):
        assert r[attribute]["in-distribution"] > floor, (attribute, r[attribute])
        assert r[attribute]["held-out combinations"] > floor, (attribute, r[attribute])
    # every colour of the held-out wording is an eval-only word: a random vector, chance is 1/6
    assert r["colour"]["held-out wording"] < 0.5, r["colour"]


def test_the_command_prints_the_readout(encoder, tmp_path, capsys):
    assert encoder_probe.main(["--text-encoder", str(encoder), "--layer", "1", "--readout",
                               "--json", str(tmp_path / "p.json")]) == 0
    report = json.loads((tmp_path / "p.json").read_text())
    assert set(report["readout"]) == set(text_probe.TABLES)
    assert set(report["readout"]["shape"]) == {"in-distribution", "held-out wording", "held-out combinations", "noisy"}
    assert all(0.0 <= v <= 1.0 for shares in report["readout"].values() for v in shares.values())
    assert "linear readout of the sentence embedding" in capsys.readouterr().out
