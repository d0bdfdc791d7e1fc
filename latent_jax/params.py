"""Flat views of model params ("blocks.0.attn.wq" -> array) and building params from them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from latent_jax.config import ModelConfig
from latent_jax.models import abstract_model


def _key_name(k) -> str | None:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return None if k.name in ("value", "raw_value") else k.name
    return str(k)


def path_str(keypath) -> str:
    return ".".join(n for n in map(_key_name, keypath) if n is not None)


def _stacked_name(name: str) -> str | None:
    """"blocks.attn.wq" (a scanned model's stacked weight) -> "attn.wq"; a per-layer or other name -> None."""
    parts = name.split(".")
    return ".".join(parts[1:]) if parts[0] == "blocks" and len(parts) > 1 and not parts[1].isdigit() else None


def flatten_params(params) -> dict[str, jax.Array]:
    """params (nnx.State) -> {"blocks.0.attn.wq": array, ...}: per-layer names in both layouts (a scanned
    model's stacked `blocks.attn.wq` [L, ...] becomes L entries), so flat views compare across layouts."""
    flat = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(p)
        rest = _stacked_name(name)
        if rest is None:
            flat[name] = leaf
            continue
        for i in range(leaf.shape[0]):
            flat[f"blocks.{i}.{rest}"] = (jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
                                          if isinstance(leaf, jax.ShapeDtypeStruct) else leaf[i])
    return flat


def params_from_flat(cfg: ModelConfig, flat: dict, source: str = "params"):
    """Build (graphdef, params) for `cfg` from a flat dict of per-layer names (`flatten_params`), checking names
    and shapes; stacked on a layer axis when `cfg.scanned`.

    Raises ValueError naming `source` and the tensor for anything missing, unexpected or mis-shaped:
    never a silent partial load.
    """
    graphdef, abstract = abstract_model(cfg)
    expected = flatten_params(abstract)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: parameter names do not match the {cfg.family} model"
                         f" (missing: {missing[:8]}{'...' if len(missing) > 8 else ''};"
                         f" unexpected: {unexpected[:8]}{'...' if len(unexpected) > 8 else ''})")
    for name, spec in expected.items():
        if tuple(flat[name].shape) != tuple(spec.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(flat[name].shape)},"
                             f" the config expects {tuple(spec.shape)}")

    def fill(keypath, spec):
        name = path_str(keypath)
        rest = _stacked_name(name)
        value = (np.asarray(flat[name]) if rest is None
                 else np.stack([np.asarray(flat[f"blocks.{i}.{rest}"]) for i in range(spec.shape[0])]))
        return jnp.asarray(value, dtype=spec.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


def resize_vocab(cfg: ModelConfig, params, new_vocab_size: int, init_from: int | None = None):
    """Grow or shrink the vocabulary. New rows (embedding and untied LM head) copy row `init_from`
    (as the Coconut reference initialises its special tokens); without it they are N(0, 0.02).
    Returns (new_cfg, graphdef, params)."""
    if new_vocab_size <= 0:
        raise ValueError(f"new_vocab_size must be > 0, got {new_vocab_size}")
    if init_from is not None and not 0 <= init_from < min(cfg.vocab_size, new_vocab_size):
        raise ValueError(f"init_from={init_from} is not a token id kept in the resized vocabulary")
    flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    rng = np.random.default_rng(0)
    for name in ("embed", "lm_head"):
        if name not in flat:
            continue
        old = flat[name]
        if new_vocab_size <= old.shape[0]:
            flat[name] = old[:new_vocab_size]
            continue
        extra = new_vocab_size - old.shape[0]
        if init_from is not None:
            rows = np.repeat(old[init_from][None], extra, axis=0)
        else:
            rows = (0.02 * rng.standard_normal((extra, old.shape[1]))).astype(old.dtype)
        flat[name] = np.concatenate([old, rows.astype(old.dtype)], axis=0)
    new_cfg = cfg.replace(vocab_size=new_vocab_size)
    return (new_cfg, *params_from_flat(new_cfg, flat, source="resize_vocab"))


def relayout(cfg: ModelConfig, params, **changes):
    """(new_cfg, graphdef, params) of the same weights under ModelConfig `changes` that keep them, e.g.
    `scan_layers` (the block params restacked or unstacked) or `loss_chunk`."""
    new_cfg = cfg.replace(**changes)
    return (new_cfg, *params_from_flat(new_cfg, flatten_params(params), source="relayout"))
