"""The Triton GroupNorm(+SiLU)(+shift) kernels under the interpreter, forward and backward, against
float64 PyTorch (F.group_norm + F.silu on x + shift). Every buffer the launchers allocate starts as
NaN (the ``poison`` fixture), so an element a kernel forgets to write fails the comparison."""

import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import kernels.groupnorm as gn
from kernels.groupnorm import GroupNormFunction, group_norm_backward, group_norm_forward, plan_group_norm

# (rtol, atol as a fraction of max(1, the reference's largest magnitude)), per dtype of x.
TOL = {
    torch.float32: (1e-5, 1e-5),     # fp32 arithmetic throughout; the sums run over a few thousand terms at most
    torch.float16: (2e-3, 1e-3),     # one rounding of an fp32 result to fp16 (unit roundoff 2**-11)
    torch.bfloat16: (1.6e-2, 1e-2),  # the interpreter casts fp32 -> bf16 by truncation: up to 2**-7 relative
}
DTYPES = list(TOL)
SILU_GRAD_MAX = 1.1  # the largest slope of silu (1.0998, at x = 2.40)
ROUNDINGS_ON_PATH = 16  # generous count of fp32 roundings between x and y or dx (see conditioned_tol)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the launchers allocate (outputs, statistics, partial sums) starts as NaN."""
    monkeypatch.setattr(gn, "_empty", lambda shape, dtype, device: torch.full(
        (shape,) if isinstance(shape, int) else shape, math.nan, dtype=dtype, device=device))


def make_inputs(B, C, spatial, dtype, layout="nchw", affine=True, shift=True, param_dtype=None,
                scale=3.0, offset=1.0):
    """x (B, C, *spatial) with a nonzero mean, in the asked memory layout; weight, bias (C,), shift (B, C)."""
    x = (torch.randn(B, C, *spatial) * scale + offset).to(dtype)
    if layout == "channels_last":
        perm = (0, *range(2, x.dim()), 1)
        x = x.permute(perm).contiguous().permute(sorted(range(x.dim()), key=perm.__getitem__))
        assert x.permute(perm).is_contiguous()
    elif layout == "strided":  # neither NCHW nor channels_last: the launcher copies it
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    pd = param_dtype or dtype
    w = torch.randn(C).to(pd) if affine else None
    b = torch.randn(C).to(pd) if affine else None
    s = torch.randn(B, C).to(pd) if shift else None
    return x, w, b, s


def shifted(x, s):
    """x + shift, the shift (B, C) broadcast over the spatial axes; x itself without one."""
    return x if s is None else x + s.view(*s.shape, *([1] * (x.dim() - 2)))


def reference(x, G, w, b, s, eps, silu, dy):
    """float64 forward, mean, rstd and gradients of (x, weight, bias, shift)."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, s)]
    xd, wd, bd, sd = leaves
    h = shifted(xd, sd)
    y = F.group_norm(h, G, wd, bd, eps)
    y = F.silu(y) if silu else y
    y.backward(dy.double())
    hg = h.detach().reshape(x.shape[0], G, -1)
    mean, var = hg.mean(-1), hg.var(-1, unbiased=False)
    return y.detach(), mean, (var + eps).rsqrt(), [t.grad if t is not None else None for t in leaves]


def assert_close(name, actual, expected, dtype, tol=None, scale=None):
    """atol is relative to ``scale``: by default the reference's largest magnitude (at least 1)."""
    assert actual is not None, f"{name} missing"
    assert not actual.isnan().any(), f"{name}: NaN left (an element never written)"
    rtol, atol = tol or TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if scale is None else scale
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{name}: {m}")


def conditioned_tol(x, s, mean, rstd, dtype):
    """TOL[dtype], widened for ill-conditioned groups. The kernel computes in fp32, and x - mean
    loses up to u * |x| (u = fp32 unit roundoff) to cancellation, which the normalisation
    magnifies by rstd: a group whose largest |x + shift| is k standard deviations gets an error of
    about u * k per rounding on the path (a few: the sums, the centring, the scale), whatever the
    output dtype. Seen: a 2-element fp32 group with k = 77 came out 2.3e-5 off (TOL allows 1e-5)."""
    h = shifted(x.double(), None if s is None else s.double())
    k = (h.reshape(x.shape[0], mean.shape[1], -1).abs().amax(-1) * rstd).max().item()
    fp32_path_error = ROUNDINGS_ON_PATH * (torch.finfo(torch.float32).eps / 2) * k
    rtol, atol = TOL[dtype]
    return max(rtol, fp32_path_error), max(atol, fp32_path_error)


