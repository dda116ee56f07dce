"""The Triton attention kernels (forward and backward) through the interpreter, against float64.

Every launch writes into outputs filled with NaN first (out, lse, delta, dq, dk, dv), so a value the
kernels forget to write fails the test. Inputs are fresh each run (the ``seed`` fixture prints its seed).
"""

import math
import random

import pytest
import torch

import kernels
from kernels.attention import (
    CONFIGS,
    Attention,
    AttentionConfig,
    BlockConfig,
    _rows_aligned,
    attention_backward,
    attention_forward,
    block_d,
    q_splits,
    triton_dtypes,
)

# Tolerances, as a fraction of the largest reference value of each output (see assert_close_scaled).
# The reference takes the same rounded inputs, so what remains is the kernel's own rounding:
#  - fp32: the interpreter multiplies exactly and accumulates in fp32 (6e-8 per op over sums of a
#    few hundred terms); dS = P * (dP - delta) cancels, which amplifies that in dq, dk: 1e-4.
#  - fp16 (11-bit significand, 4.9e-4 per rounding): P and dS are rounded to fp16 before their
#    products, and the result once more: 5e-3.
#  - bf16 (8-bit significand, 3.9e-3 per rounding): the same roundings: 3e-2.
# The logsumexp comes out of fp32 scores in every dtype: 1e-5 absolute plus relative.
# The worst errors seen over 150 to 230 random cases of the fuzz distribution: fp32 2.5e-5 (dk), fp16
# 1.5e-3 (dk), bf16 1.2e-2 (dk), logsumexp 1.3e-6: each tolerance keeps a margin of 2.5x or more.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
LSE_TOL = 1e-5


