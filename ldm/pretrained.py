"""Load what the training commands export: ``load_vae(folder)`` rebuilds the autoencoder.

``train_vae`` writes ``vae.safetensors`` and ``vae.json`` into its output folder; the JSON holds the
model config, the latent scale factor (1 / std of the latents over a sample of the training data),
the image resolution and what the model was trained on. Every consumer reads the scale factor from
here: ``z = vae.encode(x).sample() * meta["latent_scale_factor"]`` and
``x = vae.decode(z / meta["latent_scale_factor"])``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from autoencoder import VAE, VAEConfig
from ldm.checkpoint import load_model_files, load_state_dict_strict

VAE_NAME = "vae"


def load_vae(folder: str | Path, device: str | torch.device = "cpu") -> tuple[VAE, dict]:
    """The VAE saved in ``folder`` (eval mode, gradients off, on ``device``) and its metadata:
    ``config``, ``latent_scale_factor``, ``resolution``, ``downsample_factor``, ``latent_shape``,
    ``dataset``, ``steps``, ``eval``. Errors name the file that is missing or does not fit."""
    folder = Path(folder)
    state, meta = load_model_files(folder, VAE_NAME)
    try:
        config = VAEConfig(**meta["config"])
    except TypeError as e:
        raise ValueError(f"{folder / (VAE_NAME + '.json')}: config does not describe a VAE ({e})") from None
    if not isinstance(meta.get("latent_scale_factor"), (int, float)):
        raise ValueError(f"{folder / (VAE_NAME + '.json')} has no latent_scale_factor; "
                         "was it written by ldm.train_vae?")
    model = VAE(config)
    load_state_dict_strict(model, state, str(folder / f"{VAE_NAME}.safetensors"))
    return model.to(device).eval().requires_grad_(False), meta
