"""Multi-head attention for every attention a UNet or VAE has (self and cross, non-causal).

Layout: ``q`` is ``(B, Nq, H, D)``, ``k`` and ``v`` are ``(B, Nk, H, D)``: the layout that a
projection produces with ``.view(B, N, H, D)``, any strides. ``key_lengths`` (``(B,)`` integers)
marks the first ``key_lengths[b]`` keys of batch ``b`` as valid; the rest (padded text tokens)
get no weight.

The Triton path is FlashAttention-2 (Tri Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", 2023): a tile of queries stays on chip while blocks of keys and
values stream past it, with an online softmax (running max and sum in fp32, exp2 with the scale
folded into log2 e); the logsumexp is saved, and the backward recomputes the probabilities from it.
The backward adds dQ up with fp32 atomics inside the dK/dV kernel where that pays (long key
sequences; 5 matmuls, as FlashAttention-2), or runs a dQ kernel of its own (7 matmuls, bitwise
reproducible: ``deterministic=True`` or ``LDM_ATTENTION_DETERMINISTIC=1``). Head dims that are not
a power of two run as a power-of-two chunk plus a power-of-two tail (40 = 32 + 16, 80 = 64 + 16,
160 = 128 + 32). The notes in ``kernels/attention.md`` give the algorithm, the config table and
the roofline.

Chain: ``_attn_fwd_kernel`` -> ``attention_forward`` and ``_attn_bwd_*_kernel`` ->
``attention_backward`` -> the custom ops ``ldm::attention_fwd`` / ``ldm::attention_bwd`` (fake
implementations and autograd registered with torch.library, so torch.compile traces through them) ->
``AttentionFunction`` -> ``attention()`` and the ``Attention`` module; the
dispatch in ``kernels.dispatch`` picks Triton on CUDA and PyTorch's ``scaled_dot_product_attention``
elsewhere.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.dispatch import (
    ATTENTION_MAX_HEAD_DIM,
    attention_triton_dtypes,
    resolve_backend,
    triton_available,
    triton_interpreted,
    triton_refusal,
)

MAX_HEAD_DIM = ATTENTION_MAX_HEAD_DIM  # widest head dim of the Triton kernels (the CONFIGS row 512)
LOG2E = math.log2(math.e)  # exp(x) == exp2(x * LOG2E)
INT32_MAX = 2**31 - 1


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
    if k.shape[1] == 0:
        raise ValueError(f"attention: k ({_shape(k)}) has no keys")
    if q.shape[3] == 0:
        raise ValueError(f"attention: head dim of q ({_shape(q)}) is 0")
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


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# Every kernel runs on a 1-D grid of (tile, batch*head) programs, the tile index fastest: the
# programs that read one head's K and V (or Q and dO) run side by side and find them in L2, and a
# 1-D grid has no 65535 limit (grid axes 1 and 2 have one; axis 0 allows 2**31 - 1 programs).
# Offsets of a batch and a head are taken in int64, so tensors may exceed 2**31 elements; within
# one (batch, head) slice the launcher checks that offsets fit in int32.
#
# The head dim D is a constexpr (HEAD_DIM), covered by one or two power-of-two chunks of columns
# (head_dim_chunks): a main chunk of BLOCK_D and, where D is not a power of two and it saves work,
# a tail of TAIL_D columns from BLOCK_D on (TAIL_D = 0: no tail, its code compiled out). Each
# product that sums over D (q k^T, dO v^T) is two tl.dots into one accumulator; each product with
# D columns (P v, dS k, P^T dO, dS^T q) has one accumulator per chunk. Loads and stores are masked
# on d < HEAD_DIM, so D = 40, 80, 160 run as 32 + 16, 64 + 16, 128 + 32 (48, 80, 160 columns, not
# the 64, 128, 256 of one power-of-two tile) with no padded copies.

if triton_available():
    import triton
    import triton.language as tl

    _LN2 = tl.constexpr(math.log(2.0))
    _LOG2E = tl.constexpr(LOG2E)
    _VECTOR_BYTES = tl.constexpr(16)  # widest global load/store: 8 fp16/bf16 or 4 fp32 elements

    def _device_fn(fn):
        """@triton.jit for a device helper, except under the interpreter: there every call of a
        jitted helper re-patches triton.language (milliseconds, most of the test time), while a
        plain function runs inside the calling kernel's patch and computes the same thing. Some of
        triton.language is such a helper (tl.zeros, tl.cdiv): the kernels make their zero tiles
        before the loops, not in them (on a GPU a zero tile is a constant either way)."""
        return fn if triton_interpreted() else triton.jit(fn)

    @_device_fn
    def _mma(a, b, acc, UPCAST: tl.constexpr):
        """acc + a @ b with fp32 accumulation; 16-bit tiles go to the tensor cores as they are
        (fp32 tiles, taken only by the interpreter, are multiplied exactly). UPCAST is set only
        under the interpreter, whose tl.dot multiplies the raw bits of bf16 tiles and runs fp16
        tiles through numpy's slow non-BLAS loop: 16-bit tiles are widened exactly (every fp16
        and bf16 is an fp32), so results keep the rounding a GPU gives them."""
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision="ieee")

    @_device_fn
    def _round(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
        """fp32 x rounded to nearest in dtype, as a GPU converts. Under the interpreter (UPCAST) the
        result stays an fp32 that holds the rounded value, since the interpreter truncates fp32 ->
        bf16 (a GPU rounds to nearest even): Veltkamp's split c - (c - x), c = x * (2**16 + 1),
        rounds an fp32 to its 8 leading significant bits, which is bf16's precision."""
        if UPCAST:
            if dtype == tl.bfloat16:
                c = x * 65537.0
                x = c - (c - x)
            else:
                x = x.to(dtype).to(tl.float32)
        else:
            x = x.to(dtype)
        return x

    @_device_fn
    def _tile_ptrs(Base, rows, stride_row, offs_d, stride_d, ALIGNED: tl.constexpr):
        """Pointers to the (rows, BLOCK_D) tile of a (N, D) slice. With ALIGNED (the launcher has
        checked that every row starts on a 16-byte boundary) the compiler is told so: loads and
        stores then move 16 bytes per instruction and keep one address per 16 bytes, not one per
        element (the hint must sit on an op made here, not on an argument, to reach the compiler)."""
        ptrs = Base + rows[:, None] * stride_row + offs_d[None, :] * stride_d
        if ALIGNED:
            ptrs = tl.multiple_of(ptrs, [1, _VECTOR_BYTES])
        return ptrs

    @_device_fn
    def _program(n, BLOCK: tl.constexpr):
        """This program's tile of a length-n axis cut in BLOCK blocks, and the index of the rest
        of the 1-D grid (batch * heads, and query splits for dK/dV): tiles fastest."""
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(n, BLOCK)
        return pid % n_tiles, pid // n_tiles

    @_device_fn
    def _head(Ptr, b, h, stride_b, stride_h):
        """Ptr moved to the (batch b, head h) slice, the offset in int64."""
        return Ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h

    @_device_fn
    def _kv_len(KeyLengths, b, Nk, HAS_KEY_LENGTHS: tl.constexpr):
        """Number of valid keys of batch b: min(key_lengths[b], Nk), at least 0."""
        kv_len = Nk
        if HAS_KEY_LENGTHS:
            kv_len = tl.minimum(tl.maximum(tl.load(KeyLengths + b), 0), Nk)
        return kv_len

    @_device_fn
    def _load_tile(Base, rows, stride_row, cols, stride_d, mask, ALIGNED: tl.constexpr):
        """The (rows, cols) tile of a (N, D) slice (one chunk of the head dim), 0 where mask is false."""
        return tl.load(_tile_ptrs(Base, rows, stride_row, cols, stride_d, ALIGNED), mask=mask, other=0.0)

    @_device_fn
    def _store_tile(Base, rows, stride_row, cols, stride_d, x, mask, ALIGNED: tl.constexpr, UPCAST: tl.constexpr):
        """Round the fp32 tile x to Base's dtype and store it at (rows, cols) where mask is true."""
        x = _round(x, Base.dtype.element_ty, UPCAST).to(Base.dtype.element_ty)
        tl.store(_tile_ptrs(Base, rows, stride_row, cols, stride_d, ALIGNED), x, mask=mask)

    @_device_fn
    def _add_tile(Base, rows, stride_row, cols, stride_d, x, mask, ALIGNED: tl.constexpr):
        """Atomically add the fp32 tile x into the fp32 slice at (rows, cols) where mask is true.
        Relaxed order: nothing reads the sums before the kernel ends, so no fence is needed."""
        tl.atomic_add(_tile_ptrs(Base, rows, stride_row, cols, stride_d, ALIGNED), x, mask=mask, sem="relaxed")

    # Masks of a (rows, chunk) tile are rows_ok[:, None] & cols_ok[None, :], with the column test
    # (d < HEAD_DIM) made once per kernel and the tile mask once per step, shared by every load of
    # those rows (the compiler would fold repeats; the interpreter would compute each one).
    # In each loop, a tail chunk's tl.dot comes before the main chunk's: on sm_80 Triton lets the
    # kernel's last dot choose how the warps split every chained dot (all along the longer side of
    # its output), and the main chunk's dot is the one to fit; with the tail's narrow output last,
    # 8 warps went along M and 32- or 64-row tiles were computed two to four times over (spills).

    @triton.jit
    def _attn_fwd_kernel(
        Q,  # pointer to queries, shape (B, Nq, H, D), any strides
        K,  # pointer to keys, shape (B, Nk, H, D), any strides
        V,  # pointer to values, shape (B, Nk, H, D), any strides
        Out,  # pointer to the output, shape (B, Nq, H, D)
        Lse,  # pointer to the logsumexp of the scaled scores (natural log), shape (B, H, Nq) contiguous, fp32
        KeyLengths,  # pointer to valid keys per batch, shape (B,) int32; None without HAS_KEY_LENGTHS
        stride_qb, stride_qn, stride_qh, stride_qd,  # strides of Q, elements
        stride_kb, stride_kn, stride_kh, stride_kd,  # strides of K
        stride_vb, stride_vn, stride_vh, stride_vd,  # strides of V
        stride_ob, stride_on, stride_oh, stride_od,  # strides of Out
        H, Nq, Nk,  # heads, queries, keys
        qk_scale,  # softmax scale * log2(e): scores go straight into exp2
        HEAD_DIM: tl.constexpr,  # D
        BLOCK_D: tl.constexpr,  # main chunk of the head dim, a power of two (see head_dim_chunks)
        TAIL_D: tl.constexpr,  # tail chunk, columns BLOCK_D .. BLOCK_D + TAIL_D; 0: none, compiled out
        BLOCK_M: tl.constexpr,  # queries per program
        BLOCK_N: tl.constexpr,  # keys per step of the inner loop
        HAS_KEY_LENGTHS: tl.constexpr,
        ALIGNED: tl.constexpr,  # every row of Q, K, V, Out starts on 16 bytes (see _tile_ptrs)
        UPCAST: tl.constexpr,  # interpreter only (see _mma)
    ):
        pid_m, bh = _program(Nq, BLOCK_M)
        b = bh // H
        h = bh % H
        kv_len = _kv_len(KeyLengths, b, Nk, HAS_KEY_LENGTHS)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Nq
        d_ok = offs_d < HEAD_DIM
        Q = _head(Q, b, h, stride_qb, stride_qh)
        K = _head(K, b, h, stride_kb, stride_kh)
        V = _head(V, b, h, stride_vb, stride_vh)
        Out = _head(Out, b, h, stride_ob, stride_oh)

        q_mask = m_ok[:, None] & d_ok[None, :]
        q = _load_tile(Q, offs_m, stride_qn, offs_d, stride_qd, q_mask, ALIGNED)  # (BLOCK_M, BLOCK_D)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) v
        if TAIL_D > 0:  # the same for the tail columns of the head dim
            offs_t = BLOCK_D + tl.arange(0, TAIL_D)
            t_ok = offs_t < HEAD_DIM
            q_mask_t = m_ok[:, None] & t_ok[None, :]
            q_t = _load_tile(Q, offs_m, stride_qn, offs_t, stride_qd, q_mask_t, ALIGNED)  # (BLOCK_M, TAIL_D)
            acc_t = tl.zeros([BLOCK_M, TAIL_D], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores, log2 units
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
        zero_s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # each step's scores start from it (see _device_fn)
        # Only blocks holding a valid key are visited, so every step sees at least one finite
        # score per row: m_i is finite after the first step and exp2(m_i - m_new) never meets -inf - -inf.
        for start_n in range(0, kv_len, BLOCK_N):
            n = start_n + offs_n
            n_ok = n < kv_len
            s = zero_s
            if TAIL_D > 0:  # q k^T sums over both chunks of D
                kv_mask_t = n_ok[:, None] & t_ok[None, :]
                k_t = _load_tile(K, n, stride_kn, offs_t, stride_kd, kv_mask_t, ALIGNED)
                s = _mma(q_t, tl.trans(k_t), s, UPCAST)
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = _load_tile(K, n, stride_kn, offs_d, stride_kd, kv_mask, ALIGNED)
            s = _mma(q, tl.trans(k), s, UPCAST)  # (BLOCK_M, BLOCK_N)
            s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
            p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N), fp32
            l_i = l_i * alpha + tl.sum(p, 1)
            p = _round(p, V.dtype.element_ty, UPCAST)  # the tensor cores take P in the input dtype
            if TAIL_D > 0:
                v_t = _load_tile(V, n, stride_vn, offs_t, stride_vd, kv_mask_t, ALIGNED)
                acc_t = _mma(p, v_t, acc_t * alpha[:, None], UPCAST)
            v = _load_tile(V, n, stride_vn, offs_d, stride_vd, kv_mask, ALIGNED)
            acc = _mma(p, v, acc * alpha[:, None], UPCAST)
            m_i = m_new

        # A batch whose key_lengths is 0 has no valid key: output 0, logsumexp -inf.
        has_keys = l_i > 0.0
        l_safe = tl.where(has_keys, l_i, 1.0)
        lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
        _store_tile(Out, offs_m, stride_on, offs_d, stride_od, acc / l_safe[:, None], q_mask, ALIGNED, UPCAST)
        if TAIL_D > 0:
            _store_tile(Out, offs_m, stride_on, offs_t, stride_od, acc_t / l_safe[:, None], q_mask_t, ALIGNED, UPCAST)
        tl.store(Lse + bh.to(tl.int64) * Nq + offs_m, lse, mask=m_ok)

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        Out,  # pointer to the forward output, shape (B, Nq, H, D), any strides
        DOut,  # pointer to the output gradient, shape (B, Nq, H, D), any strides
        Delta,  # pointer to rowsum(dO * O), shape (B, H, Nq) contiguous, fp32
        DQAcc,  # pointer to the fp32 dQ accumulator, shape (B, Nq, H, D), zeroed here; None without ZERO_DQ_ACC
        stride_ob, stride_on, stride_oh, stride_od,  # strides of Out
        stride_dob, stride_don, stride_doh, stride_dod,  # strides of DOut
        stride_dqab, stride_dqan, stride_dqah, stride_dqad,  # strides of DQAcc
        H, Nq,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,  # next power of two >= max(D, 16): no matmul here, one chunk covers D
        BLOCK_M: tl.constexpr,
        ZERO_DQ_ACC: tl.constexpr,  # the dK/dV kernel adds dQ into DQAcc with atomics (see attention_backward)
        ALIGNED: tl.constexpr,  # every row of Out, DOut, DQAcc starts on 16 bytes
    ):
        pid_m, bh = _program(Nq, BLOCK_M)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Nq
        mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        Out = _head(Out, b, h, stride_ob, stride_oh)
        DOut = _head(DOut, b, h, stride_dob, stride_doh)
        o = _load_tile(Out, offs_m, stride_on, offs_d, stride_od, mask, ALIGNED)
        do = _load_tile(DOut, offs_m, stride_don, offs_d, stride_dod, mask, ALIGNED)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
        tl.store(Delta + bh.to(tl.int64) * Nq + offs_m, delta, mask=m_ok)
        if ZERO_DQ_ACC:  # the same tile of the accumulator: saves a launch and a pass of its own
            DQAcc = _head(DQAcc, b, h, stride_dqab, stride_dqah)
            tl.store(_tile_ptrs(DQAcc, offs_m, stride_dqan, offs_d, stride_dqad, ALIGNED),
                     tl.zeros([BLOCK_M, BLOCK_D], tl.float32), mask=mask)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q,  # pointer to queries, shape (B, Nq, H, D), any strides
        K,  # pointer to keys, shape (B, Nk, H, D), any strides
        V,  # pointer to values, shape (B, Nk, H, D), any strides
        DOut,  # pointer to the output gradient, shape (B, Nq, H, D), any strides
        Lse,  # pointer to the forward logsumexp, shape (B, H, Nq) contiguous, fp32
        Delta,  # pointer to rowsum(dO * O), shape (B, H, Nq) contiguous, fp32
        DK,  # pointer to dK, shape (Q_SPLITS, B, Nk, H, D): the output's dtype, or fp32 partial sums
        DV,  # pointer to dV, same shape, strides and dtype as DK
        DQAcc,  # pointer to the fp32 dQ accumulator, shape (B, Nq, H, D), zeroed; None without ATOMIC_DQ
        KeyLengths,  # pointer to valid keys per batch, shape (B,) int32; None without HAS_KEY_LENGTHS
        stride_qb, stride_qn, stride_qh, stride_qd,  # strides of Q
        stride_kb, stride_kn, stride_kh, stride_kd,  # strides of K
        stride_vb, stride_vn, stride_vh, stride_vd,  # strides of V
        stride_dob, stride_don, stride_doh, stride_dod,  # strides of DOut
        stride_dks, stride_dkb, stride_dkn, stride_dkh, stride_dkd,  # strides of DK and DV, split first
        stride_dqab, stride_dqan, stride_dqah, stride_dqad,  # strides of DQAcc
        H, Nq, Nk,
        Q_SPLITS,  # programs that share one key block, each summing over its own range of queries
        qk_scale,  # softmax scale * log2(e)
        sm_scale,  # softmax scale
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,  # main chunk of the head dim
        TAIL_D: tl.constexpr,  # tail chunk, 0 for none
        BLOCK_M: tl.constexpr,  # queries per step of the inner loop
        BLOCK_N: tl.constexpr,  # keys per program, held on chip with their dK, dV
        HAS_KEY_LENGTHS: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,  # also add scale * dS K into DQAcc: the dQ kernel is then not run
        ALIGNED: tl.constexpr,  # every row of Q, K, V, DOut, DK, DV (and DQAcc) starts on 16 bytes
        UPCAST: tl.constexpr,
    ):
        pid_n, rest = _program(Nk, BLOCK_N)
        split = rest % Q_SPLITS
        bh = rest // Q_SPLITS
        b = bh // H
        h = bh % H
        kv_len = _kv_len(KeyLengths, b, Nk, HAS_KEY_LENGTHS)

        # This program's queries: whole blocks, split evenly; none when every key of the block is padding.
        m_per_split = tl.cdiv(tl.cdiv(Nq, BLOCK_M), Q_SPLITS) * BLOCK_M
        m_start = split * m_per_split
        m_end = tl.minimum(m_start + m_per_split, Nq)
        m_end = tl.where(pid_n * BLOCK_N < kv_len, m_end, m_start)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < kv_len
        d_ok = offs_d < HEAD_DIM
        Q = _head(Q, b, h, stride_qb, stride_qh)
        K = _head(K, b, h, stride_kb, stride_kh)
        V = _head(V, b, h, stride_vb, stride_vh)
        DOut = _head(DOut, b, h, stride_dob, stride_doh)
        Lse += bh.to(tl.int64) * Nq
        Delta += bh.to(tl.int64) * Nq
        if ATOMIC_DQ:
            DQAcc = _head(DQAcc, b, h, stride_dqab, stride_dqah)

        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = _load_tile(K, offs_n, stride_kn, offs_d, stride_kd, kv_mask, ALIGNED)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(V, offs_n, stride_vn, offs_d, stride_vd, kv_mask, ALIGNED)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if TAIL_D > 0:  # the same for the tail columns of the head dim
            offs_t = BLOCK_D + tl.arange(0, TAIL_D)
            t_ok = offs_t < HEAD_DIM
            kv_mask_t = n_ok[:, None] & t_ok[None, :]
            k_t = _load_tile(K, offs_n, stride_kn, offs_t, stride_kd, kv_mask_t, ALIGNED)  # (BLOCK_N, TAIL_D)
            v_t = _load_tile(V, offs_n, stride_vn, offs_t, stride_vd, kv_mask_t, ALIGNED)
            dk_t = tl.zeros([BLOCK_N, TAIL_D], tl.float32)
            dv_t = tl.zeros([BLOCK_N, TAIL_D], tl.float32)
        zero_s = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # each step's S^T and dP^T start from it (see _device_fn)
        if ATOMIC_DQ:
            zero_dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            if TAIL_D > 0:
                zero_dq_t = tl.zeros([BLOCK_M, TAIL_D], tl.float32)
        for start_m in range(m_start, m_end, BLOCK_M):
            m = start_m + offs_m
            m_ok = m < Nq
            sT = zero_s  # (K Q^T), S transposed
            dpT = zero_s  # (V dO^T)
            if TAIL_D > 0:  # both sum over D
                q_mask_t = m_ok[:, None] & t_ok[None, :]
                q_t = _load_tile(Q, m, stride_qn, offs_t, stride_qd, q_mask_t, ALIGNED)  # (BLOCK_M, TAIL_D)
                do_t = _load_tile(DOut, m, stride_don, offs_t, stride_dod, q_mask_t, ALIGNED)
                sT = _mma(k_t, tl.trans(q_t), sT, UPCAST)
                dpT = _mma(v_t, tl.trans(do_t), dpT, UPCAST)
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = _load_tile(Q, m, stride_qn, offs_d, stride_qd, q_mask, ALIGNED)  # (BLOCK_M, BLOCK_D)
            do = _load_tile(DOut, m, stride_don, offs_d, stride_dod, q_mask, ALIGNED)
            sT = _mma(k, tl.trans(q), sT, UPCAST)
            dpT = _mma(v, tl.trans(do), dpT, UPCAST)
            # Rows past Nq read lse = +inf: their probabilities come out exactly 0.
            lse2 = tl.load(Lse + m, mask=m_ok, other=float("inf")) * _LOG2E
            pT = tl.math.exp2(sT * qk_scale - lse2[None, :])  # (BLOCK_N, BLOCK_M), P transposed
            pT = tl.where(n_ok[:, None], pT, 0.0)  # padded keys get no weight, hence no gradient
            delta = tl.load(Delta + m, mask=m_ok, other=0.0)
            dsT = _round(pT * (dpT - delta[None, :]), Q.dtype.element_ty, UPCAST)  # dS^T = P^T * (dP^T - delta)
            pT = _round(pT, DOut.dtype.element_ty, UPCAST)
            if TAIL_D > 0:
                dv_t = _mma(pT, do_t, dv_t, UPCAST)
                dk_t = _mma(dsT, q_t, dk_t, UPCAST)
            dv = _mma(pT, do, dv, UPCAST)  # dV += P^T dO
            dk = _mma(dsT, q, dk, UPCAST)  # dK += dS^T Q (scaled below)
            if ATOMIC_DQ:  # dQ += scale * dS K for these queries, summed over the key blocks in fp32
                ds = tl.trans(dsT)  # (BLOCK_M, BLOCK_N)
                if TAIL_D > 0:
                    dq_t = _mma(ds, k_t, zero_dq_t, UPCAST) * sm_scale
                    _add_tile(DQAcc, m, stride_dqan, offs_t, stride_dqad, dq_t, q_mask_t, ALIGNED)
                dq = _mma(ds, k, zero_dq, UPCAST) * sm_scale
                _add_tile(DQAcc, m, stride_dqan, offs_d, stride_dqad, dq, q_mask, ALIGNED)

        DK = _head(DK + split.to(tl.int64) * stride_dks, b, h, stride_dkb, stride_dkh)
        DV = _head(DV + split.to(tl.int64) * stride_dks, b, h, stride_dkb, stride_dkh)
        out_ok = offs_n < Nk  # padded keys get their zero gradients written too
        out_mask = out_ok[:, None] & d_ok[None, :]
        _store_tile(DK, offs_n, stride_dkn, offs_d, stride_dkd, dk * sm_scale, out_mask, ALIGNED, UPCAST)
        _store_tile(DV, offs_n, stride_dkn, offs_d, stride_dkd, dv, out_mask, ALIGNED, UPCAST)
        if TAIL_D > 0:
            out_mask_t = out_ok[:, None] & t_ok[None, :]
            _store_tile(DK, offs_n, stride_dkn, offs_t, stride_dkd, dk_t * sm_scale, out_mask_t, ALIGNED, UPCAST)
            _store_tile(DV, offs_n, stride_dkn, offs_t, stride_dkd, dv_t, out_mask_t, ALIGNED, UPCAST)

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q,  # pointer to queries, shape (B, Nq, H, D), any strides
        K,  # pointer to keys, shape (B, Nk, H, D), any strides
        V,  # pointer to values, shape (B, Nk, H, D), any strides
        DOut,  # pointer to the output gradient, shape (B, Nq, H, D), any strides
        Lse,  # pointer to the forward logsumexp, shape (B, H, Nq) contiguous, fp32
        Delta,  # pointer to rowsum(dO * O), shape (B, H, Nq) contiguous, fp32
        DQ,  # pointer to dQ, shape (B, Nq, H, D)
        KeyLengths,  # pointer to valid keys per batch, shape (B,) int32; None without HAS_KEY_LENGTHS
        stride_qb, stride_qn, stride_qh, stride_qd,  # strides of Q
        stride_kb, stride_kn, stride_kh, stride_kd,  # strides of K
        stride_vb, stride_vn, stride_vh, stride_vd,  # strides of V
        stride_dob, stride_don, stride_doh, stride_dod,  # strides of DOut
        stride_dqb, stride_dqn, stride_dqh, stride_dqd,  # strides of DQ
        H, Nq, Nk,
        qk_scale,  # softmax scale * log2(e)
        sm_scale,  # softmax scale
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,  # main chunk of the head dim
        TAIL_D: tl.constexpr,  # tail chunk, 0 for none
        BLOCK_M: tl.constexpr,  # queries per program, held on chip with their dO and dQ
        BLOCK_N: tl.constexpr,  # keys per step of the inner loop
        HAS_KEY_LENGTHS: tl.constexpr,
        ALIGNED: tl.constexpr,  # every row of Q, K, V, DOut, DQ starts on 16 bytes
        UPCAST: tl.constexpr,
    ):
        pid_m, bh = _program(Nq, BLOCK_M)
        b = bh // H
        h = bh % H
        kv_len = _kv_len(KeyLengths, b, Nk, HAS_KEY_LENGTHS)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Nq
        d_ok = offs_d < HEAD_DIM
        Q = _head(Q, b, h, stride_qb, stride_qh)
        K = _head(K, b, h, stride_kb, stride_kh)
        V = _head(V, b, h, stride_vb, stride_vh)
        DOut = _head(DOut, b, h, stride_dob, stride_doh)
        DQ = _head(DQ, b, h, stride_dqb, stride_dqh)

        q_mask = m_ok[:, None] & d_ok[None, :]
        q = _load_tile(Q, offs_m, stride_qn, offs_d, stride_qd, q_mask, ALIGNED)  # (BLOCK_M, BLOCK_D)
        do = _load_tile(DOut, offs_m, stride_don, offs_d, stride_dod, q_mask, ALIGNED)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if TAIL_D > 0:  # the same for the tail columns of the head dim
            offs_t = BLOCK_D + tl.arange(0, TAIL_D)
            t_ok = offs_t < HEAD_DIM
            q_mask_t = m_ok[:, None] & t_ok[None, :]
            q_t = _load_tile(Q, offs_m, stride_qn, offs_t, stride_qd, q_mask_t, ALIGNED)  # (BLOCK_M, TAIL_D)
            do_t = _load_tile(DOut, offs_m, stride_don, offs_t, stride_dod, q_mask_t, ALIGNED)
            dq_t = tl.zeros([BLOCK_M, TAIL_D], tl.float32)
        lse2 = tl.load(Lse + bh.to(tl.int64) * Nq + offs_m, mask=m_ok, other=float("inf")) * _LOG2E
        delta = tl.load(Delta + bh.to(tl.int64) * Nq + offs_m, mask=m_ok, other=0.0)
        zero_s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # each step's S and dP start from it (see _device_fn)
        for start_n in range(0, kv_len, BLOCK_N):
            n = start_n + offs_n
            n_ok = n < kv_len
            s = zero_s
            dp = zero_s  # dO V^T
            if TAIL_D > 0:  # both sum over D
                kv_mask_t = n_ok[:, None] & t_ok[None, :]
                k_t = _load_tile(K, n, stride_kn, offs_t, stride_kd, kv_mask_t, ALIGNED)  # (BLOCK_N, TAIL_D)
                v_t = _load_tile(V, n, stride_vn, offs_t, stride_vd, kv_mask_t, ALIGNED)
                s = _mma(q_t, tl.trans(k_t), s, UPCAST)
                dp = _mma(do_t, tl.trans(v_t), dp, UPCAST)
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = _load_tile(K, n, stride_kn, offs_d, stride_kd, kv_mask, ALIGNED)  # (BLOCK_N, BLOCK_D)
            v = _load_tile(V, n, stride_vn, offs_d, stride_vd, kv_mask, ALIGNED)
            s = _mma(q, tl.trans(k), s, UPCAST)
            dp = _mma(do, tl.trans(v), dp, UPCAST)
            p = tl.math.exp2(s * qk_scale - lse2[:, None])
            p = tl.where(n_ok[None, :], p, 0.0)
            ds = _round(p * (dp - delta[:, None]), K.dtype.element_ty, UPCAST)
            if TAIL_D > 0:
                dq_t = _mma(ds, k_t, dq_t, UPCAST)
            dq = _mma(ds, k, dq, UPCAST)  # dQ += dS K (scaled below)

        _store_tile(DQ, offs_m, stride_dqn, offs_d, stride_dqd, dq * sm_scale, q_mask, ALIGNED, UPCAST)
        if TAIL_D > 0:
            _store_tile(DQ, offs_m, stride_dqn, offs_t, stride_dqd, dq_t * sm_scale, q_mask_t, ALIGNED, UPCAST)


