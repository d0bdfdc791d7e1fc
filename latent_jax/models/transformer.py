"""The decoder-only transformer (GPT-2 and Llama 3 families) and its pure functional API.

`forward(graphdef, params, ...)` is the boundary every jitted / scanned / differentiated function uses:
params is the `nnx.State` from `nnx.split`, the KV cache is an explicit pytree passed in and returned.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from latent_jax.config import ModelConfig
from latent_jax.models.dropout import dropout_BxT, site_key
from latent_jax.models.layers import Attention, Mlp, Norm, ThoughtProjection, param
from latent_jax.models.stack import KVCache, init_cache, run_list, run_scanned, stack_blocks
from latent_jax.sharding import ACT_BTD, constrain

__all__ = ["KVCache", "init_cache"]  # re-exported: the cache is part of the functional API

class ModelOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32 (None: forward(..., return_logits=False))
    hidden: jax.Array  # [B, T, D] final hidden state, after the final norm
    cache: KVCache | None
    all_hidden: tuple | None  # (embeddings, block_1, ..., block_L) outputs, HF `hidden_states` order


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, x, positions, q_slots, kv, key_valid, write_index, drop_key=None):
        """drop_key: this layer's dropout key (sites 0: attention probabilities, 1: attention output, 2: MLP
        output, as HF GPT-2's attn_dropout / resid_dropout), or None."""
        rate, cols = self.attn.cfg.resid_dropout, q_slots[0]
        h, new_kv = self.attn(self.attn_norm(x), positions, q_slots, kv, key_valid, write_index,
                              site_key(drop_key, 0))
        x = x + dropout_BxT(h, rate, site_key(drop_key, 1), cols)
        return x + dropout_BxT(self.mlp(self.mlp_norm(x)), rate, site_key(drop_key, 2), cols), new_kv


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        cfg = cfg.replace(scan_layers=cfg.scanned)  # auto resolved once: checkpoints record the layout they hold
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        self.pos_embed = (param(rngs, (cfg.max_positions, cfg.d_model), (None, "embed"), cfg, std=0.01)
                          if cfg.family == "gpt2" else None)
        blocks = [Block(cfg, rngs) for _ in range(cfg.n_layers)]
        self.blocks = stack_blocks(blocks) if cfg.scanned else nnx.List(blocks)
        self.final_norm = Norm(cfg, rngs)
        self.lm_head = (None if cfg.tie_embeddings
                        else param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg))
        self.thought_proj = ThoughtProjection(cfg, rngs) if cfg.thought_proj_dim else None

    def head_VxD(self):
        """The LM head's weight [V, D] (the embedding when tied)."""
        return (self.embed if self.lm_head is None else self.lm_head)[...]

    def embed_tokens(self, tokens_BxT):
        return constrain(jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.cfg.compute_dtype), ACT_BTD)

    def __call__(self, tokens=None, embeds=None, positions=None, mask=None, cache=None,
                 return_all_hidden=False, dropout_rng=None, return_logits=True) -> ModelOutput:
        cfg = self.cfg
        if not cfg.has_dropout:
            dropout_rng = None
        if (tokens is None) == (embeds is None):
            raise ValueError("pass exactly one of tokens [B, T] or embeds [B, T, D]")
        x = self.embed_tokens(tokens) if embeds is None else embeds.astype(cfg.compute_dtype)
        B, T = x.shape[:2]
        mask_BxT = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
        if cache is None:
            q_slots = jnp.broadcast_to(jnp.arange(T), (B, T))
            key_valid, write_index, n_prev_B = mask_BxT, 0, jnp.zeros((B,), jnp.int32)
        else:
            write_index = cache.index
            q_slots = jnp.broadcast_to(write_index + jnp.arange(T), (B, T))
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache.mask_BxS, mask_BxT, write_index, axis=1)
            n_prev_B = jnp.sum(cache.mask_BxS, axis=1, dtype=jnp.int32)
        if positions is None:  # left padding: a row's first real token is position 0
            positions = n_prev_B[:, None] + jnp.cumsum(mask_BxT, axis=1, dtype=jnp.int32) - 1
            positions = jnp.maximum(positions, 0)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
        x = x_in = constrain(dropout_BxT(x, cfg.embd_dropout, site_key(dropout_rng, 0), q_slots[0]), ACT_BTD)
        args = (positions, q_slots, key_valid, write_index, dropout_rng)
        run = run_scanned if cfg.scanned else run_list
        x, kv, hs = run(cfg, self.blocks, x, cache, args, return_all_hidden)
        all_hidden = [x_in, *hs] if return_all_hidden else None
        hidden = self.final_norm(x)
        if return_all_hidden:
            all_hidden[-1] = hidden  # HF convention: the last entry has the final norm applied
        logits = None
        if return_logits:
            logits = jnp.einsum("BTD,VD->BTV", hidden, self.head_VxD().astype(hidden.dtype),
                                preferred_element_type=jnp.float32)
            logits = constrain(logits, ("batch", "length", "act_vocab"))
        new_cache = None if cache is None else KVCache(k=kv[0], v=kv[1], mask_BxS=key_valid, index=write_index + T,
                                                        in_place=cache.in_place)
        return ModelOutput(logits, hidden, new_cache, None if all_hidden is None else tuple(all_hidden))


