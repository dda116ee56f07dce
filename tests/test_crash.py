"""Crash consistency: train_vae killed (SIGKILL, as a power cut) at random points inside its checkpoint
and export writes (``ldm.checkpoint.crash_point``) always resumes from the newest whole checkpoint, with
no traceback, never loads a mixed weights + JSON pair, and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SESSION_SEED
from safetensors.torch import load_file

from ldm.checkpoint import load_model_files

ROOT = Path(__file__).resolve().parents[1]
# two steps, a checkpoint after each, then the export: about 35 crash points
FLAGS = ["--steps", "2", "--batch-size", "4", "--threads", "1", "--quiet", "--resolution", "16", "--ckpt-every", "1",
         "--sample-every", "1"]
POINTS = 20  # random crash points a run


def run(out: Path, *extra: str, crash_at: int | None = None, count: Path | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LDM_CRASH_AT", None)
    if crash_at is not None:
        env["LDM_CRASH_AT"] = str(crash_at)
    if count is not None:
        env["LDM_CRASH_COUNT"] = str(count)
    return subprocess.run([sys.executable, "-m", "ldm.train_vae", "--out", str(out), *FLAGS, *extra], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, and how many crash points it passes."""
    folder = tmp_path_factory.mktemp("crash_ref")
    proc = run(folder / "run", count=folder / "count")
    assert proc.returncode == 0, proc.stderr
    total = int((folder / "count").read_text())
    assert total >= 30, total  # every part, index, rename and pointer of two checkpoints and the export
    points = sorted(random.Random(SESSION_SEED).sample(range(1, total + 1), POINTS))
    return {"weights": load_file(folder / "run" / "vae.safetensors"), "points": points, "total": total}


@pytest.mark.parametrize("k", range(POINTS))
def test_a_kill_inside_any_write_resumes_from_a_whole_checkpoint(reference, tmp_path, k):
    at = reference["points"][k]
    out = tmp_path / "run"
    crashed = run(out, crash_at=at)
    assert crashed.returncode == -9, f"crash point {at} of {reference['total']} was not reached: {crashed.stderr}"
    # what a user would find: a pair that loads is never a mix of two exports
    if (out / "vae.json").is_file() and (out / "vae.safetensors").is_file():
        try:
            load_model_files(out, "vae")
        except ValueError as e:
            assert "come from two different exports" in str(e)
    resumed = run(out, "--resume")
    if resumed.returncode == 2 and "--resume: no checkpoint in" in resumed.stderr:  # killed in the first save
        assert "Traceback" not in resumed.stderr
        resumed = run(out)  # what the message says to do: start without --resume
    assert resumed.returncode == 0, f"crash point {at}: {resumed.stderr}"
    assert "Traceback" not in resumed.stderr
    weights = load_file(out / "vae.safetensors")
    assert weights.keys() == reference["weights"].keys()
    for name, tensor in reference["weights"].items():
        assert weights[name].equal(tensor), f"crash point {at}: {name} differs from the uninterrupted run"
    load_model_files(out, "vae")  # the final pair is one export
