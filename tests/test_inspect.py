"""Every kernel config compiles for sm_80 and sm_90 without spills; matmul kernels use tensor cores.

Runs `python -m kernels.inspect` in a process without TRITON_INTERPRET (under the interpreter,
@triton.jit functions cannot be compiled for a GPU)."""

import json
import os
import subprocess
import sys

import pytest

from kernels.dispatch import triton_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not triton_available(), reason="Triton is not installed")]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "table.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "kernels.inspect", "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    print(run.stdout[-4000:], run.stderr[-4000:])
    assert out.exists(), run.stderr
    return run.returncode, json.loads(out.read_text())


def test_every_kernel_of_both_families_is_built_for_both_archs(table):
    _, rows = table
    kernels = {r["kernel"] for r in rows}
    assert any(k.startswith("attn_") for k in kernels) and any(k.startswith("gn_") for k in kernels), kernels
    for k in kernels:
        assert {r["arch"] for r in rows if r["kernel"] == k} == {80, 90}, k


def test_no_config_spills(table):
    _, rows = table
    spills = [(r["kernel"], r["config"], r["arch"], r["local_bytes"]) for r in rows if r["local_bytes"] > 0]
    assert not spills


def test_matmul_kernels_use_tensor_cores(table):
    _, rows = table
    dots = [r for r in rows if r["uses_dot"]]
    assert dots, "no kernel declares a matmul"
    missing = [(r["kernel"], r["config"], r["arch"]) for r in dots if r["hmma"] + r["hgmma"] == 0]
    assert not missing
    # Hopper builds of the attention forward use warpgroup MMA (wgmma -> HGMMA).
    assert any(r["hgmma"] > 0 for r in dots if r["arch"] == 90 and r["kernel"].startswith("attn_fwd"))


def test_cli_exit_status_reflects_the_table(table):
    code, rows = table
    assert code == (0 if all(r["ok"] for r in rows) else 1)
