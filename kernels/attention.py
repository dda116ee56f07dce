"""Multi-head attention for every attention a UNet or VAE has (self and cross, non-causal).

Layout: ``q`` is ``(B, Nq, H, D)``, ``k`` and ``v`` are ``(B, Nk, H, D)``: the layout that a
projection produces with ``.view(B, N, H, D)``, any strides. ``key_lengths`` (``(B,)`` integers)
marks the first ``key_lengths[b]`` keys of batch ``b`` as valid; the rest (padded text tokens)
get no weight.

Chain: Triton kernels -> launchers -> ``AttentionFunction`` -> ``attention()``; the dispatch in
``kernels.dispatch`` picks Triton on CUDA and PyTorch's ``scaled_dot_product_attention`` elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.dispatch import resolve_backend

MAX_HEAD_DIM = 256


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) if t.dim() else "scalar"


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_lengths: torch.Tensor | None) -> None:
    """Raise a ValueError that names the tensors and their shapes when a call cannot work."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, N, H, D), got shape {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"attention: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {_shape(k)} and v {_shape(v)} must have the same shape")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: batch of q ({_shape(q)}) and k ({_shape(k)}) differ")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"attention: heads of q ({_shape(q)}) and k ({_shape(k)}) differ")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: head dim of q ({_shape(q)}) and k ({_shape(k)}) differ")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim {q.shape[3]} of q ({_shape(q)}) exceeds {MAX_HEAD_DIM}")
    if k.shape[1] == 0:
        raise ValueError(f"attention: k ({_shape(k)}) has no keys")
    if key_lengths is not None:
        if not isinstance(key_lengths, torch.Tensor) or key_lengths.dim() != 1 \
                or key_lengths.shape[0] != q.shape[0]:
            got = _shape(key_lengths) if isinstance(key_lengths, torch.Tensor) else type(key_lengths).__name__
            raise ValueError(f"attention: key_lengths must have shape ({q.shape[0]},), got {got}")
        if key_lengths.dtype.is_floating_point or key_lengths.dtype == torch.bool:
            raise ValueError(f"attention: key_lengths must be integers, got {key_lengths.dtype}")
        if key_lengths.device != q.device:
            raise ValueError(f"attention: key_lengths is on {key_lengths.device}, q on {q.device}")


def key_padding_mask(key_lengths: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(B,) valid-key counts -> (B, Nk) boolean mask, True where a key may be attended."""
    return torch.arange(n_keys, device=key_lengths.device)[None, :] < key_lengths[:, None]


def _attention_torch(q, k, v, scale, key_lengths):
    mask = None
    if key_lengths is not None:
        mask = key_padding_mask(key_lengths, k.shape[1])[:, None, None, :]  # (B, 1, 1, Nk)
    out = F.scaled_dot_product_attention(  # (B, H, Nq, D)
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)  # (B, Nq, H, D)


def _attention_xformers(q, k, v, scale, key_lengths):
    import xformers.ops as xops

    bias = None
    if key_lengths is not None:
        B, Nq, H, _ = q.shape
        mask = key_padding_mask(key_lengths, k.shape[1])  # (B, Nk)
        bias = torch.zeros(B, H, Nq, k.shape[1], device=q.device, dtype=q.dtype)
        bias.masked_fill_(~mask[:, None, None, :], float("-inf"))
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              key_lengths: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale) v per head. q (B, Nq, H, D), k and v (B, Nk, H, D) -> (B, Nq, H, D).

    ``scale`` defaults to 1/sqrt(D). ``key_lengths`` (B,) masks padded keys. Differentiable.
    """
    check_attention_inputs(q, k, v, key_lengths)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    which = resolve_backend("attention", backend, q, k, v)
    if which == "xformers":
        return _attention_xformers(q, k, v, scale, key_lengths)
    if which == "triton":
        raise NotImplementedError("attention: the Triton kernel lands with its own issue")
    return _attention_torch(q, k, v, scale, key_lengths)
