"""Every kernel config compiles for sm_80 and sm_90 without spills; matmul kernels use tensor cores.

Runs `python -m kernels.inspect --core` in a process without TRITON_INTERPRET (under the interpreter,
@triton.jit functions cannot be compiled for a GPU): the representative subset, about 130 cubins, a few
minutes here. `python -m kernels.inspect` without --core builds every specialization the models reach
(about 440 cubins, ~10 minutes on two loaded cores); the tests below check, without compiling, that the
spec list holds every one of them."""

import json
import os
import subprocess
import sys

import pytest

from kernels.dispatch import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
pytestmark = [needs_triton]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "table.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "kernels.inspect", "--core", "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    print(run.stdout[-4000:], run.stderr[-4000:])
    assert out.exists(), run.stderr
    return run.returncode, json.loads(out.read_text())


@pytest.mark.slow
def test_every_kernel_of_both_families_is_built_for_both_archs(table):
    _, rows = table
    kernels = {r["kernel"] for r in rows}
    assert any(k.startswith("attn_") for k in kernels) and any(k.startswith("gn_") for k in kernels), kernels
    for k in kernels:
        assert {r["arch"] for r in rows if r["kernel"] == k} == {80, 90}, k


@pytest.mark.slow
def test_no_config_spills(table):
    _, rows = table
    spills = [(r["kernel"], r["config"], r["arch"], r["local_bytes"]) for r in rows if r["local_bytes"] > 0]
    assert not spills


@pytest.mark.slow
def test_matmul_kernels_use_tensor_cores(table):
    _, rows = table
    dots = [r for r in rows if r["uses_dot"]]
    assert dots, "no kernel declares a matmul"
    missing = [(r["kernel"], r["config"], r["arch"]) for r in dots if r["hmma"] + r["hgmma"] == 0]
    assert not missing
    # Hopper builds of the attention forward use warpgroup MMA (wgmma -> HGMMA).
    assert any(r["hgmma"] > 0 for r in dots if r["arch"] == 90 and r["kernel"].startswith("attn_fwd"))


@pytest.mark.slow
def test_cli_exit_status_reflects_the_table(table):
    code, rows = table
    assert code == (0 if all(r["ok"] for r in rows) else 1)


def _specs(prefix):
    from kernels.aot import all_specs  # the spec lists only, nothing compiled (works under the interpreter)

    return [s for s in all_specs() if s.kernel.startswith(prefix)]


ATTENTION_KERNELS = {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dkdv_split", "attn_bwd_dkdv_atomic",
                     "attn_bwd_dkdv_split_atomic", "attn_bwd_dq"}


def test_attention_specs_cover_every_specialization_the_models_reach():
    """Each model head dim (tiny UNet 4, 8; small 32, 64; SD 40, 80, 160; VAE 64, 256, 512), with key
    lengths off and (cross-attention) on, aligned where the rows can be, with every kernel; the
    preprocess with and without zeroing the dQ accumulator."""
    from kernels.attention import MODEL_HEAD_DIMS, _can_align

    assert set(MODEL_HEAD_DIMS) == {4, 8, 32, 40, 64, 80, 160, 256, 512}
    built = {}
    for s in _specs("attn_"):
        c = s.constexprs
        if s.kernel == "attn_bwd_preprocess":
            built.setdefault(("pre", c["HEAD_DIM"], c["ALIGNED"]), set()).add(c["ZERO_DQ_ACC"])
        elif s.config.startswith("bf16"):
            built.setdefault((c["HEAD_DIM"], c["HAS_KEY_LENGTHS"], c["ALIGNED"]), set()).add(s.kernel)
    for D, cross in MODEL_HEAD_DIMS.items():
        for kl in (False, True) if cross else (False,):
            assert built.get((D, kl, _can_align(D))) == ATTENTION_KERNELS, (D, kl)
        assert built.get(("pre", D, _can_align(D))) == {True, False}, D
    assert not _can_align(4) and _can_align(8)  # D = 4 runs unaligned, every other model head dim aligned


def test_attention_specs_build_every_row_of_the_table():
    from kernels.attention import CONFIGS, pick_config

    rows = {id(pick_config(s.constexprs["HEAD_DIM"])) for s in _specs("attn_") if s.kernel != "attn_bwd_preprocess"}
    assert rows == {id(r) for r in CONFIGS.values()}


def test_group_norm_specs_cover_every_flag_and_layout():
    """SiLU on / off x shift on / off x NCHW / channels_last x whole / split groups, forward and
    backward (and the statistics kernels of the split path), in bf16 and fp32."""
    built = {(s.kernel, s.constexprs.get("SILU"), s.constexprs.get("HAS_SHIFT"), s.constexprs.get("CHANNELS_LAST"),
              s.constexprs.get("SPLIT"), s.signature.get("X")) for s in _specs("gn_")}
    for dtype in ("*bf16", "*fp32"):
        for silu in (True, False):
            for shift in (True, False):
                for cl in (True, False):
                    for split in (True, False):
                        for kernel in ("gn_fwd", "gn_bwd"):
                            assert (kernel, silu, shift, cl, split, dtype) in built, (kernel, silu, shift, cl, split)
                        if split:
                            assert ("gn_bwd_stats", silu, shift, cl, None, dtype) in built
                    assert ("gn_fwd_stats", None, shift, cl, None, dtype) in built
    assert {s.constexprs["HAS_SHIFT"] for s in _specs("gn_bwd_reduce")} == {True, False}


def test_core_is_a_subset_that_still_builds_every_kernel_and_row():
    from kernels.attention import CONFIGS, pick_config

    core = [s for s in _specs("") if s.core]
    assert {s.kernel for s in core} == {s.kernel for s in _specs("")}
    rows = {id(pick_config(s.constexprs["HEAD_DIM"])) for s in core if s.kernel.startswith("attn_")
            and s.kernel != "attn_bwd_preprocess"}
    assert rows == {id(r) for r in CONFIGS.values()}