def check_autograd(x, G, w, b, s, eps, silu, max_tile=gn.MAX_TILE, grads=(True, True, True, True), tol=None):
    """Run the Triton path through autograd and compare y and every requested gradient."""
    dtype = x.dtype
    leaves = [t.detach().clone().requires_grad_(g) if t is not None else None
              for t, g in zip((x, w, b, s), grads, strict=True)]
    if not any(t is not None and t.requires_grad for t in leaves):
        leaves[0].requires_grad_(True)
    y = GroupNormFunction.apply(*leaves, G, eps, silu, max_tile)
    dy = torch.randn(y.shape).to(y.dtype)
    y_ref, mean, rstd, grads_ref = reference(x, G, w, b, s, eps, silu, dy)
    tol = tol or conditioned_tol(x, s, mean, rstd, dtype)
    assert y.shape == x.shape and y.dtype == (dtype if s is None else torch.promote_types(dtype, s.dtype))
    assert_close("y", y, y_ref, dtype, tol)
    y.backward(dy)
    # dshift[b, c] sums dx[b, c] over positions and may cancel to ~0 (exactly 0 when G = C): its
    # rounding error scales with the sum of the magnitudes it adds up, not with the result
    dshift_scale = max(1.0, grads_ref[0].abs().flatten(2).sum(-1).max().item()) if x.dim() > 2 else None
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * silu' * weight: the three terms may
    # cancel (a two-element group's dx is zero but for eps), so dx's rounding error scales with the terms,
    # rstd * |g|, and the forward's conditioning (tol), not with dx itself
    g_max = dy.abs().max().item() * (1.0 if w is None else w.abs().max().item()) * (SILU_GRAD_MAX if silu else 1.0)
    dx_scale = max(1.0, rstd.max().item() * g_max)
    # dshift sums dx over the positions: never tighter than one dx element (one position: dshift is dx)
    scales = {"dx": dx_scale, "dshift": max(dshift_scale or 1.0, dx_scale)}
    for name, t, ref in zip(("dx", "dweight", "dbias", "dshift"), leaves, grads_ref, strict=True):
        if t is not None and t.requires_grad:
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            assert_close(name, t.grad, ref, dtype, tol, scales.get(name))