# ----------------------------------------------------------------------------------------------
# Block configs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options of one kernel."""

    block_m: int  # queries per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int

    def label(self) -> str:
        return f"BM={self.block_m} BN={self.block_n} w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class AttentionConfig:
    """One row of the table: the configs of the forward, dK/dV and dQ kernels."""

    fwd: BlockConfig
    dkdv: BlockConfig  # block_n keys held on chip, block_m queries streamed
    dq: BlockConfig  # block_m queries held on chip, block_n keys streamed
    dkdv_atomic: BlockConfig | None = None  # the dK/dV kernel when it also adds dQ; None: as dkdv

    @property
    def dkdv_with_dq(self) -> BlockConfig:
        return self.dkdv_atomic or self.dkdv


# One row per width of the head-dim chunks, BLOCK_D + TAIL_D (head_dim_chunks): a head dim takes the
# first row at least as wide, so D <= 16 (the tiny UNet's 4 and 8) takes 16, 17..64 (SD: 40, run as
# 32 + 16) 64, 65..96 (SD: 80, as 64 + 16) 96, 97..128 (padded to 128) 128, 129..256 (SD: 160, as
# 128 + 32) 256, and 257..512 (the SD VAE's single 512-wide head; 320 as 256 + 64) 512. Every program's
# tiles fit in registers (at most 255 per thread) and its pipelined K/V (or Q/dO) buffers in shared
# memory (A100 163 KiB, H100 227 KiB per program); `python -m kernels.inspect --kernel attn` builds
# every row at every specialization the models reach and shows no spills. kernels/attention.md gives
# the reasoning.
CONFIGS: dict[int, AttentionConfig] = {
    # 16 columns (D <= 16: the tiny UNet's 4 and 8): the 64 row's tiles, but 3 stages for dK/dV and dQ and
    # 64 queries a step with atomic dQ: at 2 stages ptxas parked one register on the stack around the
    # loop of the D = 8 dQ and split dK/dV kernels and the D = 4 unaligned atomic one (4 bytes of spill
    # stores at 80 to 128 registers, sm_80); these build clean at every flag (attention.md)
    16: AttentionConfig(fwd=BlockConfig(128, 64, 8, 3), dkdv=BlockConfig(64, 128, 8, 3), dq=BlockConfig(128, 64, 8, 3),
                        dkdv_atomic=BlockConfig(64, 128, 8, 2)),
    64: AttentionConfig(fwd=BlockConfig(128, 64, 8, 3), dkdv=BlockConfig(64, 128, 8, 2), dq=BlockConfig(128, 64, 8, 2),
                        dkdv_atomic=BlockConfig(32, 128, 8, 2)),
    96: AttentionConfig(fwd=BlockConfig(128, 64, 8, 3), dkdv=BlockConfig(32, 128, 8, 2), dq=BlockConfig(128, 32, 8, 2)),
    128: AttentionConfig(fwd=BlockConfig(128, 64, 8, 3), dkdv=BlockConfig(64, 64, 8, 2), dq=BlockConfig(128, 32, 8, 2)),
    256: AttentionConfig(fwd=BlockConfig(64, 64, 8, 2), dkdv=BlockConfig(32, 32, 8, 2), dq=BlockConfig(64, 32, 8, 2),
                         dkdv_atomic=BlockConfig(16, 64, 8, 2)),
    # 512 columns: the fp32 accumulator alone is BLOCK_M * 2 registers a thread at 8 warps, so 64
    # queries stream 16 keys a step (255 registers on sm_80), 32 keys are held in dK/dV, 16 with atomic
    # dQ (32 spilled without key lengths on sm_90 and with split queries on sm_80; attention.md)
    512: AttentionConfig(fwd=BlockConfig(64, 16, 8, 2), dkdv=BlockConfig(16, 32, 8, 2), dq=BlockConfig(32, 32, 8, 2),
                         dkdv_atomic=BlockConfig(16, 16, 8, 2)),
}
PREPROCESS_ELEMENTS = 4096  # elements of O (and dO) per preprocess program: 32 per thread at 4 warps
PREPROCESS_WARPS = 4
DEFAULT_SM_COUNT = 132  # streaming multiprocessors assumed when no GPU says otherwise (H100 SXM)
MIN_Q_BLOCKS_PER_SPLIT = 8  # a dK/dV program that splits the queries streams at least this many blocks,
# so the queries it reads (8 x BLOCK_M rows of Q and dO) outweigh the fp32 partial sums it writes
MIN_DOT_DIM = 16  # smallest K and N of tl.dot: the narrowest chunk of the head dim
# From this many keys on the backward adds dQ with atomics by default. Recomputing S and dP in a dQ
# kernel costs 4 * Nk * D FLOP and Nk exp2 per query row; the fp32 accumulator costs about 8 * D more
# bytes per row (zeroed, written back, read by the final copy, against Q and dO read again). At the
# H100 peaks that breaks even at 190 keys for D = 40, 290 for D = 80, 380 for D = 160 (attention.md):
# 512 keeps a margin for the L2 atomics the model leaves out. Shorter keys (cross-attention against
# 77 tokens, where the dK/dV kernel is split over queries to fill the GPU) keep the dQ kernel.
ATOMIC_DQ_MIN_KEYS = 512
DETERMINISTIC_ENV = "LDM_ATTENTION_DETERMINISTIC"  # =1: never atomics (see deterministic_requested)


