"""The latent loop: continuous thoughts as one compiled `jax.lax.scan`, differentiable end to end.

Training layout (see `methods.base.collate`): every row's latent block starts at column P = prefix_len; rows have
n_i <= n = n_latent latent slots. One pass over the prefix [0, P) fills the KV cache; then `scan` over the n
thought columns: at column P+k a row's input embedding is the previous column's final hidden state if the slot is
latent, else its own token embedding; each step extends the cache by one position. Then one teacher-forced pass
over the rest [P+n, T). Same result as the reference's n+1 full forward passes, at the cost of one.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latent_jax.generate import SamplingConfig, decode_loop
from latent_jax.layout import Prompt, layout_prompts, token_loss  # noqa: F401 (token_loss re-exported)
from latent_jax.models import embed_tokens, forward, get_config, init_cache


def latent_forward(graphdef, params, tokens, mask, latent, prefix_len: int, n_latent: int, positions=None,
                   dropout_rng=None):
    """Logits [B, T, V] (f32) of a batch with continuous thoughts. positions [B, T] (optional, int): explicit
    position ids, e.g. an HF batch's `position_ids`; default: each row's real tokens count 0, 1, ... (padding takes
    no position), which is what the reference's collator writes. dropout_rng: training-mode dropout (the model
    config's rates); every pass draws its masks by column, so the result equals n+1 full passes with that key."""
    if n_latent == 0:
        return forward(graphdef, params, tokens=tokens, mask=mask, positions=positions,
                       dropout_rng=dropout_rng).logits
    cfg = get_config(graphdef, params)
    B, T = tokens.shape
    P, n = prefix_len, n_latent
    emb_BxTxD = embed_tokens(graphdef, params, tokens)
    cache = init_cache(cfg, B, T)
    pos = (lambda a, b: None) if positions is None else (lambda a, b: jax.lax.slice_in_dim(positions, a, b, axis=1))
    pre = forward(graphdef, params, embeds=emb_BxTxD[:, :P], mask=mask[:, :P], cache=cache, positions=pos(0, P),
                  dropout_rng=dropout_rng)

    def think(carry, k):
        cache, h_prev_BxD = carry
        col = P + k
        tok_emb = jax.lax.dynamic_index_in_dim(emb_BxTxD, col, axis=1, keepdims=False)
        is_latent = jax.lax.dynamic_index_in_dim(latent, col, axis=1, keepdims=False)
        x_BxD = jnp.where(is_latent[:, None], h_prev_BxD.astype(tok_emb.dtype), tok_emb)
        m = jax.lax.dynamic_slice_in_dim(mask, col, 1, axis=1)
        p = None if positions is None else jax.lax.dynamic_slice_in_dim(positions, col, 1, axis=1)
        o = forward(graphdef, params, embeds=x_BxD[:, None], mask=m, cache=cache, positions=p,
                    dropout_rng=dropout_rng)
        return (o.cache, o.hidden[:, 0]), o.logits[:, 0]

    (cache, _), logits_nxBxV = jax.lax.scan(think, (pre.cache, pre.hidden[:, -1]), jnp.arange(n))
    rest = forward(graphdef, params, embeds=emb_BxTxD[:, P + n:], mask=mask[:, P + n:], cache=cache,
                   positions=pos(P + n, T), dropout_rng=dropout_rng)
    return jnp.concatenate([pre.logits, jnp.swapaxes(logits_nxBxV, 0, 1), rest.logits], axis=1)


def loss_fn(params, graphdef, batch: dict, prefix_len: int, n_latent: int, rng=None):
    """Mean token loss of a batch (dict of arrays: tokens, mask, labels, latent; optional positions [B, T] as
    `latent_forward` takes them). rng: dropout key (training), None: no dropout. Returns (loss, aux)."""
    logits = latent_forward(graphdef, params, batch["tokens"], batch["mask"], batch["latent"], prefix_len, n_latent,
                            batch.get("positions"), dropout_rng=rng)
    total, count, correct = token_loss(logits, batch["labels"])
    loss = total / jnp.maximum(count, 1)
    return loss, {"loss_sum": total, "n_tokens": count, "n_correct": correct}


