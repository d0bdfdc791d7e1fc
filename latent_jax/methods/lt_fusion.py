"""LT-Tuning's pure JAX parts: Context-Prediction Fusion, the training forward with `<thinking>` slots at scattered
positions, teacher-forced gold-token probabilities (confidence-driven insertion) and the compiled decode loop.

Fusion at a `<thinking>` position, from the hidden state h [D] and logits z [V] of the position before it:
    p = renorm(top_p_nucleus(softmax(z / T with z[<thinking>] = -inf)));  e = alpha * h + (1 - alpha) * p @ E_in
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from latent_jax.generate import Feedback, SamplingConfig, decode_loop
from latent_jax.latent import token_loss
from latent_jax.models import embed_tokens, forward, get_config, init_cache


def embedding_matrices(graphdef, params):
    """(input embedding E_in [V, D], LM head [V, D]); the same array when tied."""
    model = nnx.merge(graphdef, params)
    e_in = model.embed[...]
    return e_in, (e_in if model.lm_head is None else model.lm_head[...])


def nucleus_probs(logits_BxV, think_id: int, temperature: float, top_p: float):
    """softmax(z / T) with the `<thinking>` logit at -inf, cut to the top-p nucleus (>= 1 token), renormalised."""
    z = logits_BxV.astype(jnp.float32) / temperature
    z = jnp.where(jnp.arange(z.shape[-1]) == think_id, -jnp.inf, z)
    probs = jax.nn.softmax(z, axis=-1)
    if top_p >= 1.0:
        return probs
    sorted_p = jnp.sort(probs, axis=-1)[..., ::-1]
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the tokens ranked strictly higher
    n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_p, n_keep - 1, axis=-1)
    kept = jnp.where(probs >= jax.lax.stop_gradient(cutoff), probs, 0.0)
    return kept / jnp.sum(kept, axis=-1, keepdims=True)


def fuse(h_BxD, logits_BxV, embed_VxD, *, alpha: float, think_id: int, temperature: float, top_p: float):
    """Context-Prediction Fusion vector [B, D] (dtype of h): alpha * h + (1 - alpha) * p @ E_in."""
    if alpha == 1.0:  # stage 1: the raw hidden state
        return h_BxD
    p_BxV = nucleus_probs(logits_BxV, think_id, temperature, top_p)
    e_pred = jnp.einsum("BV,VD->BD", p_BxV, embed_VxD.astype(jnp.float32))
    return (alpha * h_BxD.astype(jnp.float32) + (1.0 - alpha) * e_pred).astype(h_BxD.dtype)


def thought_forward(graphdef, params, tokens, mask, latent, prefix_len: int, n_passes: int, remat: bool = True,
                    dropout_rng=None, **fusion):
    """Logits [B, T, V] with every `latent` position's input replaced by its fusion vector. Columns [0, P) (P =
    prefix_len: the questions, left-padded) hold no thoughts: one pass fills their KV cache. Thought k of each row
    (its k-th latent column) is then filled by pass k over [P, T) from pass k-1's (h, z) at the column before it; K
    passes + a final one (the reference's K+1 forward passes, prefix cache reused), one `lax.scan`, differentiable
    end to end. remat: the backward pass recomputes each fill pass (memory of one pass instead of K).
    dropout_rng: training-mode dropout; masks are drawn per column, so every fill pass and the final one agree."""
    emb_BxTxD = embed_tokens(graphdef, params, tokens)
    if n_passes == 0:
        return forward(graphdef, params, embeds=emb_BxTxD, mask=mask, dropout_rng=dropout_rng).logits
    B, T = tokens.shape
    P = prefix_len
    pre = forward(graphdef, params, embeds=emb_BxTxD[:, :P], mask=mask[:, :P],
                  cache=init_cache(get_config(graphdef, params), B, T), dropout_rng=dropout_rng)
    e_in, head = embedding_matrices(graphdef, params)
    latent_BxS = latent[:, P:]
    rank_BxS = jnp.cumsum(latent_BxS, axis=1) - 1

    def run(suffix_BxSxD):
        return forward(graphdef, params, embeds=suffix_BxSxD, mask=mask[:, P:], cache=pre.cache,
                       dropout_rng=dropout_rng)

    def fill(suffix, k):
        sel_BxS = latent_BxS & (rank_BxS == k)
        col_B = jnp.argmax(sel_BxS, axis=1)
        before_BxSxD = jnp.concatenate([pre.hidden[:, -1:], run(suffix).hidden[:, :-1]], axis=1)  # column s-1
        h_BxD = jnp.take_along_axis(before_BxSxD, col_B[:, None, None], axis=1)[:, 0]
        z_BxV = jnp.einsum("BD,VD->BV", h_BxD, head.astype(h_BxD.dtype), preferred_element_type=jnp.float32)
        e_BxD = fuse(h_BxD, z_BxV, e_in, **fusion).astype(suffix.dtype)
        return jnp.where(sel_BxS[..., None], e_BxD[:, None], suffix), None

    suffix, _ = jax.lax.scan(jax.checkpoint(fill) if remat else fill, emb_BxTxD[:, P:], jnp.arange(n_passes))
    return jnp.concatenate([pre.logits, run(suffix).logits], axis=1)


def lt_loss(params, graphdef, batch: dict, prefix_len: int, n_latent: int, rng=None, *, fusion: tuple,
            remat: bool = True):
    """Trainer loss: mean token loss (labels include `<thinking>`); n_latent = passes (max thoughts per row,
    bucketed). `fusion` = ((name, value), ...) of `fuse`'s keyword arguments (hashable)."""
    mask = batch["mask"]
    logits = thought_forward(graphdef, params, batch["tokens"], mask, batch["latent"] & mask, prefix_len, n_latent,
                             remat, dropout_rng=rng, **dict(fusion))
    total, count, correct = token_loss(logits, batch["labels"])
    return total / jnp.maximum(count, 1), {"loss_sum": total, "n_tokens": count, "n_correct": correct}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def gold_probs(graphdef, params, tokens_BxT, mask_BxT):
    """[B, T-1]: the model's probability of token t+1 given tokens <= t (teacher forced, no thoughts)."""
    logits = forward(graphdef, params, tokens=tokens_BxT, mask=mask_BxT).logits
    logp = -optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens_BxT[:, 1:])
    return jnp.exp(logp)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_ids", "pad_id", "max_consecutive",
                                             "fusion"))
