"""The Triton attention kernels (forward and backward) through the interpreter, against float64.

Every launch writes into outputs filled with NaN first (out, lse, delta, dq, dk, dv, and the fp32 dQ
accumulator of the atomic backward), so a value the kernels forget to write fails the test. Both
backward paths run: dQ added with atomics in the dK/dV kernel, and the deterministic dQ kernel.
Inputs are fresh each run (the ``seed`` fixture prints its seed).
"""

import math
import random
import sys

import pytest
import torch

import kernels
from kernels.attention import (
    CONFIGS,
    Attention,
    AttentionConfig,
    ATOMIC_DQ_MIN_KEYS,
    DETERMINISTIC_ENV,
    BlockConfig,
    _align_rows,
    _rows_aligned,
    attention_backward,
    attention_forward,
    block_d,
    head_dim_chunks,
    pick_config,
    q_splits,
    triton_dtypes,
    use_atomic_dq,
)

# Tolerances, as a fraction of the largest reference value of each output (see assert_close_scaled).
# The reference takes the same rounded inputs, so what remains is the kernel's own rounding:
#  - fp32: the interpreter multiplies exactly and accumulates in fp32 (6e-8 per op over sums of a
#    few hundred terms); dS = P * (dP - delta) cancels, which amplifies that in dq, dk: 1e-4.
#  - fp16 (11-bit significand, 4.9e-4 per rounding): P and dS are rounded to fp16 before their
#    products, and the result once more: 5e-3.
#  - bf16 (8-bit significand, 3.9e-3 per rounding): the same roundings: 3e-2.
# The logsumexp comes out of fp32 scores in every dtype: 1e-5 absolute plus relative.
# The gradients' reference takes delta = rowsum(dO * O) from the kernel's own rounded output O, as
# every FlashAttention backward does (delta is checked against it separately, O against the exact
# output): with the exact O, O's last rounding, summed over D products in delta and then left bare by
# the cancellation in dP - delta, belongs to the algorithm, not to these kernels, and at bf16 it
# broke the tolerance now and then (1 in 300 cases of one query, D = 256: 3.8% of the largest dk).
# The worst errors seen over 200 random cases of the fuzz distribution (both backward paths), as a
# fraction of the largest reference value: fp32 1.4e-5 (dk), fp16 6.6e-4 (dv), bf16 5.3e-3 (dq),
# logsumexp 2.2e-6: each tolerance keeps a margin of 4.5x or more.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
LSE_TOL = 1e-5


def reference(q, k, v, scale, key_lengths, dout, out_for_delta=None):
    """float64 out (B, Nq, H, D), lse (B, H, Nq), dq, dk, dv of softmax(q k^T scale) v: the gradients
    in closed form (test_reference_is_the_exact_gradient), with delta = rowsum(dO * O) taken from
    ``out_for_delta`` when given (a kernel's rounded output, see the tolerances), else exact."""
    q, k, v, do = (t.detach().double() for t in (q, k, v, dout))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Nq, Nk)
    if key_lengths is not None:
        keep = torch.arange(k.shape[1])[None, :] < key_lengths[:, None]  # (B, Nk)
        s = s.masked_fill(~keep[:, None, None, :], -math.inf)
    lse = s.logsumexp(-1)
    p = s.softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    o = out if out_for_delta is None else out_for_delta.double()
    delta = (do * o).sum(-1).transpose(1, 2)[..., None]  # (B, H, Nq, 1)
    ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, v) - delta)  # P * (dO V^T - delta)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    return out, lse, dq, dk, dv