SHAPES = [  # (B, C, G, spatial); few groups, as the interpreter runs one program per group at a time
    (2, 20, 2, (7, 9)),     # CPG = 10 (SD 320/32), odd spatial 7x9
    (2, 80, 2, (3, 3)),     # CPG = 40 (SD 1280/32)
    (2, 40, 1, (1, 1)),     # HW = 1, one group of every channel
    (1, 6, 6, (4, 5)),      # groups of one channel (G = C): the shift cancels, dshift = 0
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,G,spatial", SHAPES)
def test_matches_float64(seed, B, C, G, spatial, dtype, layout):
    x, w, b, s = make_inputs(B, C, spatial, dtype, layout)
    check_autograd(x, G, w, b, s, 1e-5, silu=True)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("shift", [False, True])
def test_with_and_without_silu_affine_shift(seed, silu, affine, shift):
    x, w, b, s = make_inputs(2, 24, (5, 6), torch.float32, "channels_last" if shift else "nchw",
                             affine=affine != "none", shift=shift)
    if affine == "weight":
        b = None
    check_autograd(x, 2, w, b, s, 1e-5, silu)


@pytest.mark.parametrize("layout, dtype, C, spatial, max_tile, tiling", [
    ("nchw", torch.float32, 6, (5, 7), 32, "S=32 C=1: 2 spatial x 3 channel tiles"),
    ("nchw", torch.bfloat16, 20, (2, 3), 32, "S=8 C=4: 3 channel tiles of a 10-channel group"),
    ("channels_last", torch.float32, 20, (3, 5), 64, "S=4 C=16: 4 spatial tiles"),
    ("channels_last", torch.bfloat16, 20, (1, 3), 8, "S=1 C=8: 3 spatial x 2 channel tiles"),
])
def test_split_reduction(seed, monkeypatch, layout, dtype, C, spatial, max_tile, tiling):
    """Groups larger than one tile: partial statistics per tile, then the combine (several steps)."""
    monkeypatch.setattr(gn, "PARTIAL_BLOCK", 2)  # combine 2 partials per step, so the loop runs several times
    x, w, b, s = make_inputs(1, C, spatial, dtype, layout)
    plan = plan_group_norm(x.shape, 2, layout == "channels_last", max_tile)
    assert f"S={plan.BLOCK_S} C={plan.BLOCK_C}" in tiling and plan.split and plan.n_chunks > 2
    check_autograd(x, 2, w, b, s, 1e-5, silu=True, max_tile=max_tile)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # lanes outside the group, never stored
@pytest.mark.parametrize("max_tile", [gn.MAX_TILE, 16])
def test_large_mean_keeps_variance_accurate(seed, max_tile):
    """mean 1000, std 1: a one-pass sum of squares in fp32 loses the variance; two-pass + Chan does not."""
    x, w, b, s = make_inputs(1, 8, (6, 6), torch.float32, scale=1.0, offset=1000.0)
    _, mean_ref, rstd_ref, _ = reference(x, 2, w, b, s, 1e-5, True, torch.zeros(x.shape))
    _, mean, rstd = group_norm_forward(x, 2, w, b, 1e-5, True, s, max_tile=max_tile)
    assert_close("mean", mean, mean_ref, torch.float32)
    # x + shift rounds to fp32 near 1000 (3e-5 per element, against a std of 1): rstd keeps ~1e-5
    # (a one-pass E[x^2] - E[x]^2 in fp32 is off by percents here)
    torch.testing.assert_close(rstd.double(), rstd_ref, rtol=3e-5, atol=0)
    # y and the gradients: every fp32 value near 1000 carries 1000 * 2**-24 = 6e-5 of rounding,
    # which the normalization turns into that much error per unit of std
    check_autograd(x, 2, w, b, s, 1e-5, silu=True, max_tile=max_tile, tol=(1e-3, 1e-3))


@pytest.mark.parametrize("max_tile", [gn.MAX_TILE, 16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_launchers_fill_preallocated_outputs(seed, layout, max_tile):
    """The launchers write every element of caller-provided buffers (all NaN here) and return them."""
    B, C, G, eps = 1, 8, 2, 1e-4
    x, w, b, s = make_inputs(B, C, (3, 5), torch.float32, layout)
    assert plan_group_norm(x.shape, G, layout == "channels_last", max_tile).split == (max_tile == 16)
    dy = torch.randn(x.shape)
    y_ref, mean_ref, rstd_ref, (dx_ref, dw_ref, db_ref, ds_ref) = reference(x, G, w, b, s, eps, True, dy)
    y, mean, rstd = torch.full_like(x, math.nan), torch.full((B, G), math.nan), torch.full((B, G), math.nan)
    out = group_norm_forward(x, G, w, b, eps, True, s, max_tile=max_tile, y=y, mean=mean, rstd=rstd)
    assert out[0] is y and out[1] is mean and out[2] is rstd
    for name, got, ref in (("y", y, y_ref), ("mean", mean, mean_ref), ("rstd", rstd, rstd_ref)):
        assert_close(name, got, ref, torch.float32)
    bufs = [torch.full_like(x, math.nan), torch.full((C,), math.nan), torch.full((C,), math.nan),
            torch.full((B, C), math.nan)]
    grads = group_norm_backward(dy, x, G, mean, rstd, w, b, True, s, max_tile=max_tile, dx=bufs[0],
                                dweight=bufs[1], dbias=bufs[2], dshift=bufs[3])
    for name, got, buf, ref in zip(("dx", "dweight", "dbias", "dshift"), grads, bufs,
                                   (dx_ref, dw_ref, db_ref, ds_ref), strict=True):
        assert got is buf
        assert_close(name, got, ref, torch.float32)
    assert y.stride() == x.stride()  # the output keeps x's memory layout


@pytest.mark.parametrize("shape, nchw, channels_last", [  # (BLOCK_S, BLOCK_C, tiles per group, CPG_ALIGN)
    ((2, 320, 64, 64), (4096, 1, 10, 1), (256, 16, 16, 2)),
    ((2, 640, 32, 32), (1024, 4, 5, 1), (128, 32, 8, 4)),
    ((2, 1280, 16, 16), (256, 16, 3, 1), (64, 64, 4, 8)),
    ((1, 128, 8, 8), (64, 4, 1, 1), (64, 4, 1, 4)),       # a whole group in one tile
])
def test_plan_at_the_sd_shapes(shape, nchw, channels_last):
    """The tiles kernels/groupnorm.md describes: the contiguous axis long, channels_last vectors."""
    for cl, want in ((False, nchw), (True, channels_last)):
        p = plan_group_norm(shape, 32, cl)
        assert (p.BLOCK_S, p.BLOCK_C, p.n_chunks, p.CPG_ALIGN) == want
        assert p.BLOCK_S * p.BLOCK_C <= gn.MAX_TILE and p.split == (p.n_chunks > 1)
        assert p.BLOCK_S * p.BLOCK_C // (32 * p.num_warps) <= gn.ELEMS_PER_THREAD


def test_backward_computes_only_what_is_asked(seed):
    x, w, b, s = make_inputs(1, 4, (3, 4), torch.float32)
    _, mean, rstd = group_norm_forward(x, 2, w, b, 1e-5, True, s)
    dy = torch.randn(x.shape)
    _, _, _, (dx_ref, dw_ref, _, _) = reference(x, 2, w, b, s, 1e-5, True, dy)
    for max_tile in (gn.MAX_TILE, 8):
        dx, dw, db, ds = group_norm_backward(dy, x, 2, mean, rstd, w, b, True, s, max_tile=max_tile,
                                             needs=(False, True, False, False))
        assert dx is None and db is None and ds is None
        assert_close("dweight", dw, dw_ref, torch.float32)
    # gradients of absent parameters come back as None even when asked for
    dx, dw, db, ds = group_norm_backward(dy, x, 2, mean, rstd, None, None, True, None)
    assert dw is None and db is None and ds is None and dx is not None


def test_preallocated_output_of_the_wrong_layout_is_refused():
    x = torch.randn(2, 8, 3, 4).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="preallocated y"):
        group_norm_forward(x, 2, y=torch.empty(2, 8, 3, 4))  # NCHW buffer for a channels_last x
    with pytest.raises(ValueError, match="max_tile"):
        group_norm_forward(x, 2, max_tile=24)


@pytest.mark.parametrize("case", [
    ((2, 8, 11), 2, "nchw"),                # 1-D spatial (B, C, L)
    ((2, 8, 11), 2, "channels_last"),       # (B, L, C) memory
    ((3, 6), 2, "nchw"),                    # no spatial dims (B, C)
    ((1, 8, 3, 4, 5), 2, "channels_last"),  # 3-D spatial, channels_last_3d memory
    ((2, 8, 5, 6), 2, "strided"),           # neither layout: copied once
], ids=["1d", "1d-channels-last", "0d", "3d-channels-last", "strided"])
def test_other_spatial_ranks_and_layouts(seed, case):
    shape, G, layout = case
    x, w, b, s = make_inputs(shape[0], shape[1], shape[2:], torch.float32, layout)
    check_autograd(x, G, w, b, s, 1e-5, silu=True)


def test_mixed_dtypes_follow_pytorch(seed):
    """bf16 x with fp32 parameters (autocast-style): y is bf16 without a shift, fp32 with an fp32 shift."""
    x, w, b, s = make_inputs(2, 20, (4, 4), torch.bfloat16, param_dtype=torch.float32)
    check_autograd(x, 2, w, b, None, 1e-5, silu=True)
    check_autograd(x, 2, w, b, s, 1e-5, silu=True)


@pytest.mark.slow  # 3-20 s on a loaded 2-core machine
def test_fuzz(seed):
    """At least 50 random cases per run: shapes, groups, layouts, dtypes, flags, tiles, eps, grads."""
    rng = random.Random(seed)
    for case in range(50):
        B, G = rng.choice([(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1)])
        C = G * rng.choice([1, 2, 3, 5, 8, 10, 16])
        rank = rng.choice([0, 1, 2, 2, 2, 3])
        spatial = tuple(rng.randint(1, 9) for _ in range(rank))
        while math.prod(spatial) > 96:
            spatial = spatial[1:]
        if C // G * math.prod(spatial) == 1:  # PyTorch refuses groups of one element
            spatial = (2,)
            rank = 1
        layout = rng.choice(["nchw", "channels_last", "strided"]) if rank >= 2 else \
            rng.choice(["nchw", "channels_last"])
        dtype = rng.choice(DTYPES)
        affine, shift, silu = rng.random() < 0.7, rng.random() < 0.6, rng.random() < 0.6
        eps = rng.choice([1e-5, 1e-6, 1e-3])
        x, w, b, s = make_inputs(B, C, spatial, dtype, layout, affine=affine, shift=shift,
                                 scale=rng.uniform(0.1, 5.0), offset=rng.uniform(-3.0, 3.0))
        if affine and rng.random() < 0.2:
            b = None
        # interpreter time grows with the number of programs: keep them few
        tiles = [t for t in (gn.MAX_TILE, 64, 16, 4, 1)
                 if B * G * plan_group_norm(x.shape, G, gn._is_channels_last(x), t).n_chunks <= 8]
        max_tile = rng.choice(tiles)
        grads = tuple(rng.random() < 0.8 for _ in range(4))
        note = f"case {case}: x {tuple(x.shape)} {dtype} {layout} G={G} affine={affine} shift={shift} " \
               f"silu={silu} eps={eps} max_tile={max_tile} grads={grads}"
        try:
            check_autograd(x, G, w, b, s, eps, silu, max_tile, grads)
        except AssertionError as e:
            raise AssertionError(f"{note}\n{e}") from e


def test_module_shares_nn_groupnorm_state_dict_on_the_triton_path(seed):
    ref = nn.GroupNorm(2, 40)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    ours = kernels.GroupNormSiLU(2, 40, silu=True)
    ours.load_state_dict(ref.state_dict())
    x = (torch.randn(2, 40, 5, 5) * 2 + 1).requires_grad_()
    with kernels.use_backend("triton"):
        y = ours(x)
    assert type(y.grad_fn).__name__ == "GroupNormFunctionBackward"  # the Triton path ran
    ref64 = nn.GroupNorm(2, 40).double()
    ref64.load_state_dict(ref.state_dict())
    x64 = x.detach().double().requires_grad_()
    y_ref = F.silu(ref64(x64))
    assert_close("y", y, y_ref.detach(), torch.float32)
    dy = torch.randn(y.shape)
    y.backward(dy)
    y_ref.backward(dy.double())
    assert_close("dx", x.grad, x64.grad, torch.float32)
    assert_close("dweight", ours.weight.grad, ref64.weight.grad, torch.float32)
    assert_close("dbias", ours.bias.grad, ref64.bias.grad, torch.float32)
    # and the other way round: our trained parameters load into nn.GroupNorm and give the same output
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    with kernels.use_backend("triton"):
        y = ours(x.detach())
    assert_close("y after load", y, F.silu(ref(x.detach())).double(), torch.float32)
    plain = kernels.GroupNormSiLU(2, 40, silu=False)
    plain.load_state_dict(ref.state_dict())
    with kernels.use_backend("triton"):
        assert_close("y without silu", plain(x.detach()), ref(x.detach()).double(), torch.float32)


def test_module_without_affine_and_with_shift_on_the_triton_path(seed):
    m = kernels.GroupNormSiLU(2, 10, affine=False)
    assert dict(m.state_dict()) == dict(nn.GroupNorm(2, 10, affine=False).state_dict()) == {}
    x, _, _, s = make_inputs(3, 10, (4, 3), torch.float32)
    with kernels.use_backend("triton"):
        y = m(x, s)
    y_ref, _, _, _ = reference(x, 2, None, None, s, m.eps, True, torch.zeros(x.shape))
    assert_close("y", y, y_ref, torch.float32)


def test_explicit_triton_backend_refuses_float64():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        kernels.group_norm(x, 2, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        group_norm_forward(x, 2)
