"""`python -m ldm.eval_text`: the scoring arithmetic, prompts paired with their own attributes, the
sampler comparison on one set of prompts and noise, and bad input."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SESSION_SEED
from PIL import Image
from t2i_helpers import RESOLUTION, shared_assets

from ldm import eval_text, metrics, prompt_sheet
from ldm.checkpoint import load_json, save_json, save_model
from ldm.data import SHAPES, ShapesDataset, eval_prompts, render, to_tensor
from ldm.data.wording import EVAL_SPLITS, split_prompts
from ldm.metrics import ATTRIBUTES, HEADLINE, evaluate_prompts, score
from ldm.pipeline import load_pipeline
from ldm.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory, SESSION_SEED % 1000)


def other(values, current):
    return next(v for v in values if v != current)


def test_score_counts_each_attribute_and_the_combinations(seed):
    data = ShapesDataset(32, seed=seed, split="eval")
    truth = [data.attributes(i) for i in range(10)]
    images = torch.stack([data[i]["image"] for i in range(10)])
    shares, seen = score(images, truth)
    assert all(shares[a] == 1.0 for a in ATTRIBUTES), [(s, t) for s, t in zip(seen, truth) if s["shape"] != t["shape"]]
    asked = [dict(t) for t in truth]
    for i in (0, 1, 2):
        asked[i]["shape"] = other(SHAPES, truth[i]["shape"])
    for i in (3, 4):
        asked[i]["colour"] = "not a colour"
    asked[5]["background"] = "not a background"
    asked[6]["size"] = other(("small", "large"), truth[6]["size"])
    asked[7]["position"] = "nowhere"
    shares, _ = score(images, asked)
    assert shares == pytest.approx({"shape": 0.7, "colour": 0.8, "size": 0.9, "position": 0.9, "background": 0.9,
                                    HEADLINE: 0.4, "all": 0.2})  # headline misses 0-4 and 7; all also 5 and 6


def test_each_prompt_is_judged_against_its_own_attributes(monkeypatch):
    pairs = eval_prompts(12, metrics.PROMPT_SEED)
    attrs_of = {text: a for a, text in pairs}
    calls = []

    def draw(shift):
        def fake_generate(pipe, prompts, **kw):
            calls.append(kw)
            order = prompts[shift:] + prompts[:shift]  # shift 0: each prompt's own scene
            return torch.stack([to_tensor(render(attrs_of[p], 32)) for p in order])
        return fake_generate

    monkeypatch.setattr(metrics, "generate", draw(0))
    pipe = SimpleNamespace(conditional=True)
    result = evaluate_prompts(pipe, 12, sampler="ddim", steps=7, cfg=2.5, seed=3, batch_size=5)
    assert calls[-1] == {"n": 1, "steps": 7, "sampler": "ddim", "cfg": 2.5, "seed": 3, "batch_size": 5,
                         "spacing": None, "progress": False}
    assert all(result[a] == 1.0 for a in ATTRIBUTES + (HEADLINE, "all")) and result["misses"] == []
    assert (result["n"], result["sampler"], result["steps"], result["cfg"]) == (12, "ddim", 7, 2.5)
    monkeypatch.setattr(metrics, "generate", draw(1))  # every image shows the next prompt's scene
    shifted = evaluate_prompts(pipe, 12)
    assert shifted[HEADLINE] < 0.5 and len(shifted["misses"]) == min(10, round(12 * (1 - shifted[HEADLINE])))
    assert shifted["misses"][0]["prompt"] in attrs_of


def test_cli_compares_samplers_on_the_same_prompts_and_noise(assets, tmp_path, capsys):
    rc = eval_text.main(["--unet", str(assets["unet"]), "--n", "6", "--split", "in-distribution",
                         "--sampler", "dpmpp_2m:3", "--sampler", "ddim:4",
                         "--sampler", "dpmpp_2m:3", "--json", str(tmp_path / "s.json"),
                         "--grid", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads((tmp_path / "s.json").read_text())
    runs = result["runs"]
    assert [(r["sampler"], r["steps"], r["n"]) for r in runs] == [("dpmpp_2m", 3, 6), ("ddim", 4, 6),
                                                                  ("dpmpp_2m", 3, 6)]
    meta = load_json(assets["unet"] / "unet.json")
    for r in runs:
        assert r["cfg"] == meta["cfg_scale"] and r[HEADLINE] <= min(r["shape"], r["colour"], r["position"])
        assert r["all"] <= r[HEADLINE] and all(0 <= r[a] <= 1 for a in ATTRIBUTES)
    same = ("shape", "colour", "size", "position", "background", HEADLINE, "all", "misses")
    assert {k: runs[0][k] for k in same} == {k: runs[2][k] for k in same}  # same prompts, noise, sampler
    assert "dpmpp_2m     3" in out and "ddim     4" in out
    assert Image.open(tmp_path / "g.png").size == (6 * (RESOLUTION + 2) + 2, RESOLUTION + 4)


def test_cli_reports_each_split_on_its_own_line(assets, tmp_path, capsys, monkeypatch):
    asked = []
    real = metrics.generate

    def spy(pipe, prompts, **kw):
        asked.append(list(prompts))
        return real(pipe, prompts, **kw)

    monkeypatch.setattr(metrics, "generate", spy)
    assert eval_text.main(["--unet", str(assets["unet"]), "--n", "3", "--sampler", "ddim:2",
                           "--json", str(tmp_path / "s.json"), "--sheet", str(tmp_path / "sheet.png")]) == 0
    out = capsys.readouterr().out
    runs = json.loads((tmp_path / "s.json").read_text())["runs"]
    assert [r["split"] for r in runs] == list(EVAL_SPLITS) and all(r["n"] == 3 for r in runs)
    assert asked == [[p for _, p in split_prompts(name, 3)] for name in EVAL_SPLITS]
    sheet = Image.open(tmp_path / "sheet.png")
    side = RESOLUTION * prompt_sheet.SCALE
    assert sheet.size == (side + prompt_sheet.TEXT_WIDTH + 3 * prompt_sheet.PAD,
                          4 * 3 * (side + 2 * prompt_sheet.PAD))  # 3 labelled images of each of the 4 splits
    lines = [line for line in out.splitlines() if "ddim     2" in line]
    assert [line.split("ddim")[0].strip() for line in lines] == list(EVAL_SPLITS)
    with pytest.raises(SystemExit):
        eval_text.main(["--unet", str(assets["unet"]), "--split", "easy"])
    assert "argument --split: invalid choice: 'easy'" in capsys.readouterr().err


def test_scores_are_those_of_the_returned_images(assets):
    pipe = load_pipeline(assets["unet"])
    result = evaluate_prompts(pipe, 5, steps=2, seed=1, return_images=True)
    shares, _ = score(result["images"], [a for a, _ in eval_prompts(5, metrics.PROMPT_SEED)])
    assert all(result[k] == shares[k] for k in shares)
    assert result["images"].shape == (5, 3, RESOLUTION, RESOLUTION)


def test_unconditional_models_and_bad_samplers_are_refused(assets, tmp_path, capsys):
    folder = tmp_path / "uncond"
    meta = load_json(assets["unet"] / "unet.json")
    config = UNetConfig(**{**meta["config"], "context_dim": None})
    save_model(folder, "unet", UNet(config), config, **{k: v for k, v in meta.items() if k != "config"})
    save_json({**load_json(folder / "unet.json"), "text_encoder": None}, folder / "unet.json")
    assert eval_text.main(["--unet", str(folder), "--n", "2"]) == 2
    assert f"{folder}/unet.json describes an unconditional UNet" in capsys.readouterr().err
    for spec, message in (("heun:10", "unknown sampler 'heun'"), ("ddim:ten", "steps must be an integer"),
                          ("ddim:0", "steps must be positive")):
        assert eval_text.main(["--unet", str(assets["unet"]), "--sampler", spec]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    shutil.rmtree(folder)


def test_sheet_shows_each_image_beside_its_label(seed):
    data = ShapesDataset(32, seed=seed, split="eval")
    rows = [{"image": data[i]["image"], "split": "noisy", "prompt": data[i]["text"], "read": "x", "right": i == 0}
            for i in range(2)]
    sheet = prompt_sheet.prompt_sheet(rows)
    side, pad = 32 * prompt_sheet.SCALE, prompt_sheet.PAD
    for k in range(2):
        top = k * (side + 2 * pad) + pad
        drawn = torch.from_numpy(np.asarray(sheet.crop((pad, top, pad + side, top + side))).copy())
        want = ((data[k]["image"] + 1) * 127.5).round().permute(1, 2, 0)
        assert torch.equal(drawn[::prompt_sheet.SCALE, ::prompt_sheet.SCALE], want.to(drawn.dtype))
        text = np.asarray(sheet.crop((side + 2 * pad, top, sheet.width, top + side))).reshape(-1, 3).astype(np.int64)
        assert (text.sum(1) < 600).any()  # something is written beside it
    with pytest.raises(ValueError, match="no rows"):
        prompt_sheet.prompt_sheet([])
