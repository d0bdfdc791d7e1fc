"""Evaluation: batched KV-cache generation (prompt = question [+ <bot> + thoughts + <eot>]), exact match of the
answer after the last '#', mean generated tokens, latency per question."""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from latent_jax.generate import SamplingConfig
from latent_jax.latent import latent_generate_padded
from latent_jax.methods.base import Prompt, round_up
from latent_jax.models import get_config


def extract_answer(text: str) -> str:
    """Reference rule: the text after the last '#', commas removed, stripped."""
    return text.split("#")[-1].replace(",", "").strip()


def r_head(record: dict[str, Any], n: int = 60) -> str:
    """The start of a record's question, for error messages."""
    q = str(record.get("question", ""))
    return repr(q[:n] + ("..." if len(q) > n else ""))


def layout_prompts(prompts: Sequence[Prompt], pad_id: int, bucket: int = 16, batch_size: int | None = None):
    """Arrays for `latent_generate_padded`: left-padded prefixes, right-aligned thought masks, suffixes."""
    suffix_lens = {len(p.suffix) for p in prompts}
    if len(suffix_lens) != 1:
        raise ValueError(f"prompts in one batch need equal suffix lengths, got {sorted(suffix_lens)}")
    B = batch_size or len(prompts)
    P = round_up(max(len(p.prefix) for p in prompts), bucket)
    n = max(p.n_latent for p in prompts)
    S = suffix_lens.pop()
    prefix = np.full((B, P), pad_id, np.int32)
    mask = np.zeros((B, P), bool)
    think = np.zeros((B, n), bool)
    suffix = np.full((B, S), pad_id, np.int32)
    for i, p in enumerate(prompts):
        prefix[i, P - len(p.prefix):] = p.prefix
        mask[i, P - len(p.prefix):] = True
        think[i, n - p.n_latent:] = True
        suffix[i] = p.suffix
    mask[len(prompts):, -1] = True  # filler rows: one valid token so nothing is fully masked
    return prefix, mask, think, suffix


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


def evaluate(method, records: Sequence[dict[str, Any]], graphdef, params, stage: int, batch_size: int = 32,
             max_new_tokens: int = 64, out_path: str | pathlib.Path | None = None, progress: bool = True,
             n_show: int = 3) -> dict[str, Any]:
    """Greedy generation on `records` at `stage`; exact-match accuracy. Writes JSON to out_path if given."""
    tok = method.tok
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    correct, gen_tokens, shown = 0, [], []
    gen = getattr(method, "generate", None) or generate_prompts  # methods with their own decoding (LT, Soft Thinking)
    max_positions = get_config(graphdef, params).max_positions if graphdef is not None else None  # None: a stub
    start = time.perf_counter()
    for lo in tqdm(range(0, len(records), batch_size), desc=f"eval {method.name}", disable=not progress):
        chunk = records[lo:lo + batch_size]
        prompts = [method.prompt(r, stage) for r in chunk]
        for i, p in enumerate(prompts):  # name the record before any compile
            need = len(p.prefix) + p.n_latent + len(p.suffix) + max_new_tokens
            if max_positions is not None and need > max_positions:
                raise ValueError(f"record {lo + i} ({r_head(chunk[i])}): its prompt ({len(p.prefix)} tokens,"
                                 f" {p.n_latent} thoughts, {len(p.suffix)} after them) + max_new_tokens"
                                 f" {max_new_tokens} = {need} positions > the model's max_positions {max_positions}")
        outs = gen(graphdef, params, prompts, sampling,
                                eos_id=tok.eos_id, pad_id=tok.pad_id if tok.pad_id is not None else tok.eos_id,
                                batch_size=batch_size)
        for r, o in zip(chunk, outs):
            text = tok.decode([t for t in o if t != tok.eos_id])
            ok = extract_answer(text) == extract_answer(r["answer"])
            correct += ok
            gen_tokens.append(len(o))
            if len(shown) < n_show:
                shown.append({"question": r["question"], "generated": text, "answer": r["answer"],
                              "correct": bool(ok)})
    elapsed = time.perf_counter() - start
    result = {"method": method.name, "stage": stage, "n": len(records), "accuracy": correct / max(len(records), 1),
              "mean_generated_tokens": float(np.mean(gen_tokens)) if gen_tokens else 0.0,
              "seconds_per_question": elapsed / max(len(records), 1), "examples": shown}
    if out_path is not None:
        pathlib.Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out_path).write_text(json.dumps(result, indent=2))
    return result
