"""Soft Thinking (Zhang et al. 2025, arXiv 2505.15778): training-free reasoning with "concept tokens".

Works with any loaded model (typically one trained with plain CoT: `encode` is the CoT layout, so `latent-jax train`
with this method trains CoT and evaluates with soft thinking). At evaluation the prompt is the question only; then
a thinking phase where, instead of sampling a token, the model is fed the concept token

    p = softmax(logits / temperature) restricted to the top-k, renormalised, then to the top-p nucleus of that,
    renormalised (at least one token);   e = p @ E_in   (input embedding matrix)

Thinking ends for a row (rows are independent) when
  * the top-1 token is the answer marker's first token ("###" for our data, the think-end marker) or an EOS:
    nothing more is fed and normal decoding starts from the same logits (greedy then emits the marker / EOS);
  * "cold stop": the entropy of the full next-token distribution (after temperature) was below
    `entropy_threshold` for `cold_stop_steps` consecutive steps; the step that completes the run feeds
    `cold_stop_text` ("\\n###") instead of its concept token (as the reference replaces it by </think>);
  * `max_thinking_steps` concept tokens were fed: `cold_stop_text` is fed too.
Then the answer is decoded normally (`generate.decode_loop`); when `cold_stop_text` was fed its tokens are prepended
to the returned output, so `evaluate` sees "### answer".

One jitted function: prefill + the shared thought loop (`latent.thought_loop`; this file supplies the step, the
concept token as the next input; steps where no row thinks skip the forward pass) + forced text + decode loop. All
rows advance in lockstep; a row that stopped writes masked cache slots (mask False), which no later query attends
to and which do not advance its positions (`forward` counts positions from the cache mask), so every row's KV cache
stays exact.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latent_jax.config import check_rules, coerce_numbers
from latent_jax.generate import SamplingConfig, decode_loop
from latent_jax.latent import thought_loop
from latent_jax.layout import Example, Prompt, layout_prompts
from latent_jax.methods.base import Method
from latent_jax.methods.coconut import Coconut, CoconutConfig
from latent_jax.models import embed_tokens, forward, get_config, init_cache
from latent_jax.tokenizer import Tokenizer

RUNNING, MARKER, COLD, BUDGET, EOS = 0, 1, 2, 3, 4  # why a row's thinking ended
STOP_REASONS = {RUNNING: "running", MARKER: "marker", COLD: "cold_stop", BUDGET: "budget", EOS: "eos"}


@dataclasses.dataclass(frozen=True)
class SoftThinkingConfig:
    """Defaults: concept top-k 15, top-p 0.95, temperature 0.6, entropy threshold 0.01 (reference values);
    cold_stop_steps scaled down from the reference's 256 to our short traces."""

    top_k: int = 15
    top_p: float = 0.95
    temperature: float = 0.6
    entropy_threshold: float = 0.01
    cold_stop_steps: int = 16
    max_thinking_steps: int = 128
    answer_marker: str = "###"  # its first token ends thinking when it is the top-1 token
    cold_stop_text: str = "\n###"  # fed after a cold stop / at the budget (prepended to the returned answer)

    def __post_init__(self):
        coerce_numbers(self, "SoftThinkingConfig", strict_types=True)
        check_rules(self, "SoftThinkingConfig", [
            ("top_k", self.top_k >= 1, "an integer >= 1"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("temperature", self.temperature > 0, "> 0"), ("entropy_threshold", self.entropy_threshold >= 0, ">= 0"),
            ("cold_stop_steps", self.cold_stop_steps >= 1, "an integer >= 1"),
            ("max_thinking_steps", self.max_thinking_steps >= 1, "an integer >= 1"),
            ("answer_marker", bool(self.answer_marker), "a non-empty string"),
            ("cold_stop_text", bool(self.cold_stop_text), "a non-empty string")])


def concept_weights(logits_BxV, top_k: int, top_p: float, temperature: float):
    """(weights [B, k] f32 summing to 1, token ids [B, k]): top-k of softmax(logits / T) renormalised, then the
    top-p nucleus of those (the smallest prefix whose mass reaches top_p, >= 1 token) renormalised."""
    vals_Bxk, idx_Bxk = jax.lax.top_k(logits_BxV.astype(jnp.float32) / temperature, top_k)
    p_Bxk = jax.nn.softmax(vals_Bxk, axis=-1)
    keep = (jnp.cumsum(p_Bxk, axis=-1) - p_Bxk) < top_p  # mass before this token not yet top_p; keeps index 0
    p_Bxk = jnp.where(keep, p_Bxk, 0.0)
    return p_Bxk / jnp.sum(p_Bxk, axis=-1, keepdims=True), idx_Bxk


def entropy(logits_BxV, temperature: float):
    """Entropy (nats) of softmax(logits / T) over the full vocabulary."""
    return jnp.sum(jax.scipy.special.entr(jax.nn.softmax(logits_BxV.astype(jnp.float32) / temperature)), axis=-1)


def concept_embedding(graphdef, params, logits_BxV, top_k: int, top_p, temperature):
    """The concept token e = p @ E_in [B, D] (f32), as a weighted sum of the top-k rows of E_in. Returns (e, top-1
    token ids [B])."""
    w_Bxk, idx_Bxk = concept_weights(logits_BxV, top_k, top_p, temperature)
    emb_BxkxD = embed_tokens(graphdef, params, idx_Bxk).astype(jnp.float32)
    return jnp.einsum("bk,bkd->bd", w_Bxk, emb_BxkxD), idx_Bxk[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "max_steps", "sampling", "eos_ids", "pad_id"))
