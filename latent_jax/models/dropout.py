"""Dropout whose masks are a pure function of (key, site, absolute column).

A mask element is drawn from the key folded with the column of its query (and, for attention probabilities, the
cache slot of its key), never from the shape of the call. So the compiled latent loop (a prefix pass, one column
per `scan` step, a rest pass over the cache) and the reference's n+1 full forward passes draw identical masks for
the same `dropout_rng`, and LT-Tuning's fill passes agree with its final pass. Row b of a column takes element b of
that column's draw, so a batch's rows differ. Shape letters: B batch, T query columns, S key slots, K kv heads,
G query heads per kv head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _keep(key, rate: float, shape) -> jax.Array:
    return jax.random.bernoulli(key, 1.0 - rate, shape)


def _apply(x, keep, rate: float):
    if rate >= 1.0:
        return jnp.zeros_like(x)
    return jnp.where(keep, x * (1.0 / (1.0 - rate)), 0).astype(x.dtype)


def dropout_BxT(x_BxTx_, rate: float, key, cols_T):
    """Dropout of an activation [B, T, ...] (embeddings, residual branches): the mask of column t comes from
    fold_in(key, cols_T[t]). key None or rate 0: x unchanged."""
    if key is None or rate == 0.0:
        return x_BxTx_
    B, tail = x_BxTx_.shape[0], x_BxTx_.shape[2:]
    keep_TxBx_ = jax.vmap(lambda c: _keep(jax.random.fold_in(key, c), rate, (B, *tail)))(cols_T)
    return _apply(x_BxTx_, jnp.moveaxis(keep_TxBx_, 0, 1), rate)


def dropout_probs(probs_BxKxGxTxS, rate: float, key, cols_T):
    """Dropout of attention probabilities [B, K, G, T, S] (after the softmax, as HF's `attn_dropout`): the mask of
    (query column t, key slot s) comes from fold_in(fold_in(key, cols_T[t]), s)."""
    if key is None or rate == 0.0:
        return probs_BxKxGxTxS
    B, K, G, _, S = probs_BxKxGxTxS.shape

    def row(c):
        kc = jax.random.fold_in(key, c)
        return jax.vmap(lambda s: _keep(jax.random.fold_in(kc, s), rate, (B, K, G)))(jnp.arange(S))  # [S,B,K,G]

    keep_TxSxBxKxG = jax.vmap(row)(cols_T)
    return _apply(probs_BxKxGxTxS, jnp.transpose(keep_TxSxBxKxG, (2, 3, 4, 0, 1)), rate)


def site_key(key, *path: int):
    """key folded with each index of `path` (layer, site), or None when key is None."""
    if key is None:
        return None
    for i in path:
        key = jax.random.fold_in(key, i)
    return key
