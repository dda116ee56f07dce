"""The fine-tuning demo's data: stars and hearts drawn like the built-in scenes, read back by the reader that
knows them, held-out prompts that share no attribute combination with the taught scenes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import teach_shape
from ldm.data.new_shapes import COMBO, held_out_prompts, reader_shapes, render_new, training_scenes
from ldm.data.shapes import (_AREA, _CENTROID_DROP, HEART_HEIGHT, NEW_SHAPES, ShapesDataset, _gaussian_blur,
                             read_attributes, render, shape_coverage)
from ldm.runlog import labelled_rows

RES = 96  # pixels of the geometry tests' renders: fine enough for 1% of the area


def test_star_geometry(seed):
    rng = np.random.default_rng(seed)
    side = float(rng.uniform(0.3, 0.6))
    cover = shape_coverage("star", 0.5, 0.5, side, RES, supersample=8).astype(np.float64)
    assert abs(cover.sum() / RES ** 2 / side ** 2 - _AREA["star"]) < 0.01 * _AREA["star"]
    assert np.allclose(cover, cover[:, ::-1], atol=1e-6)  # mirror-symmetric about the vertical axis
    t = (np.arange(RES) + 0.5) / RES
    assert abs((cover.sum(1) @ t) / cover.sum() - 0.5) < 0.01 * side  # centroid at the box centre
    # five points: the coverage along a ring at 0.8 of the outer radius has five runs; averaged over 15 of
    # the 720 samples (7.5 degrees), since pixel steps along an edge the ring grazes would split a run
    ang = np.linspace(0, 2 * math.pi, 720, endpoint=False)
    r = 0.8 * side / 2
    along = cover[np.clip(((0.5 + r * np.sin(ang)) * RES).astype(int), 0, RES - 1),
                  np.clip(((0.5 + r * np.cos(ang)) * RES).astype(int), 0, RES - 1)]  # (720,)
    ring = sum(np.roll(along, k) for k in range(-7, 8)) / 15 > 0.5
    assert int(np.sum(ring & ~np.roll(ring, 1))) == 5


def test_heart_geometry(seed):
    """Area and centroid as the reader assumes them; as wide as the box, centred in it, two lobes, one point."""
    rng = np.random.default_rng(seed)
    side = float(rng.uniform(0.3, 0.6))
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05, size=2)
    cover = shape_coverage("heart", cx, cy, side, RES, supersample=8).astype(np.float64)
    assert abs(cover.sum() / RES ** 2 / side ** 2 - _AREA["heart"]) < 0.01 * _AREA["heart"]
    t = (np.arange(RES) + 0.5) / RES
    assert abs((cover.sum(1) @ t) / cover.sum() - cy - _CENTROID_DROP["heart"] * side) < 0.01 * side
    assert abs((cover.sum(0) @ t) / cover.sum() - cx) < 0.01 * side  # mirror-symmetric: centroid on the axis
    rows, cols = np.flatnonzero(cover.sum(1) > 0), np.flatnonzero(cover.sum(0) > 0)
    assert abs((cols[-1] - cols[0] + 1) / RES - side) <= 2 / RES
    assert abs((rows[-1] - rows[0] + 1) / RES - HEART_HEIGHT * side) <= 2 / RES
    assert abs((rows[0] + rows[-1] + 1) / 2 / RES - cy) <= 1 / RES  # centred vertically
    # two lobes with a cleft between them (0.086 of the side deep: 2.5 pixels or more here), one point below
    top, bottom = cover[rows[0] + 1] > 0.5, cover[rows[-1] - 2] > 0.5
    assert int(np.sum(top & ~np.roll(top, 1))) == 2 and int(np.sum(bottom & ~np.roll(bottom, 1))) == 1
    assert bottom.sum() < 0.25 * side * RES


@pytest.mark.parametrize("shape", NEW_SHAPES)
def test_reader_knows_the_new_shape_and_still_the_old_ones(shape, seed):
    """Every rendered held-out scene of the new shape (200) and every old scene (400) read right, and still
    when blurred by a Gaussian of 1 pixel, as soft as decoded samples (measured: all right on six seeds)."""
    reader = reader_shapes(shape)
    prompts = held_out_prompts(200, 40, shape, seed=seed % 1000)
    seen = [read_attributes(render_new(a), reader) for a, _ in prompts]
    assert [s["shape"] for s in seen] == [shape] * len(prompts)
    assert all(all(s[k] == a[k] for k in COMBO) for s, (a, _) in zip(seen, prompts, strict=True))
    old = ShapesDataset(32, seed=seed % 1000, split="eval")
    scenes = [old.attributes(i) for i in range(400)]
    assert [read_attributes(render(a), reader)["shape"] for a in scenes] == [a["shape"] for a in scenes]

    def soft(image: np.ndarray) -> np.ndarray:  # (H, W, 3) uint8 -> float in [0, 1], each channel blurred
        return np.stack([_gaussian_blur(image[..., c].astype(np.float32) / 255, 1.0) for c in range(3)], axis=-1)

    assert [read_attributes(soft(render_new(a)), reader)["shape"] for a, _ in prompts[:50]] == [shape] * 50
    assert [read_attributes(soft(render(a)), reader)["shape"] for a in scenes[:50]] == [a["shape"] for a in scenes[:50]]


@pytest.mark.parametrize("shape", NEW_SHAPES)
def test_held_out_prompts(tmp_path, shape):
    taught = {tuple(a[k] for k in COMBO) for a in training_scenes(40, shape)}
    prompts = held_out_prompts(100, 40, shape)
    assert not {tuple(a[k] for k in COMBO) for a, _ in prompts} & taught
    assert all(shape in text and a["shape"] == shape for a, text in prompts)
    assert prompts == held_out_prompts(100, 40, shape)
    # the same scenes whatever the shape: the demos differ by the shape only
    other = [s for s in NEW_SHAPES if s != shape][0]
    assert [{**a, "shape": other} for a in training_scenes(40, shape)] == training_scenes(40, other)
    assert teach_shape.main(["data", "--shape", shape, "--out", str(tmp_path / "d"), "--n", "7", "--replay", "5"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and sum(shape in r["text"] for r in rows) == 7
    assert all((tmp_path / "d" / r["file_name"]).is_file() for r in rows)
    assert teach_shape.main(["eval", "--shape", shape, "--unet", str(tmp_path / "none"), "--n", "0"]) == 2


def test_unknown_new_shape(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown new shape 'circle'"):
        reader_shapes("circle")
    with pytest.raises(SystemExit):
        teach_shape.main(["data", "--shape", "moon", "--out", str(tmp_path / "d")])
    assert "--shape" in capsys.readouterr().err


def test_labelled_rows():
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    img = labelled_rows(x, ["a", "b"], scale=2, pad=2)
    assert img.width > 3 * 16 and img.height == 2 * ((8 + 2) * 2 + 4)


def test_tune_decoder_keeps_the_latents(tmp_path, seed):
    """The decoder learns, the encoder and the latent scale stay: a UNet's latent cache remains valid."""
    from ldm.data import ShapesDataset as Shapes
    from ldm.finetune import tune_decoder
    from ldm.pretrained import load_vae
    from t2i_helpers import RESOLUTION, make_vae

    src = make_vae(tmp_path / "vae", seed)
    data = Shapes(RESOLUTION, length=8, seed=seed % 100)
    x = torch.stack([data[i]["image"] for i in range(8)])  # (8, 3, R, R): the pictures it is taught
    before, meta = load_vae(src)
    assert teach_shape.main(["decoder", "--vae", str(src), "--data", str(tmp_path / "none"), "--out",
                             str(tmp_path / "x")]) == 2
    tune_decoder(src, data, tmp_path / "tuned", steps=100, batch_size=8, lr=3e-3, seed=seed)
    after, meta2 = load_vae(tmp_path / "tuned")
    assert (meta2["latent_scale_factor"], meta2["latent_mean"]) == (meta["latent_scale_factor"], meta["latent_mean"])
    sb, sa = before.state_dict(), after.state_dict()
    assert all(torch.equal(sb[k], sa[k]) for k in sb if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if k.startswith("decoder."))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # its objective, on the same posterior samples for both decoders
        post = before.encode(x)
        z = torch.cat([post.mean + post.std * torch.randn(post.mean.shape, generator=g) for _ in range(4)])
        err_before = torch.nn.functional.mse_loss(before.decode(z), x.repeat(4, 1, 1, 1)).item()
        err_after = torch.nn.functional.mse_loss(after.decode(z), x.repeat(4, 1, 1, 1)).item()
    # measured over seeds 0-159: after / before 0.26-0.93 (a decoder that learns nothing gives 1)
    assert err_after < 0.97 * err_before, (err_before, err_after)


