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

from latent_jax.generate import SamplingConfig, decode_loop, shifted_positions
from latent_jax.layout import Prompt, layout_prompts, token_loss  # noqa: F401 (token_loss re-exported)
from latent_jax.loss import chunked_token_loss
from latent_jax.models import embed_tokens, forward, get_config, init_cache, lm_head


def latent_forward(graphdef, params, tokens, mask, latent, prefix_len: int, n_latent: int, positions=None,
                   dropout_rng=None, next_input=None, return_all_hidden: bool = False, output: str = "logits"):
    """Logits [B, T, V] (f32) of a batch with continuous thoughts. positions [B, T] (optional, int): explicit
    position ids, e.g. an HF batch's `position_ids`; default: each row's real tokens count 0, 1, ... (padding takes
    no position), which is what the reference's collator writes. dropout_rng: training-mode dropout (the model
    config's rates); every pass draws its masks by column, so the result equals n+1 full passes with that key.
    next_input(graphdef, params, h_BxD) -> x_BxD: what a latent slot is fed, from the previous column's final hidden
    state (None: h itself, Coconut; CODI: its projection). return_all_hidden: also every layer's hidden states
    [L+1, B, T, D] (the embeddings and each block's output, the last after the final norm: HF's order).
    output "hidden": the final hidden states [B, T, D] in place of the logits, which are then never computed (a
    loss that applies the head chunk by chunk, `latent_jax.loss`)."""
    if output not in ("logits", "hidden"):
        raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
    want_logits = output == "logits"
    pick = (lambda o: o.logits) if want_logits else (lambda o: o.hidden)
    if n_latent == 0:
        o = forward(graphdef, params, tokens=tokens, mask=mask, positions=positions, dropout_rng=dropout_rng,
                    return_all_hidden=return_all_hidden, return_logits=want_logits)
        return (pick(o), jnp.stack(o.all_hidden)) if return_all_hidden else pick(o)
    cfg = get_config(graphdef, params)
    B, T = tokens.shape
    P, n = prefix_len, n_latent
    emb_BxTxD = embed_tokens(graphdef, params, tokens)
    cache = init_cache(cfg, B, T, in_place=False)  # differentiated: per-layer slices (models.stack)
    pos = (lambda a, b: None) if positions is None else (lambda a, b: jax.lax.slice_in_dim(positions, a, b, axis=1))
    pre = forward(graphdef, params, embeds=emb_BxTxD[:, :P], mask=mask[:, :P], cache=cache, positions=pos(0, P),
                  dropout_rng=dropout_rng, return_all_hidden=return_all_hidden, return_logits=want_logits)
    feed = _feeder(graphdef, params, next_input)

    def column(k, h_prev_BxD, _logits, extra):  # a latent slot takes the previous column's hidden state
        col = P + k
        tok_emb = jax.lax.dynamic_index_in_dim(emb_BxTxD, col, axis=1, keepdims=False)
        is_latent = jax.lax.dynamic_index_in_dim(latent, col, axis=1, keepdims=False)
        x_BxD = jnp.where(is_latent[:, None], feed(h_prev_BxD).astype(tok_emb.dtype), tok_emb)
        m_B = jax.lax.dynamic_index_in_dim(mask, col, axis=1, keepdims=False)
        p = None if positions is None else jax.lax.dynamic_slice_in_dim(positions, col, 1, axis=1)
        return x_BxD, m_B, p, extra

    cache, *_, trace = thought_loop(graphdef, params, pre.cache, pre.hidden[:, -1],
                                    pre.logits[:, -1] if want_logits else None, jnp.arange(n), column,
                                    dropout_rng=dropout_rng, collect="layers" if return_all_hidden else "out")
    rest = forward(graphdef, params, embeds=emb_BxTxD[:, P + n:], mask=mask[:, P + n:], cache=cache,
                   positions=pos(P + n, T), dropout_rng=dropout_rng, return_all_hidden=return_all_hidden,
                   return_logits=want_logits)
    out_nxBxF = trace[0] if return_all_hidden else trace  # F: V (logits) or D (output="hidden")
    out = jnp.concatenate([pick(pre), jnp.swapaxes(out_nxBxF, 0, 1), pick(rest)], axis=1)
    if not return_all_hidden:
        return out
    layers_nxLxBxD = trace[1]
    return out, jnp.concatenate([jnp.stack(pre.all_hidden), jnp.transpose(layers_nxLxBxD, (1, 2, 0, 3)),
                                 jnp.stack(rest.all_hidden)], axis=2)


