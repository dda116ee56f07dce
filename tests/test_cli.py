"""Every entry point answers --help without crashing."""

import subprocess
import sys

import pytest

ENTRY_POINTS = ["ldm.train_vae", "ldm.eval_vae", "ldm.train_unet", "ldm.sample", "ldm.eval_text", "ldm.convert"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
