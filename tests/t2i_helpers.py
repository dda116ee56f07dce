"""Small stand-ins shared by the text-to-image tests: a random VAE saved the way train_vae saves
one, a tiny word-level text encoder, and the flags of a seconds-long train_unet run."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from autoencoder import VAE, VAEConfig
from ldm.checkpoint import save_model
from ldm.data import TEMPLATES, VOCABULARY, ShapesDataset

RESOLUTION = 16  # 16 x 16 images, 4 x 4 x 4 latents
VAE_CONFIG = VAEConfig(channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, norm_groups=4,
                       mid_attention=False)
ENCODER_WIDTH = 16
# a UNet of ~0.1M parameters: the tiny preset at 16 channels
UNET_FLAGS = ["--unet-override", "model_channels=16", "--unet-override", "norm_groups=8",
              "--unet-override", "num_heads=2"]


def make_vae(folder: Path, seed: int, config: VAEConfig = VAE_CONFIG) -> Path:
    """A randomly initialised VAE with the metadata ``load_vae`` needs; its scale factor makes the
    latents of the built-in images unit-variance, as train_vae's does."""
    torch.manual_seed(seed)
    vae = VAE(config).eval()
    x = torch.stack([ShapesDataset(RESOLUTION)[i]["image"] for i in range(32)])
    with torch.no_grad():
        z = vae.encode(x).mode()
    f = config.downsample_factor
    save_model(folder, "vae", vae, config, latent_scale_factor=1.0 / z.std().item(), latent_mean=z.mean().item(),
               resolution=RESOLUTION, downsample_factor=f,
               latent_shape=[config.latent_channels, RESOLUTION // f, RESOLUTION // f], created_by="tests")
    return folder


def make_text_encoder(folder: Path, seed: int = 0, width: int = ENCODER_WIDTH) -> Path:
    """A one-layer BERT, ``width`` wide, whose WordPiece vocabulary holds every word of the shapes captions."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = {w for values in VOCABULARY.values() for v in values for w in v.split()}
    words |= {w for t in TEMPLATES for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t))}
    words |= {"in", "at", "on", "the", "of", "a"}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ":", "."] + sorted(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=80)
    BertModel(config).save_pretrained(folder)
    return folder


def train_flags(vae: Path, steps: int, seed: int, *, batch: int = 8, cache_images: int = 48) -> list[str]:
    """A seconds-long train_unet run on ``vae``: tiny UNet, few cached images, no grids until the end."""
    return ["--vae", str(vae), "--steps", str(steps), "--batch-size", str(batch), "--cache-images", str(cache_images),
            "--seed", str(seed), "--warmup", "2", "--threads", "1", "--quiet", "--log-every", "1", "--val-every", "0",
            "--val-steps", "2", "--lr-schedule", "constant",
            "--schedule", "cosine", "--min-snr-gamma", "5"] + UNET_FLAGS


# The shared run's learning rate. At 3e-3 its 40 steps lowered the loss by 19-28% over seeds 0-11 (seed 9: 19.4%,
# failing test_train_unet's 20% check, seeds 4 and 7 at 20.3%); at 5e-3 by 31-43% over seeds 0-21.
SHARED_LR = "5e-3"
_BUILT: dict = {}  # per test process: what the shared fixtures already built


def shared_assets(tmp_path_factory, seed: int) -> dict:
    """The random VAE, the tiny text encoder and one short text-conditional run (40 steps, grids at
    20 and 40, 4 prompts scored at the end), built once per test process and shared by the test
    files: {"vae", "encoder", "unet", "cache", "stderr"}."""
    if "assets" in _BUILT and _BUILT["seed"] != seed:  # one build per process: every file must ask alike
        raise AssertionError(f"shared_assets built with seed {_BUILT['seed']}, asked again with {seed}")
    if "assets" not in _BUILT:
        import contextlib
        import io

        import ldm.train_unet as train_unet

        root = tmp_path_factory.mktemp("t2i")
        vae, encoder = make_vae(root / "vae", seed), make_text_encoder(root / "encoder", seed)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = train_unet.main(["--out", str(root / "unet"), "--text", "--text-encoder", str(encoder),
                                  "--cache-dir", str(root / "cache"), "--lr", SHARED_LR, "--ckpt-every", "20",
                                  "--eval", "4"]
                                 + train_flags(vae, 40, seed) + ["--val-every", "20"])
        assert rc == 0, err.getvalue()
        _BUILT["seed"] = seed
        _BUILT["assets"] = {"vae": vae, "encoder": encoder, "unet": root / "unet", "cache": root / "cache",
                            "stderr": err.getvalue()}
    return _BUILT["assets"]
