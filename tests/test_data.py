"""The built-in captioned dataset, its attribute reader, image folders and the resumable stream."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    VOCABULARY,
    FolderDataset,
    ShapesDataset,
    ShuffledStream,
    caption,
    eval_prompts,
    open_dataset,
    read_attributes,
    render,
    sample_attributes,
)
from ldm.data.shapes import WHERE

ATTRS = ("shape", "colour", "position", "size", "background")


# ---------------------------------------------------------------- vocabulary and captions
def test_vocabulary_is_what_the_issue_asks():
    assert len(SHAPES) >= 4 and len(COLOURS) >= 6 and len(SIZES) >= 2
    assert len(POSITIONS) == 9 and len(BACKGROUNDS) >= 4
    assert set(VOCABULARY) == set(ATTRS)
    assert len(TEMPLATES) >= 4


def test_every_template_states_every_attribute(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        a = sample_attributes(rng)
        for t in range(len(TEMPLATES)):
            text = caption(a, t)
            for word in (a["size"], a["colour"], a["shape"], WHERE[a["position"]], a["background"]):
                assert word in text, (t, text)
            assert text == text.strip() and "{" not in text
    a = sample_attributes(rng)
    assert caption(a) == caption(a, a["template"])
    assert caption({k: v for k, v in a.items() if k != "template"}) == caption(a, 0)
    assert caption(a, "{colour} {shape}") == f"{a['colour']} {a['shape']}"


def test_example_caption_from_the_issue():
    a = {"shape": "circle", "colour": "red", "size": "small", "position": "top left", "background": "blue"}
    assert caption(a, 0) == "a small red circle in the top left on a blue background"


def test_templates_are_all_used_and_differ(seed):
    ds = ShapesDataset(16, length=300, seed=seed)
    texts = [ds[i]["text"] for i in range(0, 300, 3)]
    used = {ds.attributes(i)["template"] for i in range(300)}
    assert used == set(range(len(TEMPLATES)))
    assert len(set(texts)) > 80


def test_bad_attributes_are_named():
    a = {"shape": "hexagon", "colour": "red", "size": "small", "position": "top", "background": "white"}
    with pytest.raises(ValueError, match="shape='hexagon'"):
        caption(a)
    with pytest.raises(ValueError, match="blue shape cannot lie on a blue background"):
        render({**a, "shape": "circle", "colour": "blue", "background": "blue"})


def test_attribute_distribution_covers_the_vocabulary(seed):
    rng = np.random.default_rng(seed)
    seen = {k: set() for k in ATTRS}
    for _ in range(3000):
        a = sample_attributes(rng)
        assert COLOURS[a["colour"]] != BACKGROUNDS[a["background"]]
        for k in ATTRS:
            seen[k].add(a[k])
    for k in ATTRS:
        assert seen[k] == set(VOCABULARY[k]), k


# ---------------------------------------------------------------- determinism and splits
def test_items_are_deterministic_by_seed_and_index(seed):
    a = ShapesDataset(32, length=1000, seed=seed)
    b = ShapesDataset(32, length=1000, seed=seed)
    idx = np.random.default_rng(seed).permutation(1000)[:20]
    first = {int(i): a[int(i)] for i in idx}
    for i in reversed(idx):  # another order, another instance
        assert torch.equal(b[int(i)]["image"], first[int(i)]["image"])
        assert b[int(i)]["text"] == first[int(i)]["text"]
    other = ShapesDataset(32, length=1000, seed=seed + 1)
    assert sum(torch.equal(other[int(i)]["image"], first[int(i)]["image"]) for i in idx) <= 2


def test_eval_split_is_disjoint_from_train(seed):
    train = ShapesDataset(32, length=400, seed=seed)
    held = ShapesDataset(32, length=400, seed=seed, split="eval")
    seen = {train[i]["image"].numpy().tobytes() for i in range(400)}
    assert not any(held[i]["image"].numpy().tobytes() in seen for i in range(400))
    prompts = eval_prompts(10, seed)
    assert [p[0] for p in prompts] == [held.attributes(i) for i in range(10)]
    assert all(text == caption(a) for a, text in prompts)
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(32, split="test")


def test_item_format_and_antialiasing(seed):
    ds = ShapesDataset(32, length=10, seed=seed)
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    a = ds.attributes(3)
    img = render(a, 32).reshape(-1, 3)
    fg, bg = np.asarray(COLOURS[a["colour"]]), np.asarray(BACKGROUNDS[a["background"]])
    is_fg, is_bg = (img == fg).all(1), (img == bg).all(1)
    assert is_fg.sum() > 10 and is_bg.sum() > 500
    assert (~is_fg & ~is_bg).sum() > 4  # edge pixels are mixtures, not jaggies


# ---------------------------------------------------------------- the attribute reader
def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> Gaussian-blurred, edges replicated (shifted sums, not the reader's code)."""
    r = 3
    g = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma * sigma))
    g /= g.sum()
    H, W, _ = img.shape
    p = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
    p = sum(g[i] * p[:, i:i + W] for i in range(2 * r + 1))
    return sum(g[i] * p[i:i + H] for i in range(2 * r + 1))


