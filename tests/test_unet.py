"""The cross-attention UNet: shapes of every preset, the SD 1.x layout, gradients, training,
checkpointing, channels_last, masking, and the Triton kernels against PyTorch's."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from ldm.diffusion import NoiseSchedule, diffusion_loss
from ldm.unet import (
    UNET_CONFIGS,
    TransformerBlock,
    UNet,
    UNetConfig,
    count_parameters,
    timestep_embedding,
    unet_config,
)

SD15_PARAMETERS = 859_520_964  # diffusers' UNet2DConditionModel with the SD 1.x config, counted on the meta device


def randomize_(model: nn.Module) -> nn.Module:
    """Give the zero-initialised layers (ResBlock conv2, proj_out, conv_out) PyTorch's default init,
    so that every path carries signal, as in a trained model."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.any():
            m.reset_parameters()
    return model


def inputs(cfg: UNetConfig, B=2, H=8, W=8, L=5, dtype=torch.float32):
    x = torch.randn(B, cfg.in_channels, H, W, dtype=dtype)
    t = torch.rand(B, dtype=dtype) * 999
    if cfg.context_dim is None:
        return x, t, {}
    context = torch.randn(B, L, cfg.context_dim, dtype=dtype)
    lengths = torch.randint(1, L + 1, (B,))
    return x, t, {"context": context, "context_lengths": lengths}


@pytest.fixture
def tiny(seed):
    """The tiny preset with fresh weights from the test's seed."""
    return randomize_(UNet(UNET_CONFIGS["tiny"]))


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name,H,W", [
    ("tiny", 8, 8),  # the demo's 8 x 8 latents
    ("tiny", 7, 9),  # odd sizes: the upsampler meets each skip's size
    ("tiny", 16, 16),
    ("tiny-uncond", 8, 8),  # context_dim=None
    ("tiny-wide", 8, 8),  # channel_mult[0] > 1: level 0 (and the output norm) wider than conv_in
    ("small", 8, 8),
])
def test_preset_output_shapes(name, H, W, seed):
    cfg = {"tiny-uncond": unet_config("tiny", context_dim=None),
           "tiny-wide": unet_config("tiny", channel_mult=(2, 2))}.get(name) or UNET_CONFIGS[name]
    model = randomize_(UNet(cfg))
    x, t, cond = inputs(cfg, B=2, H=H, W=W)
    with torch.no_grad():
        out = model(x, t, **cond)
    assert out.shape == (2, cfg.out_channels, H, W) and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.std() > 0
    if cfg.context_dim is None:
        assert not any("attn2" in n for n, _ in model.named_parameters())  # no cross-attention layers


def _sd15_on_meta() -> UNet:
    with torch.device("meta"):
        return UNet(UNET_CONFIGS["sd15"])


def test_sd15_parameter_count():
    n = count_parameters(_sd15_on_meta())
    print(f"sd15 UNet: {n:,} parameters (SD 1.x UNet: 860M; diffusers' count {SD15_PARAMETERS:,})")
    assert abs(n - 860e6) / 860e6 < 0.01
    assert n == SD15_PARAMETERS


def test_sd15_layout_is_stable_diffusions():
    """The blocks and channel counts of SD 1.x (diffusers' down_blocks / mid_block / up_blocks)."""
    m = _sd15_on_meta()
    assert [len(level.res) for level in m.down] == [2, 2, 2, 2]
    assert [level.attn is not None for level in m.down] == [True, True, True, False]
    assert [level.attn is not None for level in m.up] == [False, True, True, True]
    assert [level.resample is not None for level in m.down] == [True, True, True, False]
    assert [level.resample is not None for level in m.up] == [True, True, True, False]
    # ResBlock inputs on the way up: the running channels concatenated with the skip, as in SD
    assert [[r.conv1.in_channels for r in level.res] for level in m.up] == [
        [2560, 2560, 2560], [2560, 2560, 1920], [1920, 1280, 960], [960, 640, 640]]
    assert m.down[0].resample.conv.stride == (2, 2)
    block = m.down[0].attn[0].blocks[0]
    assert block.attn1.qkv.weight.shape == (960, 320) and block.attn1.qkv.bias is None
    assert block.attn2.q.weight.shape == (320, 320) and block.attn2.kv.weight.shape == (640, 768)
    assert block.ff.proj.weight.shape == (2560, 320) and block.ff.out.weight.shape == (320, 1280)
    assert m.down[0].attn[0].proj_in.weight.shape == (320, 320, 1, 1)  # 1x1 convs, as in SD 1.5
    assert m.time_embed.linear_1.weight.shape == (1280, 320) and m.mid.attn is not None
    assert m.down[0].attn[0].norm.eps == 1e-6 and m.down[0].res[0].norm1.eps == 1e-5