def block_d(head_dim: int) -> int:
    """One power-of-two tile covering a head dim: the next power of two, at least MIN_DOT_DIM."""
    return max(MIN_DOT_DIM, 1 << (head_dim - 1).bit_length())


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, TAIL_D): the power-of-two chunks of columns that cover a head dim in the matmul
    kernels. The main chunk is the largest power of two <= D, the tail the next power of two >= the
    rest, at least MIN_DOT_DIM: 40 -> 32 + 16, 72 and 80 -> 64 + 16, 96 -> 64 + 32, 160 -> 128 + 32.
    Where that is no narrower than one padded tile (17..32, 49..64, 97..128, 193..256: 24 -> 16 + 16,
    200 -> 128 + 128) the tail would only add instructions, so one tile of block_d(D) columns
    runs, TAIL_D = 0; so does every power of two. A tail that wins saves at least a quarter of the
    columns (it is at most half the main chunk)."""
    padded = block_d(head_dim)
    main = max(MIN_DOT_DIM, 1 << max(head_dim.bit_length() - 1, 0))
    if main >= head_dim:
        return padded, 0
    tail = block_d(head_dim - main)
    if main + tail >= padded:
        return padded, 0
    return main, tail


def deterministic_requested(deterministic: bool | None = None) -> bool | None:
    """The backward's determinism as asked for: the argument when given, else True when the
    environment variable LDM_ATTENTION_DETERMINISTIC is set true or PyTorch's
    ``torch.use_deterministic_algorithms(True)`` is in force, else None (no preference)."""
    if deterministic is not None:
        return bool(deterministic)
    value = os.environ.get(DETERMINISTIC_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value not in ("", "0", "false", "no", "off"):
        raise ValueError(f"environment variable {DETERMINISTIC_ENV}={value!r}: expected 1 or 0")
    return True if torch.are_deterministic_algorithms_enabled() else None


def use_atomic_dq(n_keys: int, deterministic: bool | None = None) -> bool:
    """Whether the backward adds dQ up with fp32 atomics inside the dK/dV kernel (5 matmuls; the
    order of the fp32 additions, hence the last bits of dQ, varies from run to run) instead of
    computing it in a dQ kernel of its own (7 matmuls: S and dP again; deterministic).
    ``deterministic=True`` never uses atomics, ``False`` always does; with no preference (see
    deterministic_requested) they are used where they pay, from ATOMIC_DQ_MIN_KEYS keys on."""
    wanted = deterministic_requested(deterministic)
    if wanted is not None:
        return not wanted
    return n_keys >= ATOMIC_DQ_MIN_KEYS


def pick_config(head_dim: int) -> AttentionConfig:
    """The table's row for this head dim: the narrowest at least as wide as its chunks."""
    width = sum(head_dim_chunks(head_dim))
    return CONFIGS[min(w for w in CONFIGS if w >= width)]


