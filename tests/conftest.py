"""Test session set-up: Triton runs through its CPU interpreter, seeds are fresh and printed."""

import os

# One BLAS thread: the interpreter runs each tile's tl.dot through numpy, and OpenBLAS threads
# spinning against each other on small matrices slow it down by an order of magnitude.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# One intra-op thread per test process (and for the CLIs the tests start): the tensors here are
# small, the suite runs on two pytest-xdist workers, and a second thread per process only stalls.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Must happen before anything imports triton: @triton.jit reads it when a kernel is defined.
os.environ["TRITON_INTERPRET"] = "1"

import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SESSION_SEED = int(os.environ.get("LDM_TEST_SEED", random.SystemRandom().randrange(2**31)))
os.environ["LDM_TEST_SEED"] = str(SESSION_SEED)  # pytest-xdist workers inherit it: one seed per run


def pytest_report_header(config):
    return f"ldm test seed: {SESSION_SEED} (LDM_TEST_SEED={SESSION_SEED} replays this run)"


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test and run, derived from the session seed and the test's id; printed,
    so a failure shows it, and torch's generator is seeded with it."""
    s = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    print(f"seed={s} (session seed {SESSION_SEED})")
    torch.manual_seed(s)
    random.seed(s)
    return s
