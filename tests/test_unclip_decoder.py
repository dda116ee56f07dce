"""The unCLIP decoder: its forward against the plain UNet in float64, shapes, gradients, the embedding
dropout of the training batches, a short train_unet --cond clip-image run with save/load, sampling through
the prior and variations, and the commands' one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import SESSION_SEED
from PIL import Image
from t2i_helpers import RESOLUTION, UNET_FLAGS, make_text_encoder, make_vae, train_flags

from ldm import sample, train_unet
from ldm.checkpoint import save_model
from ldm.clip import CLIP, CLIPConfig, save_clip
from ldm.data import ShapesDataset
from ldm.distributed import Dist
from ldm.latent_cache import Batches, Cache
from ldm.pretrained import load_unet
from ldm.unclip import Prior, PriorConfig
from ldm.unclip_decoder import (ClipDecoderUNet, attach_clip_embeddings, embed_images, load_decoder,
                                source_images, variations)
from ldm.unet import UNet, unet_config

EMBED = 12  # the tiny CLIP's embedding width
TEXT_WIDTH = 16  # t2i_helpers' tiny text encoder
CONFIG = unet_config("tiny", in_channels=4, out_channels=4, model_channels=16, norm_groups=8, num_heads=2,
                     context_dim=EMBED, clip_tokens=3, pooled_context=True)


def decoder(seed: int = SESSION_SEED) -> ClipDecoderUNet:
    """A random decoder with its zero-initialised layers (output, residual and attention projections) drawn
    too, so every input shows in the output."""
    torch.manual_seed(seed)
    model = ClipDecoderUNet(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(std=0.1)
    return model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random tiny CLIP on 16-px images with t2i_helpers' text encoder, saved as train_clip saves one."""
    root = tmp_path_factory.mktemp("unclip_decoder")
    encoder = make_text_encoder(root / "encoder", SESSION_SEED, TEXT_WIDTH)
    torch.manual_seed(SESSION_SEED)
    clip = CLIP(CLIPConfig(resolution=RESOLUTION, channels=(8, 16), norm_groups=4, embed_dim=EMBED,
                           text_width=TEXT_WIDTH, text_hidden=16, time_dim=16)).eval()
    save_clip(root / "clip", clip, text_encoder=str(encoder))
    return root / "clip"


