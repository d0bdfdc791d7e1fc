"""Moved to `latent_jax.methods.vqvae` (Token Assorted's VQ-VAE lives with its method); this name stays an alias."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("latent_jax.methods.vqvae")