def _reader_accuracy(seed: int, n: int, degrade) -> dict:
    rng = np.random.default_rng(seed)
    hits = dict.fromkeys(ATTRS, 0)
    for _ in range(n):
        a = sample_attributes(rng)
        got = read_attributes(degrade(render(a, 32), rng))
        for k in ATTRS:
            hits[k] += got[k] == a[k]
    return {k: v / n for k, v in hits.items()}


def test_reader_on_clean_images(seed):
    acc = _reader_accuracy(seed, 400, lambda img, rng: img)
    print(acc)
    assert min(acc.values()) >= 0.99, acc


def test_reader_on_noisy_blurred_images(seed):
    """What a decoder gives back is soft and a little noisy: the reader must still judge it."""
    def degrade(img, rng):
        soft = _blur(img / 255.0, float(rng.uniform(0.4, 0.9)))
        return np.clip(soft + rng.normal(0, 0.03, soft.shape), 0, 1)
    acc = _reader_accuracy(seed, 300, degrade)
    print(acc)
    assert min(acc[k] for k in ("shape", "colour", "position")) >= 0.97, acc


def test_reader_takes_every_image_type(seed):
    a = sample_attributes(np.random.default_rng(seed))
    img = render(a, 32)
    expected = {k: a[k] for k in ATTRS}
    tensor = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
    for form in (img, Image.fromarray(img), tensor, img / 255.0, Image.fromarray(img).convert("RGBA")):
        got = read_attributes(form)
        assert {k: got[k] for k in ATTRS} == expected
    big = read_attributes(render(a, 64))
    assert {k: big[k] for k in ATTRS} == expected
    with pytest.raises(ValueError, match="square"):
        read_attributes(np.zeros((32, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        read_attributes(torch.zeros(1, 32, 32))


def test_reader_reports_no_shape_on_a_blank_image():
    blank = np.full((32, 32, 3), BACKGROUNDS["gray"], np.uint8)
    assert read_attributes(blank)["coverage"] < 0.01


# ---------------------------------------------------------------- the stream
def test_stream_positions_do_not_depend_on_batching(seed):
    ds = ShapesDataset(16, length=10, seed=seed)
    stream = ShuffledStream(ds, seed=seed)
    # 30 positions (3 epochs), then positions 9 .. 29 in batches of another size
    whole = torch.cat([b["image"] for _, b in zip(range(6), stream.loader(5, 0), strict=False)])
    resumed = torch.cat([b["image"] for _, b in zip(range(3), stream.loader(7, 9), strict=False)])
    assert torch.equal(whole[9:30], resumed)
    texts = [b for _, batch in zip(range(2), stream.loader(5, 10), strict=False) for b in batch["text"]]
    assert sorted(texts) == sorted(ds[i]["text"] for i in range(10))  # one epoch visits every item once
    first, second = whole[:10], whole[10:20]
    assert not torch.equal(first, second)  # each epoch in its own order


# ---------------------------------------------------------------- image folders
def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path.name


def _make_folder(root, rng) -> dict:
    """One image per mode and format, plus a corrupt file; returns file name -> caption."""
    root.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :24, 3] = 255  # left half opaque red, right half fully transparent
    names = {
        _save(Image.fromarray(rgba, "RGBA"), root / "rgba.png"): "a red half on white",
        _save(Image.fromarray(arr[..., 0], "L"), root / "gray.jpg", quality=90): "a gray photo",
        _save(Image.fromarray(arr).convert("P"), root / "palette.png"): "a palette image",
        _save(Image.fromarray(arr), root / "photo.webp"): "a webp photo",
    }
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    names["broken.png"] = "never loads"
    return names


def test_folder_with_metadata_jsonl(tmp_path, seed):
    names = _make_folder(tmp_path / "imgs", np.random.default_rng(seed))
    with open(tmp_path / "imgs" / "metadata.jsonl", "w") as f:
        for name, text in names.items():
            f.write(json.dumps({"file_name": name, "text": text, "alt": text.upper()}) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): broken.png"):
        ds = FolderDataset(tmp_path / "imgs", resolution=24)
    assert len(ds) == 4 and len(ds.skipped) == 1
    by_text = {}
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
        assert -1 <= item["image"].min() and item["image"].max() <= 1
        by_text[item["text"]] = item["image"]
    assert set(by_text) == {t for n, t in names.items() if n != "broken.png"}
    half = by_text["a red half on white"]
    assert torch.allclose(half[:, :, :10], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1), atol=0.02)  # red
    assert torch.allclose(half[:, :, 14:], torch.ones(3, 24, 10), atol=0.02)  # transparent -> white
    gray = by_text["a gray photo"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alt = FolderDataset(tmp_path / "imgs", resolution=24, caption_column="alt")
    assert {alt[i]["text"] for i in range(len(alt))} == {t.upper() for t in by_text}


def test_folder_missing_caption_column_names_the_file(tmp_path, seed):
    names = _make_folder(tmp_path / "imgs", np.random.default_rng(seed))
    with open(tmp_path / "imgs" / "metadata.jsonl", "w") as f:
        for name, text in names.items():
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "imgs" / "metadata.jsonl")) + ".*'caption'"):
        FolderDataset(tmp_path / "imgs", resolution=16, caption_column="caption")


