"""The decoder-only transformer (GPT-2 and Llama 3 families) and its pure functional API.

`forward(graphdef, params, ...)` is the boundary every jitted / scanned / differentiated function uses:
params is the `nnx.State` from `nnx.split`, the KV cache is an explicit pytree passed in and returned.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from latent_jax.config import ModelConfig
from latent_jax.models.dropout import dropout_BxT, site_key
from latent_jax.models.layers import Attention, Mlp, Norm, ThoughtProjection, param
from latent_jax.sharding import ACT_BTD, constrain

# jax.checkpoint policy per ModelConfig.remat ("none": no remat)
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _call_block(block, *args):
    return block(*args)


def _block_runner(remat: str):
    """How the layer loop calls a Block: directly, or rematerialised in the backward pass (`jax.checkpoint` of the
    pure function of the block's state: nothing is mutated, so it also runs inside the latent `lax.scan`)."""
    if remat == "none":
        return _call_block
    policy = REMAT_POLICIES[remat]

    def run(block, *args):
        block_def, state = nnx.split(block)
        pure = jax.checkpoint(lambda st, *a: nnx.merge(block_def, st)(*a), policy=policy)
        return pure(state, *args)

    return run


@struct.dataclass
class KVCache:
    """k, v: per-layer keys [B*K, H, S] and values [B*K, S, H] (K kv heads; the
    attention matmuls' operand layouts, so a decode step updates them in place); mask_BxS: slot holds a real (non-pad) token; index: next slot to write."""

    k: tuple
    v: tuple
    mask_BxS: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.mask_BxS.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = dtype or cfg.compute_dtype
    B, K, S, H = batch, cfg.n_kv_heads, max_len, cfg.head_dim
    return KVCache(k=tuple(jnp.zeros((B * K, H, S), dtype) for _ in range(cfg.n_layers)),
                   v=tuple(jnp.zeros((B * K, S, H), dtype) for _ in range(cfg.n_layers)),
                   mask_BxS=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
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
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        self.pos_embed = (param(rngs, (cfg.max_positions, cfg.d_model), (None, "embed"), cfg, std=0.01)
                          if cfg.family == "gpt2" else None)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = Norm(cfg, rngs)
        self.lm_head = (None if cfg.tie_embeddings
                        else param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg))
        self.thought_proj = ThoughtProjection(cfg, rngs) if cfg.thought_proj_dim else None

    def embed_tokens(self, tokens_BxT):
        return constrain(jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.cfg.compute_dtype), ACT_BTD)

    def __call__(self, tokens=None, embeds=None, positions=None, mask=None, cache=None,
                 return_all_hidden=False, dropout_rng=None) -> ModelOutput:
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
        x = constrain(dropout_BxT(x, cfg.embd_dropout, site_key(dropout_rng, 0), q_slots[0]), ACT_BTD)
        all_hidden = [x] if return_all_hidden else None
        new_k, new_v = [], []
        run_block = _block_runner(getattr(cfg, "remat", "none"))
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = run_block(block, x, positions, q_slots, kv, key_valid, write_index, site_key(dropout_rng, i + 1))
            x = constrain(x, ACT_BTD)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
            if return_all_hidden:
                all_hidden.append(x)
        hidden = self.final_norm(x)
        if return_all_hidden:
            all_hidden[-1] = hidden  # HF convention: the last entry has the final norm applied
        head = self.embed if self.lm_head is None else self.lm_head
        logits = jnp.einsum("BTD,VD->BTV", hidden, head[...].astype(hidden.dtype),
                            preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "length", "act_vocab"))
        new_cache = None if cache is None else KVCache(
            k=tuple(new_k), v=tuple(new_v), mask_BxS=key_valid, index=write_index + T)
        return ModelOutput(logits, hidden, new_cache, None if all_hidden is None else tuple(all_hidden))


def init_model(cfg: ModelConfig, seed: int = 0):
    """Random init. Returns (graphdef, params) — the pure functional pair."""
    return nnx.split(Transformer(cfg, nnx.Rngs(params=seed)))


def abstract_model(cfg: ModelConfig):
    """(graphdef, params of jax.ShapeDtypeStruct) without allocating weights."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0))))


def forward(graphdef, params, tokens=None, embeds=None, positions=None, mask=None, cache=None,
            return_all_hidden=False, dropout_rng=None) -> ModelOutput:
    """Pure forward pass: see `Transformer.__call__`. Accepts token ids or input embeddings. dropout_rng: a PRNG
    key turns on the config's dropout (training); None (the default) is the deterministic pass. Masks depend on
    (key, layer, site, column) only (`latent_jax.models.dropout`), so a pass over columns [a, b) with a cache
    draws what a full pass draws there."""
    model = nnx.merge(graphdef, params)
    return model(tokens=tokens, embeds=embeds, positions=positions, mask=mask, cache=cache,
                 return_all_hidden=return_all_hidden, dropout_rng=dropout_rng)


def with_remat(graphdef, params, remat: str):
    """The graphdef of the same model with `cfg.remat` set (params unchanged; usable inside a trace)."""
    model = nnx.merge(graphdef, params)
    if model.cfg.remat == remat:
        return graphdef
    model.cfg = model.cfg.replace(remat=remat)
    return nnx.split(model)[0]


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