def soft_think_padded(graphdef, params, tokens_BxP, mask_BxP, live_B, force_F, knobs, marker_id, rng, *,
                      top_k: int, max_steps: int, sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int):
    """Prefill (left-padded) -> soft thinking -> [forced text] -> decode. `live_B` False = filler row (thinks
    nothing). `knobs` = {top_p, temperature, entropy_threshold, cold_stop_steps} (traced: one compile per
    (B, P, top_k, max_steps, sampling)). Returns a dict of arrays: out [B, N],
    lengths [B], think_top1 [B, S] (top-1 token of each fed concept, pad after), n_think [B], reason [B],
    forced [B] (whether force_F was fed)."""
    mcfg = get_config(graphdef, params)
    B, P = tokens_BxP.shape
    S, F, T = max_steps, force_F.shape[0], knobs["temperature"]
    stop_ids = jnp.concatenate([jnp.reshape(marker_id, (1,)), jnp.asarray(eos_ids, jnp.int32)]).astype(jnp.int32)
    cache = init_cache(mcfg, B, P + S + F + sampling.max_new_tokens)
    o = forward(graphdef, params, tokens=tokens_BxP, mask=mask_BxP, cache=cache)

    def think(k, h, logits, st):  # Soft Thinking's step of the shared thought loop: the next input is a concept
        active = st["active"]
        top1_B = jnp.argmax(logits, axis=-1)
        hit = active & jnp.isin(top1_B, stop_ids)
        low = jnp.where(entropy(logits, T) < knobs["entropy_threshold"], st["low"] + 1, 0)
        cold = active & ~hit & (low >= knobs["cold_stop_steps"])
        feed = active & ~hit & ~cold
        e_BxD, top1 = concept_embedding(graphdef, params, logits, top_k, knobs["top_p"], T)
        top1s = jax.lax.dynamic_update_slice_in_dim(st["top1"], jnp.where(feed, top1, pad_id)[:, None], k, axis=1)
        reason = jnp.where(hit, jnp.where(top1_B == stop_ids[0], MARKER, EOS), jnp.where(cold, COLD, st["reason"]))
        return e_BxD, feed, None, dict(active=feed, low=low, reason=reason, n=st["n"] + feed, top1=top1s)

    init = dict(active=live_B, low=jnp.zeros((B,), jnp.int32), reason=jnp.full((B,), RUNNING, jnp.int32),
                n=jnp.zeros((B,), jnp.int32), top1=jnp.full((B, S), pad_id, jnp.int32))
    cache, _, last_logits, st, _ = thought_loop(graphdef, params, o.cache, o.hidden[:, -1], o.logits[:, -1],
                                                jnp.arange(S), think, init, skip_idle=True)
    # rows still thinking used the whole budget; a top-1 marker right at the budget needs no forced text
    top1_B = jnp.argmax(last_logits, axis=-1)
    at_stop = st["active"] & jnp.isin(top1_B, stop_ids)
    reason = jnp.where(at_stop, jnp.where(top1_B == stop_ids[0], MARKER, EOS),
                       jnp.where(st["active"], BUDGET, st["reason"]))
    forced = (reason == COLD) | (reason == BUDGET)
    fo = forward(graphdef, params, tokens=jnp.broadcast_to(force_F, (B, F)),
                 mask=jnp.broadcast_to(forced[:, None], (B, F)), cache=cache)
    logits = jnp.where(forced[:, None], fo.logits[:, -1], last_logits)
    out, lengths = decode_loop(graphdef, params, fo.cache, logits, rng, sampling, eos_ids, pad_id)
    return dict(out=out, lengths=lengths, think_top1=st["top1"], n_think=st["n"], reason=reason, forced=forced)