def test_reference_is_the_exact_gradient(seed):
    """The closed-form reference against autograd through softmax, float64, with padded keys."""
    q, k, v = (torch.randn(2, n, 3, 24, dtype=torch.float64) for n in (9, 13, 13))
    lengths, dout = torch.tensor([13, 4]), torch.randn(2, 9, 3, 24, dtype=torch.float64)
    out, _, *grads = reference(q, k, v, 0.3, lengths, dout)
    leaves = tuple(t.requires_grad_() for t in (q, k, v))
    exact = kernels.attention(*leaves, scale=0.3, key_lengths=lengths, backend="torch")
    torch.testing.assert_close(out, exact.detach(), atol=1e-12, rtol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(exact, leaves, dout), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def nan_like(shape, dtype):
    return torch.full(shape, math.nan, dtype=dtype)


def run_kernels(q, k, v, scale, key_lengths, dout, config=None, splits=None, deterministic=None):
    """Forward and backward launchers writing into NaN-filled outputs; returns them and delta.
    The fp32 dQ accumulator is handed over NaN-filled too: the atomic path must zero all of it
    (a NaN left in it reaches dq), the deterministic path must leave it alone."""
    B, Nq, H, D = q.shape
    out, lse = nan_like(q.shape, q.dtype), nan_like((B, H, Nq), torch.float32)
    got_out, got_lse = attention_forward(q, k, v, scale, key_lengths, out=out, lse=lse, config=config)
    assert got_out is out and got_lse is lse, "the launcher must write into the given buffers"
    dq, dk, dv = nan_like(q.shape, q.dtype), nan_like(k.shape, k.dtype), nan_like(v.shape, v.dtype)
    delta, dq_acc = nan_like((B, H, Nq), torch.float32), nan_like(q.shape, torch.float32)
    attention_backward(dout, q, k, v, out, lse, scale, key_lengths, dq=dq, dk=dk, dv=dv, delta=delta,
                       dq_acc=dq_acc, config=config, splits=splits, deterministic=deterministic)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv), ("delta", delta)):
        assert not t.isnan().any(), f"{name}: {int(t.isnan().sum())} of {t.numel()} values never written"
    assert not lse.isnan().any(), "lse: values never written"
    if use_atomic_dq(k.shape[1], deterministic):
        assert torch.equal(dq, dq_acc.to(q.dtype)), "dq is not the accumulator rounded once"
    else:
        assert dq_acc.isnan().all(), "the deterministic path touched the dQ accumulator"
    return out, lse, dq, dk, dv, delta


def assert_close_scaled(name, got, ref, dtype):
    """|got - ref| <= TOL * (max |ref|, at least 1: the inputs are unit normal, so an output that is
    exactly 0, e.g. dq with a single key, is judged on the scale of its inputs) + TOL * |ref|."""
    tol = TOL[dtype]
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(got.double(), ref, atol=tol * max(scale, 1.0), rtol=tol,
                               msg=lambda m: f"{name} ({dtype}): {m}")


