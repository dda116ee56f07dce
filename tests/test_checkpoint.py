"""Checkpoints: safetensors + JSON, atomic, nested state round trips, clear errors."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from ldm.checkpoint import (CheckpointDir, export_id, load_model_files, load_state, load_state_dict_strict, rng_state,
                            save_model, save_state, set_rng_state)


def test_optimizer_state_round_trips_exactly(tmp_path, seed):
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(3):
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
    save_state({"opt": opt.state_dict(), "step": 3, "pair": (1, "a")}, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors")
    assert back["step"] == 3 and back["pair"] == (1, "a")
    opt2 = torch.optim.AdamW(model.parameters(), lr=5.0)
    opt2.load_state_dict(back["opt"])
    assert opt2.param_groups[0]["lr"] == 1e-3 and opt2.param_groups[0]["betas"] == (0.9, 0.99)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt2.state[p][key], opt.state[p][key], rtol=0, atol=0)


def test_shared_tensors_and_views_round_trip(tmp_path, seed):
    """One tensor met twice (bitsandbytes shares its quantisation map among parameters) is stored once and
    comes back shared; a view of another entry's memory comes back as an equal copy."""
    table, base = torch.randn(256), torch.randn(4, 6)
    state = {"a": {"qmap": table, "m": torch.randn(3)}, "b": {"qmap": table}, "row": base[1], "whole": base,
             "empty": torch.empty(0), "empty2": torch.empty(0)}
    save_state(state, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors")
    assert back["a"]["qmap"] is back["b"]["qmap"] and torch.equal(back["a"]["qmap"], table)
    assert torch.equal(back["row"], base[1]) and torch.equal(back["whole"], base)
    assert torch.equal(back["a"]["m"], state["a"]["m"]) and back["empty"].numel() == back["empty2"].numel() == 0


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_checkpoint_dir_latest_prunes_and_ignores_half_written(tmp_path):
    ckpts = CheckpointDir(tmp_path / "ck", keep=2)
    assert ckpts.latest() is None
    for step in (10, 20, 30):
        ckpts.save(step, {"train": {"step": step, "w": torch.full((2,), float(step))}})
    (tmp_path / "ck" / ".step_0000040.tmp").mkdir()  # a save killed before its rename
    step, parts = ckpts.load()
    assert step == 30 and torch.equal(parts["train"]["w"], torch.full((2,), 30.0))
    ckpts.save(40, {"train": {"step": 40}})
    kept = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert kept == ["latest", "step_0000030", "step_0000040"]


def test_model_export_and_strict_load_errors(tmp_path):
    model = nn.Linear(3, 2)
    save_model(tmp_path, "m", model, {"width": 3}, scale=0.5)
    state, meta = load_model_files(tmp_path, "m")
    assert meta == {"config": {"width": 3}, "scale": 0.5, "export_id": export_id(tmp_path / "m.safetensors")}
    assert len(meta["export_id"]) == 32  # one id in both files of the pair
    assert json.loads((tmp_path / "m.json").read_text())["scale"] == 0.5
    with pytest.raises(ValueError, match=r"m\.safetensors.*shape mismatches.*weight"):
        load_state_dict_strict(nn.Linear(4, 2), state, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="missing keys.*unexpected keys"):
        load_state_dict_strict(nn.Sequential(nn.Linear(3, 2)), state, "m")
    with pytest.raises(FileNotFoundError, match="other config not found"):
        load_model_files(tmp_path, "other")
    (tmp_path / "bad.json").write_text('{"config": {}}')
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors"):
        load_model_files(tmp_path, "bad")