def soft_think_generate(graphdef, params, prompts: Sequence[Sequence[int]], cfg: SoftThinkingConfig,
                        sampling: SamplingConfig, eos_id: int, pad_id: int, marker_id: int,
                        force_ids: Sequence[int], seed: int = 0, bucket: int = 16,
                        batch_size: int | None = None) -> dict[str, Any]:
    """Soft thinking for token-id prompts. Returns {"outputs": per prompt the answer tokens (forced text
    prepended where it was fed, EOS included), "think_top1": top-1 token of each concept, "n_think",
    "reason" (names, see STOP_REASONS)}. `batch_size` pads with filler rows (one compile per batch size)."""
    mcfg = get_config(graphdef, params)
    tokens, mask, _, _ = layout_prompts([Prompt(list(p)) for p in prompts], pad_id, bucket, batch_size)
    longest = max(len(p) for p in prompts)  # left padding takes cache slots, not positions
    total = longest + cfg.max_thinking_steps + len(force_ids) + sampling.max_new_tokens
    if total > mcfg.max_positions:
        raise ValueError(f"prompt ({longest} tokens) + max_thinking_steps + cold_stop_text + max_new_tokens"
                         f" = {total} positions > max_positions {mcfg.max_positions}")
    if cfg.top_k > mcfg.vocab_size:
        raise ValueError(f"top_k={cfg.top_k} exceeds the model's vocabulary ({mcfg.vocab_size} tokens)")
    live = np.arange(tokens.shape[0]) < len(prompts)
    knobs = {"top_p": np.float32(cfg.top_p), "temperature": np.float32(cfg.temperature),
             "entropy_threshold": np.float32(cfg.entropy_threshold), "cold_stop_steps": np.int32(cfg.cold_stop_steps)}
    r = soft_think_padded(graphdef, params, tokens, mask, live, np.asarray(force_ids, np.int32), knobs,
                          np.int32(marker_id), jax.random.PRNGKey(seed), top_k=cfg.top_k,
                          max_steps=cfg.max_thinking_steps, sampling=sampling, eos_ids=(int(eos_id),),
                          pad_id=int(pad_id))
    r = {k: np.asarray(v) for k, v in r.items()}
    n = len(prompts)
    return {"outputs": [(list(force_ids) if r["forced"][i] else []) + r["out"][i, :r["lengths"][i]].tolist()
                        for i in range(n)],
            "think_top1": [r["think_top1"][i, :r["n_think"][i]].tolist() for i in range(n)],
            "n_think": r["n_think"][:n].tolist(), "reason": [STOP_REASONS[int(x)] for x in r["reason"][:n]]}


class SoftThinking(Method):
    """CoT layout for training; soft-thinking decoding for evaluation (the `generate` hook)."""

    name = "soft_thinking"

    def __init__(self, tokenizer: Tokenizer, cfg: SoftThinkingConfig = SoftThinkingConfig()):
        self.tok, self.cfg = tokenizer, cfg
        self._cot = Coconut(tokenizer, CoconutConfig(variant="cot"))
        self.special_tokens: tuple[str, ...] = ()
        marker = tokenizer.encode(cfg.answer_marker)
        self.force_ids = tokenizer.encode(cfg.cold_stop_text)
        if not marker or not self.force_ids:
            raise ValueError(f"answer_marker {cfg.answer_marker!r} / cold_stop_text {cfg.cold_stop_text!r} encode"
                             " to no token")
        self.marker_id = marker[0]
        self.log: list[dict[str, Any]] = []  # per generated prompt: n_think, reason (see thinking_stats)

    def num_stages(self) -> int:
        return 1

    def encode(self, record: dict[str, Any], stage: int) -> Example:
        return self._cot.encode(record, stage)

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        return self._cot.prompt(record, stage)  # the question only

    def generate(self, graphdef, params, prompts: Sequence[Prompt], sampling: SamplingConfig, eos_id: int,
                 pad_id: int, batch_size: int | None = None, seed: int = 0) -> list[list[int]]:
        if any(p.n_latent or p.suffix for p in prompts):
            raise ValueError("soft thinking prompts are plain token prefixes (no latent slots / suffix)")
        r = soft_think_generate(graphdef, params, [p.prefix for p in prompts], self.cfg, sampling, eos_id, pad_id,
                                self.marker_id, self.force_ids, seed=seed, batch_size=batch_size)
        self.log.extend({"n_think": n, "reason": why} for n, why in zip(r["n_think"], r["reason"]))
        return r["outputs"]

    def thinking_stats(self) -> dict[str, Any]:
        """Mean concept tokens per question and the share of each stop reason over `self.log`."""
        if not self.log:
            return {"n": 0}
        reasons = [x["reason"] for x in self.log]
        return {"n": len(self.log), "mean_thinking_steps": float(np.mean([x["n_think"] for x in self.log])),
                **{f"stop_{k}": reasons.count(k) / len(reasons) for k in ("marker", "eos", "cold_stop", "budget")}}