def check_against_reference(q, k, v, scale, key_lengths=None, dout=None, config=None, splits=None,
                            deterministic=None):
    if dout is None:
        dout = torch.randn(q.shape).to(q.dtype)
    out, lse, dq, dk, dv, delta = run_kernels(q, k, v, scale, key_lengths, dout, config, splits, deterministic)
    r_out, r_lse, r_dq, r_dk, r_dv = reference(q, k, v, scale, key_lengths, dout, out_for_delta=out)
    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == q.dtype and lse.dtype == torch.float32
    assert_close_scaled("out", out, r_out, q.dtype)
    torch.testing.assert_close(lse.double(), r_lse, atol=LSE_TOL, rtol=LSE_TOL)
    # delta = rowsum(dO * O) of the kernel's own (rounded) output
    r_delta = (dout.double() * out.double()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(delta.double(), r_delta, atol=1e-5 * max(r_delta.abs().max().item(), 1), rtol=1e-5)
    for name, got, ref in (("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)):
        assert_close_scaled(name, got, ref, q.dtype)


def make_qkv(B, Nq, Nk, H, D, dtype, layout):
    """q (B, Nq, H, D), k and v (B, Nk, H, D) in one of the layouts callers hand us."""
    if layout == "contiguous":
        return (torch.randn(B, Nq, H, D).to(dtype), torch.randn(B, Nk, H, D).to(dtype),
                torch.randn(B, Nk, H, D).to(dtype))
    if layout == "fused_qkv":  # views out of one (B, N, 3 * H * D) projection; self-attention only
        assert Nq == Nk
        q, k, v = torch.randn(B, Nq, 3 * H * D).to(dtype).view(B, Nq, 3, H, D).unbind(2)
        return q, k, v
    if layout == "heads_first":  # (B, H, N, D) tensors viewed as (B, N, H, D)
        return (torch.randn(B, H, Nq, D).to(dtype).transpose(1, 2), torch.randn(B, H, Nk, D).to(dtype).transpose(1, 2),
                torch.randn(B, H, Nk, D).to(dtype).transpose(1, 2))
    if layout == "unaligned":  # rows off 16-byte boundaries, and every other element of D: the slow path
        def odd(N):
            return torch.randn(B * N * H * 2 * D + 1).to(dtype)[1:].view(B, N, H, 2 * D)[..., ::2]
        return odd(Nq), odd(Nk), odd(Nk)
    raise ValueError(layout)


# The backward path: None lets the launcher pick (atomics from ATOMIC_DQ_MIN_KEYS keys on), True is
# the dQ kernel, False the atomics at any length.
CASES = [
    # B, Nq, Nk, H, D, dtype, layout, key lengths, deterministic
    (2, 1, 1, 2, 16, torch.float32, "contiguous", None, None),  # one query, one key
    (1, 77, 77, 2, 40, torch.float16, "fused_qkv", None, False),  # SD head dim 40 (32 + 16), 77 keys
    (2, 77, 77, 1, 80, torch.bfloat16, "heads_first", [1, 77], False),  # 80 = 64 + 16, key lengths 1 and full
    (1, 1000, 77, 1, 16, torch.float16, "contiguous", None, None),  # cross-attention, 1000 queries
    (1, 600, 600, 1, 16, torch.bfloat16, "fused_qkv", None, None),  # self-attention N = 600: atomics
    (1, 4097, 77, 1, 16, torch.float32, "contiguous", [40], None),  # 4097 queries against padded text
    (1, 77, 4097, 1, 16, torch.float16, "contiguous", [4000], None),  # 4097 keys, masked near the end: atomics
    (1, 77, 600, 1, 24, torch.bfloat16, "contiguous", [599], True),  # long keys, deterministic asked for
    (2, 65, 33, 2, 64, torch.float32, "heads_first", [33, 5], None),
    (1, 129, 130, 2, 160, torch.float16, "contiguous", [1], False),  # 160 = 128 + 32, a single valid key
    (2, 40, 70, 1, 256, torch.bfloat16, "contiguous", [70, 64], False),  # largest head dim
    (1, 50, 50, 2, 40, torch.float32, "unaligned", [31], False),  # non-unit D stride, rows off 16 bytes
    (1, 31, 45, 1, 72, torch.bfloat16, "unaligned", None, None),  # 72 = 64 + 16, unaligned
    (3, 300, 20, 4, 16, torch.float16, "contiguous", [20, 7, 1], None),  # 12 batch*heads x 3 query blocks
    (2, 67, 45, 1, 512, torch.bfloat16, "contiguous", [45, 30], False),  # the SD VAE's single 512-wide head
    (1, 33, 19, 1, 512, torch.float32, "heads_first", None, True),
    (1, 20, 21, 1, 512, torch.float16, "unaligned", [17], None),
]


@pytest.mark.slow
@pytest.mark.parametrize("B,Nq,Nk,H,D,dtype,layout,lengths,deterministic", CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}x{c[4]}-{str(c[5])[6:]}-{c[6]}-{c[7]}-det{c[8]}"
                              for c in CASES])
def test_kernels_match_float64(seed, B, Nq, Nk, H, D, dtype, layout, lengths, deterministic):
    q, k, v = make_qkv(B, Nq, Nk, H, D, dtype, layout)
    if layout == "unaligned":
        assert not _rows_aligned(q, k, v)
    elif layout != "contiguous" or D % 8 == 0:
        assert _rows_aligned(q, k, v)
    key_lengths = None if lengths is None else torch.tensor(lengths)
    check_against_reference(q, k, v, random.uniform(0.05, 0.3), key_lengths, deterministic=deterministic)


@pytest.mark.parametrize("D,deterministic", [(4, False), (8, True), (16, False), (24, True), (40, True),
                                             (40, False), (64, True), (72, False), (80, True), (80, False),
                                             (96, True), (160, True), (160, False), (200, False), (256, True),
                                             (320, False), (512, True), (512, False)])
def test_head_dims(seed, D, deterministic):
    """Head dims with a tail chunk (40, 72, 80, 96, 160, 320) and without (powers of two; 24 and 200
    fall back to one padded tile; 4 and 8, the CPU demo's, run in a 16-wide one; 512, the SD VAE's),
    every table row, both backward paths, lengths off the block edges."""
    q, k, v = make_qkv(2, 37, 70, 1, D, torch.float16, "contiguous")
    check_against_reference(q, k, v, 1 / math.sqrt(D), torch.tensor([70, 9]), deterministic=deterministic)


ROW_HEAD_DIMS = {16: 8, 64: 40, 96: 72, 128: 100, 256: 136, 512: 512}  # a head dim that each row of CONFIGS serves


def test_every_table_row_on_ragged_lengths(seed):
    """Each config the GPU launches (BM, BN of every row and kernel, both backward paths) at
    lengths that leave partial blocks: a full and a partial block of keys (with atomics, two key
    blocks add into the same dQ rows), of queries in the forward and the dQ kernel."""
    assert set(ROW_HEAD_DIMS) == set(CONFIGS)
    for width, row in CONFIGS.items():
        D = ROW_HEAD_DIMS[width]
        assert pick_config(D) is row
        Nq, Nk = max(row.fwd.block_m, row.dq.block_m) + 3, max(row.dkdv.block_n, row.dkdv_with_dq.block_n) + 5
        q, k, v = make_qkv(1, Nq, Nk, 1, D, torch.bfloat16, "contiguous")
        for deterministic in (True, False):
            check_against_reference(q, k, v, 0.2, torch.tensor([Nk - 2]), deterministic=deterministic)


@pytest.mark.parametrize("splits,deterministic", [(2, False), (3, True)])
def test_split_queries_of_the_dkdv_kernel(seed, splits, deterministic):
    """dK, dV summed over query ranges in fp32 partials (short keys, cross-attention); with atomics,
    dQ is added from every split."""
    q, k, v = make_qkv(2, 200, 77, 2, 40, torch.float16, "contiguous")
    check_against_reference(q, k, v, 0.15, torch.tensor([77, 12]), splits=splits, deterministic=deterministic)


def test_split_partials_are_added_in_fp32(seed):
    """Split and unsplit dK, dV differ only by the order of fp32 additions: after the final
    rounding to bf16 nearly every value is the same (rounding the partials first would change
    about half of them)."""
    q, k, v = make_qkv(1, 256, 40, 2, 32, torch.bfloat16, "contiguous")
    dout = torch.randn(q.shape).to(torch.bfloat16)
    out, lse = attention_forward(q, k, v, 0.2)
    one = attention_backward(dout, q, k, v, out, lse, 0.2, splits=1)
    four = attention_backward(dout, q, k, v, out, lse, 0.2, splits=4)
    for name, a, b in zip(("dq", "dk", "dv"), one, four, strict=True):
        changed = (a != b).float().mean().item()
        assert changed < 0.02, f"{name}: {changed:.1%} of the values change with split queries"


def test_atomic_and_deterministic_dq_agree(seed):
    """The two backward paths sum the same fp32 products in another order: after rounding to bf16
    nearly every value of dq (and of dk, dv, whose query blocks differ in size) is the same."""
    q, k, v = make_qkv(1, 200, 150, 1, 40, torch.bfloat16, "contiguous")
    dout = torch.randn(q.shape).to(torch.bfloat16)
    out, lse = attention_forward(q, k, v, 0.2)
    det = attention_backward(dout, q, k, v, out, lse, 0.2, deterministic=True)
    atomic = attention_backward(dout, q, k, v, out, lse, 0.2, deterministic=False)
    for name, a, b in zip(("dq", "dk", "dv"), det, atomic, strict=True):
        changed = (a != b).float().mean().item()
        assert changed < 0.02, f"{name}: {changed:.1%} of the values differ between the backward paths"


def test_backward_path_policy(monkeypatch):
    monkeypatch.delenv(DETERMINISTIC_ENV, raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    # no preference: atomics from ATOMIC_DQ_MIN_KEYS keys on (self-attention), the dQ kernel below (77 tokens)
    assert not use_atomic_dq(77) and not use_atomic_dq(ATOMIC_DQ_MIN_KEYS - 1)
    assert use_atomic_dq(ATOMIC_DQ_MIN_KEYS) and use_atomic_dq(4096)
    # the argument decides when given
    assert not use_atomic_dq(4096, deterministic=True)
    assert use_atomic_dq(77, deterministic=False)
    # the environment, then PyTorch's switch, when it is not
    monkeypatch.setenv(DETERMINISTIC_ENV, "1")
    assert not use_atomic_dq(4096)
    assert use_atomic_dq(4096, deterministic=False)  # an explicit argument beats the environment
    monkeypatch.setenv(DETERMINISTIC_ENV, "0")
    assert use_atomic_dq(4096)
    monkeypatch.setenv(DETERMINISTIC_ENV, "sometimes")
    with pytest.raises(ValueError, match=DETERMINISTIC_ENV):
        use_atomic_dq(4096)
    monkeypatch.delenv(DETERMINISTIC_ENV)
    torch.use_deterministic_algorithms(True)
    try:
        assert not use_atomic_dq(4096)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("deterministic", [None, True, False])
def test_attention_hands_deterministic_to_the_backward(seed, monkeypatch, deterministic):
    """attention(..., deterministic=...) reaches the launcher through autograd, gradients correct."""
    seen = []
    real = attention_backward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return real(*args, **kwargs)

    module = sys.modules["kernels.attention"]  # the module: kernels.attention is the function
    monkeypatch.setattr(module, "attention_backward", spy)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 20, 600, 1, 16, torch.float32, "contiguous"))
    out = kernels.attention(q, k, v, scale=0.25, backend="triton", deterministic=deterministic)
    dout = torch.randn(q.shape)
    out.backward(dout)
    assert seen == [deterministic]
    _, _, r_dq, r_dk, r_dv = reference(q, k, v, 0.25, None, dout)
    for name, got, ref in (("dq", q.grad, r_dq), ("dk", k.grad, r_dk), ("dv", v.grad, r_dv)):
        assert_close_scaled(name, got, ref, torch.float32)