def feed_thoughts(graphdef, params, cache, h_BxD, logits_BxV, active_nxB, collect: bool = False):
    """The thought loop of generation and analysis: one `lax.scan` step per thought column. At step k the rows with
    active[k] feed their last final hidden state as the input of one new position and take its hidden state and
    logits; inactive rows keep theirs (the position is masked). Returns (cache, h [B, D], logits [B, V], and with
    `collect` the per-step inputs [n, B, D] and the logits they came from [n, B, V], else None)."""

    def step(carry, active_B):
        cache, h, z = carry
        o = forward(graphdef, params, embeds=h[:, None], mask=active_B[:, None], cache=cache)
        a = active_B[:, None]
        return (o.cache, jnp.where(a, o.hidden[:, 0], h), jnp.where(a, o.logits[:, 0], z)), \
            ((h, z) if collect else None)

    (cache, h, z), trace = jax.lax.scan(step, (cache, h_BxD, logits_BxV), active_nxB)
    return cache, h, z, trace


@functools.partial(jax.jit, static_argnames=("graphdef", "n_latent", "sampling", "eos_ids", "pad_id"))
def latent_generate_padded(graphdef, params, prefix_BxP, prefix_mask_BxP, think_mask_Bxn, suffix_BxS, rng, *,
                           n_latent: int, sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int):
    """Prefix (left-padded) -> n thoughts (each the previous final hidden state; row i thinks in the last
    sum(think_mask[i]) columns, right-aligned) -> suffix tokens (e.g. <eot>) -> decode. One compile per bucket."""
    cfg = get_config(graphdef, params)
    B, P = prefix_BxP.shape
    S = suffix_BxS.shape[1]
    cache = init_cache(cfg, B, P + n_latent + S + sampling.max_new_tokens)
    o = forward(graphdef, params, tokens=prefix_BxP, mask=prefix_mask_BxP, cache=cache)

    cache, _, last, _ = feed_thoughts(graphdef, params, o.cache, o.hidden[:, -1], o.logits[:, -1],
                                      jnp.swapaxes(think_mask_Bxn, 0, 1))
    if S:
        o = forward(graphdef, params, tokens=suffix_BxS, cache=cache)
        cache, last = o.cache, o.logits[:, -1]
    return decode_loop(graphdef, params, cache, last, rng, sampling, eos_ids, pad_id)


def generate_prompts(graphdef, params, prompts: Sequence[Prompt], sampling: SamplingConfig, eos_id: int,
                     pad_id: int, seed: int = 0, bucket: int = 16, batch_size: int | None = None):
    """Generate for a batch of `Prompt`s. Returns list of token lists (EOS included)."""
    cfg = get_config(graphdef, params)
    prefix, mask, think, suffix = layout_prompts(prompts, pad_id, bucket, batch_size)
    # positions count real tokens only (left padding takes cache slots, not positions)
    total = max(len(p.prefix) + p.n_latent + len(p.suffix) for p in prompts) + sampling.max_new_tokens
    if total > cfg.max_positions:
        i = max(range(len(prompts)), key=lambda j: len(prompts[j].prefix) + prompts[j].n_latent)
        raise ValueError(f"prompt {i} of the batch: prompt + thoughts + max_new_tokens = {total} positions >"
                         f" max_positions {cfg.max_positions}")
    out, lengths = latent_generate_padded(graphdef, params, prefix, mask, think, suffix, jax.random.PRNGKey(seed),
                                          n_latent=think.shape[1], sampling=sampling, eos_ids=(eos_id,),
                                          pad_id=pad_id)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[i, :lengths[i]].tolist() for i in range(len(prompts))]