def _feeder(graphdef, params, next_input):
    """h_BxD -> what a thought slot is fed: h itself (next_input None), else next_input(graphdef, params, h)."""
    return (lambda h: h) if next_input is None else (lambda h: next_input(graphdef, params, h))


def thought_loop(graphdef, params, cache, h_BxD, logits_BxV, xs, step, extra=None, *, dropout_rng=None,
                 collect: str | None = None, skip_idle: bool = False):
    """The one loop that feeds a method's vectors back as inputs: a `lax.scan` over `xs`, one new position per step,
    differentiable. logits_BxV None: no step computes logits (z stays None; "out" then collects final hidden states
    [n, B, D] instead). `step(x, h_BxD, logits_BxV, extra) -> (input_BxD, feed_B, positions_Bx1 | None, extra)` is the
    method's part: x is this step's slice of `xs`, (h, logits) each row's final hidden state and logits at its last
    fed position. Coconut feeds h (training: h where the column is latent, else the column's token); Soft Thinking
    a concept token. Rows with feed False write a masked slot (never attended, no position) and keep (h, logits).
    skip_idle: skip the forward pass of a step where no row feeds (early-stopping loops). collect: None, "out"
    (the logits of every step's position [n, B, V]), "in" (every step's input [n, B, D] and the logits it came
    from [n, B, V]) or "layers" (the logits [n, B, V] and every layer's hidden state [n, L+1, B, D] of each step's
    position). Returns (cache, h, logits, extra, trace)."""
    layers = collect == "layers"
    with_logits = logits_BxV is not None

    def body(carry, x):
        cache, h, z, extra = carry
        inp_BxD, feed_B, pos, extra = step(x, h, z, extra)

        def run(cache):
            o = forward(graphdef, params, embeds=inp_BxD[:, None], mask=feed_B[:, None], cache=cache,
                        positions=pos, dropout_rng=dropout_rng, return_all_hidden=layers, return_logits=with_logits)
            z_new = o.logits[:, 0] if with_logits else None
            return o.cache, o.hidden[:, 0], z_new, (jnp.stack(o.all_hidden)[:, :, 0] if layers else None)

        if skip_idle:
            cache2, h_new, z_new, hs = jax.lax.cond(jnp.any(feed_B), run, lambda c: (c, h, z, None), cache)
        else:
            cache2, h_new, z_new, hs = run(cache)
        a = feed_B[:, None]
        out = z_new if with_logits else h_new
        trace = {"out": out, "in": (inp_BxD, z), "layers": (out, hs), None: None}[collect]
        z_next = jnp.where(a, z_new, z) if with_logits else None
        return (cache2, jnp.where(a, h_new, h), z_next, extra), trace

    (cache, h, z, extra), trace = jax.lax.scan(body, (cache, h_BxD, logits_BxV, extra), xs)
    return cache, h, z, extra, trace


def loss_fn(params, graphdef, batch: dict, prefix_len: int, n_latent: int, rng=None, *, with_hidden: bool = False,
            next_input=None):
    """Mean token loss of a batch (dict of arrays: tokens, mask, labels, latent; optional positions [B, T] as
    `latent_forward` takes them). rng: dropout key (training), None: no dropout. Returns (loss, aux). With the model
    config's `loss_chunk` > 0 the head and the cross-entropy run chunk by chunk (`latent_jax.loss`). with_hidden:
    aux["hidden"] holds the final hidden states [B, T, D] (SIM-CoT reads the thoughts from them). next_input: what a
    thought slot is fed (`latent_forward`; None: the hidden state itself)."""
    chunk = get_config(graphdef, params).loss_chunk
    out = latent_forward(graphdef, params, batch["tokens"], batch["mask"], batch["latent"], prefix_len, n_latent,
                         batch.get("positions"), dropout_rng=rng, next_input=next_input,
                         output="hidden" if chunk or with_hidden else "logits")
    if chunk:
        total, count, correct = chunked_token_loss(out, lm_head(graphdef, params), batch["labels"], chunk)
    elif with_hidden:  # the head applied here, as the model applies it
        head_VxD = lm_head(graphdef, params)
        logits = jnp.einsum("BTD,VD->BTV", out, head_VxD.astype(out.dtype), preferred_element_type=jnp.float32)
        total, count, correct = token_loss(logits, batch["labels"])
    else:
        total, count, correct = token_loss(out, batch["labels"])
    loss = total / jnp.maximum(count, 1)
    aux = {"loss_sum": total, "n_tokens": count, "n_correct": correct}
    return loss, ({**aux, "hidden": out} if with_hidden else aux)