def test_vae_ceiling_counts_what_survives_the_round_trip(tmp_path, seed):
    """``teach_shape vae``: the counts are the reader's verdicts on ``round_trip``'s pictures, which are the
    VAE's decoding of its posterior mode, whatever the batching."""
    from ldm.data.shapes import to_tensor
    from ldm.finetune import round_trip
    from ldm.pretrained import load_vae
    from t2i_helpers import RESOLUTION, make_vae

    src = make_vae(tmp_path / "vae", seed)
    vae, _ = load_vae(src)
    n = 5
    assert teach_shape.main(["vae", "--vae", str(src), "--n", str(n), "--json", str(tmp_path / "c.json")]) == 0
    counts = json.loads((tmp_path / "c.json").read_text())
    assert set(counts) == set(NEW_SHAPES)
    for shape, c in counts.items():
        x = torch.stack([to_tensor(render_new(a, RESOLUTION)) for a, _ in held_out_prompts(n, 40, shape)])
        back = round_trip(vae, x, batch_size=2)  # (n, 3, R, R), three batches
        with torch.no_grad():
            assert torch.allclose(back, vae.decode(vae.encode(x).mode()).clamp(-1, 1), atol=1e-5)
        assert c["after_vae"] == sum(read_attributes(b, reader_shapes(shape))["shape"] == shape for b in back)
        assert c["n"] == n and 0 <= c["small_after_vae"] <= c["small"] <= n and 0 <= c["old_after_vae"] <= n
    assert teach_shape.main(["vae", "--vae", str(tmp_path / "none")]) == 2


