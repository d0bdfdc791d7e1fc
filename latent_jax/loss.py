"""The training loss without the [B, T, V] logits: LM head + shifted cross-entropy, chunk by chunk.

With Llama-3's 128,256-token vocabulary a 32 x 512 batch has 8.4 GB of f32 logits, and their gradient as much
again. `chunked_token_loss` takes the final hidden states [B, T, D] and the head [V, D] instead: a `lax.scan` over
chunks of C positions computes each chunk's logits [B, C, V], its cross-entropy and argmax, and (under
differentiation) at once the chunk's gradients, dL/dh = (softmax - onehot) W and dL/dW += (softmax - onehot)^T h,
through a custom VJP. The backward pass then only scales those by the incoming cotangent: no logits are saved
and none recomputed, so the head costs the same matmuls as the unchunked loss (the fused linear cross-entropy of
Liger-Kernel / Apple's "Cut your losses", written from their description).

Shape letters: B batch, T positions, C chunk length, N chunks, D d_model, V vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from latent_jax.layout import IGNORE


def chunked_token_loss(hidden_BxTxD, head_VxD, labels_BxT, chunk: int):
    """`layout.token_loss(hidden @ head.T, labels)` (sum of losses, #tokens, #correct) computed in chunks of
    `chunk` positions; the last chunk is padded with ignored labels. Same values and gradients (f32) as the full
    logits; the largest logits tensor alive is [B, chunk, V]."""
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    h_BxTxD, labels = hidden_BxTxD[:, :-1], labels_BxT[:, 1:]
    B, T, D = h_BxTxD.shape
    N = -(-T // chunk)
    pad = N * chunk - T
    h_BxTxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE)
    h_NxBxCxD = jnp.swapaxes(h_BxTxD.reshape(B, N, chunk, D), 0, 1)
    y_NxBxC = jnp.swapaxes(labels.reshape(B, N, chunk), 0, 1)
    total, correct = _fused_ce(h_NxBxCxD, head_VxD.astype(h_BxTxD.dtype), y_NxBxC)
    return total, jnp.sum(labels != IGNORE), correct


def _chunk_stats(h_BxCxD, head_VxD, y_BxC):
    """(logits f32 [B, C, V], valid [B, C], safe labels, ce [B, C], correct [B, C]) of one chunk."""
    logits = jnp.einsum("BCD,VD->BCV", h_BxCxD, head_VxD, preferred_element_type=jnp.float32)
    valid = y_BxC != IGNORE
    safe = jnp.where(valid, y_BxC, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == safe) & valid
    return logits, valid, safe, (lse - picked) * valid, correct


@jax.custom_vjp
def _fused_ce(h_NxBxCxD, head_VxD, y_NxBxC):
    def body(carry, xs):
        total, correct = carry
        _, _, _, ce, ok = _chunk_stats(xs[0], head_VxD, xs[1])
        return (total + jnp.sum(ce), correct + jnp.sum(ok, dtype=jnp.int32)), None

    (total, correct), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)),
                                       (h_NxBxCxD, y_NxBxC))
    return total, correct


def _fused_fwd(h_NxBxCxD, head_VxD, y_NxBxC):
    def body(carry, xs):
        total, correct, dW_VxD = carry
        h_BxCxD, y_BxC = xs
        logits, valid, safe, ce, ok = _chunk_stats(h_BxCxD, head_VxD, y_BxC)
        # d(sum ce)/d logits = softmax - onehot(label), zero at ignored positions
        g_BxCxV = (jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(safe, logits.shape[-1])) * valid[..., None]
        dh_BxCxD = jnp.einsum("BCV,VD->BCD", g_BxCxV, head_VxD.astype(jnp.float32))
        dW_VxD = dW_VxD + jnp.einsum("BCV,BCD->VD", g_BxCxV, h_BxCxD.astype(jnp.float32))
        carry = (total + jnp.sum(ce), correct + jnp.sum(ok, dtype=jnp.int32), dW_VxD)
        return carry, dh_BxCxD.astype(h_BxCxD.dtype)

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros(head_VxD.shape, jnp.float32))
    (total, correct, dW_VxD), dh_NxBxCxD = jax.lax.scan(body, init, (h_NxBxCxD, y_NxBxC))
    return (total, correct), (dh_NxBxCxD, dW_VxD.astype(head_VxD.dtype))


def _fused_bwd(res, cotangents):
    dh_NxBxCxD, dW_VxD = res
    g = cotangents[0]  # the count of correct tokens is an integer: no gradient flows through it
    return (g.astype(dh_NxBxCxD.dtype) * dh_NxBxCxD, g.astype(dW_VxD.dtype) * dW_VxD, None)


_fused_ce.defvjp(_fused_fwd, _fused_bwd)
