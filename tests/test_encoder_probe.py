"""`python -m ldm.encoder_probe`: the nearest-mean probe finds a phrase's own value when the encoder gives
it the same states, and the other value when the words are swapped; the command prints and writes JSON."""

import json

import pytest
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
