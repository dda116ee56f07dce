"""ldm.data.wording: the evaluation splits are held out from the training data (no caption, no eval-only
word, no held-out combination in it), the varied training captions state every attribute in
training-side words, and the held-out rule leaves every pair of attributes in training."""

import itertools

import numpy as np
import pytest

from ldm.data import COLOURS, POSITIONS, SHAPES, ShapesDataset, caption
from ldm.data.shapes import held_out
from ldm.data.wording import (
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    EVAL,
    EVAL_SPLITS,
    POSITION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    TRAIN,
    DROP_P,
    TEMPLATE_SHARE,
    _phrases,
    eval_only_words,
    split_prompts,
    words,
)

N_TRAIN = 3000  # training items checked against the splits (the demo caches 10,000 of the same stream)
N_SPLIT = 200
TABLES = {"colour": COLOUR_WORDS, "background": BACKGROUND_WORDS, "shape": SHAPE_WORDS, "size": SIZE_WORDS,
          "position": POSITION_WORDS}


@pytest.fixture(scope="module")
def training():
    """The varied captions and scenes of the first N_TRAIN training items of a fresh data seed."""
    seed = int(np.random.default_rng().integers(1 << 20))
    ds = ShapesDataset(16, length=N_TRAIN, seed=seed, captions="varied")
    scenes = [ds.attributes(i) for i in range(N_TRAIN)]
    return seed, scenes, [ds.caption(i, a) for i, a in enumerate(scenes)]


def test_training_never_renders_a_held_out_combination(training):
    _, scenes, _ = training
    assert not any(held_out(a) for a in scenes)
    triples = {(a["shape"], a["colour"], a["position"]) for a in scenes}
    assert len(triples) == len(SHAPES) * len(COLOURS) * len(POSITIONS) * 8 // 9  # every other triple is there
    values = {"shape": SHAPES, "colour": COLOURS, "position": POSITIONS}
    for x, y in itertools.combinations(values, 2):  # every pair still occurs
        assert len({(a[x], a[y]) for a in scenes}) == len(values[x]) * len(values[y]), (x, y)
    eval_stream = ShapesDataset(16, length=400, seed=training[0], split="eval")
    assert sum(held_out(eval_stream.attributes(i)) for i in range(400)) > 20  # the eval stream keeps them


def test_splits_are_held_out_from_the_training_captions(training, seed):
    _, scenes, captions = training
    train_words = set().union(*(words(c) for c in captions))
    only_eval = eval_only_words()
    assert not train_words & only_eval, sorted(train_words & only_eval)[:10]
    lowered = {c.lower() for c in captions}
    splits = {name: split_prompts(name, N_SPLIT, seed) for name in EVAL_SPLITS}
    assert all(len(pairs) == N_SPLIT for pairs in splits.values())
    for name in ("held-out wording", "noisy"):
        prompts = [p for _, p in splits[name]]
        assert len(set(prompts)) > 0.95 * N_SPLIT, name
        assert not any(p.lower() in lowered for p in prompts), name
        assert all(words(p) & only_eval for p in prompts), name  # each holds at least one eval-only word
    assert all(held_out(a) for a, _ in splits["held-out combinations"])
    assert not any(held_out(a) for name in ("in-distribution", "held-out wording", "noisy") for a, _ in splits[name])
    for name, pairs in splits.items():
        assert all(isinstance(p, str) and p for _, p in pairs), name
    assert all(p == caption(a) for a, p in splits["in-distribution"] + splits["held-out combinations"])
    with pytest.raises(ValueError, match="unknown split"):
        split_prompts("easy", 3)


def test_every_eval_phrase_is_new_and_says_its_value(seed):
    only_eval = eval_only_words()
    for phrase in _phrases(EVAL):
        assert words(phrase) & only_eval, phrase  # no eval phrase is made of training words alone
    assert not set(_phrases(EVAL)) & set(_phrases(TRAIN))
    for table in TABLES.values():
        for value, (train, held) in table.items():
            assert len(train) >= 4 and len(held) >= 3, value
    for a, prompt in split_prompts("held-out wording", 60, seed):
        for attribute, table in TABLES.items():  # each attribute in one of its own eval-only phrases
            assert any(p in prompt for p in table[a[attribute]][EVAL]), (attribute, prompt)


def test_varied_captions_state_every_attribute_in_training_words(training):
    seed, scenes, captions = training
    for a, text in zip(scenes[:500], captions[:500], strict=True):
        low = text.lower()
        if low == caption(a):
            continue
        for attribute, table in TABLES.items():
            assert any(p in low for p in table[a[attribute]][TRAIN]), (attribute, text)
    assert len(set(captions)) > 0.9 * len(captions)
    template_share = sum(c == caption(a) for a, c in zip(scenes, captions, strict=True)) / len(captions)
    assert 0.15 < template_share < 0.35
    again = ShapesDataset(16, length=N_TRAIN, seed=seed, captions="varied")
    picks = np.random.default_rng(seed).integers(N_TRAIN, size=10)
    assert [again[int(i)]["text"] for i in picks] == [captions[int(i)] for i in picks]
    with pytest.raises(ValueError, match="caption style"):
        ShapesDataset(16, captions="fancy")


def test_dropped_captions_leave_out_one_attribute_at_most(seed):
    ds = ShapesDataset(16, length=1500, seed=seed, captions="varied-drop")
    missing = []
    for i in range(1500):
        a, text = ds.attributes(i), ds.caption(i).lower()
        unsaid = [k for k, table in TABLES.items() if not any(p in text for p in table[a[k]][TRAIN] + (a[k],))]
        assert len(unsaid) <= 1 and "shape" not in unsaid, (unsaid, text)
        assert "  " not in text and not text.startswith((",", ":")) and ", ," not in text, text
        missing.append(bool(unsaid))
    share = sum(missing) / len(missing)  # DROP_P of the 75% that are not template captions
    assert abs(share - DROP_P * (1 - TEMPLATE_SHARE)) < 0.04, share


def test_train_unet_caches_the_varied_captions(tmp_path, seed):
    import contextlib
    import io

    from t2i_helpers import make_text_encoder, make_vae, train_flags

    import ldm.train_unet as train_unet
    from ldm.checkpoint import load_json
    from ldm.latent_cache import read_cache_key

    vae, encoder = make_vae(tmp_path / "vae", seed), make_text_encoder(tmp_path / "encoder", seed)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train_unet.main(["--out", str(tmp_path / "unet"), "--text", "--text-encoder", str(encoder),
                              "--captions", "varied"] + train_flags(vae, 2, seed, cache_images=40))
    assert rc == 0, err.getvalue()
    key = read_cache_key(tmp_path / "unet" / "cache" / "text.safetensors")
    assert key["dataset"]["captions"] == "varied" and key["dataset"]["holdout"] is True
    assert load_json(tmp_path / "unet" / "unet.json")["dataset"]["captions"] == "varied"
    want = {ShapesDataset(16, length=40, captions="varied").caption(i) for i in range(40)}
    assert f"cached {len(want | set(key['val_prompts']) | {''})} distinct captions" in err.getvalue()
