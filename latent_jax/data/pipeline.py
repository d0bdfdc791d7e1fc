"""An alias: this module moved to the training wing (see `latent_jax.train`); the old name is the same module."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("latent_jax.train.pipeline")