def test_folder_empty_or_missing_names_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty"))):
        FolderDataset(tmp_path / "empty", resolution=16)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        FolderDataset(tmp_path / "nope", resolution=16)


def test_folder_with_txt_captions_and_a_missing_one(tmp_path, seed):
    rng = np.random.default_rng(seed)
    root = tmp_path / "txt"
    (root / "sub").mkdir(parents=True)
    for i, where in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(root / where)
    (root / "a.txt").write_text("caption of a\n")
    (root / "sub" / "c.txt").write_text("caption of c")
    with pytest.warns(UserWarning, match="1 of 3 images have no caption"):
        ds = FolderDataset(root, resolution=16)
    assert sorted(ds[i]["text"] for i in range(3)) == ["", "caption of a", "caption of c"]


def test_folder_crops_and_flips(tmp_path, seed):
    rng = np.random.default_rng(seed)
    root = tmp_path / "crop"
    root.mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 96, 3), dtype=np.uint8)).save(root / "wide.png")
    (root / "wide.txt").write_text("the left side is darker")
    center = FolderDataset(root, resolution=32)
    one, two = (center.get(0, np.random.default_rng(s))["image"] for s in (1, 2))
    assert torch.equal(one, two)
    expect = torch.from_numpy(np.asarray(Image.open(root / "wide.png"))[:, 32:64].copy()).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(center[0]["image"], expect, atol=1e-6)  # no flip unless asked
    rand = FolderDataset(root, resolution=32, crop="random")
    crops = {rand.get(0, np.random.default_rng(s))["image"].numpy().tobytes() for s in range(12)}
    assert len(crops) > 3
    flip = FolderDataset(root, resolution=32, flip=True)
    flips = {flip.get(0, np.random.default_rng(s))["image"].numpy().tobytes() for s in range(12)}
    assert flips == {expect.numpy().tobytes(), expect.flip(-1).numpy().tobytes()}


def test_open_dataset_picks_builtin_or_folder(tmp_path, seed):
    assert isinstance(open_dataset(None, 32, seed=seed), ShapesDataset)
    assert open_dataset(None, 32, split="eval").split == "eval"
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        open_dataset(tmp_path / "missing", 32)