def init_model(cfg: ModelConfig, seed: int = 0):
    """Random init. Returns (graphdef, params) — the pure functional pair."""
    return nnx.split(Transformer(cfg, nnx.Rngs(params=seed)))


def abstract_model(cfg: ModelConfig):
    """(graphdef, params of jax.ShapeDtypeStruct) without allocating weights."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0))))


def forward(graphdef, params, tokens=None, embeds=None, positions=None, mask=None, cache=None,
            return_all_hidden=False, dropout_rng=None, return_logits=True) -> ModelOutput:
    """Pure forward pass: see `Transformer.__call__`. Accepts token ids or input embeddings. return_logits False:
    `logits` is None (a loss that applies the head chunk by chunk: `latent_jax.loss`). dropout_rng: a PRNG
    key turns on the config's dropout (training); None (the default) is the deterministic pass. Masks depend on
    (key, layer, site, column) only (`latent_jax.models.dropout`), so a pass over columns [a, b) with a cache
    draws what a full pass draws there."""
    model = nnx.merge(graphdef, params)
    return model(tokens=tokens, embeds=embeds, positions=positions, mask=mask, cache=cache,
                 return_all_hidden=return_all_hidden, dropout_rng=dropout_rng, return_logits=return_logits)


def with_remat(graphdef, params, remat: str):
    """The graphdef of the same model with `cfg.remat` set (params unchanged; usable inside a trace)."""
    model = nnx.merge(graphdef, params)
    if model.cfg.remat == remat:
        return graphdef
    model.cfg = model.cfg.replace(remat=remat)
    return nnx.split(model)[0]


def lm_head(graphdef, params):
    """The LM head's weight [V, D] (the token embedding when the head is tied)."""
    return nnx.merge(graphdef, params).head_VxD()


def embed_tokens(graphdef, params, tokens_BxT):
    return nnx.merge(graphdef, params).embed_tokens(tokens_BxT)


def project_thought(graphdef, params, h_BxD):
    """The model's thought projection (CODI) of final hidden states [B, D]; a ValueError if it has none."""
    model = nnx.merge(graphdef, params)
    if model.thought_proj is None:
        raise ValueError("this model has no thought projection (ModelConfig.thought_proj_dim = 0)")
    return model.thought_proj(h_BxD)


def add_thought_projection(cfg: ModelConfig, params, dim: int, norm: bool = True, seed: int = 0):
    """(cfg, graphdef, params) of the same model with a fresh thought projection of width `dim` (CODI training)."""
    from latent_jax.params import flatten_params, params_from_flat

    new_cfg = cfg.replace(thought_proj_dim=dim, thought_proj_norm=norm)
    proj = nnx.state(ThoughtProjection(new_cfg, nnx.Rngs(params=seed)))
    flat = {**flatten_params(params), **{f"thought_proj.{k}": v for k, v in flatten_params(proj).items()}}
    return (new_cfg, *params_from_flat(new_cfg, flat, source="thought projection"))


def get_config(graphdef, params) -> ModelConfig:
    return nnx.merge(graphdef, params).cfg
