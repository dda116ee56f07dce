"""The KL autoencoder that maps images to latents and back, and its training losses."""