def test_eval_scores_the_new_and_the_old_prompts_and_draws_before_and_after(tmp_path, tmp_path_factory):
    """``teach_shape eval`` on the tests' tiny text-to-image model: with ``--base`` the same model, the old
    prompts score the same before and after (same prompts, same noise); the picture has a before and an
    after row for each new-shape prompt and one row for each of two old prompts."""
    from conftest import SESSION_SEED
    from t2i_helpers import RESOLUTION, shared_assets

    from ldm.data.shapes import eval_prompts

    unet = str(shared_assets(tmp_path_factory, SESSION_SEED % 1000)["unet"])
    n = 3
    assert teach_shape.main(["eval", "--unet", unet, "--base", unet, "--n", str(n), "--grid", str(tmp_path / "g.png"),
                             "--json", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["shape"] == "heart" and scores["new"]["n"] == scores["old"]["n"] == n
    assert {k: v for k, v in scores["old_before"].items() if k != "seconds"} == \
        {k: v for k, v in scores["old"].items() if k != "seconds"}
    labels = [t for _, t in held_out_prompts(n, 40, "heart") for _ in range(2)] + [t for _, t in eval_prompts(2)]
    want = labelled_rows(torch.zeros(len(labels) * teach_shape.GRID_N, 3, RESOLUTION, RESOLUTION), labels,
                         scale=teach_shape.GRID_SCALE)
    assert Image.open(tmp_path / "g.png").size == want.size
