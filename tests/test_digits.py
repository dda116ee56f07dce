"""The real handwritten digits: the loader, the digit reader and the scores of ldm.digits_eval, the
class-conditional UNet and its guidance, and the digits through train_unet, sample and eval_digits."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
from t2i_helpers import UNET_FLAGS, make_vae

import ldm.digits_eval as digits_eval
from ldm import eval_digits, sample, train_unet, train_vae
from ldm.data import DigitsDataset, open_dataset
from ldm.data.digits import EVAL_TEMPLATES, NUM_CLASSES, TEMPLATES, WORDS, _load, downsample, split_indices
from ldm.diffusion import PREDICTIONS
from ldm.distributed import Dist
from ldm.latent_cache import Batches, Cache
from ldm.pipeline import Pipeline
from ldm.samplers import ClassCFGDenoiser
from ldm.unet import UNet, UNetConfig, unet_config



def run(main, argv) -> tuple[int, str]:
    """A command's main in this process; -> (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


def one_error_line(rc: int, err: str, command: str, *words: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), err
    for w in words:
        assert w in lines[0], err


# ---------------------------------------------------------------- the loader
@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_items_are_upsampled_grey_images_in_range(resolution):
    ds = DigitsDataset(resolution, split="eval")
    item = ds[0]
    assert item["image"].shape == (3, resolution, resolution) and item["image"].dtype == torch.float32
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert ds.images.min() == -1 and ds.images.max() > 0.9  # black paper, white ink
    assert torch.equal(item["image"][0], item["image"][1]) and torch.equal(item["image"][0], item["image"][2])
    assert item["label"] == int(ds.labels[0])


def test_the_split_is_fixed_stratified_and_held_out():
    idx = split_indices()
    train, held = set(idx["train"].tolist()), set(idx["eval"].tolist())
    assert not train & held and len(train) + len(held) == 1797
    labels = _load()[1]
    for d in range(NUM_CLASSES):  # 20% of every digit held out
        share = np.isin(np.flatnonzero(labels == d), idx["eval"]).mean()
        assert abs(share - 0.2) < 0.01, (d, share)
    pixels = _load()[0].reshape(len(labels), -1)
    seen = {p.tobytes() for p in pixels[idx["train"]]}
    assert sum(p.tobytes() in seen for p in pixels[idx["eval"]]) <= 2  # no held-out image is in train (2 exact
    # duplicates among the 1797 source images aside)
    # the seed picks captions only: another seed, the same images
    a, b = DigitsDataset(16, seed=0), DigitsDataset(16, seed=1)
    assert torch.equal(a.images, b.images) and a.captions != b.captions


def test_items_are_deterministic_and_captions_name_their_digit():
    a, b = DigitsDataset(16, seed=3), DigitsDataset(16, seed=3)
    assert a.captions == b.captions and torch.equal(a[5]["image"], b.get(5, np.random.default_rng(0))["image"])
    used = set()
    for text, label in zip(a.captions, a.labels, strict=True):
        named = {int(m) for m in re.findall(r"\d", text)} | {WORDS.index(w) for w in re.findall(r"[a-z]+", text)
                                                             if w in WORDS}
        assert named == {int(label)}, text
        used.add(text)
    assert len({t.format(d=0, word="zero") for t in TEMPLATES}) == len(TEMPLATES)
    held_out_wording = {t.format(d=d, word=WORDS[d]) for t in EVAL_TEMPLATES for d in range(NUM_CLASSES)}
    assert not held_out_wording & used
    assert a.describe()["name"] == "digits" and a.describe()["split"] == "train"
    assert a.prompts(3) == [EVAL_TEMPLATES[0].format(d=d, word=WORDS[d]) for d in range(3)]


def test_open_dataset_names_the_digits_and_refuses_bad_sides():
    ds = open_dataset("digits", 16, split="eval")
    assert isinstance(ds, DigitsDataset) and len(ds) == 359
    with pytest.raises(ValueError, match="multiple of 8"):
        DigitsDataset(12)
    with pytest.raises(ValueError, match="split"):
        DigitsDataset(16, split="test")


def test_downsample_reads_the_source_grid_back():
    ds = DigitsDataset(8, split="eval")
    torch.testing.assert_close(downsample(ds.images).view(-1, 8, 8), torch.as_tensor(ds.pixels))
    ds = DigitsDataset(32, split="eval")  # bilinear up, block mean down: a little blur
    assert (downsample(ds.images).view(-1, 8, 8) - torch.as_tensor(ds.pixels)).abs().mean() < 0.1


# ---------------------------------------------------------------- the reader and the scores
@pytest.fixture(scope="module")
def reader():
    return digits_eval.train_reader(16)  # the command's reader


@pytest.fixture(scope="module")
def reference(reader):
    return digits_eval.real_reference(reader, 16, n=100)


def test_the_reader_reads_held_out_real_digits(reference):
    assert reference["accuracy"] >= 0.97, reference["accuracy"]
    assert min(reference["per_digit"]) >= 0.9, reference["per_digit"]
    assert reference["floor_sizes"] == [1000, 359]


