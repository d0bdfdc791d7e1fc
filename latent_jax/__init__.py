"""latent_jax: latent reasoning (continuous thoughts and friends) for GPT-2 and Llama in JAX/Flax NNX."""
__version__ = "0.1.0"
