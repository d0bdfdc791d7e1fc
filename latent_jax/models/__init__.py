"""Models: one Flax NNX decoder for the GPT-2 and Llama 3 families behind a pure functional API."""
from latent_jax.models.transformer import (KVCache, ModelOutput, Transformer, abstract_model, add_thought_projection,
                                           embed_tokens, forward, get_config, init_cache, init_model,
                                           lm_head, project_thought)

__all__ = ["KVCache", "ModelOutput", "Transformer", "abstract_model", "add_thought_projection", "embed_tokens",
           "forward", "get_config", "init_cache", "init_model", "lm_head", "project_thought"]
