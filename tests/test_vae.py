"""The VAE: shapes per preset, the posterior, the attention path, diffusers equivalence, the losses."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import kernels
from autoencoder import VAE, VAE_CONFIGS, DiagonalGaussian, LossConfig, VAEConfig, VAELoss, hinge_d_loss
from autoencoder import vae as vae_module
from autoencoder.losses import LPIPS, LPIPS_ENV
from ldm.sd_format import vae_diffusers_key as diffusers_key  # the key map lives in ldm.sd_format

TINY = VAEConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, latent_channels=3, norm_groups=4)

# spatial size per preset: the smallest that exercises every level, so sd runs at 16 x 16
PRESET_SIZES = {"tiny": 32, "small": 16, "f4": 16, "sd": 16}


@pytest.mark.parametrize("preset", list(VAE_CONFIGS))
def test_preset_shapes(preset, seed):
    cfg = VAE_CONFIGS[preset]
    vae = VAE(cfg).eval()
    size, f = PRESET_SIZES[preset], cfg.downsample_factor
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x)
        z = post.sample()
        y = vae.decode(z)
    assert post.mean.shape == (2, cfg.latent_channels, size // f, size // f)
    assert z.shape == post.mean.shape and torch.equal(post.mode(), post.mean)
    assert post.kl().shape == (2,)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_sd_preset_is_kl_f8():
    cfg = VAE_CONFIGS["sd"]
    assert (cfg.channels, cfg.channel_mult, cfg.num_res_blocks, cfg.latent_channels) == (128, (1, 2, 4, 4), 2, 4)
    assert cfg.downsample_factor == 8 and cfg.mid_attention and cfg.attention_heads == 1
    assert VAE_CONFIGS["tiny"].downsample_factor in (4, 8)


def test_posterior_kl_sample_and_clamp(seed):
    moments = torch.randn(3, 8, 4, 4)
    post = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, torch.exp(0.5 * logvar)),
                                            torch.distributions.Normal(0.0, 1.0)).sum((1, 2, 3))
    assert torch.allclose(post.kl(), ref, rtol=1e-5, atol=1e-5)
    n = 4000
    draws = torch.stack([post.sample() for _ in range(n)])
    z = (draws.mean(0) - mean) / (post.std / n**0.5)  # standard errors off; |z| > 5 has odds ~1e-4 over 192 values
    assert z.abs().max() < 5, z.abs().max()
    assert torch.allclose(draws.std(0), post.std, rtol=0.1, atol=0.02)
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert torch.equal(post.sample(g1), post.sample(g2))
    extreme = DiagonalGaussian(torch.cat([mean, torch.full_like(logvar, 100.0)], 1))
    assert extreme.logvar.max() == 20.0


def test_channels_last_gives_the_same_result(seed):
    vae = VAE(TINY).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = vae.decode(vae.encode(x).mean)
        vae = vae.to(memory_format=torch.channels_last)
        cl = vae.decode(vae.encode(x.contiguous(memory_format=torch.channels_last)).mean)
    assert torch.allclose(ref, cl, atol=1e-5)


def test_mid_attention_runs_through_kernels_attention_on_views(seed, monkeypatch):
    calls = []
    real = vae_module.attention

    def spy(q, k, v, **kw):
        calls.append((q, k, v))
        return real(q, k, v, **kw)

    monkeypatch.setattr(vae_module, "attention", spy)
    cfg = VAEConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4, attention_heads=2)
    block = VAE(cfg).encoder.mid.attn.double()
    x = torch.randn(2, 32, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = block(x)
    assert len(calls) == 1
    q, k, v = calls[0]
    assert q.shape == (2, 20, 2, 16) and q._base is not None  # a view of the projection, not a copy
    # reference: GroupNorm, projections, softmax attention per head, output projection, residual
    h = F.group_norm(x, 4, block.norm.weight, block.norm.bias, 1e-6).flatten(2).transpose(1, 2)  # (B, N, C)
    qh, kh, vh = (lin(h).view(2, 20, 2, 16).transpose(1, 2) for lin in (block.q, block.k, block.v))
    att = torch.softmax(qh @ kh.transpose(-1, -2) / 4.0, dim=-1) @ vh  # (B, heads, N, D)
    ref = x + block.out(att.transpose(1, 2).reshape(2, 20, 32)).transpose(1, 2).reshape(2, 32, 4, 5)
    assert torch.allclose(y, ref, atol=1e-10)
    with kernels.use_backend("torch"):
        assert torch.allclose(block(x), ref, atol=1e-10)


def test_sd_mid_attention_runs_the_triton_kernels_at_head_dim_512(seed, monkeypatch):
    """The sd preset's single 512-wide head goes through kernels.attention and, with the Triton
    backend (the interpreter here), through the fused kernels: no SDPA bypass in the model. Output and
    every gradient match the PyTorch backend on the same block (fp32, 3 x 5 positions)."""
    cfg = VAE_CONFIGS["sd"]
    block = vae_module.Attention(cfg.widths[-1], cfg)
    for p in block.parameters():  # the zero-initialised output projection would hide the attention
        torch.nn.init.normal_(p, std=0.05)
    launches = []
    attention_module = sys.modules["kernels.attention"]
    real_forward = attention_module.attention_forward

    def spy(q, k, v, *args, **kwargs):
        launches.append(tuple(q.shape))
        return real_forward(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention_module, "attention_forward", spy)
    x = torch.randn(2, 512, 3, 5)
    x_t, x_ref = x.clone().requires_grad_(), x.clone().double().requires_grad_()
    ref_block = copy.deepcopy(block).double()
    with kernels.use_backend("triton"):
        y = block(x_t)
    assert launches == [(2, 15, 1, 512)], launches  # (B, N, heads, D): the fused kernel ran
    with kernels.use_backend("torch"):
        y_ref = ref_block(x_ref)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    dy = torch.randn(y.shape)
    y.backward(dy)
    y_ref.backward(dy.double())
    torch.testing.assert_close(x_t.grad.double(), x_ref.grad, atol=1e-4, rtol=1e-4)
    for (name, p), ref in zip(block.named_parameters(), ref_block.parameters(), strict=True):
        scale = max(ref.grad.abs().max().item(), 1.0)
        torch.testing.assert_close(p.grad.double(), ref.grad, atol=1e-4 * scale, rtol=1e-4, msg=name)


def test_bad_input_names_the_problem():
    vae = VAE(TINY)
    with pytest.raises(ValueError, match="divisible by the downsampling factor 2"):
        vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="not divisible by norm_groups"):
        VAEConfig(channels=20, norm_groups=8)


# ---------------------------------------------------------------- diffusers equivalence
def diffusers_vae(cfg: VAEConfig):
    diffusers = pytest.importorskip("diffusers")
    n = len(cfg.channel_mult)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.widths,
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_groups)


@pytest.mark.parametrize("cfg", [
    VAEConfig(channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, norm_groups=8),
    VAEConfig(channels=8, channel_mult=(1, 2, 4), num_res_blocks=2, latent_channels=3, norm_groups=4),
], ids=["f4-1block", "f4-2blocks"])
def test_matches_diffusers_autoencoderkl_by_renaming(cfg, seed):
    theirs = diffusers_vae(cfg).double().eval()
    ours = VAE(cfg).double().eval()
    their_state = theirs.state_dict()
    mapped = {}
    for k, v in ours.state_dict().items():
        assert diffusers_key(k) in their_state, f"{k} -> {diffusers_key(k)} has no twin"
        mapped[k] = their_state[diffusers_key(k)].reshape(v.shape)
    assert len(mapped) == len(their_state)  # every diffusers parameter has a home
    ours.load_state_dict(mapped)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        ref_moments = theirs.encode(x).latent_dist.parameters
        moments = ours.encode(x).moments
        z = torch.randn_like(moments[:, : cfg.latent_channels])
        ref_img, img = theirs.decode(z).sample, ours.decode(z)
    assert (moments - ref_moments).norm() / ref_moments.norm() < 1e-10
    assert (img - ref_img).norm() / ref_img.norm() < 1e-10


def test_sd_preset_has_diffusers_sd_parameters():
    """Every SD 1.x VAE tensor has a home of the same size in our `sd` preset."""
    cfg = VAE_CONFIGS["sd"]
    theirs = diffusers_vae(cfg).state_dict()
    ours = VAE(cfg).state_dict()
    assert {diffusers_key(k): v.numel() for k, v in ours.items()} == {k: v.numel() for k, v in theirs.items()}
    assert sum(v.numel() for v in ours.values()) == 83_653_863  # SD 1.x VAE


# ---------------------------------------------------------------- losses
def test_hinge_loss_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0, 1] -> 0.5; half their sum
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 16, 16, generator=g) * 2 - 1


def test_generator_loss_before_and_after_disc_start(seed, monkeypatch):
    monkeypatch.delenv(LPIPS_ENV, raising=False)
    vae = VAE(TINY)
    loss_fn = VAELoss(LossConfig(disc_start=5, kl_weight=1e-3, disc_channels=8))
    assert loss_fn.lpips is None and "LPIPS off" in loss_fn.lpips_notice
    x = _batch(seed)
    recon, post = vae(x)
    before, logs = loss_fn.generator_loss(x, recon, post, step=4, last_layer=vae.last_layer)
    expected = (x - recon).abs().sum((1, 2, 3)).mean() + 1e-3 * post.kl().mean()
    assert before.item() == pytest.approx(expected.item(), rel=1e-6)
    assert "g_loss" not in logs
    after, logs = loss_fn.generator_loss(x, recon, post, step=5, last_layer=vae.last_layer)
    # the adaptive weight: |grad rec| / |grad gan| at the decoder's last layer, times disc_weight
    rec = (x - recon).abs().sum((1, 2, 3)).mean()
    gan = -loss_fn.discriminator(recon).mean()
    g_rec = torch.autograd.grad(rec, vae.last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, vae.last_layer, retain_graph=True)[0]
    weight = 0.5 * g_rec.norm() / (g_gan.norm() + 1e-4)
    assert logs["d_weight"] == pytest.approx(weight.item(), rel=1e-4)
    assert after.item() == pytest.approx(before.item() + weight.item() * gan.item(), rel=1e-4, abs=1e-3)
    after.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())  # the generator step leaves D alone
    d_loss, d_logs = loss_fn.discriminator_loss(x, recon)
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    assert vae.last_layer.grad is not None and d_logs["d_loss"] >= 0


def test_lpips_from_a_local_weights_file(tmp_path, seed, monkeypatch):
    torch.manual_seed(seed)
    vgg = LPIPS.__new__(LPIPS)  # the VGG16 layout without loading anything: build, then save random weights
    torch.nn.Module.__init__(vgg)
    layers, c = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        layers += [torch.nn.MaxPool2d(2)] if v == "M" else [torch.nn.Conv2d(c, v, 3, padding=1), torch.nn.ReLU()]
        c = v if v != "M" else c
    state = {f"features.{k}": t for k, t in torch.nn.Sequential(*layers).state_dict().items()}
    state["lin0.model.1.weight"] = torch.rand(1, 64, 1, 1)
    path = tmp_path / "vgg16.safetensors"
    save_file(state, str(path))
    monkeypatch.setenv(LPIPS_ENV, str(path))
    loss_fn = VAELoss(LossConfig())
    assert loss_fn.lpips is not None and str(path) in loss_fn.lpips_notice
    assert torch.equal(loss_fn.lpips.lin[0].data, state["lin0.model.1.weight"].flatten())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss_fn.lpips(x, x).abs().max() < 1e-6
    d = loss_fn.lpips(x, x.flip(-1))
    assert d.shape == (2,) and (d > 0).all()
    monkeypatch.setenv(LPIPS_ENV, str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        VAELoss(LossConfig())
