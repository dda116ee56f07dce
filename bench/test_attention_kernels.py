"""Attention kernels: provider x {forward, backward, full} x the Stable Diffusion 1.x shapes.

Providers: ours (the Triton FlashAttention-2 kernels, GPU only), PyTorch's
``scaled_dot_product_attention`` as it dispatches by itself ("sdpa", the baseline of the ratios) and
pinned to each of its backends through ``torch.nn.attention.sdpa_kernel`` (a backend that cannot run
on the device, dtype or shape is skipped with PyTorch's reason), xformers'
``memory_efficient_attention`` when it can run, and a plain eager reference (two matmuls and a
softmax, the scores materialized).

Shapes, batch 2 and 8 heads: on a GPU the SD 1.x attentions of a 512 x 512 image (64 x 64 latents)
in bf16 and fp16; self-attention N=4096 D=40, N=1024 D=80, N=256 D=160, N=64 D=160, and
cross-attention of the same queries against 77 text tokens. On the CPU the same layers at 256 x 256
(N divided by 4) in fp32. Every provider gets the same (B, N, H, D) tensors (the layout a projection's
``.view`` gives; SDPA sees them through a transpose, as diffusers passes them).

Derived figures: TFLOP/s (forward 4 B H Nq Nk D, backward 2.5x that, full 3.5x), GB/s of the
minimum traffic (forward reads q, k, v and writes o; backward reads q, k, v, o, do and writes dq, dk,
dv), and the fraction of the device roofline.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from kernels.dispatch import xformers_available

ON_GPU = torch.cuda.is_available()
BATCH, HEADS, TEXT_TOKENS = 2, 8, 77
MODES = ("forward", "backward", "full")
FLOP_FACTOR = {"forward": 1.0, "backward": 2.5, "full": 3.5}  # x 4 B H Nq Nk D


def _shapes() -> list:
    """(kind, Nq, Nk, D); the smallest self- and cross-attention are the quick subset."""
    scale = 1 if ON_GPU else 4  # CPU: the same layers at 256 x 256 pixels
    layers = [(4096, 40), (1024, 80), (256, 160), (64, 160)]
    out = []
    for kind in ("self", "cross"):
        for i, (n, d) in enumerate(layers):
            n //= scale
            shape = (kind, n, n if kind == "self" else TEXT_TOKENS, d)
            marks = [pytest.mark.quick] if i == len(layers) - 1 else []
            out.append(pytest.param(shape, id=f"{kind}-{shape[1]}x{shape[2]}-d{d}", marks=marks))
    return out


DTYPES = ["bfloat16", "float16"] if ON_GPU else ["float32"]  # names: the JSON keeps them readable
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-math": SDPBackend.MATH, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
PROVIDERS = ("ours-triton", "sdpa", *SDPA_BACKENDS, "xformers", "eager")
BASELINE = "sdpa"


def _sdpa(q, k, v, backend=None):
    pinned = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
    with pinned:  # (B, N, H, D) -> (B, H, N, D) views, as diffusers' processors pass them
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # (B, Nq, H, D)


def _eager(q, k, v):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, Nq, H, D)


def _xformers(q, k, v):
    import xformers.ops as xops

    return xops.memory_efficient_attention(q, k, v)  # takes (B, N, H, D) as it is


def provider_fn(bench, provider: str):
    if provider == "ours-triton":
        bench.skip_unless_triton()
        return lambda q, k, v: kernels.attention(q, k, v, backend="triton")
    if provider == "sdpa":
        return _sdpa
    if provider in SDPA_BACKENDS:
        backend = SDPA_BACKENDS[provider]
        return lambda q, k, v: _sdpa(q, k, v, backend)
    if provider == "xformers":
        if not xformers_available():
            pytest.skip("xformers cannot run here (it needs the package and a CUDA device)")
        return _xformers
    return _eager


def _probe(fn, q, k, v, provider: str) -> None:
    """Skip, with PyTorch's reason, a pinned SDPA backend that has no kernel (forward or backward)
    for these inputs; one batch row of them."""
    q, k, v = (t[:1].detach().requires_grad_() for t in (q, k, v))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA warns each reason before it raises
            out = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    except RuntimeError as e:
        if provider in SDPA_BACKENDS:
            pytest.skip(f"{provider} has no kernel for these inputs on {q.device.type}: {str(e).split('. ')[0]}")
        raise


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", _shapes())
def test_attention(bench, shape, dtype_name, mode, provider):
    kind, nq, nk, d = shape
    fn = provider_fn(bench, provider)
    dev, dtype = bench.torch_device, getattr(torch, dtype_name)
    bench.label(suite="attention", case=f"{kind} {nq}x{nk} d{d}", mode=mode, dtype=dtype_name,
                provider=provider, baseline=BASELINE, batch=BATCH, heads=HEADS,
                show=["tflops"] if kind == "self" else ["gbps", "tflops"])  # cross-attention is memory-bound

    def inputs():
        q = torch.randn(BATCH, nq, HEADS, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(BATCH, nk, HEADS, d, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(BATCH, nk, HEADS, d, device=dev, dtype=dtype, requires_grad=True)
        return q, k, v

    _probe(fn, *inputs(), provider)
    flops = 4 * BATCH * HEADS * nq * nk * d * FLOP_FACTOR[mode]
    head_bytes = BATCH * HEADS * d * dtype.itemsize  # one token of one tensor, all heads
    fwd_bytes = (2 * nq + 2 * nk) * head_bytes  # read q, k, v; write o
    bwd_bytes = (4 * nq + 4 * nk) * head_bytes  # read q, k, v, o, do; write dq, dk, dv
    nbytes = {"forward": fwd_bytes, "backward": bwd_bytes, "full": fwd_bytes + bwd_bytes}[mode]
    bench.time(lambda: bench.mode_call(mode, fn, inputs()), flops=flops, nbytes=nbytes, dtype=dtype)