def preprocess_block_m(block_d_: int) -> int:
    """Rows per program of the delta = rowsum(dO * O) kernel: PREPROCESS_ELEMENTS elements."""
    return max(16, min(128, PREPROCESS_ELEMENTS // block_d_))


def q_splits(n_key_blocks: int, n_query_blocks: int, batch_heads: int, sm_count: int) -> int:
    """How many programs share each key block of the dK/dV kernel. Short key sequences (cross-
    attention against 77 tokens) give too few key blocks to fill the GPU, so the queries are split
    and the fp32 partial sums added afterwards; long ones keep one program per key block."""
    programs = n_key_blocks * batch_heads
    if programs >= sm_count:
        return 1
    return max(1, min(-(-sm_count // programs), n_query_blocks // MIN_Q_BLOCKS_PER_SPLIT))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def triton_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """Input dtypes the Triton kernels take on ``device``. On a GPU, fp16 and bf16: exact fp32
    products cannot run on tensor cores (TF32 rounds them to 10 mantissa bits, 3xTF32 spills at
    every useful tile size, see attention.md), so fp32 goes to PyTorch's exact SDPA. The CPU
    interpreter also takes fp32, which the tests use as a near-exact check of the algorithm.
    The rule lives in kernels.dispatch, which decides the backend."""
    return attention_triton_dtypes(device)


def _check_triton_call(**tensors: torch.Tensor) -> None:
    """The launchers' contract, by the rules dispatch decides with (dtype, head dim: triton_refusal),
    and within one (batch, head) slice of every other (B, N, H, D) tensor the offsets
    n * stride_n + d * stride_d fit in int32."""
    why = triton_refusal("attention", tensors["q"], tensors["k"], tensors["v"])
    if why is not None:
        raise ValueError(f"attention: the Triton kernels {why}; use backend='torch'")
    for name, t in tensors.items():
        reach = (t.shape[1] - 1) * abs(t.stride(1)) + (t.shape[3] - 1) * abs(t.stride(3))
        if reach > INT32_MAX:
            raise ValueError(f"attention: one (batch, head) slice of {name} ({_shape(t)}, strides "
                             f"{t.stride()}) spans more than 2**31 elements")


def _out_buffer(name: str, given: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """A contiguous, 16-byte aligned buffer: ``given`` after checking it, else a new tensor."""
    if given is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(given.shape) != shape or given.dtype != dtype or given.device != device:
        raise ValueError(f"attention: {name} must be {dtype} of shape {shape} on {device}, got "
                         f"{given.dtype} of shape {tuple(given.shape)} on {given.device}")
    if not given.is_contiguous() or given.data_ptr() % 16:
        raise ValueError(f"attention: {name} ({_shape(given)}) must be contiguous and 16-byte aligned")
    return given


_ALIGN_BYTES = 16  # row alignment that lets the kernels move 16 bytes per load (_tile_ptrs' hint)


def _rows_aligned(*tensors: torch.Tensor) -> bool:
    """True when every (B, N, H, D) tensor has a contiguous last dim and each of its rows starts
    on a 16-byte boundary: the kernels may then load and store 16 bytes at a time (see _aligned).
    Dims of size 1 are never stepped over, so their strides do not count."""
    for t in tensors:
        if t.data_ptr() % 16 or (t.shape[-1] > 1 and t.stride(-1) != 1):
            return False
        if any(n > 1 and s * t.element_size() % 16 for n, s in zip(t.shape[:-1], t.stride()[:-1], strict=True)):
            return False
    return True


def _align_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors, each one whose rows are off 16 bytes (a view at an odd offset, a strided head
    dim) copied to contiguous memory where that aligns it (D * itemsize a multiple of 16). One pass
    over that tensor buys the aligned kernels: 16-byte loads, and no unaligned build of the wide
    kernels, whose per-element addresses spill (the dK/dV kernels at D >= 32 on sm_80, attention.md).
    Rows that no layout can align (D = 4 in 16-bit: 8-byte rows) run the unaligned build."""
    return tuple(t if _rows_aligned(t) or t.shape[-1] * t.element_size() % _ALIGN_BYTES else t.contiguous()
                 for t in tensors)


def _key_lengths_i32(key_lengths: torch.Tensor | None) -> torch.Tensor | None:
    if key_lengths is None:
        return None
    return key_lengths.to(torch.int32).contiguous()


def _upcast(dtype: torch.dtype) -> bool:
    """Widen 16-bit dot operands to fp32, only under the interpreter (see _mma)."""
    return triton_interpreted() and dtype != torch.float32


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      key_lengths: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                      lse: torch.Tensor | None = None,
                      config: AttentionConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. q (B, Nq, H, D), k and v (B, Nk, H, D), any strides ->
    out (B, Nq, H, D) contiguous in q's dtype, lse (B, H, Nq) fp32 (natural log of the softmax
    denominator of the scaled scores; -inf for a batch without valid keys).

    ``out`` and ``lse`` may be given (contiguous) to be written in place; ``config`` overrides the table.
    """
    check_attention_inputs(q, k, v, key_lengths)
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    out = _out_buffer("out", out, (B, Nq, H, D), q.dtype, q.device)
    _check_triton_call(q=q, k=k, v=v, out=out)
    q, k, v = _align_rows(q, k, v)
    lse = _out_buffer("lse", lse, (B, H, Nq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    cfg = (config or pick_config(D)).fwd
    BD, TD = head_dim_chunks(D)
    grid = (triton.cdiv(Nq, cfg.block_m) * B * H,)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, _key_lengths_i32(key_lengths),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Nq, Nk, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=BD, TAIL_D=TD, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_KEY_LENGTHS=key_lengths is not None, ALIGNED=_rows_aligned(q, k, v, out),
        UPCAST=_upcast(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float,
                       key_lengths: torch.Tensor | None = None, *, dq: torch.Tensor | None = None,
                       dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
                       delta: torch.Tensor | None = None, dq_acc: torch.Tensor | None = None,
                       config: AttentionConfig | None = None, splits: int | None = None,
                       deterministic: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels: delta = rowsum(dO * O), then dK and dV (K, V held on chip while
    the queries stream), and dQ one of two ways (use_atomic_dq): added up in an fp32 accumulator
    with atomics by the dK/dV kernel, then copied into dq; or by a dQ kernel of its own
    (deterministic). Returns dq, dk, dv, contiguous, in q's dtype.

    ``dq``, ``dk``, ``dv``, ``delta`` ((B, H, Nq) fp32) and ``dq_acc`` ((B, Nq, H, D) fp32, used by the
    atomic path only) may be given to be written in place; ``config`` overrides the table,
    ``splits`` the number of query ranges per key block of dK/dV; ``deterministic``: True for the
    dQ kernel, False for the atomics, None to let use_atomic_dq decide.
    """
    check_attention_inputs(q, k, v, key_lengths)
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    for name, t in (("dout", dout), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"attention: {name} must be {q.dtype} of q's shape {_shape(q)} on {q.device}, "
                             f"got {t.dtype} of shape {_shape(t)} on {t.device}")
    _out_buffer("lse", lse, (B, H, Nq), torch.float32, q.device)  # as the forward wrote it
    dq = _out_buffer("dq", dq, tuple(q.shape), q.dtype, q.device)
    dk = _out_buffer("dk", dk, tuple(k.shape), k.dtype, k.device)
    dv = _out_buffer("dv", dv, tuple(v.shape), v.dtype, v.device)
    delta = _out_buffer("delta", delta, (B, H, Nq), torch.float32, q.device)
    atomic = use_atomic_dq(Nk, deterministic)
    if atomic:
        dq_acc = _out_buffer("dq_acc", dq_acc, tuple(q.shape), torch.float32, q.device)
        acc_args = (dq_acc, *dq_acc.stride())
    else:
        acc_args = (None, 0, 0, 0, 1)  # no accumulator: the kernels compile its code out
    _check_triton_call(q=q, k=k, v=v, out=out, dout=dout, dq=dq)
    q, k, v, out, dout = _align_rows(q, k, v, out, dout)
    if dk.numel() == 0:
        return dq, dk, dv
    if Nq == 0:  # no query looks at any key
        return dq, dk.zero_(), dv.zero_()
    cfg = config or pick_config(D)
    BD, TD = head_dim_chunks(D)
    kl, upcast = _key_lengths_i32(key_lengths), _upcast(q.dtype)
    aligned_acc = (dq_acc,) if atomic else ()

    pre_d = block_d(D)
    pre_m = preprocess_block_m(pre_d)
    _attn_bwd_preprocess_kernel[(triton.cdiv(Nq, pre_m) * B * H,)](
        out, dout, delta, acc_args[0], *out.stride(), *dout.stride(), *acc_args[1:], H, Nq,
        HEAD_DIM=D, BLOCK_D=pre_d, BLOCK_M=pre_m, ZERO_DQ_ACC=atomic,
        ALIGNED=_rows_aligned(out, dout, *aligned_acc), num_warps=PREPROCESS_WARPS,
    )

    c = cfg.dkdv_with_dq if atomic else cfg.dkdv
    n_blocks = triton.cdiv(Nk, c.block_n)
    if splits is None:
        splits = q_splits(n_blocks, triton.cdiv(Nq, c.block_m), B * H, _sm_count(q.device))
    if splits == 1:  # each program owns its keys: write dK, dV straight into the outputs
        dk_part, dv_part, part_strides = dk, dv, (0, *dk.stride())
    else:  # each program sums over its range of queries: fp32 partials, added below
        parts = torch.empty((2, splits, *k.shape), dtype=torch.float32, device=k.device)
        dk_part, dv_part = parts.unbind(0)  # (splits, B, Nk, H, D) each
        part_strides = dk_part.stride()
    _attn_bwd_dkdv_kernel[(n_blocks * splits * B * H,)](
        q, k, v, dout, lse, delta, dk_part, dv_part, acc_args[0], kl,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *part_strides, *acc_args[1:],
        H, Nq, Nk, splits, scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_D=BD, TAIL_D=TD, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        HAS_KEY_LENGTHS=key_lengths is not None, ATOMIC_DQ=atomic,
        ALIGNED=_rows_aligned(q, k, v, dout, dk_part, dv_part, *aligned_acc),
        UPCAST=upcast, num_warps=c.num_warps, num_stages=c.num_stages,
    )
    if splits > 1:  # add the partials in fp32 (sum(out=bf16) would round them first), then round once
        sums = parts.sum(1)  # (2, B, Nk, H, D)
        dk.copy_(sums[0])
        dv.copy_(sums[1])
    if atomic:  # the sums are complete once the dK/dV kernel ends (scaled already): round them once
        dq.copy_(dq_acc)
        return dq, dk, dv

    c = cfg.dq
    _attn_bwd_dq_kernel[(triton.cdiv(Nq, c.block_m) * B * H,)](
        q, k, v, dout, lse, delta, dq, kl,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        H, Nq, Nk, scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_D=BD, TAIL_D=TD, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        HAS_KEY_LENGTHS=key_lengths is not None, ALIGNED=_rows_aligned(q, k, v, dout, dq),
        UPCAST=upcast, num_warps=c.num_warps, num_stages=c.num_stages,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees
# ----------------------------------------------------------------------------------------------
# The launchers are registered with torch.library as two opaque ops, ``ldm::attention_fwd`` and
# ``ldm::attention_bwd``, each with a fake implementation (output shapes, dtypes and strides without
# running anything), and the forward with its autograd (the backward op). A compiled model traces
# through them without a graph break (PyTorch's guidance for user-defined Triton kernels). The
# schemas are spelled out, so the ops register the same way on every torch from 2.4 on.

def _attention_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        key_lengths: torch.Tensor | None,
                        deterministic: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale, key_lengths)  # (B, Nq, H, D), (B, H, Nq) fp32


def _attention_fwd_fake(q, k, v, scale, key_lengths, deterministic):
    B, Nq, H, D = q.shape
    return q.new_empty((B, Nq, H, D)), q.new_empty((B, H, Nq), dtype=torch.float32)  # contiguous, as the launcher's


def _attention_bwd_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, scale: float, key_lengths: torch.Tensor | None,
                        deterministic: bool | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, scale, key_lengths, deterministic=deterministic)


def _attention_bwd_fake(dout, q, k, v, out, lse, scale, key_lengths, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the launcher's


attention_fwd_op = torch.library.custom_op(
    "ldm::attention_fwd", _attention_fwd_impl, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, float scale, Tensor? key_lengths, bool? deterministic) -> (Tensor, Tensor)")
attention_fwd_op.register_fake(_attention_fwd_fake)
attention_bwd_op = torch.library.custom_op(
    "ldm::attention_bwd", _attention_bwd_impl, mutates_args=(),
    schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, Tensor? key_lengths, "
           "bool? deterministic) -> (Tensor, Tensor, Tensor)")
attention_bwd_op.register_fake(_attention_bwd_fake)


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, key_lengths, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths)
    ctx.scale, ctx.deterministic = scale, deterministic


def _attention_grads(ctx, dout: torch.Tensor, dlse: torch.Tensor | None = None):
    """Gradients for (q, k, v, scale, key_lengths, deterministic); the logsumexp is not differentiated."""
    q, k, v, out, lse, key_lengths = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(dout, q, k, v, out, lse, ctx.scale, key_lengths, ctx.deterministic)
    return dq, dk, dv, None, None, None


attention_fwd_op.register_autograd(_attention_grads, setup_context=_attention_setup_context)


class AttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels (through the custom ops); gradients flow to q, k and v."""

    @staticmethod
    def forward(ctx, q, k, v, scale, key_lengths, deterministic=None):
        out, lse = attention_fwd_op(q, k, v, scale, key_lengths, deterministic)
        _attention_setup_context(ctx, (q, k, v, scale, key_lengths, deterministic), (out, lse))
        return out

    @staticmethod
    def backward(ctx, dout):
        return _attention_grads(ctx, dout)


# ----------------------------------------------------------------------------------------------
# PyTorch paths and the public entry
# ----------------------------------------------------------------------------------------------

def _attention_triton(q, k, v, scale, key_lengths, deterministic=None):
    return AttentionFunction.apply(q, k, v, scale, key_lengths, deterministic)


def _attention_torch(q, k, v, scale, key_lengths, deterministic=None):
    mask = None
    if key_lengths is not None:
        mask = key_padding_mask(key_lengths, k.shape[1])[:, None, None, :]  # (B, 1, 1, Nk)
    out = F.scaled_dot_product_attention(  # (B, H, Nq, D)
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)  # (B, Nq, H, D)


XFORMERS_BIAS_ALIGN = 8  # xformers reads an attention bias in vectors: its rows must start on multiples of 8


def xformers_key_bias(key_lengths: torch.Tensor, B: int, H: int, Nq: int, Nk: int, dtype: torch.dtype,
                      device: torch.device | str) -> torch.Tensor:
    """The additive bias xformers takes for padded keys: (B, H, Nq, Nk), 0 where a key is valid and
    -inf past key_lengths[b]. xformers rejects a bias whose rows are not aligned (77 text tokens), so
    it is a view of a (B, H, Nq, Nk rounded up to XFORMERS_BIAS_ALIGN) buffer: every row starts on a
    multiple of 8 elements, and the padding columns are never read."""
    padded = -(-Nk // XFORMERS_BIAS_ALIGN) * XFORMERS_BIAS_ALIGN
    bias = torch.zeros(B, H, Nq, padded, device=device, dtype=dtype)[..., :Nk]  # (B, H, Nq, Nk) view
    keep = key_padding_mask(key_lengths, Nk)  # (B, Nk)
    return bias.masked_fill_(~keep[:, None, None, :], float("-inf"))


def _attention_xformers(q, k, v, scale, key_lengths, deterministic=None):
    import xformers.ops as xops

    bias = None
    if key_lengths is not None:
        B, Nq, H, _ = q.shape
        bias = xformers_key_bias(key_lengths, B, H, Nq, k.shape[1], q.dtype, q.device)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)  # (B, Nq, H, D) in and out


_IMPLEMENTATIONS = {"triton": _attention_triton, "torch": _attention_torch, "xformers": _attention_xformers}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              key_lengths: torch.Tensor | None = None, backend: str = "auto",
              deterministic: bool | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per head. q (B, Nq, H, D), k and v (B, Nk, H, D) -> (B, Nq, H, D).

    ``scale`` defaults to 1/sqrt(D). ``key_lengths`` (B,) masks padded keys. Differentiable in
    q, k and v. ``deterministic`` (Triton backward only; see use_atomic_dq): True makes dQ
    bitwise reproducible, False adds it with atomics, None (default) lets the environment
    (LDM_ATTENTION_DETERMINISTIC, torch.use_deterministic_algorithms) or the key length decide.
    """
    check_attention_inputs(q, k, v, key_lengths)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    run = _IMPLEMENTATIONS[resolve_backend("attention", backend, q, k, v)]  # dispatch decides, not this op
    return run(q, k, v, float(scale), key_lengths, deterministic)


class Attention(nn.Module):
    """Multi-head attention with its projections, for the UNet's transformer blocks and the VAE.

    Self-attention (``context_dim=None``) projects q, k, v with one fused linear layer and hands
    the kernel strided (B, N, H, D) views of its output, no copies; cross-attention projects q from
    x and k, v (fused) from the context. ``forward(x (B, N, dim), context (B, M, context_dim),
    context_lengths (B,))`` -> (B, N, dim).
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: dim={dim} is not divisible by heads={heads}")
        self.dim, self.heads, self.backend = dim, heads, backend
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim, bias=bias)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_lengths: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        H, D = self.heads, self.dim // self.heads
        if self.is_cross:
            if context is None:
                raise ValueError("Attention: a cross-attention layer needs a context")
            q = self.to_q(x).view(B, N, H, D)
            k, v = self.to_kv(context).view(B, context.shape[1], 2, H, D).unbind(2)  # (B, M, H, D) views
        else:
            if context is not None:
                raise ValueError("Attention: a self-attention layer takes no context")
            q, k, v = self.to_qkv(x).view(B, N, 3, H, D).unbind(2)  # (B, N, H, D) views
        out = attention(q, k, v, key_lengths=context_lengths, backend=self.backend)  # (B, N, H, D)
        return self.to_out(out.reshape(B, N, self.dim))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time builds for `python -m kernels.inspect`
# ----------------------------------------------------------------------------------------------

# Head dims the models run, with whether they meet key lengths (cross-attention against padded text;
# the VAE has self-attention only): the UNet presets tiny (4, 8), small (32, 64), sd15 (40, 80, 160),
# the VAE presets tiny (64), small (256), f4 and sd (512).
MODEL_HEAD_DIMS = {4: True, 8: True, 32: True, 40: True, 64: True, 80: True, 160: True, 256: False, 512: False}
SD_HEAD_DIMS = (40, 80, 160, 512)  # Stable Diffusion 1.x: the UNet's three and the VAE's single head
POW2_ROWS = (64, 128, 256)  # the rows built at their full power-of-two width (fp16; 128 serves no model)
AOT_DTYPE = "bf16"  # the training dtype; fp16 builds differ only in conversions (within 2 registers)


def _aot_signature(fn, dtype: str, pointers: dict[str, str], constexprs: dict) -> tuple[dict, dict]:
    """Triton types of a kernel's runtime arguments as the launcher passes them: pointers as given
    (default: the input dtype), strides of D as the constant 1 (the JIT specializes 1 the same way),
    other strides and sizes i32, scales fp32."""
    signature, consts = {}, dict(constexprs)
    for name in fn.arg_names:
        if name in consts:
            continue
        if name[0].isupper() and name not in ("H", "Nq", "Nk", "Q_SPLITS"):
            signature[name] = pointers.get(name, f"*{dtype}")
        elif name.startswith("stride_") and name.endswith("d"):
            consts[name] = 1
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, consts


def _can_align(head_dim: int, itemsize: int = 2) -> bool:
    """Whether rows of (B, N, H, D) tensors can start on 16 bytes (D * itemsize a multiple of 16). The
    launchers copy unaligned views to contiguous rows where this holds (_align_rows), so the unaligned
    build runs only for head dims where it does not: D = 4 in 16-bit."""
    return head_dim * itemsize % _ALIGN_BYTES == 0


def aot_variants() -> list[tuple[str, int, bool, bool, bool]]:
    """Every (dtype, D, key lengths, aligned, core) specialization the models can reach: each head
    dim of MODEL_HEAD_DIMS without key lengths (self-attention) and, where it meets cross-attention,
    with them; aligned rows where D allows (the launchers align every other layout by a copy), else
    unaligned (D = 4). ``core`` marks the representative subset tests/test_inspect.py builds: every
    kernel at the SD head dims as the SD models run them (40, 80, 160 with key lengths, the VAE's
    512 without), the tiny UNet's unaligned D = 4, and fp16 at the power-of-two rows."""
    variants = []
    for D, cross in MODEL_HEAD_DIMS.items():
        for has_kl in ((False, True) if cross else (False,)):
            aligned = _can_align(D)
            core = (D in SD_HEAD_DIMS and has_kl == cross) or (D == 4 and has_kl)
            variants.append((AOT_DTYPE, D, has_kl, aligned, core))
    variants += [("fp16", width, True, True, True) for width in POW2_ROWS]
    return variants


def aot_specs() -> list:
    """What `python -m kernels.inspect` builds: every specialization of aot_variants() (head dim, key
    lengths on / off, aligned / unaligned rows), each with every kernel: the forward; the dK/dV kernel
    four ways (writing dK, dV; writing fp32 partial sums for split queries; adding dQ with atomics;
    both); the dQ kernel; and per (D, aligned) the preprocess with and without zeroing the dQ
    accumulator. fp16 builds the power-of-two rows (128 serves no model head dim) with the kernels
    that run at every key length. Specs marked ``core`` (AotSpec.core) are the representative set."""
    from kernels.aot import AotSpec

    stats = {"Lse": "*fp32", "Delta": "*fp32", "KeyLengths": "*i32", "DQAcc": "*fp32"}
    fp32_parts = {"DK": "*fp32", "DV": "*fp32"}
    specs = []
    preprocess_built = set()
    for dtype, D, has_kl, aligned, core in aot_variants():
        row = pick_config(D)
        BD, TD = head_dim_chunks(D)
        common = dict(HEAD_DIM=D, BLOCK_D=BD, TAIL_D=TD, HAS_KEY_LENGTHS=has_kl, ALIGNED=aligned, UPCAST=False)
        one = {"Q_SPLITS": 1}  # each program writes its keys' dK, dV
        deterministic = {"ATOMIC_DQ": False, "DQAcc": None}
        no_kl = {} if has_kl else {"KeyLengths": None}
        variants = [  # name, kernel, config, pointer types, constexprs
            ("attn_fwd", _attn_fwd_kernel, row.fwd, {}, {}),
            ("attn_bwd_dkdv", _attn_bwd_dkdv_kernel, row.dkdv, {}, {**one, **deterministic}),
            ("attn_bwd_dkdv_split", _attn_bwd_dkdv_kernel, row.dkdv, fp32_parts, deterministic),
            ("attn_bwd_dkdv_atomic", _attn_bwd_dkdv_kernel, row.dkdv_with_dq, {}, {**one, "ATOMIC_DQ": True}),
            ("attn_bwd_dkdv_split_atomic", _attn_bwd_dkdv_kernel, row.dkdv_with_dq, fp32_parts, {"ATOMIC_DQ": True}),
            ("attn_bwd_dq", _attn_bwd_dq_kernel, row.dq, {}, {}),
        ]
        if dtype == "fp16":
            variants = [v for v in variants if "split" not in v[0]]
        flags = f"{'kl' if has_kl else 'nokl'} {'al' if aligned else 'unal'}"
        chunks = f"{BD}+{TD}" if TD else f"{BD}"
        for kernel, fn, cfg, pointers, extra in variants:
            consts = dict(common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **extra, **no_kl)
            signature, consts = _aot_signature(fn, dtype, {**stats, **pointers}, consts)
            hinted = []
            if aligned:
                hinted = [n for n, t in signature.items() if t.startswith("*") and n != "KeyLengths"]
                if "Q_SPLITS" in extra:
                    hinted.append("stride_dks")  # 0 when each program writes its keys' dK, dV itself
            specs.append(AotSpec(kernel, f"{dtype} D={D} ({chunks}) {flags} {cfg.label()}", fn, signature, consts,
                                 cfg.num_warps, cfg.num_stages, uses_dot=True, aligned=tuple(hinted), core=core))
        if dtype == "fp16" or (D, aligned) in preprocess_built:
            continue
        preprocess_built.add((D, aligned))
        pre_d = block_d(D)
        pre_m = preprocess_block_m(pre_d)
        for zero in (True, False):  # with atomic dQ (zeroes the accumulator) and without
            signature, consts = _aot_signature(
                _attn_bwd_preprocess_kernel, dtype, stats,
                dict(HEAD_DIM=D, BLOCK_D=pre_d, BLOCK_M=pre_m, ZERO_DQ_ACC=zero, ALIGNED=aligned,
                     **({} if zero else {"DQAcc": None})))
            hinted = tuple(n for n, t in signature.items() if t.startswith("*")) if aligned else ()
            specs.append(AotSpec("attn_bwd_preprocess",
                                 f"{dtype} D={D} {'zero' if zero else 'nozero'} {'al' if aligned else 'unal'} "
                                 f"BM={pre_m} w{PREPROCESS_WARPS}",
                                 _attn_bwd_preprocess_kernel, signature, consts, PREPROCESS_WARPS, aligned=hinted,
                                 core=core))
    return specs
