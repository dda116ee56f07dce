"""UNetConfig(context_norm=True): each text token is layer-normalised before cross-attention and the pool
read it, so the UNet's output does not change when a token's states are scaled and shifted."""

import torch

from ldm.unet import UNet, unet_config


def small(norm: bool) -> UNet:
    return UNet(unet_config("tiny", model_channels=16, norm_groups=8, num_heads=2, context_dim=12,
                            context_norm=norm)).double().eval()


def test_normalised_context_ignores_each_tokens_scale_and_shift(seed):
    x, t = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([10, 700])
    context, lengths = torch.randn(2, 5, 12, dtype=torch.float64), torch.tensor([5, 3])
    scale, shift = torch.rand(2, 5, 1, dtype=torch.float64) * 3 + 0.5, torch.randn(2, 5, 1, dtype=torch.float64)
    torch.manual_seed(seed)
    normed = small(True)
    for p in normed.parameters():  # out of the zero-initialised output layer's shadow
        p.data.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        a = normed(x, t, context, lengths)
        b = normed(x, t, context * scale + shift, lengths)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5)  # up to LayerNorm's eps (1e-5 in the variance)
    assert a.abs().max() > 1e-3
    torch.manual_seed(seed)
    plain = small(False)
    for p in plain.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        assert (plain(x, t, context, lengths) - plain(x, t, context * scale + shift, lengths)).abs().max() > 1e-3
    assert sum(p.numel() for p in normed.parameters()) == sum(p.numel() for p in plain.parameters()) + 2 * 12
