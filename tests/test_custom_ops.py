"""The kernels as torch.library custom ops: schemas, fake implementations and autograd pass
``torch.library.opcheck`` (the real ops run through Triton's interpreter here), and torch.compile
traces whole models through the ops and the dispatch with ``fullgraph=True`` (no graph break),
matching eager."""

import copy

import pytest
import torch
import torch.nn as nn

import kernels
from kernels.attention import Attention
from ldm.unet import UNet, unet_config

# opcheck's four checks: the schema matches what the op does, the autograd registration is
# reachable, the fake implementation gives the real outputs' shapes, dtypes and strides, and
# AOTAutograd (the compile path) with dynamic shapes gives the eager values and gradients.
CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck(op, args):
    result = torch.library.opcheck(op, args, test_utils=CHECKS)
    assert all(v == "SUCCESS" for v in result.values()), result


def qkv(B, Nq, Nk, H, D, dtype, layout, grad=True):
    if layout == "fused_qkv":  # views into one projection: strided, not contiguous
        q, k, v = torch.randn(B, Nq, 3 * H * D).to(dtype).view(B, Nq, 3, H, D).unbind(2)
    elif layout == "heads_first":
        q, k, v = (torch.randn(B, H, n, D).to(dtype).transpose(1, 2) for n in (Nq, Nk, Nk))
    else:
        q, k, v = (torch.randn(B, n, H, D).to(dtype) for n in (Nq, Nk, Nk))
    return tuple(t.detach().requires_grad_(grad) for t in (q, k, v))


@pytest.mark.parametrize("B,Nq,Nk,H,D,dtype,layout,lengths,deterministic", [
    (2, 9, 7, 2, 16, torch.float32, "contiguous", [7, 3], None),  # key lengths
    (1, 11, 11, 3, 40, torch.float32, "fused_qkv", None, True),  # 40 = 32 + 16, strided views
    (2, 5, 13, 1, 80, torch.bfloat16, "heads_first", [13, 1], False),  # atomic dQ
    (1, 4, 6, 1, 512, torch.float32, "contiguous", None, None),  # the VAE's head dim
])
def test_opcheck_attention_ops(seed, B, Nq, Nk, H, D, dtype, layout, lengths, deterministic):
    q, k, v = qkv(B, Nq, Nk, H, D, dtype, layout)
    kl = None if lengths is None else torch.tensor(lengths)
    opcheck(torch.ops.ldm.attention_fwd.default, (q, k, v, 0.3, kl, deterministic))
    out, lse = torch.ops.ldm.attention_fwd(q.detach(), k.detach(), v.detach(), 0.3, kl, deterministic)
    dout = torch.randn(B, H, Nq, D).to(dtype).transpose(1, 2)  # a strided output gradient
    opcheck(torch.ops.ldm.attention_bwd.default,
            (dout, q.detach(), k.detach(), v.detach(), out, lse, 0.3, kl, deterministic))


def gn_inputs(B, C, spatial, dtype, layout, affine=True, shift=True, shift_dtype=None):
    x = torch.randn(B, C, *spatial).to(dtype) * 2 + 1
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":  # neither NCHW nor channels_last: the launcher copies
        x = torch.randn(B, C, *spatial[:-1], 2 * spatial[-1]).to(dtype)[..., ::2]
    w = torch.randn(C) if affine else None
    b = torch.randn(C) if affine else None
    s = torch.randn(B, C).to(shift_dtype or dtype) if shift else None
    return x, w, b, s


@pytest.mark.parametrize("B,C,spatial,G,dtype,layout,affine,shift,shift_dtype,silu,max_tile", [
    (2, 8, (3, 5), 2, torch.float32, "contiguous", True, True, None, True, 4096),  # whole groups
    (2, 8, (3, 5), 4, torch.float32, "channels_last", False, False, None, False, 16),  # split, no affine
    (1, 6, (7,), 3, torch.float32, "contiguous", True, False, None, True, 4),  # 1-D, split
    (2, 4, (3, 4), 2, torch.float16, "strided", True, True, torch.float32, True, 4096),  # promoted to fp32
])
def test_opcheck_group_norm_ops(seed, B, C, spatial, G, dtype, layout, affine, shift, shift_dtype, silu, max_tile):
    x, w, b, s = gn_inputs(B, C, spatial, dtype, layout, affine, shift, shift_dtype)
    leaves = [t.requires_grad_() if t is not None else None for t in (x, w, b, s)]
    opcheck(torch.ops.ldm.group_norm_fwd.default, (*leaves, G, 1e-5, silu, max_tile))
    x, w, b, s = (None if t is None else t.detach() for t in leaves)  # the backward op has no double backward
    y, mean, rstd = torch.ops.ldm.group_norm_fwd(x, w, b, s, G, 1e-5, silu, max_tile)
    dy = torch.randn(y.shape).to(y.dtype)
    for needs in ([True, True, True, True], [False, True, False, True], [True, False, False, False]):
        opcheck(torch.ops.ldm.group_norm_bwd.default, (dy, x, mean, rstd, w, b, s, G, silu, max_tile, needs))


