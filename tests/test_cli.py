"""Every entry point answers --help without crashing."""

import subprocess
import sys

import pytest
from test_layers import COMMANDS

ENTRY_POINTS = sorted(COMMANDS) + ["bench.gpu", "bench.samplers"]  # the layer table's commands, and bench's


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