def test_frechet_distance_of_gaussians():
    gen = np.random.default_rng(0)
    a, b = gen.normal(size=(4000, 3)), gen.normal(size=(4000, 3))
    assert digits_eval.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    assert digits_eval.frechet_distance(a, b) < 0.02
    assert digits_eval.frechet_distance(a, b + [2.0, 0, 0]) == pytest.approx(4.0, abs=0.15)
    # N(0, I) vs N(0, 4 I): 3 * (1 + 4 - 2 * 2) = 3
    assert digits_eval.frechet_distance(a, 2 * b) == pytest.approx(3.0, abs=0.15)
    with pytest.raises(ValueError):
        digits_eval.frechet_distance(a, b[:, :2])


def test_real_digits_sit_near_the_floor_and_noise_far_from_it(reader, reference):
    assert 0 < reference["fd_floor"] < 15
    noise = torch.rand(1000, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _, feats = reader.read(noise)
    assert digits_eval.frechet_distance(feats, reference["features"]) > 20 * reference["fd_floor"]


def test_evaluate_digits_scores_a_generator_of_real_digits(reader, reference, monkeypatch):
    """A 'model' that returns real train digits of the asked class: high accuracy, FD at the floor;
    one that always draws a 1: right for one digit in ten."""
    train = DigitsDataset(16)
    by_digit = [train.images[torch.as_tensor(np.flatnonzero(train.labels == d))] for d in range(NUM_CLASSES)]

    class FakePipe:
        num_classes, conditional = NUM_CLASSES, False

    def real(pipe, prompts, *, classes, n, **kw):
        return torch.cat([by_digit[c][-n:] for c in classes])  # the last n of each: not the floor's first n

    monkeypatch.setattr(digits_eval, "generate", real)
    r = digits_eval.evaluate_digits(FakePipe(), reader, reference, n=30)
    assert r["mode"] == "class" and r["accuracy"] >= 0.97 and len(r["per_digit"]) == NUM_CLASSES
    assert r["fd_ratio"] < 3, r

    def ones(pipe, prompts, *, classes, n, **kw):
        return torch.cat([by_digit[1][:n] for _ in classes])

    monkeypatch.setattr(digits_eval, "generate", ones)
    r = digits_eval.evaluate_digits(FakePipe(), reader, reference, n=30)
    assert r["per_digit"][1] >= 0.9 and r["accuracy"] < 0.15 and r["fd_ratio"] > 10
    assert r["confusions"][0] == {"asked": 0, "read": 1}


def test_digit_prompts_use_held_out_wording():
    prompts, labels = digits_eval.digit_prompts(4)
    assert len(prompts) == 40 and labels == [d for d in range(10) for _ in range(4)]
    assert prompts[:2] == [EVAL_TEMPLATES[0].format(d=0, word="zero"), EVAL_TEMPLATES[1].format(d=0, word="zero")]


# ---------------------------------------------------------------- the class-conditional UNet
def small_unet(**kw) -> UNet:
    cfg = unet_config("tiny", in_channels=4, out_channels=4, model_channels=16, norm_groups=8, num_heads=2, **kw)
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():  # the zero-initialised output layers would hide the label
            p.normal_(0, 0.1)
    return unet


def test_class_conditional_unet_shapes_null_class_and_checks():
    unet = small_unet(context_dim=None, num_classes=10)
    x, t = torch.randn(3, 4, 4, 4), torch.tensor([10.0, 500.0, 900.0])
    out = unet(x, t, class_labels=torch.tensor([0, 7, 10]))  # 10: the null class
    assert out.shape == (3, 4, 4, 4) and unet.class_embed.weight.shape == (11, 64)
    other = unet(x, t, class_labels=torch.tensor([1, 7, 10]))
    assert not torch.allclose(out[0], other[0]) and torch.allclose(out[1:], other[1:], atol=1e-6)
    with pytest.raises(ValueError, match="class-conditional"):
        unet(x, t)
    with pytest.raises(ValueError, match="integers"):
        unet(x, t, class_labels=torch.zeros(3))
    with pytest.raises(ValueError, match="no class labels"):
        small_unet(context_dim=None)(x, t, class_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_classes"):
        UNetConfig(num_classes=0)
    saved = {k: v for k, v in UNetConfig().__dict__.items() if k != "num_classes"}  # a unet.json from before
    assert UNetConfig(**saved).num_classes is None


def test_class_guidance_is_one_batched_call():
    calls = []

    def model(x, sigma, class_labels):
        calls.append(class_labels.clone())
        return x * (1 + class_labels.float()[:, None, None, None]) + sigma[:, None, None, None]

    x, sigma = torch.randn(2, 4, 4, 4), torch.tensor(3.0)
    labels = torch.tensor([3, 7])
    out = ClassCFGDenoiser(model, 2.5)(x, sigma, labels, null_class=10)
    assert len(calls) == 1 and calls[0].tolist() == [3, 7, 10, 10]
    cond, uncond = x * (1 + labels.float()[:, None, None, None]) + 3, x * 11 + 3
    torch.testing.assert_close(out, uncond + 2.5 * (cond - uncond))


def test_batches_drop_labels_to_the_null_class():
    n = 64
    cache = Cache(torch.zeros(n, 4, 2, 2, dtype=torch.float16), torch.zeros(n, 4, 2, 2, dtype=torch.float16),
                  keys={}, labels=torch.arange(n) % 10)
    batches = Batches(cache, 32, Dist(), 0, 0.5, 1000, torch.device("cpu"), null_class=10)
    labels = torch.cat([batches(s)[3]["class_labels"] for s in range(4)])
    assert ((labels == 10).float().mean() - 0.5).abs() < 0.2 and set(labels.tolist()) <= set(range(11))
    assert len(set(labels.tolist())) == 11
    with pytest.raises(Exception, match="labelled dataset"):
        Batches(Cache(cache.mean, cache.std, keys={}), 32, Dist(), 0, 0.5, 1000, torch.device("cpu"), null_class=10)


def test_every_prediction_is_a_train_unet_choice():
    for prediction in PREDICTIONS:
        args = train_unet.build_parser().parse_args(["--prediction", prediction])
        assert args.prediction == prediction
    assert "x0" in PREDICTIONS


# ---------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A seconds-long class-conditional train_unet run on the digits (random VAE, tiny UNet)."""
    root = tmp_path_factory.mktemp("digits")
    vae = make_vae(root / "vae", 0)
    out = root / "unet"
    rc, err = run(train_unet.main, ["--data", "digits", "--class-cond", "--vae", vae, "--out", out,
                                    "--prediction", "x0", "--steps", "3", "--batch-size", "8", "--cache-images", "64",
                                    "--threads", "1", "--quiet", "--val-every", "0", "--val-steps", "2",
                                    "--warmup", "1"] + UNET_FLAGS)
    assert rc == 0, err
    return {"vae": vae, "unet": out, "stderr": err}


def test_train_unet_on_the_digits_by_class(digits_run):
    out = digits_run["unet"]
    meta = json.loads((out / "unet.json").read_text())
    assert meta["config"]["num_classes"] == 10 and meta["config"]["context_dim"] is None
    assert meta["conditioning"] == "class" and meta["prediction"] == "x0"
    assert meta["dataset"]["name"] == "digits" and meta["cached_items"] == 64
    assert "class-conditional (10 classes)" in digits_run["stderr"]
    assert (out / "val" / "step_0000003.png").is_file()
    pipe = Pipeline.from_pretrained(out)
    images = pipe(classes=[7, 2], n=2, steps=2, output="pt")
    assert pipe.num_classes == 10 and images.shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="class-conditional"):
        pipe(n=1, steps=2)
    with pytest.raises(ValueError, match="outside"):
        pipe(classes=[10], steps=2)


def test_sample_and_eval_digits_commands(digits_run, tmp_path):
    rc, err = run(sample.main, ["--unet", digits_run["unet"], "--class", "3", "--class", "8", "--n", "2",
                                "--steps", "2", "--out", tmp_path / "grid.png"])
    assert rc == 0 and (tmp_path / "grid.png").is_file() and "row 1: class 8" in err, err
    rc, err = run(eval_digits.main, ["--unet", digits_run["unet"], "--n", "2", "--steps", "2", "--reader-epochs", "1",
                                     "--json", tmp_path / "s.json", "--grid", tmp_path / "digits.png"])
    assert rc == 0, err
    scores = json.loads((tmp_path / "s.json").read_text())
    assert {"accuracy", "fd_floor", "per_digit"} <= set(scores["reader"])
    assert scores["generated"]["mode"] == "class" and len(scores["generated"]["per_digit"]) == 10
    assert (tmp_path / "digits.png").is_file()


def test_bad_inputs_are_one_line(digits_run, tmp_path):
    vae = digits_run["vae"]
    one_error_line(*run(train_unet.main, ["--class-cond", "--vae", vae, "--out", tmp_path / "a"]),
                   "train_unet", "--class-cond", "digits")
    one_error_line(*run(train_unet.main, ["--data", "digits", "--class-cond", "--text", "--vae", vae,
                                          "--out", tmp_path / "b"]), "train_unet", "pick one")
    one_error_line(*run(train_unet.main, ["--data", "nowhere", "--vae", vae, "--out", tmp_path / "c"]),
                   "train_unet", "nowhere", "digits")
    one_error_line(*run(train_vae.main, ["--data", "digits", "--resolution", "12", "--out", tmp_path / "d"]),
                   "train_vae", "multiple of 8")
    one_error_line(*run(eval_digits.main, ["--unet", digits_run["unet"], "--n", "0"]), "eval_digits", "--n")
    one_error_line(*run(eval_digits.main, ["--unet", tmp_path / "missing"]), "eval_digits", "missing")
    one_error_line(*run(sample.main, ["--unet", digits_run["unet"], "--class", "10", "--out", tmp_path / "g.png"]),
                   "sample", "--class 10")
    one_error_line(*run(sample.main, ["--unet", digits_run["unet"], "--prompt", "a 7", "--out", tmp_path / "g.png"]),
                   "sample", "--prompt")
    assert not any(tmp_path.iterdir())