def test_fake_group_norm_keeps_the_layout():
    """The fake forward gives y the strides the launcher gives it: channels_last stays channels_last."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 3, 5).to(memory_format=torch.channels_last)
        y, mean, rstd = torch.ops.ldm.group_norm_fwd(x, None, None, None, 2, 1e-5, True, 4096)
    assert y.stride() == x.stride() and mean.shape == rstd.shape == (2, 2) and mean.dtype == torch.float32


class Block(nn.Module):
    """GroupNorm+SiLU with a timestep shift, then self-attention over the positions: both custom ops."""

    def __init__(self, C=16, heads=2):
        super().__init__()
        self.norm = kernels.GroupNormSiLU(4, C)
        self.attn = Attention(C, heads)

    def forward(self, x, shift):
        B, C, H, W = x.shape
        h = self.norm(x, shift).flatten(2).transpose(1, 2)  # (B, N, C)
        return self.attn(h)


def test_compiled_block_with_the_triton_backend_matches_eager(seed):
    """fullgraph=True with the Triton backend (interpreter): dynamo and AOTAutograd trace the
    custom ops by their fake implementations, the compiled graph runs the real ones; forward and
    every gradient equal eager."""
    block = Block()
    x, shift = torch.randn(2, 16, 3, 5), torch.randn(2, 16)
    compiled = torch.compile(copy.deepcopy(block), fullgraph=True, backend="aot_eager")
    results = []
    for model in (block, compiled):
        xs = (x.clone().requires_grad_(), shift.clone().requires_grad_())
        with kernels.use_backend("triton"):
            y = model(*xs)
            y.backward(torch.ones_like(y) * 0.1 + y.detach())
        results.append((y.detach(), *(t.grad for t in xs), *(p.grad for p in model.parameters())))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def tiny_unet_inputs(cfg, B=2, H=8, W=8, L=5):
    x = torch.randn(B, cfg.in_channels, H, W)
    t = torch.rand(B) * 999
    cond = {"context": torch.randn(B, L, cfg.context_dim), "context_lengths": torch.randint(1, L + 1, (B,))}
    return x, t, cond


@pytest.fixture
def tiny_unet(seed):
    model = UNet(unet_config("tiny", context_dim=384, in_channels=8, out_channels=8))
    for m in model.modules():  # the zero-initialised layers would hide most of the network
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.any():
            m.reset_parameters()
    return model


def test_tiny_unet_compiles_with_fullgraph_and_matches_eager(tiny_unet):
    """The whole tiny UNet traces as one graph (dispatch included: its decisions are Python-level and
    break nothing); forward and the input gradient equal eager within fp32 tolerance. AOT-eager keeps
    the test at ~15 s here; inductor is the slow test below."""
    x, t, cond = tiny_unet_inputs(tiny_unet.config)
    compiled = torch.compile(tiny_unet, fullgraph=True, backend="aot_eager")
    with kernels.use_backend("torch"):
        outs = []
        for model in (tiny_unet, compiled):
            xs = x.clone().requires_grad_()
            y = model(xs, t, **cond)
            y.square().mean().backward()
            outs.append((y.detach(), xs.grad))
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.slow
def test_tiny_unet_compiles_with_inductor(tiny_unet):
    """The same through inductor (C++ code generation with gcc on the CPU; ~2 minutes here)."""
    x, t, cond = tiny_unet_inputs(tiny_unet.config)
    tiny_unet.eval()
    with kernels.use_backend("torch"), torch.no_grad():
        ref = tiny_unet(x, t, **cond)
        got = torch.compile(tiny_unet, fullgraph=True)(x, t, **cond)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
