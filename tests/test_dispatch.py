"""The dispatch layer and the PyTorch paths of both kernels, against float64 references."""

import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import dispatch
from kernels.dispatch import requested_backend, resolve_backend


def attention_ref(q, k, v, scale, key_lengths=None):
    """float64 softmax(q k^T scale) v, q (B, Nq, H, D)."""
    q, k, v = (t.double() for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if key_lengths is not None:
        keep = torch.arange(k.shape[1])[None, :] < key_lengths[:, None]  # (B, Nk)
        s = s.masked_fill(~keep[:, None, None, :], -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def test_auto_picks_torch_on_cpu(monkeypatch):
    for var in ("LDM_BACKEND", "LDM_ATTENTION_BACKEND", "LDM_GROUPNORM_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    x = torch.zeros(1)
    assert resolve_backend("attention", "auto", x) == "torch"
    assert resolve_backend("groupnorm", "auto", x) == "torch"


def test_environment_and_context_precedence(monkeypatch):
    monkeypatch.setenv("LDM_BACKEND", "torch")
    monkeypatch.setenv("LDM_ATTENTION_BACKEND", "triton")
    assert requested_backend("attention") == "triton"  # per-op variable beats the global one
    assert requested_backend("groupnorm") == "torch"
    with kernels.use_backend("torch", ops=("attention",)):
        assert requested_backend("attention") == "torch"  # a use_backend block beats the environment
        assert requested_backend("attention", "triton") == "triton"  # an explicit argument beats all
    assert requested_backend("attention") == "triton"  # restored after the block
    monkeypatch.setenv("LDM_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="LDM_BACKEND"):
        requested_backend("groupnorm")


def fake_cuda(monkeypatch):
    """Make dispatch see every tensor as a CUDA tensor (this machine has no GPU): the decision is
    then the one a GPU gets, on CPU tensors of the same shape and dtype."""
    monkeypatch.setattr(dispatch, "_on_cuda", lambda tensors: True)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)


def qkv(D, dtype, N=5, H=1):
    return tuple(torch.zeros(2, N, H, D, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("D,dtype", [
    (40, torch.bfloat16), (80, torch.float16), (160, torch.bfloat16), (512, torch.bfloat16), (4, torch.float16),
    (40, torch.float32), (640, torch.bfloat16), (64, torch.float64),
])
def test_auto_on_a_gpu_runs_sdpa_for_attention(monkeypatch, D, dtype):
    """SDPA measured faster than our attention at every SD shape on an H200: auto never picks ours,
    while a forced backend still can (the next test's refusals aside)."""
    for var in ("LDM_BACKEND", "LDM_ATTENTION_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    fake_cuda(monkeypatch)
    q, k, v = qkv(D, dtype)
    assert resolve_backend("attention", "auto", q, k, v) == "torch"
    if dtype in (torch.float16, torch.bfloat16) and D <= 512:
        assert resolve_backend("attention", "triton", q, k, v) == "triton"


def big(dtype=torch.bfloat16, extra=0):
    """A (1, 128, H, 512) tensor of GROUPNORM_AUTO_MIN_ELEMENTS + extra * 128 * 512 elements, without
    the memory (expanded from one element: dispatch reads sizes only)."""
    n = dispatch.GROUPNORM_AUTO_MIN_ELEMENTS // (128 * 512) + extra
    return torch.zeros(1, 1, 1, 1, dtype=dtype).expand(1, 128, n, 512)


@pytest.mark.parametrize("x,expected", [
    (big(), "triton"), (big(torch.float32, extra=1), "triton"), (big(torch.float16), "triton"),
    (big(extra=-1), "torch"),  # one row under the measured threshold
    (torch.zeros(2, 8, 3, 3, dtype=torch.bfloat16), "torch"),  # launch cost, not bandwidth, at this size
    (big(torch.float64), "torch"), (torch.zeros(0, 8, 3, 3), "torch"),
])
def test_auto_on_a_gpu_decides_group_norm_by_dtype_and_size(monkeypatch, x, expected):
    for var in ("LDM_BACKEND", "LDM_GROUPNORM_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    fake_cuda(monkeypatch)
    assert resolve_backend("groupnorm", "auto", x, torch.ones(128)) == expected


@pytest.mark.parametrize("op,tensors,message", [
    ("attention", qkv(640, torch.bfloat16), r"^attention: backend 'triton' takes head dims up to 512, got 640 "
                                             r"for q \(2x5x1x640\); use backend='torch'$"),
    ("attention", qkv(64, torch.float32), r"^attention: backend 'triton' takes float16, bfloat16 on cuda, got "
                                           r"torch.float32 for q \(2x5x1x64\); use backend='torch'$"),
    ("groupnorm", (torch.zeros(2, 8, 3, 3, dtype=torch.float64),),
     r"^groupnorm: backend 'triton' takes float16, bfloat16 or float32, got torch.float64 for x \(2x8x3x3\)"),
    ("groupnorm", (torch.zeros(2, 0, 3, 3),), r"takes no empty x \(2x0x3x3\)"),
])
def test_forced_triton_refuses_what_it_cannot_take_in_one_line(monkeypatch, op, tensors, message):
    fake_cuda(monkeypatch)
    with pytest.raises(ValueError, match=message) as info:
        resolve_backend(op, "triton", *tensors)
    assert "\n" not in str(info.value)


def test_forced_triton_through_the_interpreter_takes_fp32_but_not_a_wider_head():
    """On the CPU (TRITON_INTERPRET=1 in the tests) the interpreter takes fp32 too; the head-dim
    limit is the same as on a GPU, and the op raises what dispatch says before any launch."""
    assert resolve_backend("attention", "triton", *qkv(512, torch.float32)) == "triton"
    with pytest.raises(ValueError, match="head dims up to 512"):
        kernels.attention(*qkv(520, torch.float32), backend="triton")
    with pytest.raises(ValueError, match="float64"):
        kernels.group_norm(torch.zeros(2, 8, 3, 3, dtype=torch.float64), 2, backend="triton")
    # PyTorch's path takes any head dim
    q = torch.randn(1, 3, 1, 600)
    torch.testing.assert_close(kernels.attention(q, q, q, backend="torch").double(),
                               attention_ref(q, q, q, 600 ** -0.5), atol=1e-5, rtol=1e-5)


def test_the_ops_run_what_dispatch_returns(monkeypatch, seed):
    """attention() and group_norm() hold no rule of their own: whatever resolve_backend names runs."""
    seen = []

    def pick(op, backend, *tensors):
        seen.append(op)
        return "torch"

    for module in ("kernels.attention", "kernels.groupnorm"):
        monkeypatch.setattr(sys.modules[module], "resolve_backend", pick)
    q = torch.randn(1, 4, 2, 8)
    out = kernels.attention(q, q, q, backend="triton")  # forced, yet dispatch (here: the spy) decides
    assert out.grad_fn is None or "Attention" not in type(out.grad_fn).__name__
    kernels.group_norm(torch.randn(1, 4, 2, 2), 2, backend="triton")
    assert seen == ["attention", "groupnorm"]


def test_bad_backend_names_and_unavailable_backends():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("attention", "cudnn", x)
    with pytest.raises(ValueError, match="unknown op"):
        resolve_backend("softmax", "auto", x)
    if not kernels.xformers_available():
        with pytest.raises(RuntimeError, match="xformers"):
            resolve_backend("attention", "xformers", x)


@pytest.mark.parametrize("Nq,Nk,H,D,masked", [(1, 1, 1, 16, False), (77, 77, 2, 40, False),
                                              (33, 77, 3, 80, True), (64, 5, 1, 160, True)])
def test_torch_attention_matches_float64(seed, Nq, Nk, H, D, masked):
    B = 3
    q, k, v = torch.randn(B, Nq, H, D), torch.randn(B, Nk, H, D), torch.randn(B, Nk, H, D)
    lengths = torch.randint(1, Nk + 1, (B,)) if masked else None
    out = kernels.attention(q, k, v, key_lengths=lengths, backend="torch")
    assert out.shape == (B, Nq, H, D)
    ref = attention_ref(q, k, v, 1 / math.sqrt(D), lengths)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_attention_accepts_strided_views_of_a_fused_projection(seed):
    B, N, H, D = 2, 19, 4, 24
    qkv = torch.randn(B, N, 3 * H * D)
    q, k, v = qkv.view(B, N, 3, H, D).unbind(2)  # (B, N, H, D) views, no copies
    assert not q.is_contiguous()
    out = kernels.attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out.double(), attention_ref(q, k, v, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: (torch.randn(2, 4, 2, 8), torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8)), "batch"),
    (lambda: (torch.randn(2, 4, 2, 8), torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)), "heads"),
    (lambda: (torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 16), torch.randn(2, 4, 2, 16)), "head dim"),
    (lambda: (torch.randn(1, 4, 1, 1024), torch.randn(1, 4, 1, 1024), torch.randn(1, 4, 1, 1024)),
     "head dims up to 512, got 1024 for q \\(1x4x1x1024\\)"),
    (lambda: (torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8).half(), torch.randn(1, 4, 1, 8)), "dtype"),
    (lambda: (torch.randn(4, 1, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8)), "4-D"),
    (lambda: (torch.randn(1, 4, 1, 8), torch.randn(1, 5, 1, 8), torch.randn(1, 6, 1, 8)), "same shape"),
])
def test_attention_bad_calls_name_the_tensors(make, message):
    """Shape errors raise whatever the backend; the head-dim limit is the Triton kernels' (forced here:
    the tests run Triton through its interpreter), PyTorch's path takes any head dim."""
    q, k, v = make()
    with pytest.raises(ValueError, match=message):
        kernels.attention(q, k, v, backend="triton")


def test_attention_bad_key_lengths():
    q = torch.randn(2, 4, 1, 8)
    with pytest.raises(ValueError, match="key_lengths must have shape"):
        kernels.attention(q, q, q, key_lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integers"):
        kernels.attention(q, q, q, key_lengths=torch.tensor([1.0, 2.0]))


def groupnorm_ref(x, G, w, b, eps, silu, shift=None):
    x = x.double()
    if shift is not None:
        x = x + shift.double()[:, :, None, None]
    y = F.group_norm(x, G, w.double(), b.double(), eps)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("B,C,G,H,W", [(2, 20, 2, 7, 9), (1, 320, 32, 1, 1), (3, 40, 1, 4, 4)])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_group_norm_matches_float64(seed, B, C, G, H, W, silu, channels_last):
    x = torch.randn(B, C, H, W) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b, shift = torch.randn(C), torch.randn(C), torch.randn(B, C)
    y = kernels.group_norm(x, G, w, b, 1e-5, silu=silu, shift=shift, backend="torch")
    torch.testing.assert_close(y.double(), groupnorm_ref(x, G, w, b, 1e-5, silu, shift), atol=1e-5, rtol=1e-5)


def test_group_norm_module_shares_nn_groupnorm_state_dict(seed):
    ref = nn.GroupNorm(8, 32)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    ours = kernels.GroupNormSiLU(8, 32, silu=False)
    ours.load_state_dict(ref.state_dict())
    assert set(ours.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(ours(x), ref(x))
    ref.load_state_dict(kernels.GroupNormSiLU(8, 32).state_dict())  # and the other way round


@pytest.mark.parametrize("call, message", [
    (lambda: kernels.group_norm(torch.randn(2, 30, 4, 4), 4), "not divisible"),
    (lambda: kernels.group_norm(torch.randn(2, 32, 4, 4), 4, torch.ones(16)), "weight must have shape"),
    (lambda: kernels.group_norm(torch.ones(2, 32, 4, 4, dtype=torch.int32), 4), "floating point"),
    (lambda: kernels.group_norm(torch.randn(2, 32, 4, 4), 4, shift=torch.randn(32)), "shift must have shape"),
    (lambda: kernels.GroupNormSiLU(5, 32), "not divisible"),
])
def test_group_norm_bad_calls(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("Nk", [77, 8, 1, 13])
def test_xformers_key_bias_rows_are_aligned(seed, Nk):
    """The bias for padded keys: (B, H, Nq, Nk) with rows on multiples of 8 elements (a view of a
    padded buffer, as xformers requires), 0 for valid keys and -inf for padded ones."""
    from kernels.attention import XFORMERS_BIAS_ALIGN, xformers_key_bias

    B, H, Nq = 3, 2, 5
    lengths = torch.randint(1, Nk + 1, (B,))
    bias = xformers_key_bias(lengths, B, H, Nq, Nk, torch.float16, "cpu")
    assert bias.shape == (B, H, Nq, Nk) and bias.dtype == torch.float16 and bias.stride(-1) == 1
    padded = -(-Nk // XFORMERS_BIAS_ALIGN) * XFORMERS_BIAS_ALIGN
    assert bias.stride() == (H * Nq * padded, Nq * padded, padded, 1)
    assert all(s % XFORMERS_BIAS_ALIGN == 0 for s in bias.stride()[:-1])
    assert bias.data_ptr() % 16 == 0
    keep = torch.arange(Nk)[None, :] < lengths[:, None]  # (B, Nk)
    expected = torch.where(keep, 0.0, -math.inf)[:, None, None, :].expand(B, H, Nq, Nk)
    assert torch.equal(bias.float(), expected)


def test_xformers_path_hands_an_aligned_bias(seed, monkeypatch):
    """With a stand-in for xformers.ops that checks the bias as xformers does (rows aligned to 8) and
    computes attention in float64, the xformers path equals the reference (xformers is not installed
    here and has no CPU kernels)."""
    import types

    from kernels.attention import XFORMERS_BIAS_ALIGN, _attention_xformers

    seen = []

    def memory_efficient_attention(q, k, v, attn_bias=None, scale=None):
        assert attn_bias.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        assert attn_bias.stride(-2) % XFORMERS_BIAS_ALIGN == 0, f"unaligned bias strides {attn_bias.stride()}"
        seen.append(attn_bias.stride())
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale + attn_bias.double()
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double()).to(q.dtype)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    q, k, v = torch.randn(2, 9, 2, 16), torch.randn(2, 77, 2, 16), torch.randn(2, 77, 2, 16)
    lengths = torch.tensor([77, 12])
    out = _attention_xformers(q, k, v, 0.25, lengths)
    assert seen == [(2 * 9 * 80, 9 * 80, 80, 1)]
    torch.testing.assert_close(out.double(), attention_ref(q, k, v, 0.25, lengths), atol=1e-5, rtol=1e-5)
