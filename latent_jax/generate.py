"""Batched KV-cache decoding: left-padded prefill, then one compiled `lax.while_loop` decode.

Compiled once per (batch, padded prompt length, max_new_tokens, sampling) bucket: prompt lengths are rounded
up to a multiple of `bucket`. `decode_loop` is reusable by latent methods that prefill differently.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latent_jax.models import KVCache, embed_tokens, forward, get_config, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy. top_k 0 = off. top_p 1.0 = off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling config {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


def sample_logits(logits_BxV, rng, sampling: SamplingConfig):
    """Greedy, or temperature / top-k / top-p sampling. Returns token ids [B] int32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        n_keep = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < sampling.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, jnp.maximum(n_keep, 1) - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Feedback(NamedTuple):
    """A method's own inputs during decoding (LT-Tuning feeds a fusion vector where it emits `<thinking>`):
    init(B) -> extra state; mask(logits_BxV, extra) -> the logits to sample from; embed(tok_B, x_BxD, logits_BxV,
    h_BxD, extra, done_B) -> (input of the next position, extra), where x is the sampled token's own embedding and
    (h, logits) the final hidden state and logits that produced the token."""

    init: Callable[[int], Any]
    mask: Callable
    embed: Callable


def shifted_positions(cache: KVCache, mask_BxT, shift_B):
    """Position ids of new tokens after a cache: each row's count of real tokens so far, plus `shift_B` skipped
    positions (`Prompt.position_shift`); None: None (the model counts them itself)."""
    if shift_B is None:
        return None
    n_prev_B = jnp.sum(cache.mask_BxS, axis=1, dtype=jnp.int32)
    pos = n_prev_B[:, None] + jnp.cumsum(mask_BxT, axis=1, dtype=jnp.int32) - 1 + shift_B[:, None]
    return jnp.maximum(pos, 0)


def decode_loop(graphdef, params, cache: KVCache, last_logits_BxV, rng, sampling: SamplingConfig,
                eos_ids: tuple[int, ...], pad_id: int, feedback: Feedback | None = None, last_hidden_BxD=None,
                position_shift_B=None):
    """Decode up to max_new_tokens from a filled cache. Returns (tokens [B, N] padded after EOS, lengths [B]).
    feedback (with the prefill's last hidden state): a method's inputs instead of the tokens' embeddings; without
    it the loop carries no hidden state or extra (None leaves) and feeds the sampled tokens. position_shift_B
    (int [B]): positions the row skipped before (`shifted_positions`); None: none."""
    B, N = last_logits_BxV.shape[0], sampling.max_new_tokens
    eos = jnp.asarray(eos_ids, jnp.int32)
    fb = feedback

    def cond(state):
        return (state[0] < N) & ~jnp.all(state[5])

    def body(state):
        step, cache, logits, h, extra, done, out, rng = state
        rng, sub = jax.random.split(rng)
        tok = jnp.where(done, pad_id, sample_logits(logits if fb is None else fb.mask(logits, extra), sub, sampling))
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], step, axis=1)
        pos = shifted_positions(cache, ~done[:, None], position_shift_B)
        if fb is None:
            o = forward(graphdef, params, tokens=tok[:, None], mask=~done[:, None], cache=cache, positions=pos)
        else:
            x_BxD, extra = fb.embed(tok, embed_tokens(graphdef, params, tok[:, None])[:, 0], logits, h, extra, done)
            o = forward(graphdef, params, embeds=x_BxD[:, None], mask=~done[:, None], cache=cache, positions=pos)
            h = o.hidden[:, -1]
        return step + 1, o.cache, o.logits[:, -1], h, extra, done | jnp.isin(tok, eos), out, rng

    init = (jnp.zeros((), jnp.int32), cache, last_logits_BxV, None if fb is None else last_hidden_BxD,
            None if fb is None else fb.init(B), jnp.zeros((B,), bool), jnp.full((B, N), pad_id, jnp.int32), rng)
    out = jax.lax.while_loop(cond, body, init)[6]
    is_eos = jnp.isin(out, eos)
    return out, jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, N)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_ids", "pad_id"))
def generate_padded(graphdef, params, tokens_BxP, mask_BxP, rng, *, sampling: SamplingConfig,
                    eos_ids: tuple[int, ...], pad_id: int):
    """Compiled prefill + decode of a left-padded batch. Returns (tokens [B, N], lengths [B])."""
    cfg = get_config(graphdef, params)
    B, P = tokens_BxP.shape
    cache = init_cache(cfg, B, P + sampling.max_new_tokens)
    o = forward(graphdef, params, tokens=tokens_BxP, mask=mask_BxP, cache=cache)
    return decode_loop(graphdef, params, o.cache, o.logits[:, -1], rng, sampling, eos_ids, pad_id)


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, bucket: int = 16):
    """Left-pad to a common length rounded up to a multiple of `bucket`. Returns (tokens, mask) numpy."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every prompt needs at least one token")
    P = -(-max(map(len, seqs)) // bucket) * bucket
    tokens = np.full((len(seqs), P), pad_id, np.int32)
    mask = np.zeros((len(seqs), P), bool)
    for i, s in enumerate(seqs):
        tokens[i, P - len(s):] = s
        mask[i, P - len(s):] = True
    return tokens, mask


def generate(graphdef, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
             eos_id: int | Sequence[int] | None = None, pad_id: int | None = None, seed: int = 0,
             bucket: int = 16) -> list[list[int]]:
    """Generate continuations for token-id prompts. Returns new tokens per prompt (EOS included, no padding)."""
    cfg = get_config(graphdef, params)
    eos = eos_id if eos_id is not None else cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    pad = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0)
    tokens, mask = pad_left(prompts, pad, bucket)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) + sampling.max_new_tokens > cfg.max_positions:  # padding takes no positions
        raise ValueError(f"prompt {longest} ({len(prompts[longest])} tokens) + max_new_tokens"
                         f" ({sampling.max_new_tokens}) exceeds the model's max_positions {cfg.max_positions}")
    out, lengths = generate_padded(graphdef, params, tokens, mask, jax.random.PRNGKey(seed), sampling=sampling,
                                   eos_ids=eos_ids, pad_id=pad)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[i, :lengths[i]].tolist() for i in range(len(prompts))]