def test_split_policy():
    # cross-attention against 77 tokens: 1 key block x 16 (batch, head) fills 16 of 132 SMs -> split
    assert q_splits(n_key_blocks=1, n_query_blocks=256, batch_heads=16, sm_count=132) == 9
    # never fewer than MIN_Q_BLOCKS_PER_SPLIT (8) query blocks per program
    assert q_splits(n_key_blocks=1, n_query_blocks=64, batch_heads=16, sm_count=132) == 8
    assert q_splits(n_key_blocks=1, n_query_blocks=16, batch_heads=16, sm_count=132) == 2
    assert q_splits(n_key_blocks=1, n_query_blocks=7, batch_heads=1, sm_count=132) == 1
    # self-attention N = 4096: 32 key blocks x 16 already fill the GPU
    assert q_splits(n_key_blocks=32, n_query_blocks=64, batch_heads=16, sm_count=132) == 1


@pytest.mark.slow
def test_fuzz(seed):
    """At least 50 random cases per run: lengths, head dim (with and without a tail chunk), dtype,
    layout, mask, backward path; forward and backward."""
    rng = random.Random(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    for i in range(50):
        B, H = rng.choice([(1, 1), (2, 1), (1, 2)])  # several batches (key lengths) or heads (strides)
        Nq, Nk = rng.choice([1, 2, 17, 64, 77, 100]), rng.choice([1, 3, 16, 33, 65, 77, 130])
        D = rng.choice([16, 24, 32, 40, 48, 64, 72, 80, 96, 128, 160, 200, 256])
        if D > 128:  # keep the interpreter quick: fewer rows for the widest tiles
            Nq, Nk = min(Nq, 40), min(Nk, 70)
        dtype = rng.choice(dtypes)
        layout = rng.choice(["contiguous", "heads_first", "unaligned"] + (["fused_qkv"] if Nq == Nk else []))
        lengths = torch.tensor([rng.randint(1, Nk) for _ in range(B)]) if rng.random() < 0.5 else None
        deterministic = rng.choice([True, False])  # the lengths here are all below ATOMIC_DQ_MIN_KEYS
        q, k, v = make_qkv(B, Nq, Nk, H, D, dtype, layout)
        dout = torch.randn(B, H, Nq, D).to(dtype).transpose(1, 2)  # a strided output gradient too
        case = (f"case {i}: B={B} Nq={Nq} Nk={Nk} H={H} D={D} {dtype} {layout} lengths={lengths} "
                f"deterministic={deterministic}")
        try:
            check_against_reference(q, k, v, rng.uniform(0.02, 0.5), lengths, dout, deterministic=deterministic)
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from e


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_rounded_like_on_a_gpu(dtype):
    """The interpreter could as well multiply in fp32, so check that the probabilities really are
    rounded to the input dtype before P @ V, as tensor cores need. Half the keys score 0 and carry
    v = -1, the other half score -1 and carry v = 2, and the scale puts the probability p of the
    second half just above 0.5, where rounding to the dtype drops 0.4 of a spacing. Exactly, the
    output is (2p - 1) / (1 + p) > 0; with P rounded to 0.5 it is exactly 0."""
    B, Nq, Nk, H, D = 1, 16, 60, 1, 16  # one block of keys: one softmax pass, no rescaling
    assert Nk <= CONFIGS[16].fwd.block_n == CONFIGS[64].fwd.block_n
    spacing = torch.finfo(dtype).eps / 2  # between representable values in [0.5, 1)
    p = 0.5 + 0.4 * spacing
    q, k, v = (torch.zeros(B, n, H, D, dtype=dtype) for n in (Nq, Nk, Nk))
    q[..., 0] = 1.0
    k[:, Nk // 2:, :, 0] = -1.0
    v[:, :Nk // 2] = -1.0
    v[:, Nk // 2:] = 2.0
    out, _ = attention_forward(q, k, v, -math.log(p), out=nan_like(q.shape, dtype),
                               lse=nan_like((B, H, Nq), torch.float32))
    exact = torch.tensor((2 * p - 1) / (1 + p)).to(dtype)
    assert exact > 0 and out.dtype == dtype
    assert (out == 0).all(), f"P @ V did not round P to {dtype}: {out.unique()} (unrounded gives {exact})"


@pytest.mark.parametrize("deterministic", [True, False])
def test_batch_without_valid_keys(seed, deterministic):
    """key_lengths[b] = 0: no key gets weight; the output is 0 (as SDPA gives), lse -inf, gradients 0
    (with atomics: no program adds to that batch's dQ, which stays as the preprocess zeroed it)."""
    q, k, v = make_qkv(2, 20, 30, 2, 32, torch.float32, "contiguous")
    lengths = torch.tensor([0, 30])
    dout = torch.randn(q.shape)
    out, lse, dq, dk, dv, _ = run_kernels(q, k, v, 0.2, lengths, dout, deterministic=deterministic)
    assert (out[0] == 0).all() and (lse[0] == -math.inf).all()
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    r_out, r_lse, r_dq, r_dk, r_dv = reference(q[1:], k[1:], v[1:], 0.2, None, dout[1:])
    for got, ref in ((out[1:], r_out), (dq[1:], r_dq), (dk[1:], r_dk), (dv[1:], r_dv)):
        assert_close_scaled("batch 1", got, ref, torch.float32)
    torch.testing.assert_close(out, kernels.attention(q, k, v, scale=0.2, key_lengths=lengths, backend="torch"))


def test_key_lengths_beyond_the_keys_mean_all_keys(seed):
    q, k, v = make_qkv(2, 9, 12, 1, 16, torch.float32, "contiguous")
    out, lse = attention_forward(q, k, v, 0.25, torch.tensor([12, 500]))
    ref, ref_lse = attention_forward(q, k, v, 0.25)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("layout,deterministic", [("fused_qkv", False), ("heads_first", None)])
def test_autograd_through_attention(seed, layout, deterministic):
    """attention(..., backend="triton"): the autograd path, gradients to q, k, v (views of one leaf)."""
    B, N, H, D = 2, 50, 3, 40
    if layout == "fused_qkv":
        leaf = torch.randn(B, N, 3 * H * D, requires_grad=True)
        q, k, v = leaf.view(B, N, 3, H, D).unbind(2)
        leaves = (leaf,)
    else:
        leaves = tuple(torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
        q, k, v = (t.transpose(1, 2) for t in leaves)
    lengths = torch.tensor([N, 17])
    out = kernels.attention(q, k, v, key_lengths=lengths, backend="triton", deterministic=deterministic)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = tuple(t.detach().double().requires_grad_() for t in leaves)
    if layout == "fused_qkv":
        rq, rk, rv = ref_leaves[0].view(B, N, 3, H, D).unbind(2)
    else:
        rq, rk, rv = (t.transpose(1, 2) for t in ref_leaves)
    ref_out = kernels.attention(rq, rk, rv, key_lengths=lengths, backend="torch")
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double())
    assert_close_scaled("out", out, ref_out.detach(), torch.float32)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close_scaled("grad", g, r, torch.float32)


def test_backward_of_a_sum_gets_an_expanded_gradient(seed):
    """out.sum().backward() hands the backward a dO with zero strides: read as any other stride."""
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 30, 45, 2, 16, torch.float32, "contiguous"))
    kernels.attention(q, k, v, key_lengths=torch.tensor([45, 3]), backend="triton").sum().backward()
    _, _, r_dq, r_dk, r_dv = reference(q, k, v, 0.25, torch.tensor([45, 3]), torch.ones(q.shape))
    for name, got, ref in (("dq", q.grad, r_dq), ("dk", k.grad, r_dk), ("dv", v.grad, r_dv)):
        assert_close_scaled(name, got, ref, torch.float32)


def test_attention_module(seed):
    """The Attention module: self (fused QKV projection) and cross (with padded context), float64 check."""
    dim, heads, ctx_dim = 64, 4, 24
    x, ctx = torch.randn(2, 33, dim), torch.randn(2, 77, ctx_dim)
    lengths = torch.tensor([77, 10])
    for layer, args in ((Attention(dim, heads, backend="triton"), (x,)),
                        (Attention(dim, heads, context_dim=ctx_dim, backend="triton"), (x, ctx, lengths))):
        y = layer(*args)
        ref = layer.double()
        ref.backend = "torch"
        expected = ref(*(a.double() if a.is_floating_point() else a for a in args))
        assert y.shape == x.shape
        assert_close_scaled("module", y, expected.detach(), torch.float32)
    assert set(Attention(dim, heads).state_dict()) == {"to_qkv.weight", "to_out.weight", "to_out.bias"}
    with pytest.raises(ValueError, match="needs a context"):
        Attention(dim, heads, context_dim=ctx_dim)(x)
    with pytest.raises(ValueError, match="not divisible"):
        Attention(30, 4)


def test_rows_aligned():
    B, N, H, D = 2, 5, 3, 40
    assert _rows_aligned(torch.randn(B, N, H, D).half())
    assert _rows_aligned(*torch.randn(B, N, 3 * H * D).half().view(B, N, 3, H, D).unbind(2))
    assert not _rows_aligned(torch.randn(B, N, H, 20).half())  # 40-byte rows
    assert not _rows_aligned(torch.randn(B * N * H * D + 1).half()[1:].view(B, N, H, D))  # 2-byte offset
    assert not _rows_aligned(torch.randn(B, N, H, 2 * D)[..., ::2])  # D not contiguous
    assert _rows_aligned(torch.randn(1, 1, 1, 8)[..., :4])  # dims of size 1 are never stepped over


def test_block_d_and_table():
    assert [block_d(d) for d in (1, 16, 17, 40, 64, 80, 128, 160, 256, 320, 512)] == \
        [16, 16, 32, 64, 64, 128, 128, 256, 256, 512, 512]
    # SD 1.x head dims run as a power of two plus a power-of-two tail, as FlashAttention-2's 64, 96, 160 or narrower
    assert [head_dim_chunks(d) for d in (40, 80, 160)] == [(32, 16), (64, 16), (128, 32)]
    # where a tail would be no narrower than one padded tile, one tile: 24 -> 32, 56 -> 64, 100 -> 128, 200 -> 256
    assert [head_dim_chunks(d) for d in (8, 16, 24, 56, 64, 100, 128, 200, 256, 400, 512)] == \
        [(16, 0), (16, 0), (32, 0), (64, 0), (64, 0), (128, 0), (128, 0), (256, 0), (256, 0), (512, 0), (512, 0)]
    assert head_dim_chunks(320) == (256, 64)
    for d in range(1, 513):
        main, tail = head_dim_chunks(d)
        for chunk in (main, tail) if tail else (main,):
            assert chunk >= 16 and chunk & (chunk - 1) == 0, (d, main, tail)
        assert d <= main + tail <= block_d(d), (d, main, tail)
        assert tail == 0 or (main < d and 4 * (main + tail) <= 3 * block_d(d)), (d, main, tail)  # saves >= 1/4
        width = min(w for w in CONFIGS if w >= main + tail)
        assert pick_config(d) is CONFIGS[width]
    assert set(CONFIGS) == {16, 64, 96, 128, 256, 512}
    assert [pick_config(d) for d in (40, 80, 160, 512)] == [CONFIGS[64], CONFIGS[96], CONFIGS[256], CONFIGS[512]]


def test_unaligned_rows_are_copied_where_that_aligns_them():
    """A view whose rows are off 16 bytes is copied to contiguous rows when D * itemsize allows
    alignment (the kernels then take their aligned build); aligned tensors and rows that no layout
    aligns (D = 4 in fp16: 8 bytes) are passed as they are."""
    q, k, v = make_qkv(1, 9, 9, 2, 40, torch.bfloat16, "unaligned")
    assert not _rows_aligned(q) and not _rows_aligned(k, v)
    copies = _align_rows(q, k, v)
    assert _rows_aligned(*copies) and all(torch.equal(a, b) for a, b in zip(copies, (q, k, v)))
    for layout, D in (("fused_qkv", 40), ("contiguous", 4)):
        ts = make_qkv(1, 9, 9, 2, D, torch.float16, layout)
        assert all(a is b for a, b in zip(_align_rows(*ts), ts))
    assert not _rows_aligned(*make_qkv(1, 9, 9, 2, 4, torch.float16, "contiguous"))


def test_triton_dtypes():
    assert triton_dtypes(torch.device("cuda")) == (torch.float16, torch.bfloat16)
    assert torch.float32 in triton_dtypes(torch.device("cpu"))


def test_bad_launcher_calls():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="float64"):
        kernels.attention(q.double(), q.double(), q.double(), backend="triton")
    with pytest.raises(ValueError, match=r"out must be torch.float32 of shape \(1, 8, 2, 16\)"):
        attention_forward(q, q, q, 0.1, out=torch.empty(1, 8, 2, 8))
    with pytest.raises(ValueError, match="lse .* must be contiguous"):
        attention_forward(q, q, q, 0.1, lse=torch.empty(1, 8, 2).transpose(1, 2))
    out, lse = attention_forward(q, q, q, 0.1)
    with pytest.raises(ValueError, match="dout must be"):
        attention_backward(torch.randn(1, 8, 2, 8), q, q, q, out, lse, 0.1)
    with pytest.raises(ValueError, match="lse must be"):
        attention_backward(torch.randn_like(q), q, q, q, out, lse[:, :1], 0.1)
    # a (batch, head) slice that spans more than 2**31 elements (meta tensors: no memory)
    huge = torch.empty_strided((1, 2, 1, 16), (1, 2**31, 1, 1), device="meta")
    with pytest.raises(ValueError, match="spans more than 2\\*\\*31"):
        attention_forward(huge, huge, huge, 0.1)


def test_config_override_is_used(seed):
    """A config given to the launchers replaces the table (the tests run GPU configs through it)."""
    q, k, v = make_qkv(1, 40, 40, 1, 16, torch.float32, "contiguous")
    tiny = AttentionConfig(BlockConfig(16, 16, 1, 1), BlockConfig(16, 16, 1, 1), BlockConfig(16, 16, 1, 1))
    check_against_reference(q, k, v, 0.3, torch.tensor([23]), config=tiny)