def lt_generate_padded(graphdef, params, tokens_BxP, mask_BxP, rng, *, sampling: SamplingConfig,
                       eos_ids: tuple[int, ...], pad_id: int, max_consecutive: int, fusion: tuple):
    """Prefill a left-padded batch, then decode with the shared `generate.decode_loop` and a `Feedback`: a sampled
    `<thinking>` is fed back as the fusion vector of this step's (h, z), any other token as its embedding; after
    `max_consecutive` thoughts in a row the `<thinking>` logit is masked. Returns (tokens [B, N] padded after EOS,
    lengths [B])."""
    cfg = get_config(graphdef, params)
    kw = dict(fusion)
    think_id = kw["think_id"]
    B, P = tokens_BxP.shape
    e_in, _ = embedding_matrices(graphdef, params)
    o = forward(graphdef, params, tokens=tokens_BxP, mask=mask_BxP,
                cache=init_cache(cfg, B, P + sampling.max_new_tokens))

    def mask(logits, run_B):  # run_B: thoughts in a row so far
        capped = (run_B >= max_consecutive)[:, None] & (jnp.arange(logits.shape[-1]) == think_id)
        return jnp.where(capped, -jnp.inf, logits)

    def embed(tok, x_BxD, logits, h_BxD, run_B, done):
        think = (tok == think_id) & ~done
        x_BxD = jax.lax.cond(jnp.any(think), lambda: jnp.where(
            think[:, None], fuse(h_BxD, logits, e_in, **kw).astype(x_BxD.dtype), x_BxD), lambda: x_BxD)
        return x_BxD, jnp.where(think, run_B + 1, 0)

    feedback = Feedback(lambda n: jnp.zeros((n,), jnp.int32), mask, embed)
    return decode_loop(graphdef, params, o.cache, o.logits[:, -1], rng, sampling, eos_ids, pad_id, feedback,
                       o.hidden[:, -1])