@pytest.mark.parametrize("B, side", [(1, 4), (3, 6)])
def test_forward_is_the_unet_on_the_embedding_and_its_projected_tokens_float64(B, side):
    model = decoder().double()
    g = torch.Generator().manual_seed(SESSION_SEED + B)
    x = torch.randn(B, 4, side, side, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 999
    emb = torch.randn(B, 1, EMBED, generator=g, dtype=torch.float64)
    W, b = model.clip_proj.weight, model.clip_proj.bias  # (K * D, D), (K * D,)
    tokens = torch.cat([emb, (emb[:, 0] @ W.T + b).view(B, CONFIG.clip_tokens, EMBED)], 1)  # (B, 1 + K, D)
    with torch.no_grad():
        out = model(x, t, emb)
        want = UNet.forward(model, x, t, tokens)
    assert out.shape == x.shape
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    with torch.no_grad():
        moved = model(x, t, emb + 0.5 * torch.randn(emb.shape, generator=g, dtype=torch.float64))
    assert (moved - out).abs().max() > 1e-4


def test_gradients_reach_the_projection_the_pooled_path_and_the_embedding():
    model = decoder()
    g = torch.Generator().manual_seed(SESSION_SEED)
    emb = torch.randn(2, 1, EMBED, generator=g, requires_grad=True)
    out = model(torch.randn(2, 4, 4, 4, generator=g), torch.rand(2, generator=g) * 999, emb)
    out.square().sum().backward()
    for p in (model.clip_proj.weight, model.context_pool.weight, emb):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("context", [None, torch.zeros(2, 2, EMBED), torch.zeros(2, 1, EMBED + 1)])
def test_the_context_must_be_one_embedding_per_image(context):
    with pytest.raises(ValueError, match=r"CLIP image embeddings \(B, 1, 12\)"):
        decoder()(torch.zeros(2, 4, 4, 4), torch.zeros(2), context)


def test_cache_rows_are_the_clip_embeddings_and_dropout_zeroes_them(clip_dir):
    from ldm.clip import load_clip

    n = 24
    dataset = ShapesDataset(RESOLUTION)
    cache = Cache(torch.zeros(n, 4, 4, 4, dtype=torch.float16), torch.zeros(n, 4, 4, 4, dtype=torch.float16), keys={})
    captions = attach_clip_embeddings(cache, str(clip_dir), dataset, n, 3, "cpu", quiet=True)
    assert captions == [dataset[i]["text"] for i in range(3)]
    want = load_clip(clip_dir, load_text_encoder=False).encode_image(source_images(dataset, n))  # (n, D)
    torch.testing.assert_close(cache.tokens[:n, 0], want)
    assert cache.tokens.shape == (n + 1, 1, EMBED) and not cache.tokens[n].any()
    drop = 0.3
    batches = Batches(cache, 16, Dist(), SESSION_SEED, drop, 1000, torch.device("cpu"))
    dropped = total = 0
    for step in range(40):
        _, _, _, cond = batches(step)
        ctx = cond["context"][:, 0]  # (16, D)
        zero = ~ctx.any(-1)  # (16,)
        rows = batches.positions.take(step * 16, 16)
        torch.testing.assert_close(ctx[~zero], want[rows][~zero])  # kept rows: their own image's embedding
        dropped, total = dropped + int(zero.sum()), total + len(zero)
    assert abs(dropped / total - drop) < 0.08, dropped / total  # 640 draws: 3.5 standard deviations


def test_train_save_load_and_sample_end_to_end(clip_dir, tmp_path, capsys):
    vae = make_vae(tmp_path / "vae", SESSION_SEED)
    out = tmp_path / "decoder"
    assert train_unet.main(train_flags(vae, 6, SESSION_SEED) + ["--cond", "clip-image", "--clip", str(clip_dir),
                                                                "--out", str(out), "--lr", "5e-3"]) == 0
    meta = json.loads((out / "unet.json").read_text())
    assert meta["conditioning"] == "clip-image" and meta["config"]["clip_tokens"] == 4
    unet, _ = load_unet(out)
    assert isinstance(unet, ClipDecoderUNet)
    pipe, clip = load_decoder(out)
    assert isinstance(pipe.unet, ClipDecoderUNet)
    from safetensors.torch import load_file
    saved = load_file(out / "unet.safetensors")
    assert saved.keys() == pipe.unet.state_dict().keys()
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, saved[k]), k

    # variations: deterministic in the seed, and the image's embedding is what they are drawn from
    src = torch.stack([ShapesDataset(RESOLUTION)[i]["image"] for i in (0, 1)])
    a = variations(pipe, clip, src, n=2, steps=3, seed=5)
    assert a.shape == (4, 3, RESOLUTION, RESOLUTION) and torch.isfinite(a).all()
    torch.testing.assert_close(a, variations(pipe, clip, src, n=2, steps=3, seed=5), rtol=0, atol=0)
    assert embed_images(clip, src).shape == (2, EMBED)

    png = tmp_path / "src.png"
    Image.fromarray(((src[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(png)
    grid = tmp_path / "v.png"
    assert sample.main(["--decoder", str(out), "--variations", str(png), "--n", "2", "--steps", "2",
                        "--out", str(grid)]) == 0
    assert Image.open(grid).size[0] > Image.open(grid).size[1]  # one row: the source, then two variations

    torch.manual_seed(SESSION_SEED)  # a random prior of the CLIP's widths: the path, not its quality
    prior = Prior(PriorConfig(embed_dim=EMBED, text_width=TEXT_WIDTH, width=16, depth=1, heads=2, ff_mult=2))
    save_model(tmp_path / "prior", "prior", prior.eval(), prior.config)
    grid = tmp_path / "p.png"
    assert sample.main(["--decoder", str(out), "--prior", str(tmp_path / "prior"), "--prompt", "a red circle",
                        "--prompt", "a blue square", "--n", "2", "--steps", "2", "--prior-steps", "2",
                        "--out", str(grid), "--images", str(tmp_path / "each")]) == 0
    assert len(list((tmp_path / "each").glob("*.png"))) == 4
    capsys.readouterr()

    # a decoder given as a text UNet is refused by name
    assert sample.main(["--unet", str(out), "--prompt", "a red circle", "--out", str(grid)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an unCLIP decoder" in err[0] and "--decoder" in err[0], err

    # a decoder folder that says it is a text UNet is refused by name
    text = tmp_path / "text"
    shutil.copytree(out, text)
    meta["conditioning"] = "text"
    (text / "unet.json").write_text(json.dumps(meta))
    assert sample.main(["--decoder", str(text), "--variations", str(png), "--out", str(grid)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an unCLIP decoder" in err[0] and str(text) in err[0], err


@pytest.mark.parametrize("argv, message", [
    (["--variations", "x.png"], "--variations needs --decoder DIR"),
    (["--prior", "p", "--prompt", "x"], "--prior needs --decoder DIR"),
    (["--decoder", "d"], "give one of them"),
    (["--decoder", "d", "--prior", "p", "--variations", "x.png"], "give one of them"),
    (["--decoder", "d", "--prior", "p"], "--prior needs prompts"),
    (["--decoder", "d", "--variations", "x.png", "--prompt", "y"], "takes no --prompt"),
    (["--decoder", "d", "--variations", "/nonexistent/x.png"], "--variations: file not found"),
    (["--decoder", "d", "--prior", "p", "--prompt", "x", "--prior-steps", "0"], "--prior-steps must be positive"),
    (["--decoder", "d", "--prior", "p", "--prompt", "x", "--clip", "c"], "--decoder takes no --clip"),
    (["--decoder", "/nonexistent/d", "--prior", "p", "--prompt", "x"], "checkpoint folder not found"),
])
def test_sample_unclip_errors_are_one_line(argv, message, capsys):
    assert sample.main(argv + ["--out", "/nonexistent/never.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sample: error:") and message in err[0], err


@pytest.mark.parametrize("argv, message", [
    (["--cond", "clip-image"], "needs --clip DIR"),
    (["--clip", "c"], "--clip c is for --cond clip-image"),
    (["--cond", "clip-image", "--clip", "c", "--text"], "takes no --text"),
    (["--cond", "clip-image", "--clip", "/nonexistent/clip"], "CLIP folder not found"),
])
def test_train_unet_clip_image_errors_are_one_line(argv, message, tmp_path, capsys):
    vae = make_vae(tmp_path / "vae", SESSION_SEED)
    assert train_unet.main(["--vae", str(vae), "--out", str(tmp_path / "o"), "--cache-images", "8", "--quiet"]
                           + UNET_FLAGS + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_unet: error:") and message in err[0], err


@pytest.mark.parametrize("argv, message", [
    (["--variations"], "--variations needs --decoder DIR"),
    (["--prior", "p"], "--prior needs --decoder DIR"),
    (["--decoder", "d"], "give one of them"),
    (["--decoder", "d", "--prior", "p", "--variations"], "give one of them"),
    (["--decoder", "d", "--variations", "--n", "0"], "must be positive"),
    (["--decoder", "/nonexistent/d", "--variations"], "checkpoint folder not found"),
])
def test_eval_text_unclip_errors_are_one_line(argv, message, capsys):
    from ldm import eval_text

    assert eval_text.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval_text: error:") and message in err[0], err
