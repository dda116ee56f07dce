"""The KL autoencoder that maps images to latents and back, and its training losses."""

from autoencoder.losses import LPIPS, LossConfig, PatchDiscriminator, VAELoss, hinge_d_loss
from autoencoder.vae import VAE, VAE_CONFIGS, DiagonalGaussian, VAEConfig, latent_shape, num_parameters

__all__ = ["VAE", "VAEConfig", "VAE_CONFIGS", "DiagonalGaussian", "latent_shape", "num_parameters",
           "VAELoss", "LossConfig", "PatchDiscriminator", "LPIPS", "hinge_d_loss"]
