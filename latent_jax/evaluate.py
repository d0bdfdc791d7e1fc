"""Evaluation: batched KV-cache generation (prompt = question [+ <bot> + thoughts + <eot>]), exact match of the
answer after the last '#', mean generated tokens, latency per question."""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from latent_jax.generate import SamplingConfig
from latent_jax.latent import generate_prompts  # noqa: F401 (re-exported: evaluate.generate_prompts)
from latent_jax.layout import layout_prompts  # noqa: F401 (re-exported: evaluate.layout_prompts)
from latent_jax.models import get_config


def extract_answer(text: str) -> str:
    """Reference rule: the text after the last '#', commas removed, stripped."""
    return text.split("#")[-1].replace(",", "").strip()


def r_head(record: dict[str, Any], n: int = 60) -> str:
    """The start of a record's question, for error messages."""
    q = str(record.get("question", ""))
    return repr(q[:n] + ("..." if len(q) > n else ""))


def evaluate(method, records: Sequence[dict[str, Any]], graphdef, params, stage: int, batch_size: int = 32,
             max_new_tokens: int = 64, out_path: str | pathlib.Path | None = None, progress: bool = True,
             n_show: int = 3) -> dict[str, Any]:
    """Greedy generation on `records` at `stage`; exact-match accuracy. Writes JSON to out_path if given."""
    tok = method.tok
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    correct, gen_tokens, shown = 0, [], []
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
        outs = method.generate(graphdef, params, prompts, sampling, eos_id=tok.eos_id,  # LT / Soft Thinking: own
                               pad_id=tok.pad_id if tok.pad_id is not None else tok.eos_id, batch_size=batch_size)
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
