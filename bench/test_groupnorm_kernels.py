"""GroupNorm + SiLU: provider x {forward, backward, full} x the Stable Diffusion 1.x shapes, both layouts.

Providers: ours (the fused Triton kernels, GPU only), eager ``F.group_norm`` then ``F.silu`` (the
baseline of the ratios), and ``torch.compile`` of the same two calls (skipped in quick mode: its
first compile takes ~15 s on a 2-core CPU; skipped with the error when it cannot compile here).

Shapes, 32 groups: on a GPU the ResBlock norms of a 512 x 512 image, 2 x 320 x 64 x 64,
2 x 640 x 32 x 32 and 2 x 1280 x 16 x 16, in bf16 and fp16; on the CPU the same at 256 x 256
(spatial sides halved) in fp32. Layouts NCHW and channels_last; weight and bias in x's dtype.

Derived figures: GB/s of the minimum traffic (forward reads x and writes y; backward reads x and dy
and writes dx; the per-channel parameters and statistics are negligible) and the fraction of the
device's copy bandwidth.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels

ON_GPU = torch.cuda.is_available()
GROUPS, EPS = 32, 1e-5
MODES = ("forward", "backward", "full")
ACCESSES = {"forward": 2, "backward": 3, "full": 5}  # tensor-sized reads + writes
LAYOUTS = ("nchw", "channels_last")
PROVIDERS = ("ours-triton", "eager", "compile")
BASELINE = "eager"
DTYPES = ["bfloat16", "float16"] if ON_GPU else ["float32"]  # names: the JSON keeps them readable


def _shapes() -> list:
    side = 64 if ON_GPU else 32  # CPU: the same norms at 256 x 256 pixels
    out = []
    for i, c in enumerate((320, 640, 1280)):
        shape = (2, c, side >> i, side >> i)
        marks = [pytest.mark.quick] if c == 1280 else []
        out.append(pytest.param(shape, id="x".join(map(str, shape)), marks=marks))
    return out


def _eager(x, weight, bias):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def _ours(x, weight, bias):
    return kernels.group_norm(x, GROUPS, weight, bias, EPS, silu=True, backend="triton")


_compiled = {}


def _compiled_fn():
    """One ``torch.compile`` of ``_eager`` for the session. Static shapes (every case is a new
    graph); the recompile limit is raised so that no case silently falls back to eager. The
    backward mode runs one graph's backward again and again (``retain_graph``), which a compiled
    backward allows only without donated buffers (its saved tensors reused as scratch)."""
    if "fn" not in _compiled:
        import torch._dynamo
        import torch._functorch.config

        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), 64))
        torch._functorch.config.donated_buffer = False
        _compiled["fn"] = torch.compile(_eager, dynamic=False)
    return _compiled["fn"]


def provider_fn(bench, provider: str, probe_inputs):
    if provider == "ours-triton":
        bench.skip_unless_triton()
        return _ours
    if provider == "eager":
        return _eager
    if bench.quick:
        pytest.skip("quick mode: torch.compile's first compile takes ~15 s on a 2-core CPU")
    if bench.device.type == "cuda":
        bench.skip_unless_triton()  # inductor writes Triton kernels on a GPU: never time the interpreter
    fn = _compiled_fn()
    x, w, b = probe_inputs
    try:  # compile this case's forward and backward now, outside the timing
        y = fn(x, w, b)
        torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    except Exception as e:  # no C++ compiler, unsupported Python, ...: the machine, not the benchmark
        pytest.skip(f"torch.compile is unusable here: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return fn


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", _shapes())
def test_group_norm_silu(bench, shape, dtype_name, layout, mode, provider):
    dev, dtype = bench.torch_device, getattr(torch, dtype_name)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def inputs():
        x = torch.randn(shape, device=dev, dtype=dtype).to(memory_format=memory_format).requires_grad_()
        weight = (1 + 0.1 * torch.randn(shape[1], device=dev, dtype=dtype)).requires_grad_()
        bias = (0.1 * torch.randn(shape[1], device=dev, dtype=dtype)).requires_grad_()
        return x, weight, bias

    fn = provider_fn(bench, provider, inputs())
    bench.label(suite="groupnorm", case=f"{'x'.join(map(str, shape))} {layout}", mode=mode,
                dtype=dtype_name, provider=provider, baseline=BASELINE, groups=GROUPS)
    nbytes = ACCESSES[mode] * torch.Size(shape).numel() * dtype.itemsize
    bench.time(lambda: bench.mode_call(mode, fn, inputs()), nbytes=nbytes, dtype=dtype)
