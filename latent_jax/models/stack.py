"""The decoder stack: a Python loop over a list of blocks, or one `lax.scan` over stacked per-layer params.

`ModelConfig.scanned` picks the layout. Unscanned, params are `blocks.{i}.attn.wq` ... and the KV cache a tuple of
per-layer arrays. Scanned, every block weight carries a leading `layers` axis (`blocks.attn.wq` [L, D, N, H]; the
logical axis "layers" is replicated by the sharding rules) and the KV cache is stacked the same way
(k [L, R, H, S], v [L, R, S, H]); the compiled program then holds one block whatever the depth. Both layouts
flatten to the same per-layer names (`params.flatten_params`), so HF import / export and `resize_vocab` never see
the difference.

Scanned with a decoding cache (`KVCache.in_place`), the stacked cache rides in the scan carry and each layer writes
its new columns in place (`dynamic_update_slice` at [layer, ..., write_index]): a decode step copies no cache. In
training (`latent_forward` makes its cache with in_place=False) or under a remat policy, each layer's cache slice
goes in as a scanned input and comes out as an output instead: differentiating the carry would add a full-cache
cotangent per layer (measured: the GPT-2-124M Coconut step 7.7 s with the carry, 6.4 s with slices), and a remat
policy would save the whole carry once per layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from latent_jax.config import ModelConfig
from latent_jax.models.dropout import site_key
from latent_jax.sharding import ACT_BTD, constrain

# jax.checkpoint policy per ModelConfig.remat ("none": no remat)
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@struct.dataclass
class KVCache:
    """k, v: keys [B*K, H, S] and values [B*K, S, H] (K kv heads) per layer: a tuple of L arrays, or one array
    with a leading layer axis when the model scans its layers. Those are the attention matmuls' operand layouts,
    so a decode step updates them in place. mask_BxS: slot holds a real (non-pad) token; index: next slot to
    write. in_place (static; scanned models): the stacked cache rides in the layer scan's carry and is written in
    place (decoding); False: each layer's slice goes in and out of the scan (training, where the carry's cotangent
    would add a full-cache array per layer in the backward pass)."""

    k: tuple | jax.Array
    v: tuple | jax.Array
    mask_BxS: jax.Array
    index: jax.Array
    in_place: bool = struct.field(pytree_node=False, default=True)

    @property
    def max_len(self) -> int:
        return self.mask_BxS.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, in_place: bool = True) -> KVCache:
    dtype = dtype or cfg.compute_dtype
    L, R, S, H = cfg.n_layers, batch * cfg.n_kv_heads, max_len, cfg.head_dim
    if cfg.scanned:
        k, v = jnp.zeros((L, R, H, S), dtype), jnp.zeros((L, R, S, H), dtype)
    else:
        k = tuple(jnp.zeros((R, H, S), dtype) for _ in range(L))
        v = tuple(jnp.zeros((R, S, H), dtype) for _ in range(L))
    return KVCache(k=k, v=v, mask_BxS=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                   in_place=in_place)


def stack_blocks(blocks: list[nnx.Module]) -> nnx.Module:
    """One module of the blocks' structure whose every param is the blocks' params stacked on a new leading axis
    (logical name "layers"). Made from the same list the unscanned model holds, so a seed initialises both layouts
    alike."""
    graphdef, _ = nnx.split(blocks[0])
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def stack(*vs):
        return vs[0].replace(jnp.stack([v[...] for v in vs]), axes=("layers", *vs[0].get_metadata()["axes"]))

    return nnx.merge(graphdef, jax.tree.map(stack, *[nnx.state(b) for b in blocks], is_leaf=is_var))


def _layer_fn(block_def, remat: str, args: tuple):
    """(x, layer params, kv, layer index) -> (x, kv) for one block; `args` are the block's other inputs."""
    positions, q_slots, key_valid, write_index, dropout_rng = args

    def layer(x, st, kv, i):
        block = nnx.merge(block_def, st)
        return block(x, positions, q_slots, kv, key_valid, write_index, site_key(dropout_rng, i + 1))

    return layer if remat == "none" else jax.checkpoint(layer, policy=REMAT_POLICIES[remat])


def run_list(cfg: ModelConfig, blocks, x, cache: KVCache | None, args: tuple, return_all_hidden: bool):
    """The unscanned stack: a Python loop. Returns (x, (k, v) or None, per-layer outputs or None)."""
    new_k, new_v, hs = [], [], []
    for i, block in enumerate(blocks):
        block_def, st = nnx.split(block)
        kv = None if cache is None else (cache.k[i], cache.v[i])
        x, kv = _layer_fn(block_def, cfg.remat, args)(x, st, kv, i)
        x = constrain(x, ACT_BTD)
        if kv is not None:
            new_k.append(kv[0])
            new_v.append(kv[1])
        hs.append(x)
    return x, (None if cache is None else (tuple(new_k), tuple(new_v))), (hs if return_all_hidden else None)


def run_scanned(cfg: ModelConfig, blocks, x, cache: KVCache | None, args: tuple, return_all_hidden: bool):
    """The scanned stack: one `lax.scan` over the layer axis of the stacked params (and cache)."""
    block_def, stacked = nnx.split(blocks)
    layer = _layer_fn(block_def, cfg.remat, args)
    idx = jnp.arange(cfg.n_layers, dtype=jnp.int32)
    keep = (lambda h: h) if return_all_hidden else (lambda h: None)

    if cache is not None and cache.in_place and cfg.remat == "none":  # the whole cache in the carry, in place
        def body(carry, xs):
            x, k, v = carry
            st, i = xs
            x, (k, v, _) = layer(x, st, (k, v, i), i)
            x = constrain(x, ACT_BTD)
            return (x, k, v), keep(x)

        (x, k, v), hs = jax.lax.scan(body, (x, cache.k, cache.v), (stacked, idx))
        return x, (k, v), hs

    def body(x, xs):  # no cache, or remat: each layer's cache slice in and out
        st, kv, i = xs
        x, kv = layer(x, st, kv, i)
        x = constrain(x, ACT_BTD)
        return x, (kv, keep(x))

    kv_in = None if cache is None else (cache.k, cache.v)
    x, (kv, hs) = jax.lax.scan(body, x, (stacked, kv_in, idx))
    return x, kv, hs