@pytest.mark.slow
def test_sd15_forward_at_a_small_size(seed):
    """One forward of the full SD 1.x shape on an 8 x 8 latent (64 px; the deepest level is 1 x 1).
    Weights: a scaled copy of one random pool, written once (a default init of 860M parameters
    costs more than the forward)."""
    model = _sd15_on_meta().to_empty(device="cpu")
    pool = torch.randn(1 << 22)
    with torch.no_grad():
        for p in model.parameters():
            flat, scale = p.view(-1), 1 / math.sqrt(p[0].numel() if p.dim() > 1 else 1)
            for i in range(0, flat.numel(), pool.numel()):
                chunk = flat[i:i + pool.numel()]
                torch.mul(pool[:chunk.numel()], scale, out=chunk)
    x, t, cond = inputs(model.config, B=1, H=8, W=8, L=6)
    with torch.no_grad():
        out = model(x, t, **cond)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and out.std() > 0


# ------------------------------------------------------------------------------------ behaviour
def test_gradients_reach_every_parameter(tiny, seed):
    x, t, cond = inputs(tiny.config)
    x.requires_grad_(True)
    cond["context"].requires_grad_(True)
    tiny.zero_grad()
    tiny(x, t, **cond).square().mean().backward()
    dead = [n for n, p in tiny.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, f"no gradient reaches {dead}"
    assert all(torch.isfinite(p.grad).all() for p in tiny.parameters())
    assert x.grad.any() and cond["context"].grad.any()


@pytest.mark.slow
def test_a_few_hundred_steps_drive_the_loss_down(seed):
    """Overfit a batch of 8 latents with their captions for 200 AdamW steps: the loss on a fixed set of
    (t, noise) draws falls from ~1 to well under half (measured ~0.15). A 16-channel tiny keeps it fast."""
    cfg = unet_config("tiny", model_channels=16, norm_groups=8, context_dim=16, num_heads=2)
    model = UNet(cfg)
    sched = NoiseSchedule.from_name("scaled_linear")
    x0 = torch.randn(8, 4, 8, 8)
    cond = {"context": torch.randn(8, 6, 16), "context_lengths": torch.randint(1, 7, (8,))}
    g = torch.Generator().manual_seed(seed)
    evals = [(torch.randint(0, 1000, (8,), generator=g), torch.randn(8, 4, 8, 8, generator=g)) for _ in range(8)]

    def eval_loss():
        with torch.no_grad():
            return sum(diffusion_loss(model, x0, sched, t=t, noise=n, **cond).mean().item() for t, n in evals) / 8

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(200):
        loss = diffusion_loss(model, x0, sched, prediction="eps", min_snr_gamma=5.0, generator=g, **cond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = eval_loss()
    print(f"eval loss {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before


def test_gradient_checkpointing_gives_the_same_gradients(seed):
    model = randomize_(UNet(unet_config("tiny", model_channels=32, norm_groups=8, context_dim=24))).double()
    x, t, cond = inputs(model.config, dtype=torch.float64)

    def grads():
        model.zero_grad()
        model(x, t, **cond).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    hook = model.down[0].res[0].register_forward_pre_hook(lambda *a: calls.append(1))
    plain = grads()
    assert len(calls) == 1
    model.set_gradient_checkpointing(True)
    checkpointed = grads()
    assert len(calls) == 3  # run again in the backward pass: checkpointing is on
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-10, atol=1e-12, msg=n)
    with torch.no_grad():  # nothing to recompute for: plain forward
        model(x, t, **cond)
    assert len(calls) == 4
    hook.remove()
    assert UNet(dataclasses.replace(model.config, gradient_checkpointing=True)).gradient_checkpointing


def test_channels_last_gives_the_same_output_and_gradients(tiny, seed):
    x, t, cond = inputs(tiny.config, B=3)

    def run(model, x):
        x = x.clone().requires_grad_(True)
        model.zero_grad()
        out = model(x, t, **cond)
        out.square().mean().backward()
        return out.detach(), x.grad, model.down[1].attn[0].proj_in.weight.grad.clone()

    ref = run(tiny, x)
    cl = tiny.to(memory_format=torch.channels_last)
    assert cl.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got = run(cl, x.to(memory_format=torch.channels_last))
    for name, a, b in zip(("output", "x grad", "proj_in grad"), got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


def test_padded_context_tokens_are_masked(tiny, seed):
    x, t, cond = inputs(tiny.config, B=2, L=7)
    lengths = torch.tensor([3, 5])
    ctx = cond["context"]
    with torch.no_grad():
        ref = tiny(x, t, ctx, lengths)
        garbage = ctx.clone()
        garbage[0, 3:] = torch.randn(4, ctx.shape[2]) * 10
        garbage[1, 5:] = torch.randn(2, ctx.shape[2]) * 10
        torch.testing.assert_close(tiny(x, t, garbage, lengths), ref, rtol=1e-5, atol=1e-5)
        shorter = tiny(x, t, ctx[:, :5], lengths)  # the same prompts padded to another length
        torch.testing.assert_close(shorter, ref, rtol=1e-5, atol=1e-5)
        changed = ctx.clone()
        changed[0, 2] += torch.randn(ctx.shape[2])  # a valid token matters (not a constant: LayerNorm drops those)
        assert (tiny(x, t, changed, lengths)[0] - ref[0]).abs().max() > 1e-4


def test_pooled_context_is_the_mean_of_the_valid_tokens(seed):
    """pooled_context: the masked token mean (float64 reference) reaches the timestep embedding and matters."""
    model = randomize_(UNet(unet_config("tiny", model_channels=32, norm_groups=8, context_dim=24,
                                        pooled_context=True, context_norm=False))).double()  # the raw tokens
    x, t, cond = inputs(model.config, B=3, L=6, dtype=torch.float64)
    ctx, lengths = cond["context"], cond["context_lengths"]
    seen = []
    model.context_pool.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        ref = model(x, t, **cond)
        model(x, t, ctx)  # no lengths: every token counts
        expected = torch.stack([ctx[b, :lengths[b]].mean(0) for b in range(3)])  # (3, 24)
        torch.testing.assert_close(seen[0], expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(seen[1], ctx.mean(1), rtol=1e-12, atol=1e-12)
        garbage = ctx.clone()
        for b in range(3):
            garbage[b, lengths[b]:] = torch.randn(6 - lengths[b], 24, dtype=torch.float64) * 10
        torch.testing.assert_close(model(x, t, garbage, lengths), ref, rtol=1e-10, atol=1e-12)
        model.context_pool.weight.zero_()
        model.context_pool.bias.zero_()
        assert (model(x, t, **cond) - ref).abs().max() > 1e-6  # the pooled path carries signal
    assert UNet(unet_config("tiny", context_dim=None, pooled_context=True)).context_pool is None  # no text


def test_batch_elements_are_independent(seed):
    """Every reshape keeps batch rows apart: each sample alone gives the batched result (float64)."""
    model = randomize_(UNet(unet_config("tiny", model_channels=32, norm_groups=8, context_dim=24))).double()
    x, t, cond = inputs(model.config, B=3, dtype=torch.float64)
    with torch.no_grad():
        batched = model(x, t, **cond)
        for b in range(3):
            alone = model(x[b:b + 1], t[b:b + 1], cond["context"][b:b + 1], cond["context_lengths"][b:b + 1])
            torch.testing.assert_close(alone[0], batched[b], rtol=1e-10, atol=1e-12)
        # a scalar t broadcasts over the batch
        torch.testing.assert_close(model(x, t[0], **cond), model(x, t[:1].expand(3), **cond))


def test_transformer_block_matches_a_reference(seed):
    """Our block against attention written out head by head in float64: head h of q, k and v is rows
    h*D..(h+1)*D of their weights (diffusers' layout), GEGLU is value * gelu(gate)."""
    dim, heads, ctx_dim, B, N, L = 32, 4, 12, 2, 6, 5
    block = TransformerBlock(dim, heads, ctx_dim, ff_mult=4).double()
    for p in block.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(B, N, dim, dtype=torch.float64)
    ctx = torch.randn(B, L, ctx_dim, dtype=torch.float64)
    lengths = torch.tensor([5, 2])
    D = dim // heads

    def attend(q_in, kv_in, wq, wk, wv, out, n_valid):
        heads_out = []
        for h in range(heads):
            rows = slice(h * D, (h + 1) * D)
            q, k, v = q_in @ wq[rows].T, kv_in[:n_valid] @ wk[rows].T, kv_in[:n_valid] @ wv[rows].T
            heads_out.append(torch.softmax(q @ k.T / math.sqrt(D), dim=-1) @ v)
        return out(torch.cat(heads_out, dim=-1))

    a1, a2 = block.attn1, block.attn2
    wq, wk, wv = a1.qkv.weight.chunk(3)
    wk2, wv2 = a2.kv.weight.chunk(2)
    for b in range(B):
        h = x[b]
        h = h + attend(block.norm1(h), block.norm1(h), wq, wk, wv, a1.out, N)
        h = h + attend(block.norm2(h), ctx[b], a2.q.weight, wk2, wv2, a2.out, lengths[b].item())
        value, gate = block.ff.proj(block.norm3(h)).chunk(2, dim=-1)
        h = h + block.ff.out(value * F.gelu(gate))
        torch.testing.assert_close(block(x, ctx, lengths)[b], h, rtol=1e-10, atol=1e-12)


def test_timestep_embedding(seed):
    t = torch.rand(5, dtype=torch.float64) * 1000
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10_000 ** (-i / 4) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))
    # continuous in t: fractional timesteps from the samplers land between their neighbours
    assert (timestep_embedding(t + 1e-6, 8) - emb).abs().max() < 1e-5


def test_config_round_trips_through_json():
    cfg = UNET_CONFIGS["tiny"]
    again = UNetConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg and isinstance(again.channel_mult, tuple)


def test_bad_inputs_are_named(tiny):
    x, t, cond = inputs(tiny.config)
    ctx, lengths = cond["context"], cond["context_lengths"]
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4, H, W\)"):
        tiny(x[:, :3], t, ctx, lengths)
    with pytest.raises(ValueError, match="t must be a tensor of shape"):
        tiny(x, t[:1].expand(3), ctx, lengths)
    with pytest.raises(ValueError, match="pass context of shape"):
        tiny(x, t)
    with pytest.raises(ValueError, match=r"context must have shape \(2, L, 384\)"):
        tiny(x, t, ctx[..., :100], lengths)
    with pytest.raises(ValueError, match="context_lengths must be a tensor of shape"):
        tiny(x, t, ctx, lengths[:1])
    with pytest.raises(ValueError, match="context_lengths must be integers"):
        tiny(x, t, ctx, lengths.float())
    uncond = UNet(unet_config("tiny", model_channels=32, norm_groups=8, context_dim=None))
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, ctx)
    with pytest.raises(ValueError, match="attention_levels"):
        unet_config("tiny", attention_levels=(0, 2))
    with pytest.raises(ValueError, match="norm_groups"):
        unet_config("tiny", model_channels=48)
    with pytest.raises(ValueError, match="num_heads"):
        unet_config("tiny", num_heads=5, norm_groups=1)
    with pytest.raises(ValueError, match="unknown UNet config"):
        unet_config("huge")


