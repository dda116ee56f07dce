"""GroupNorm with an optional fused SiLU, and an optional per-(batch, channel) shift added first.

``y = silu(group_norm(x + shift[:, :, None, None]))``, the ResBlock's "add the timestep embedding,
normalize, activate" in one op. Works on NCHW and channels_last tensors, any number of spatial
dims. Chain: Triton kernels -> launchers -> custom ops ``ldm::group_norm_fwd`` / ``ldm::group_norm_bwd``
(fake implementations and autograd registered with torch.library, for torch.compile) ->
``GroupNormFunction`` -> ``group_norm()`` and the ``GroupNormSiLU`` module, whose state dict is
``nn.GroupNorm``'s.

How the kernels split the work (notes, bytes moved and roofline in ``kernels/groupnorm.md``):
a group of ``CPG = C / G`` channels by ``HW`` spatial positions is cut into tiles of at most
``max_tile`` elements, one program per tile. When a whole group fits in one tile, one program
computes its statistics in registers and normalizes it (forward: read x, write y). Otherwise a
first kernel writes per-tile partial statistics and a second combines them (Chan et al.'s parallel
variance formula) before normalizing its tile; the backward does the same with its two group sums.
dweight, dbias and dshift are per-(batch, channel, tile) partial sums reduced by a last kernel in
a fixed order: no atomics, the gradients are deterministic.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.dispatch import GROUPNORM_DTYPES, resolve_backend, triton_refusal

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError:  # Triton ships for Linux only; elsewhere only the PyTorch path runs
    triton = tl = None
    _jit = lambda fn: fn  # the kernels below are then never launched

MAX_TILE = 4096          # elements of x one program holds at most: 16 fp32 values per thread at 8 warps
ELEMS_PER_THREAD = 16    # the launcher gives a tile tile // (32 * 16) warps, 1 to 8
PARTIAL_BLOCK = 64       # partial statistics combined per step of the combine loop
REDUCE_TILE = 1024       # (channels x tiles) partial sums one program of the gradient reduction holds
REDUCE_WARPS = 4         # 8 partial sums per thread per loaded array
MAX_VECTOR = 8           # channels per vector load in channels_last (16 bytes of bf16)
KERNEL_DTYPES = GROUPNORM_DTYPES  # the rule lives in kernels.dispatch, which decides the backend


def check_group_norm_inputs(x, num_groups, weight, bias, shift, eps: float = 1e-5) -> None:
    """Raise a ValueError that names the problem when a call cannot work."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):  # a negative one gives NaN
        raise ValueError(f"group_norm: eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"group_norm: x must be a tensor of shape (B, C, ...), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"group_norm: x must be floating point, got {x.dtype}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"group_norm: channels C={C} of x {tuple(x.shape)} are not divisible "
                         f"by num_groups={num_groups}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (C,):
            raise ValueError(f"group_norm: {name} must have shape ({C},), got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise ValueError(f"group_norm: {name} must be floating point, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"group_norm: {name} is on {p.device}, x on {x.device}")
    if shift is not None:
        if shift.shape != (x.shape[0], C):
            raise ValueError(f"group_norm: shift must have shape ({x.shape[0]}, {C}), got {tuple(shift.shape)}")
        if shift.device != x.device:
            raise ValueError(f"group_norm: shift is on {shift.device}, x on {x.device}")


# ----------------------------------------------------------------------------------------------
# Triton kernels
#
# Every tile kernel runs one program per (batch b, group g, tile k). A group is a (HW, CPG) array:
# NCHW memory puts spatial positions next to each other (channel stride HW), channels_last puts
# channels next to each other (spatial stride C). A tile is BLOCK_S spatial positions by BLOCK_C
# channels; the launcher makes BLOCK_S long for NCHW and BLOCK_C cover the group for channels_last,
# so the contiguous axis is the long one either way and loads coalesce.
# ----------------------------------------------------------------------------------------------


@_jit
def _gn_tile(pid, C, HW, G, CPG, NS, n_chunks,
             CHANNELS_LAST: tl.constexpr, CPG_ALIGN: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Which (batch, group, tile) program ``pid`` runs, and where its elements are.

    CPG_ALIGN, a power of two dividing CPG, lets channels_last loads be vectors of CPG_ALIGN
    channels: g * CPG and the channel mask are written so that the compiler sees the alignment.
    """
    if CHANNELS_LAST:  # neighbouring programs take neighbouring groups: they share the rows of x
        g = pid % G
        k = (pid // G) % n_chunks
        b = pid // (G * n_chunks)
    else:  # neighbouring programs take neighbouring tiles of a group: one contiguous sweep
        k = pid % n_chunks
        g = (pid // n_chunks) % G
        b = pid // (n_chunks * G)
    ks = k % NS                                             # spatial tile, 0 <= ks < NS
    c = (k // NS) * BLOCK_C + tl.arange(0, BLOCK_C)         # channel within the group, (BLOCK_C,)
    s = ks * BLOCK_S + tl.arange(0, BLOCK_S)                # spatial position, (BLOCK_S,)
    cmask = (c // CPG_ALIGN) < (CPG // CPG_ALIGN)           # c < CPG, constant over CPG_ALIGN lanes
    mask = (s[:, None] < HW) & cmask[None, :]               # (BLOCK_S, BLOCK_C)
    ch = g * (CPG // CPG_ALIGN) * CPG_ALIGN + c             # channel within x, g * CPG + c, (BLOCK_C,)
    base = b.to(tl.int64) * C * HW                          # start of sample b (64-bit: B*C*HW may pass 2**31)
    if CHANNELS_LAST:
        offs = s[:, None] * C + ch[None, :]                 # (BLOCK_S, BLOCK_C), channels contiguous
    else:
        offs = s[:, None] + ch[None, :] * HW                # (BLOCK_S, BLOCK_C), positions contiguous
    return b, g, k, ks, ch, cmask, mask, base, offs


@_jit
def _gn_channel_params(W, Bias, Shift, b, C, ch, cmask,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """weight, bias and shift of the tile's channels in fp32, (BLOCK_C,) each; 1, 0, 0 when absent."""
    if HAS_WEIGHT:
        w = tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_BIAS:
        beta = tl.load(Bias + ch, mask=cmask, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros([BLOCK_C], tl.float32)
    if HAS_SHIFT:
        sh = tl.load(Shift + b * C + ch, mask=cmask, other=0.0).to(tl.float32)
    else:
        sh = tl.zeros([BLOCK_C], tl.float32)
    return w, beta, sh


@_jit
def _gn_chunk_count(k, NS, CPG, HW, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Number of elements of x in tile ``k`` of a group (a tensor of tile indices), as fp32."""
    n_c = tl.minimum(CPG - (k // NS) * BLOCK_C, BLOCK_C)
    n_s = tl.minimum(HW - (k % NS) * BLOCK_S, BLOCK_S)
    return (n_c * n_s).to(tl.float32)


@_jit
def _gn_combine_stats(PMean, PM2, bg, n_chunks, NS, CPG, HW,
                      BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Mean and biased variance of group ``bg`` from its tiles' (mean, M2).

    BLOCK_P tiles at a time are merged exactly (M2 = sum M2_k + sum n_k (mean_k - mean)^2), and the
    blocks into a running total with Chan, Golub and LeVeque's pairwise update (1979).
    """
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for k0 in range(0, n_chunks, BLOCK_P):
        k = k0 + tl.arange(0, BLOCK_P)                      # tile indices, (BLOCK_P,)
        m = k < n_chunks
        n_k = tl.where(m, _gn_chunk_count(k, NS, CPG, HW, BLOCK_S, BLOCK_C), 0.0)
        mean_k = tl.load(PMean + bg * n_chunks + k, mask=m, other=0.0)
        m2_k = tl.load(PM2 + bg * n_chunks + k, mask=m, other=0.0)
        n_b = tl.sum(n_k)
        mean_b = tl.sum(n_k * mean_k) / n_b
        m2_b = tl.sum(m2_k + n_k * (mean_k - mean_b) * (mean_k - mean_b))
        delta = mean_b - mean
        n_new = n + n_b
        mean += delta * (n_b / n_new)
        m2 += m2_b + delta * delta * (n * n_b / n_new)
        n = n_new
    return mean, m2 / n


@_jit
def _gn_pivot(X, Shift, b, g, base, C, HW, CPG, CHANNELS_LAST: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """x + shift at the group's first element. Split statistics are taken of (x + shift - pivot):
    with the group's offset removed, tile means near a large mean keep their precision and so does
    the between-tile term of the combine (the shifted-data algorithm)."""
    c0 = g * CPG
    if CHANNELS_LAST:
        pivot = tl.load(X + base + c0).to(tl.float32)
    else:
        pivot = tl.load(X + base + c0 * HW).to(tl.float32)
    if HAS_SHIFT:
        pivot += tl.load(Shift + b * C + c0).to(tl.float32)
    return pivot


@_jit
def _gn_fwd_stats_kernel(
    X,            # pointer to the input, shape (B, C, *spatial), NCHW or channels_last memory
    Shift,        # pointer to the shift, shape (B, C) contiguous (read when HAS_SHIFT)
    PMean,        # pointer to each tile's mean minus the group's pivot, shape (B * G, n_chunks), fp32
    PM2,          # pointer to each tile's sum of squared deviations from its mean, shape (B * G, n_chunks), fp32
    C, HW, G, CPG,  # channels, spatial size, groups, channels per group
    NS, n_chunks,   # spatial tiles per group, tiles per group
    CHANNELS_LAST: tl.constexpr, CPG_ALIGN: tl.constexpr, HAS_SHIFT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Split forward, pass 1: (mean, M2) of one tile of (x + shift - pivot), two-pass in registers."""
    pid = tl.program_id(0)
    b, g, k, ks, ch, cmask, mask, base, offs = _gn_tile(pid, C, HW, G, CPG, NS, n_chunks,
                                                        CHANNELS_LAST, CPG_ALIGN, BLOCK_S, BLOCK_C)
    pivot = _gn_pivot(X, Shift, b, g, base, C, HW, CPG, CHANNELS_LAST, HAS_SHIFT)
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)       # (BLOCK_S, BLOCK_C)
    if HAS_SHIFT:
        x += (tl.load(Shift + b * C + ch, mask=cmask, other=0.0).to(tl.float32) - pivot)[None, :]
    else:
        x -= pivot
    n = _gn_chunk_count(k, NS, CPG, HW, BLOCK_S, BLOCK_C)
    mean = tl.sum(tl.where(mask, x, 0.0)) / n
    d = tl.where(mask, x - mean, 0.0)
    bg = b * G + g
    tl.store(PMean + bg * n_chunks + k, mean)
    tl.store(PM2 + bg * n_chunks + k, tl.sum(d * d))


@_jit
def _gn_fwd_kernel(
    X,            # pointer to the input, shape (B, C, *spatial), NCHW or channels_last memory
    Y,            # pointer to the output, same shape and memory layout as X
    W,            # pointer to the weight, shape (C,) (read when HAS_WEIGHT)
    Bias,         # pointer to the bias, shape (C,) (read when HAS_BIAS)
    Shift,        # pointer to the shift, shape (B, C) contiguous (read when HAS_SHIFT)
    Mean,         # pointer to the group means, shape (B, G), fp32, written
    Rstd,         # pointer to the group reciprocal standard deviations, shape (B, G), fp32, written
    PMean,        # pointer to the tiles' means minus the pivot, shape (B * G, n_chunks), fp32 (read when SPLIT)
    PM2,          # pointer to the tiles' M2, shape (B * G, n_chunks), fp32 (read when SPLIT)
    C, HW, G, CPG,  # channels, spatial size, groups, channels per group
    NS, n_chunks,   # spatial tiles per group, tiles per group (1 unless SPLIT)
    eps,
    CHANNELS_LAST: tl.constexpr, CPG_ALIGN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """y = silu?(((x + shift) - mean) * rstd * w + bias) for one tile.

    SPLIT=False: the tile is the whole group, its statistics come from registers. SPLIT=True: they
    come from the tiles' partials written by ``_gn_fwd_stats_kernel``.
    """
    pid = tl.program_id(0)
    b, g, k, ks, ch, cmask, mask, base, offs = _gn_tile(pid, C, HW, G, CPG, NS, n_chunks,
                                                        CHANNELS_LAST, CPG_ALIGN, BLOCK_S, BLOCK_C)
    w, beta, sh = _gn_channel_params(W, Bias, Shift, b, C, ch, cmask, HAS_WEIGHT, HAS_BIAS, HAS_SHIFT, BLOCK_C)
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)       # (BLOCK_S, BLOCK_C)
    bg = b * G + g
    if SPLIT:
        mean, var = _gn_combine_stats(PMean, PM2, bg, n_chunks, NS, CPG, HW, BLOCK_S, BLOCK_C, BLOCK_P)
        mean += _gn_pivot(X, Shift, b, g, base, C, HW, CPG, CHANNELS_LAST, HAS_SHIFT)
    else:  # exact two-pass over the group held in registers
        N = (CPG * HW).to(tl.float32)
        xs = x + sh[None, :]
        mean = tl.sum(tl.where(mask, xs, 0.0)) / N
        d = tl.where(mask, xs - mean, 0.0)
        var = tl.sum(d * d) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Mean + bg, mean, mask=k == 0)
    tl.store(Rstd + bg, rstd, mask=k == 0)
    # Fold normalization, affine and shift into one scale and offset per channel: y = x * a + o.
    a = w * rstd                                            # (BLOCK_C,)
    o = beta + (sh - mean) * a                              # (BLOCK_C,)
    y = x * a[None, :] + o[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)


@_jit
def _gn_bwd_tile(X, DY, W, Bias, Shift, Mean, Rstd, pid, C, HW, G, CPG, NS, n_chunks,
                 CHANNELS_LAST: tl.constexpr, CPG_ALIGN: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 HAS_BIAS: tl.constexpr,
                 HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Load a tile of x and dy; recompute x_hat and dz = dL/d(affine output) (the SiLU from x)."""
    b, g, k, ks, ch, cmask, mask, base, offs = _gn_tile(pid, C, HW, G, CPG, NS, n_chunks,
                                                        CHANNELS_LAST, CPG_ALIGN, BLOCK_S, BLOCK_C)
    w, beta, sh = _gn_channel_params(W, Bias, Shift, b, C, ch, cmask, HAS_WEIGHT, HAS_BIAS, HAS_SHIFT, BLOCK_C)
    bg = b * G + g
    mean = tl.load(Mean + bg)
    rstd = tl.load(Rstd + bg)
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)       # (BLOCK_S, BLOCK_C)
    dz = tl.load(DY + base + offs, mask=mask, other=0.0).to(tl.float32)     # 0 outside the tile's mask
    xhat = x * rstd + ((sh - mean) * rstd)[None, :]                         # (BLOCK_S, BLOCK_C)
    if SILU:  # d silu(z) / dz = sig(z) * (1 + z * (1 - sig(z)))
        z = xhat * w[None, :] + beta[None, :]
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    return b, g, k, ks, ch, cmask, mask, base, offs, w, rstd, x, xhat, dz


@_jit
def _gn_bwd_tile_sums(DWp, DBp, dz, xhat, w, b, C, ch, cmask, NS, ks,
                      HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store the tile's per-channel dweight/dbias partials; return its shares of the two group sums
    (sum of w * dz, sum of w * dz * x_hat). dz is 0 off the mask (dy loads as 0): no tl.where."""
    dw_c = tl.sum(dz * xhat, axis=0)                        # (BLOCK_C,)
    db_c = tl.sum(dz, axis=0)                               # (BLOCK_C,)
    if HAS_WEIGHT:
        tl.store(DWp + (b * C + ch) * NS + ks, dw_c, mask=cmask)
    if HAS_BIAS:
        tl.store(DBp + (b * C + ch) * NS + ks, db_c, mask=cmask)
    return tl.sum(w * db_c), tl.sum(w * dw_c)


@_jit
def _gn_bwd_stats_kernel(
    X,            # pointer to the input, shape (B, C, *spatial), NCHW or channels_last memory
    DY,           # pointer to the output gradient, same shape and memory layout as X
    W,            # pointer to the weight, shape (C,) (read when HAS_WEIGHT)
    Bias,         # pointer to the bias, shape (C,) (read when HAS_BIAS)
    Shift,        # pointer to the shift, shape (B, C) contiguous (read when HAS_SHIFT)
    Mean,         # pointer to the group means, shape (B, G), fp32
    Rstd,         # pointer to the group reciprocal standard deviations, shape (B, G), fp32
    DWp,          # pointer to per-tile sums of dz * x_hat, shape (B, C, NS), fp32 (written when HAS_WEIGHT)
    DBp,          # pointer to per-tile sums of dz, shape (B, C, NS), fp32 (written when HAS_BIAS)
    S1p,          # pointer to per-tile sums of w * dz, shape (B * G, n_chunks), fp32
    S2p,          # pointer to per-tile sums of w * dz * x_hat, shape (B * G, n_chunks), fp32
    C, HW, G, CPG,  # channels, spatial size, groups, channels per group
    NS, n_chunks,   # spatial tiles per group, tiles per group
    CHANNELS_LAST: tl.constexpr, CPG_ALIGN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Split backward, pass 1: one tile's share of the group sums and of dweight, dbias."""
    pid = tl.program_id(0)
    b, g, k, ks, ch, cmask, mask, base, offs, w, rstd, x, xhat, dz = _gn_bwd_tile(
        X, DY, W, Bias, Shift, Mean, Rstd, pid, C, HW, G, CPG, NS, n_chunks,
        CHANNELS_LAST, CPG_ALIGN, HAS_WEIGHT, HAS_BIAS, HAS_SHIFT, SILU, BLOCK_S, BLOCK_C)
    s1, s2 = _gn_bwd_tile_sums(DWp, DBp, dz, xhat, w, b, C, ch, cmask, NS, ks, HAS_WEIGHT, HAS_BIAS)
    bg = b * G + g
    tl.store(S1p + bg * n_chunks + k, s1)
    tl.store(S2p + bg * n_chunks + k, s2)


@_jit
def _gn_bwd_kernel(
    X,            # pointer to the input, shape (B, C, *spatial), NCHW or channels_last memory
    DY,           # pointer to the output gradient, same shape and memory layout as X
    DX,           # pointer to the input gradient, same shape and memory layout as X, written
    W,            # pointer to the weight, shape (C,) (read when HAS_WEIGHT)
    Bias,         # pointer to the bias, shape (C,) (read when HAS_BIAS)
    Shift,        # pointer to the shift, shape (B, C) contiguous (read when HAS_SHIFT)
    Mean,         # pointer to the group means, shape (B, G), fp32
    Rstd,         # pointer to the group reciprocal standard deviations, shape (B, G), fp32
    DWp,          # pointer to per-tile sums of dz * x_hat, shape (B, C, NS), fp32 (written unless SPLIT)
    DBp,          # pointer to per-tile sums of dz, shape (B, C, NS), fp32 (written unless SPLIT)
    S1p,          # pointer to per-tile sums of w * dz, shape (B * G, n_chunks), fp32 (read when SPLIT)
    S2p,          # pointer to per-tile sums of w * dz * x_hat, shape (B * G, n_chunks), fp32 (read when SPLIT)
    DSp,          # pointer to per-tile sums of dx, shape (B, C, NS), fp32 (written when STORE_DSHIFT)
    C, HW, G, CPG,  # channels, spatial size, groups, channels per group
    NS, n_chunks,   # spatial tiles per group, tiles per group (1 unless SPLIT)
    CHANNELS_LAST: tl.constexpr, CPG_ALIGN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SHIFT: tl.constexpr, STORE_DSHIFT: tl.constexpr, SILU: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dx = rstd * (w * dz - mean(w * dz) - x_hat * mean(w * dz * x_hat)), means over the group.

    SPLIT=False: the tile is the whole group; the two group sums come from registers and the
    per-channel dweight/dbias partials are written here. SPLIT=True: the sums come from the
    partials of ``_gn_bwd_stats_kernel``.
    """
    pid = tl.program_id(0)
    b, g, k, ks, ch, cmask, mask, base, offs, w, rstd, x, xhat, dz = _gn_bwd_tile(
        X, DY, W, Bias, Shift, Mean, Rstd, pid, C, HW, G, CPG, NS, n_chunks,
        CHANNELS_LAST, CPG_ALIGN, HAS_WEIGHT, HAS_BIAS, HAS_SHIFT, SILU, BLOCK_S, BLOCK_C)
    bg = b * G + g
    if SPLIT:
        s1 = 0.0
        s2 = 0.0
        for k0 in range(0, n_chunks, BLOCK_P):
            kk = k0 + tl.arange(0, BLOCK_P)
            m = kk < n_chunks
            s1 += tl.sum(tl.load(S1p + bg * n_chunks + kk, mask=m, other=0.0))
            s2 += tl.sum(tl.load(S2p + bg * n_chunks + kk, mask=m, other=0.0))
    else:  # the tile is the group
        s1, s2 = _gn_bwd_tile_sums(DWp, DBp, dz, xhat, w, b, C, ch, cmask, NS, ks, HAS_WEIGHT, HAS_BIAS)
    inv_n = 1.0 / (CPG * HW).to(tl.float32)
    dx = (w * rstd)[None, :] * dz - rstd * inv_n * (s1 + xhat * s2)        # (BLOCK_S, BLOCK_C)
    tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if STORE_DSHIFT:  # dshift[b, c] = sum over positions of dx[b, c]
        tl.store(DSp + (b * C + ch) * NS + ks, tl.sum(tl.where(mask, dx, 0.0), axis=0), mask=cmask)


@_jit
def _gn_bwd_reduce_kernel(
    DWp,          # pointer to per-tile sums of dz * x_hat, shape (B, C, NS), fp32 (read when HAS_WEIGHT)
    DBp,          # pointer to per-tile sums of dz, shape (B, C, NS), fp32 (read when HAS_BIAS)
    DSp,          # pointer to per-tile sums of dx, shape (B, C, NS), fp32 (read when HAS_SHIFT)
    DW,           # pointer to the weight gradient, shape (C,), written
    DB,           # pointer to the bias gradient, shape (C,), written
    DS,           # pointer to the shift gradient, shape (B, C) contiguous, written
    B, C, NS,     # batch, channels, spatial tiles per group
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr,
    BLOCK_CR: tl.constexpr, BLOCK_NS: tl.constexpr,
):
    """dweight[c] = sum over (b, tile), dbias likewise, dshift[b, c] = sum over tiles; fixed order."""
    c = tl.program_id(0) * BLOCK_CR + tl.arange(0, BLOCK_CR)               # (BLOCK_CR,)
    cmask = c < C
    dw = tl.zeros([BLOCK_CR], tl.float32)
    db = tl.zeros([BLOCK_CR], tl.float32)
    for b in range(0, B):
        ds = tl.zeros([BLOCK_CR], tl.float32)
        for k0 in range(0, NS, BLOCK_NS):
            kk = k0 + tl.arange(0, BLOCK_NS)
            m = cmask[:, None] & (kk[None, :] < NS)                         # (BLOCK_CR, BLOCK_NS)
            offs = (b * C + c)[:, None] * NS + kk[None, :]
            if HAS_WEIGHT:
                dw += tl.sum(tl.load(DWp + offs, mask=m, other=0.0), axis=1)
            if HAS_BIAS:
                db += tl.sum(tl.load(DBp + offs, mask=m, other=0.0), axis=1)
            if HAS_SHIFT:
                ds += tl.sum(tl.load(DSp + offs, mask=m, other=0.0), axis=1)
        if HAS_SHIFT:
            tl.store(DS + b * C + c, ds.to(DS.dtype.element_ty), mask=cmask)
    if HAS_WEIGHT:
        tl.store(DW + c, dw.to(DW.dtype.element_ty), mask=cmask)
    if HAS_BIAS:
        tl.store(DB + c, db.to(DB.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the launchers allocate comes from here (tests swap in a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _channels_last_perm(dim: int) -> tuple[int, ...]:
    return (0, *range(2, dim), 1)


def _in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` with NCHW (contiguous) or channels_last memory; a copy only when it has another."""
    if not channels_last:
        return t.contiguous()
    perm = _channels_last_perm(t.dim())
    inverse = sorted(range(t.dim()), key=perm.__getitem__)
    return t.permute(perm).contiguous().permute(inverse)


def _is_channels_last(t: torch.Tensor) -> bool:
    """True when t's memory is (B, *spatial, C) dense and not also plain contiguous."""
    return not t.is_contiguous() and t.permute(_channels_last_perm(t.dim())).is_contiguous()


@dataclass(frozen=True)
class GroupNormPlan:
    """How the launchers cut a (B, C, *spatial) tensor into tiles; one plan for forward and backward."""
    B: int
    C: int
    HW: int
    G: int
    CPG: int
    channels_last: bool
    BLOCK_S: int
    BLOCK_C: int
    NS: int                # spatial tiles per group
    n_chunks: int          # tiles per group (channel tiles x spatial tiles)
    num_warps: int
    CPG_ALIGN: int         # channels_last: power of two dividing CPG, the width of vector loads; else 1

    @property
    def split(self) -> bool:
        return self.n_chunks > 1

    @property
    def grid(self) -> tuple[int]:
        return (self.B * self.G * self.n_chunks,)


def plan_group_norm(shape, num_groups: int, channels_last: bool, max_tile: int = MAX_TILE) -> GroupNormPlan:
    """Pick the tile: the contiguous axis long (spatial for NCHW, channels for channels_last)."""
    if max_tile < 1 or max_tile > MAX_TILE or max_tile & (max_tile - 1):
        raise ValueError(f"group_norm: max_tile must be a power of two in [1, {MAX_TILE}], got {max_tile}")
    B, C = shape[0], shape[1]
    HW = 1
    for n in shape[2:]:
        HW *= n
    CPG = C // num_groups
    if channels_last:
        BLOCK_C = min(_next_pow2(CPG), max_tile)
        BLOCK_S = min(_next_pow2(HW), max_tile // BLOCK_C)
    else:
        BLOCK_S = min(_next_pow2(HW), max_tile)
        BLOCK_C = min(_next_pow2(CPG), max_tile // BLOCK_S)
    NS = -(-HW // BLOCK_S)
    n_chunks = -(-CPG // BLOCK_C) * NS
    num_warps = max(1, min(8, BLOCK_S * BLOCK_C // (32 * ELEMS_PER_THREAD)))
    cpg_align = min(CPG & -CPG, MAX_VECTOR, BLOCK_C) if channels_last else 1
    return GroupNormPlan(B, C, HW, num_groups, CPG, channels_last, BLOCK_S, BLOCK_C, NS, n_chunks, num_warps,
                         cpg_align)


def _out(name: str, t: torch.Tensor | None, shape, stride, dtype: torch.dtype, device) -> torch.Tensor:
    """A new buffer, or the caller's preallocated ``t`` after checking it is the one the kernel writes."""
    shape, stride = tuple(shape), tuple(stride)
    if t is None:
        return _empty(math.prod(shape), dtype, device).as_strided(shape, stride)  # every layout here is dense
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != torch.device(device) or t.stride() != stride:
        raise ValueError(f"group_norm: preallocated {name} has shape {tuple(t.shape)}, dtype {t.dtype}, "
                         f"strides {t.stride()} on {t.device}; expected {shape}, {dtype}, strides {stride} "
                         f"on {device}")
    return t


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _prepare(x: torch.Tensor, num_groups: int, weight, bias, shift, max_tile: int):
    """Validate, pick the memory layout (copying only an x that is neither NCHW nor channels_last)
    and the tiling. Returns (x in its layout, plan, shift as a contiguous (B, C) or x as a stand-in)."""
    check_group_norm_inputs(x, num_groups, weight, bias, shift)
    why = triton_refusal("groupnorm", x)  # the launchers' contract, by the rules dispatch decides with
    if why:
        raise ValueError(f"group_norm: the Triton kernel {why}")
    channels_last = _is_channels_last(x)
    x = _in_layout(x, channels_last)
    plan = plan_group_norm(x.shape, num_groups, channels_last, max_tile)
    return x, plan, (shift.contiguous() if shift is not None else x)


def group_norm_forward(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = False,
                       shift: torch.Tensor | None = None, *, max_tile: int = MAX_TILE,
                       y: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                       rstd: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the forward kernels. Returns y (x's shape and memory layout; x's dtype, promoted with
    shift's), mean and rstd ((B, G) fp32). ``y``, ``mean`` and ``rstd`` may be preallocated."""
    x, p, shift_c = _prepare(x, num_groups, weight, bias, shift, max_tile)
    dev, f32 = x.device, torch.float32
    out_dtype = x.dtype if shift is None else torch.promote_types(x.dtype, shift.dtype)
    y = _out("y", y, x.shape, x.stride(), out_dtype, dev)
    mean = _out("mean", mean, (p.B, p.G), (p.G, 1), f32, dev)
    rstd = _out("rstd", rstd, (p.B, p.G), (p.G, 1), f32, dev)
    pmean = pm2 = mean  # stand-ins: read only when split
    flags = dict(CHANNELS_LAST=p.channels_last, CPG_ALIGN=p.CPG_ALIGN, HAS_SHIFT=shift is not None,
                 BLOCK_S=p.BLOCK_S,
                 BLOCK_C=p.BLOCK_C, num_warps=p.num_warps)
    args = (p.C, p.HW, p.G, p.CPG, p.NS, p.n_chunks)
    with _device_guard(x):
        if p.split:
            pmean = _empty((p.B * p.G, p.n_chunks), f32, dev)
            pm2 = _empty((p.B * p.G, p.n_chunks), f32, dev)
            _gn_fwd_stats_kernel[p.grid](x, shift_c, pmean, pm2, *args, **flags)
        _gn_fwd_kernel[p.grid](
            x, y, weight if weight is not None else x, bias if bias is not None else x, shift_c,
            mean, rstd, pmean, pm2, *args, float(eps), HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, SILU=bool(silu), SPLIT=p.split, BLOCK_P=PARTIAL_BLOCK, **flags)
    return y, mean, rstd


def group_norm_backward(dy: torch.Tensor, x: torch.Tensor, num_groups: int, mean: torch.Tensor,
                        rstd: torch.Tensor, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, silu: bool = False,
                        shift: torch.Tensor | None = None, *, max_tile: int = MAX_TILE,
                        needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
                        dx: torch.Tensor | None = None, dweight: torch.Tensor | None = None,
                        dbias: torch.Tensor | None = None, dshift: torch.Tensor | None = None):
    """Run the backward kernels from dy, x and the forward's mean and rstd (the SiLU is recomputed).

    Returns (dx, dweight, dbias, dshift); ``needs`` says which to compute, the others come back as
    None, as do dweight without a weight, dbias without a bias and dshift without a shift. Any of the
    four may be preallocated; dx gets x's memory layout.
    """
    x, p, shift_c = _prepare(x, num_groups, weight, bias, shift, max_tile)
    dy = _in_layout(dy, p.channels_last)
    if dy.shape != x.shape:
        raise ValueError(f"group_norm: dy {tuple(dy.shape)} and x {tuple(x.shape)} differ in shape")
    dev, f32 = x.device, torch.float32
    need_dx = needs[0]
    need_dw, need_db, need_ds = needs[1] and weight is not None, needs[2] and bias is not None, \
        needs[3] and shift is not None
    has_w, has_b, has_s = weight is not None, bias is not None, shift is not None
    # per-(batch, channel, spatial tile) partial sums, reduced in a fixed order by the last kernel
    dwp = _empty((p.B, p.C, p.NS), f32, dev) if has_w else mean  # `mean` stands in for unused pointers
    dbp = _empty((p.B, p.C, p.NS), f32, dev) if has_b else mean
    dsp = _empty((p.B, p.C, p.NS), f32, dev) if need_ds else mean
    s1p = s2p = mean
    w_arg, b_arg = (weight if has_w else x), (bias if has_b else x)
    flags = dict(CHANNELS_LAST=p.channels_last, CPG_ALIGN=p.CPG_ALIGN, HAS_WEIGHT=has_w, HAS_BIAS=has_b,
                 SILU=bool(silu),
                 BLOCK_S=p.BLOCK_S, BLOCK_C=p.BLOCK_C, num_warps=p.num_warps)
    args = (p.C, p.HW, p.G, p.CPG, p.NS, p.n_chunks)
    with _device_guard(x):
        if p.split:
            s1p = _empty((p.B * p.G, p.n_chunks), f32, dev)
            s2p = _empty((p.B * p.G, p.n_chunks), f32, dev)
            _gn_bwd_stats_kernel[p.grid](x, dy, w_arg, b_arg, shift_c, mean, rstd, dwp, dbp, s1p, s2p, *args,
                                         HAS_SHIFT=has_s, **flags)
        if need_dx or need_ds or not p.split:  # unsplit, this kernel also writes the dweight/dbias partials
            dx = _out("dx", dx, x.shape, x.stride(), x.dtype, dev)
            _gn_bwd_kernel[p.grid](x, dy, dx, w_arg, b_arg, shift_c, mean, rstd, dwp, dbp, s1p, s2p, dsp,
                                   *args, HAS_SHIFT=has_s, STORE_DSHIFT=need_ds, SPLIT=p.split,
                                   BLOCK_P=PARTIAL_BLOCK, **flags)
        if need_dw or need_db or need_ds:
            dweight = _out("dweight", dweight, (p.C,), (1,), weight.dtype, dev) if need_dw else mean
            dbias = _out("dbias", dbias, (p.C,), (1,), bias.dtype, dev) if need_db else mean
            dshift = _out("dshift", dshift, (p.B, p.C), (p.C, 1), shift.dtype, dev) if need_ds else mean
            block_ns = min(_next_pow2(p.NS), PARTIAL_BLOCK)
            block_cr = REDUCE_TILE // block_ns
            _gn_bwd_reduce_kernel[(triton.cdiv(p.C, block_cr),)](
                dwp, dbp, dsp, dweight, dbias, dshift, p.B, p.C, p.NS,
                HAS_WEIGHT=need_dw, HAS_BIAS=need_db, HAS_SHIFT=need_ds, BLOCK_CR=block_cr, BLOCK_NS=block_ns,
                num_warps=REDUCE_WARPS)
    return (dx if need_dx else None, dweight if need_dw else None, dbias if need_db else None,
            dshift if need_ds else None)


# ----------------------------------------------------------------------------------------------
# autograd, functional and module
# ----------------------------------------------------------------------------------------------


# Custom ops: what torch.compile sees. The launchers are registered with torch.library as two opaque
# ops, ``ldm::group_norm_fwd`` and ``ldm::group_norm_bwd``, with fake implementations (shapes, dtypes,
# strides: y and dx keep x's layout, NCHW or channels_last) and the forward's autograd, so a compiled
# model traces through them without a graph break. Schemas are spelled out (same on torch >= 2.4).
# An op cannot return None: the gradients the backward is not asked for come back as empty
# placeholders, turned back into None by _group_norm_grads.

def _layout_strides(x: torch.Tensor) -> tuple[int, ...]:
    """Strides of a dense tensor of x's shape in the layout the launchers give y and dx."""
    perm = _channels_last_perm(x.dim()) if _is_channels_last(x) else tuple(range(x.dim()))
    strides, step = [0] * x.dim(), 1
    for d in reversed(perm):
        strides[d] = step
        step *= x.shape[d]
    return tuple(strides)


def _group_norm_fwd_impl(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         shift: torch.Tensor | None, num_groups: int, eps: float, silu: bool,
                         max_tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return group_norm_forward(x, num_groups, weight, bias, eps, silu, shift, max_tile=max_tile)


def _group_norm_fwd_fake(x, weight, bias, shift, num_groups, eps, silu, max_tile):
    dtype = x.dtype if shift is None else torch.promote_types(x.dtype, shift.dtype)
    y = x.new_empty_strided(x.shape, _layout_strides(x), dtype=dtype)
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)  # (B, G)
    return y, stats, torch.empty_like(stats)


def _group_norm_bwd_impl(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                         weight: torch.Tensor | None, bias: torch.Tensor | None, shift: torch.Tensor | None,
                         num_groups: int, silu: bool, max_tile: int,
                         needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = group_norm_backward(dy, x, num_groups, mean, rstd, weight, bias, silu, shift, max_tile=max_tile,
                                needs=tuple(needs))
    return tuple(x.new_empty(0) if g is None else g for g in grads)


def _group_norm_bwd_fake(dy, x, mean, rstd, weight, bias, shift, num_groups, silu, max_tile, needs):
    dx = x.new_empty_strided(x.shape, _layout_strides(x)) if needs[0] else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if needs[1] and weight is not None else x.new_empty(0)
    db = bias.new_empty(bias.shape) if needs[2] and bias is not None else x.new_empty(0)
    ds = shift.new_empty(shift.shape) if needs[3] and shift is not None else x.new_empty(0)
    return dx, dw, db, ds


group_norm_fwd_op = torch.library.custom_op(
    "ldm::group_norm_fwd", _group_norm_fwd_impl, mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, int num_groups, float eps, bool silu, "
           "int max_tile) -> (Tensor, Tensor, Tensor)")
group_norm_fwd_op.register_fake(_group_norm_fwd_fake)
group_norm_bwd_op = torch.library.custom_op(
    "ldm::group_norm_bwd", _group_norm_bwd_impl, mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, Tensor? shift, "
           "int num_groups, bool silu, int max_tile, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor)")
group_norm_bwd_op.register_fake(_group_norm_bwd_fake)


def _group_norm_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, shift, num_groups, eps, silu, max_tile = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, shift, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.max_tile = num_groups, silu, max_tile


def _group_norm_grads(ctx, dy: torch.Tensor, *_stats_grads):
    """Gradients for (x, weight, bias, shift, num_groups, eps, silu, max_tile); mean and rstd are
    not differentiated."""
    x, weight, bias, shift, mean, rstd = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    grads = group_norm_bwd_op(dy, x, mean, rstd, weight, bias, shift, ctx.num_groups, ctx.silu, ctx.max_tile, needs)
    present = (True, weight is not None, bias is not None, shift is not None)
    dx, dweight, dbias, dshift = (g if need and has else None for g, need, has in zip(grads, needs, present))
    return dx, dweight, dbias, dshift, None, None, None, None


group_norm_fwd_op.register_autograd(_group_norm_grads, setup_context=_group_norm_setup_context)


class GroupNormFunction(torch.autograd.Function):
    """Triton GroupNorm(+SiLU)(+shift) through the custom ops. Saves x, the parameters and the (B, G)
    fp32 mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, shift, num_groups, eps, silu, max_tile=MAX_TILE):
        y, mean, rstd = group_norm_fwd_op(x, weight, bias, shift, num_groups, float(eps), bool(silu), max_tile)
        _group_norm_setup_context(ctx, (x, weight, bias, shift, num_groups, eps, silu, max_tile), (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        return _group_norm_grads(ctx, dy)


def _group_norm_torch(x, num_groups, weight, bias, eps, silu, shift):
    if shift is not None:
        x = x + shift.view(*shift.shape, *([1] * (x.dim() - 2)))
    if any(p is not None and p.dtype != x.dtype for p in (weight, bias)):
        # F.group_norm wants one dtype (on the CPU); the Triton path takes parameters of another float
        # dtype and computes in fp32: do the same, and return x's dtype as it does
        f32 = lambda t: None if t is None else t.float()
        y = F.group_norm(x.float(), num_groups, f32(weight), f32(bias), eps).to(x.dtype)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def _group_norm_triton(x, num_groups, weight, bias, eps, silu, shift):
    return GroupNormFunction.apply(x, weight, bias, shift, num_groups, eps, silu)


_IMPLEMENTATIONS = {"triton": _group_norm_triton, "torch": _group_norm_torch}


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = False, *,
               shift: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """GroupNorm over (C/G, *spatial) per group, then an optional SiLU. x (B, C, ...) -> same shape.

    ``shift`` (B, C) is added to x before the statistics are taken. Differentiable in x,
    weight, bias and shift. ``kernels.dispatch.resolve_backend`` decides where it runs: the Triton
    path takes float16, bfloat16 and float32; "auto" sends other dtypes (and empty tensors) to
    PyTorch, an explicit ``backend="triton"`` raises for them.
    """
    check_group_norm_inputs(x, num_groups, weight, bias, shift, eps)
    tensors = [t for t in (x, weight, bias, shift) if t is not None]
    run = _IMPLEMENTATIONS[resolve_backend("groupnorm", backend, *tensors)]  # dispatch decides, not this op
    return run(x, num_groups, weight, bias, eps, silu, shift)


class GroupNormSiLU(nn.Module):
    """``nn.GroupNorm`` (+ SiLU when ``silu``): same arguments, same state dict (weight, bias)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 silu: bool = True, device=None, dtype=None):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNormSiLU: num_channels={num_channels} is not divisible by "
                             f"num_groups={num_groups}")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.affine, self.silu = affine, silu
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.silu, shift=shift)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, silu={self.silu}"


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile list for ``python -m kernels.inspect``
# ----------------------------------------------------------------------------------------------

# What gets compiled: every specialization the models reach. Tiles: in both layouts the tile the planner
# picks at the largest SD shape (2 x 320 x 64 x 64: NCHW one channel by 4096 positions, channels_last 256
# positions by 16 channel lanes for CPG = 10) for split groups, and the unsplit path at its largest group
# (8 x 8 positions x 40 channels). Every tile holds MAX_TILE elements, the most per thread the planner
# gives. Flags: SiLU on (ResBlocks) and off (the attention blocks' norms), timestep shift on (the UNet's
# second ResBlock norm) and off; weight and bias always (every model norm is affine). dtypes bf16 and
# fp32 (fp16 differs from bf16 only in conversions). ``core`` (tests/test_inspect.py) is the earlier
# short list, every kernel with all flags on, plus the SiLU-off and shift-off builds of the NCHW split path.
_AOT_TILES = {  # layout -> mode -> (BLOCK_S, BLOCK_C, CPG_ALIGN)
    "nchw": {"split": (4096, 1, 1), "whole": (64, 64, 1)},
    "nhwc": {"split": (256, 16, 2), "whole": (64, 64, 8)},     # CPG = 10: pairs; CPG = 40: 8 channels
}
_AOT_CORE = {  # (kernel, mode, dtype, layout) built with all flags on in the representative set
    *((k, "split", "bf16", "nchw") for k in ("gn_fwd_stats", "gn_fwd", "gn_bwd_stats", "gn_bwd")),
    *((k, "split", "fp32", "nhwc") for k in ("gn_fwd_stats", "gn_fwd", "gn_bwd_stats", "gn_bwd")),
    ("gn_fwd", "split", "bf16", "nhwc"), ("gn_bwd", "split", "bf16", "nhwc"),
    ("gn_fwd", "whole", "bf16", "nchw"), ("gn_bwd", "whole", "fp32", "nhwc"),
}
_AOT_DTYPES = ("bf16", "fp32")


def _aot_core(kernel: str, mode: str, dtype: str, layout: str, silu: bool, shift: bool) -> bool:
    """In the representative set: _AOT_CORE with all flags on, and the bf16 NCHW split path with
    one of SiLU and shift off."""
    if silu and shift:
        return (kernel, mode, dtype, layout) in _AOT_CORE
    return mode == "split" and dtype == "bf16" and layout == "nchw" and silu != shift
_AOT_REDUCE_NS = (1, PARTIAL_BLOCK)  # BLOCK_NS: unsplit, and the most tiles per step


def aot_specs() -> list:
    """The Triton kernels of this file x every flag combination the models reach, for
    ``python -m kernels.inspect`` (see the comment above _AOT_TILES)."""
    from kernels.aot import AotSpec

    dims = {"C": "i32", "HW": "i32", "G": "i32", "CPG": "i32", "NS": "i32", "n_chunks": "i32"}
    affine = dict(HAS_WEIGHT=True, HAS_BIAS=True)
    specs = []

    def add(kernel, config, fn, x_ptrs, f32_ptrs, dtype, constexprs, warps, core, ints=dims, extra=None):
        sig = {**{n: f"*{dtype}" for n in x_ptrs}, **{n: "*fp32" for n in f32_ptrs}, **ints, **(extra or {})}
        # pointers come 16-byte aligned from torch; C and HW are multiples of 16 at the SD shapes,
        # CPG (10, 20, 40) and the tile counts are not
        aligned = tuple(x_ptrs) + tuple(f32_ptrs) + tuple(n for n in ("C", "HW") if n in ints)
        specs.append(AotSpec(kernel, config, fn, sig, constexprs, num_warps=warps, aligned=aligned, core=core))

    x_in = ("X", "W", "Bias", "Shift")
    for layout, modes in _AOT_TILES.items():
        for mode, (bs, bc, align) in modes.items():
            warps = max(1, min(8, bs * bc // (32 * ELEMS_PER_THREAD)))
            tile = dict(CHANNELS_LAST=layout == "nhwc", CPG_ALIGN=align, BLOCK_S=bs, BLOCK_C=bc)
            split = mode == "split"
            for dtype in _AOT_DTYPES:
                for silu in (True, False):
                    for shift in (True, False):
                        label = (f"{dtype} {layout} {mode} {'silu' if silu else 'nosilu'} "
                                 f"{'shift' if shift else 'noshift'} S={bs} C={bc}"
                                 + (f" A={align}" if align > 1 else "") + f" w{warps}")

                        flags = dict(affine, HAS_SHIFT=shift, SILU=silu)
                        core = functools.partial(_aot_core, mode=mode, dtype=dtype, layout=layout, silu=silu,
                                                 shift=shift)
                        if split and silu:  # the statistics kernel has no SiLU flag: built once per shift
                            add("gn_fwd_stats", label.replace(" silu", ""), _gn_fwd_stats_kernel, ("X", "Shift"),
                                ("PMean", "PM2"), dtype, dict(tile, HAS_SHIFT=shift), warps,
                                _aot_core("gn_fwd_stats", mode, dtype, layout, True, shift))
                        add("gn_fwd", label, _gn_fwd_kernel, (*x_in, "Y"), ("Mean", "Rstd", "PMean", "PM2"), dtype,
                            dict(tile, **flags, SPLIT=split, BLOCK_P=PARTIAL_BLOCK), warps, core("gn_fwd"),
                            extra={"eps": "fp32"})
                        if split:
                            add("gn_bwd_stats", label, _gn_bwd_stats_kernel, (*x_in, "DY"),
                                ("Mean", "Rstd", "DWp", "DBp", "S1p", "S2p"), dtype, dict(tile, **flags), warps,
                                core("gn_bwd_stats"))
                        add("gn_bwd", label, _gn_bwd_kernel, (*x_in, "DY", "DX"),
                            ("Mean", "Rstd", "DWp", "DBp", "S1p", "S2p", "DSp"), dtype,
                            dict(tile, **flags, STORE_DSHIFT=shift, SPLIT=split, BLOCK_P=PARTIAL_BLOCK), warps,
                            core("gn_bwd"))
    for dtype in _AOT_DTYPES:
        for block_ns in _AOT_REDUCE_NS:
            for shift in (True, False):
                block_cr = REDUCE_TILE // block_ns
                add("gn_bwd_reduce", f"{dtype} {'shift' if shift else 'noshift'} CR={block_cr} NS={block_ns} "
                    f"w{REDUCE_WARPS}", _gn_bwd_reduce_kernel, ("DW", "DB", "DS"), ("DWp", "DBp", "DSp"), dtype,
                    dict(affine, HAS_SHIFT=shift, BLOCK_CR=block_cr, BLOCK_NS=block_ns), REDUCE_WARPS,
                    core=shift and (dtype, block_ns) in (("fp32", 1), ("bf16", PARTIAL_BLOCK)),
                    ints={"B": "i32", "C": "i32", "NS": "i32"})
    return specs