def reference(q, k, v, scale, key_lengths, dout):
    """float64 out (B, Nq, H, D), lse (B, H, Nq), dq, dk, dv of softmax(q k^T scale) v."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Nq, Nk)
    if key_lengths is not None:
        keep = torch.arange(k.shape[1])[None, :] < key_lengths[:, None]  # (B, Nk)
        s = s.masked_fill(~keep[:, None, None, :], -math.inf)
    lse = s.logsumexp(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.double())
    return out.detach(), lse.detach(), dq, dk, dv


def nan_like(shape, dtype):
    return torch.full(shape, math.nan, dtype=dtype)


def run_kernels(q, k, v, scale, key_lengths, dout, config=None, splits=None):
    """Forward and backward launchers writing into NaN-filled outputs; returns them and delta."""
    B, Nq, H, D = q.shape
    out, lse = nan_like(q.shape, q.dtype), nan_like((B, H, Nq), torch.float32)
    got_out, got_lse = attention_forward(q, k, v, scale, key_lengths, out=out, lse=lse, config=config)
    assert got_out is out and got_lse is lse, "the launcher must write into the given buffers"
    dq, dk, dv = nan_like(q.shape, q.dtype), nan_like(k.shape, k.dtype), nan_like(v.shape, v.dtype)
    delta = nan_like((B, H, Nq), torch.float32)
    attention_backward(dout, q, k, v, out, lse, scale, key_lengths, dq=dq, dk=dk, dv=dv, delta=delta,
                       config=config, splits=splits)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv), ("delta", delta)):
        assert not t.isnan().any(), f"{name}: {int(t.isnan().sum())} of {t.numel()} values never written"
    assert not lse.isnan().any(), "lse: values never written"
    return out, lse, dq, dk, dv, delta


def assert_close_scaled(name, got, ref, dtype):
    """|got - ref| <= TOL * (max |ref|, at least 1: the inputs are unit normal, so an output that is
    exactly 0, e.g. dq with a single key, is judged on the scale of its inputs) + TOL * |ref|."""
    tol = TOL[dtype]
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(got.double(), ref, atol=tol * max(scale, 1.0), rtol=tol,
                               msg=lambda m: f"{name} ({dtype}): {m}")


def check_against_reference(q, k, v, scale, key_lengths=None, dout=None, config=None, splits=None):
    if dout is None:
        dout = torch.randn(q.shape).to(q.dtype)
    out, lse, dq, dk, dv, delta = run_kernels(q, k, v, scale, key_lengths, dout, config, splits)
    r_out, r_lse, r_dq, r_dk, r_dv = reference(q, k, v, scale, key_lengths, dout)
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


CASES = [
    # B, Nq, Nk, H, D, dtype, layout, key lengths
    (2, 1, 1, 2, 16, torch.float32, "contiguous", None),  # one query, one key
    (1, 77, 77, 2, 40, torch.float16, "fused_qkv", None),  # SD head dim 40, 77 = not a block multiple
    (2, 77, 77, 1, 80, torch.bfloat16, "heads_first", [1, 77]),  # key lengths 1 and full
    (1, 1000, 77, 1, 16, torch.float16, "contiguous", None),  # cross-attention, 1000 queries
    (1, 1000, 1000, 1, 16, torch.bfloat16, "fused_qkv", None),  # self-attention N = 1000
    (1, 4097, 77, 1, 16, torch.float32, "contiguous", [40]),  # 4097 queries against padded text
    (1, 77, 4097, 1, 16, torch.float16, "contiguous", [4000]),  # 4097 keys, masked near the end
    (2, 65, 33, 2, 64, torch.float32, "heads_first", [33, 5]),
    (1, 129, 130, 2, 160, torch.float16, "contiguous", [1]),  # SD head dim 160, a single valid key
    (2, 40, 70, 1, 256, torch.bfloat16, "contiguous", [70, 64]),  # largest head dim
    (1, 50, 50, 2, 40, torch.float32, "unaligned", [31]),  # non-unit D stride, rows off 16 bytes
    (1, 31, 45, 1, 24, torch.bfloat16, "unaligned", None),
    (3, 300, 20, 4, 16, torch.float16, "contiguous", [20, 7, 1]),  # 12 batch*heads x 3 query blocks
]


@pytest.mark.slow
@pytest.mark.parametrize("B,Nq,Nk,H,D,dtype,layout,lengths", CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}x{c[4]}-{str(c[5])[6:]}-{c[6]}-{c[7]}" for c in CASES])
def test_kernels_match_float64(seed, B, Nq, Nk, H, D, dtype, layout, lengths):
    q, k, v = make_qkv(B, Nq, Nk, H, D, dtype, layout)
    if layout == "unaligned":
        assert not _rows_aligned(q, k, v)
    elif layout != "contiguous" or D % 8 == 0:
        assert _rows_aligned(q, k, v)
    key_lengths = None if lengths is None else torch.tensor(lengths)
    check_against_reference(q, k, v, random.uniform(0.05, 0.3), key_lengths)


@pytest.mark.parametrize("D", [16, 40, 64, 80, 160, 256])
def test_head_dims(seed, D):
    """Every head dim the UNet uses, each table row, lengths off the block edges."""
    q, k, v = make_qkv(2, 37, 70, 2, D, torch.float16, "contiguous")
    check_against_reference(q, k, v, 1 / math.sqrt(D), torch.tensor([70, 9]))


def test_every_table_row_on_ragged_lengths(seed):
    """Each config the GPU launches (BM, BN of every row) at lengths that leave partial blocks."""
    for bd, row in CONFIGS.items():
        D = max(16, bd // 2 + 8)  # a head dim that pads into this row's tile
        Nq, Nk = row.fwd.block_m + 3, 2 * row.dkdv.block_n + 5
        q, k, v = make_qkv(1, Nq, Nk, 1, D, torch.bfloat16, "contiguous")
        check_against_reference(q, k, v, 0.2, torch.tensor([Nk - 2]))


@pytest.mark.parametrize("splits", [2, 3])
def test_split_queries_of_the_dkdv_kernel(seed, splits):
    """dK, dV summed over query ranges in fp32 partials (short keys, cross-attention)."""
    q, k, v = make_qkv(2, 200, 77, 2, 40, torch.float16, "contiguous")
    check_against_reference(q, k, v, 0.15, torch.tensor([77, 12]), splits=splits)


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
    """At least 50 random cases per run: lengths, head dim, dtype, layout, mask; forward and backward."""
    rng = random.Random(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    for i in range(50):
        B, H = rng.randint(1, 2), rng.randint(1, 2)
        Nq, Nk = rng.choice([1, 2, 17, 64, 77, 100]), rng.choice([1, 3, 16, 33, 65, 77, 130])
        D = rng.choice([16, 24, 32, 40, 48, 64, 72, 80, 96, 128, 160, 256])
        if D > 128:  # keep the interpreter quick: fewer rows for the widest tiles
            Nq, Nk = min(Nq, 40), min(Nk, 70)
        dtype = rng.choice(dtypes)
        layout = rng.choice(["contiguous", "heads_first", "unaligned"] + (["fused_qkv"] if Nq == Nk else []))
        lengths = torch.tensor([rng.randint(1, Nk) for _ in range(B)]) if rng.random() < 0.5 else None
        q, k, v = make_qkv(B, Nq, Nk, H, D, dtype, layout)
        dout = torch.randn(B, H, Nq, D).to(dtype).transpose(1, 2)  # a strided output gradient too
        case = f"case {i}: B={B} Nq={Nq} Nk={Nk} H={H} D={D} {dtype} {layout} lengths={lengths}"
        try:
            check_against_reference(q, k, v, rng.uniform(0.02, 0.5), lengths, dout)
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
    assert Nk <= CONFIGS[64].fwd.block_n
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


def test_batch_without_valid_keys(seed):
    """key_lengths[b] = 0: no key gets weight; the output is 0 (as SDPA gives), lse -inf, gradients 0."""
    q, k, v = make_qkv(2, 20, 30, 2, 32, torch.float32, "contiguous")
    lengths = torch.tensor([0, 30])
    dout = torch.randn(q.shape)
    out, lse, dq, dk, dv, _ = run_kernels(q, k, v, 0.2, lengths, dout)
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


@pytest.mark.parametrize("layout", ["fused_qkv", "heads_first"])
def test_autograd_through_attention(seed, layout):
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
    out = kernels.attention(q, k, v, key_lengths=lengths, backend="triton")
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
    assert [block_d(d) for d in (1, 16, 17, 40, 64, 80, 128, 160, 256)] == [16, 16, 32, 64, 64, 128, 128, 256, 256]
    assert set(CONFIGS) == {64, 128, 256}


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