def feed_thoughts(graphdef, params, cache, h_BxD, logits_BxV, active_nxB, collect: bool = False, next_input=None):
    """Coconut's thoughts in generation and analysis (`thought_loop` with the hidden state as the next input): at
    step k the rows with active[k] feed their last final hidden state (or `next_input(graphdef, params, h)`, e.g.
    CODI's projection). Returns (cache, h [B, D], logits [B, V], and with `collect` the per-step inputs [n, B, D]
    and the logits they came from [n, B, V], else None)."""
    feed = _feeder(graphdef, params, next_input)
    cache, h, z, _, trace = thought_loop(graphdef, params, cache, h_BxD, logits_BxV, active_nxB,
                                         lambda a_B, h, z, e: (feed(h), a_B, None, e),
                                         collect="in" if collect else None)
    return cache, h, z, trace


@functools.partial(jax.jit, static_argnames=("graphdef", "n_latent", "sampling", "eos_ids", "pad_id", "next_input"))
def latent_generate_padded(graphdef, params, prefix_BxP, prefix_mask_BxP, think_mask_Bxn, suffix_BxS, rng, *,
                           n_latent: int, sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int,
                           next_input=None, position_shift_B=None):
    """Prefix (left-padded) -> n thoughts (each the previous final hidden state, or `next_input` of it; row i
    thinks in the last sum(think_mask[i]) columns, right-aligned) -> suffix tokens (e.g. <eot>) -> decode. One
    compile per bucket. position_shift_B (int [B] or None): positions each row skips before its suffix
    (`Prompt.position_shift`)."""
    cfg = get_config(graphdef, params)
    B, P = prefix_BxP.shape
    S = suffix_BxS.shape[1]
    cache = init_cache(cfg, B, P + n_latent + S + sampling.max_new_tokens)
    o = forward(graphdef, params, tokens=prefix_BxP, mask=prefix_mask_BxP, cache=cache)

    cache, _, last, _ = feed_thoughts(graphdef, params, o.cache, o.hidden[:, -1], o.logits[:, -1],
                                      jnp.swapaxes(think_mask_Bxn, 0, 1), next_input=next_input)
    if S:
        pos = shifted_positions(cache, jnp.ones(suffix_BxS.shape, bool), position_shift_B)
        o = forward(graphdef, params, tokens=suffix_BxS, cache=cache, positions=pos)
        cache, last = o.cache, o.logits[:, -1]
    return decode_loop(graphdef, params, cache, last, rng, sampling, eos_ids, pad_id,
                       position_shift_B=position_shift_B)


def generate_prompts(graphdef, params, prompts: Sequence[Prompt], sampling: SamplingConfig, eos_id: int,
                     pad_id: int, seed: int = 0, bucket: int = 16, batch_size: int | None = None, next_input=None):
    """Generate for a batch of `Prompt`s (`next_input`: as `latent_generate_padded`). Returns list of token lists
    (EOS included)."""
    cfg = get_config(graphdef, params)
    prefix, mask, think, suffix = layout_prompts(prompts, pad_id, bucket, batch_size)
    # positions count real tokens only (left padding takes cache slots, not positions)
    need = [len(p.prefix) + p.n_latent + p.position_shift + len(p.suffix) for p in prompts]
    total = max(need) + sampling.max_new_tokens
    if total > cfg.max_positions:
        i = max(range(len(prompts)), key=need.__getitem__)
        raise ValueError(f"prompt {i} of the batch: prompt + thoughts + skipped positions + max_new_tokens = {total}"
                         f" positions > max_positions {cfg.max_positions}")
    if any(p.suffix == [] and p.position_shift for p in prompts):
        raise ValueError("a Prompt with a position_shift needs a suffix (the positions are skipped before it)")
    shift = None
    if any(p.position_shift for p in prompts):
        shift = np.zeros(prefix.shape[0], np.int32)
        shift[:len(prompts)] = [p.position_shift for p in prompts]
    out, lengths = latent_generate_padded(graphdef, params, prefix, mask, think, suffix, jax.random.PRNGKey(seed),
                                          n_latent=think.shape[1], sampling=sampling, eos_ids=(eos_id,),
                                          pad_id=pad_id, next_input=next_input, position_shift_B=shift)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[i, :lengths[i]].tolist() for i in range(len(prompts))]
