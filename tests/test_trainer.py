"""The shared training scaffold: exact flags, resume to a restored config, the learning rate."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from ldm import eval_text, eval_vae, sample, train_unet, train_vae
from ldm.errors import InputError
from ldm.trainer import RunFolder, given_fields, learning_rate
from ldm.unet_training import TrainConfig


@pytest.mark.parametrize("main, argv", [
    (train_unet.main, ["--resume", "--batch", "32"]),  # was silently --batch-size
    (train_vae.main, ["--step", "3"]),
    (sample.main, ["--prompt", "a", "--sampl", "ddim"]),
    (eval_text.main, ["--ste", "3"]),
    (eval_vae.main, ["--ckpt", "x", "--batch", "3"]),
])
def test_abbreviated_flags_are_an_error(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"unrecognized arguments: {argv[-2]}" in capsys.readouterr().err


def test_given_fields_are_exactly_the_typed_flags():
    parser = train_unet.build_parser()
    argv = ["--text", "--batch-size=32", "--lr", "1e-3", "--unet-override", "x=1", "--quiet"]
    assert given_fields(parser, argv) == {"text", "batch_size", "lr", "unet_override", "quiet"}


def fake_checkpoint(folder, saved: dict):
    RunFolder(folder).ckpt.save(5, {"run": {"args": saved}})


def test_resume_restores_the_run_and_kept_fields(tmp_path):
    saved = dataclasses.asdict(TrainConfig(lr=1e-3, batch_size=32, steps=40, threads=1, val_every=7))
    del saved["t_focus"]  # a checkpoint written before the flag existed
    fake_checkpoint(tmp_path, saved)
    typed = TrainConfig(out=str(tmp_path), steps=90, val_every=3, t_focus=0.2)
    restored, step, parts = RunFolder(tmp_path).resume(typed, {"steps", "t_focus"},
                                                       ("lr", "batch_size", "t_focus"), ("steps", "threads",
                                                                                         "val_every"))
    assert step == 5 and parts["run"]["args"] == saved
    assert (restored.lr, restored.batch_size) == (1e-3, 32)  # run fields: the checkpoint's
    assert restored.steps == 90 and restored.threads == 1 and restored.val_every == 7  # typed wins; kept
    assert restored.t_focus == 0.2  # the checkpoint predates it: today's value
    assert typed.lr == TrainConfig().lr  # the given config is not edited in place


def test_resume_refuses_a_changed_run_field_and_a_missing_checkpoint(tmp_path):
    with pytest.raises(InputError, match="--resume: no checkpoint in"):
        RunFolder(tmp_path).resume(TrainConfig(), set(), ("lr",))
    fake_checkpoint(tmp_path, dataclasses.asdict(TrainConfig(batch_size=32)))
    with pytest.raises(InputError, match="--batch-size 16 differs from the checkpoint's 32"):
        RunFolder(tmp_path).resume(TrainConfig(batch_size=16), {"batch_size"}, ("batch_size",))


def test_learning_rate_warms_up_then_holds_or_decays():
    rng = random.Random(0)
    for _ in range(200):
        lr, warmup, total, step = rng.uniform(1e-4, 1e-2), rng.randint(0, 50), rng.randint(2, 500), 0
        step = rng.randint(0, total)
        warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        assert learning_rate(lr, step, warmup=warmup, schedule="constant", total=total) == lr * warm
        cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / (total - 1))))
        for floor in (0.0, 0.1):
            got = learning_rate(lr, step, warmup=warmup, schedule="cosine", total=total, floor=floor)
            assert got == pytest.approx(lr * warm * (floor + (1 - floor) * cos), rel=1e-12)
    assert learning_rate(1.0, 99, warmup=0, schedule="cosine", total=100, floor=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        learning_rate(1.0, 0, warmup=0, schedule="linear", total=10)
