"""Latent diffusion: UNet, schedules, samplers, text encoder, data, and the entry points."""