# ------------------------------------------------------------------------------------ kernels
def test_unet_triton_path_matches_torch(tiny):
    """The tiny preset with every attention and GroupNorm on our Triton kernels (the interpreter on
    CPU) against PyTorch's, float32: output within rtol 1e-4 / atol 1e-4 x its scale; gradients of
    x, the context and four parameters within rtol 1e-3 / atol 1e-4 x their scale."""
    model = tiny
    x, t, cond = inputs(model.config, B=2, L=5)
    params = {n: p for n, p in model.named_parameters() if n in (
        "conv_in.weight", "down.0.res.0.norm2.weight", "down.1.attn.0.blocks.0.attn2.kv.weight",
        "up.0.attn.1.norm.bias")}
    assert len(params) == 4

    def run(backend):
        xi = x.clone().requires_grad_(True)
        ci = cond["context"].clone().requires_grad_(True)
        model.zero_grad()
        with kernels.use_backend(backend):
            out = model(xi, t, ci, cond["context_lengths"])
            out.square().mean().backward()
        return out.detach(), {"x": xi.grad, "context": ci.grad, **{n: p.grad.clone() for n, p in params.items()}}

    ref_out, ref_grads = run("torch")
    out, grads = run("triton")
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4 * ref_out.abs().max().item())
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-3, atol=1e-4 * g.abs().max().item(), msg=n)
