"""Latent-thought analysis of a Coconut model on ProsQA (the paper's Sec. 5, "latent reasoning as search").

Each validation question is prompted as at the final stage (question\\n <bot> + n continuous thoughts); thought k
(0-based) is the vector fed as the input of latent slot k: thought 0 is the final hidden state at <bot>, thought
k the one produced at slot k-1. Each thought is decoded through the LM head (logits = h @ W_head^T, softmax over
the whole vocabulary) and every graph node gets a score: the probability mass on the node's tokens.

Node tokens: a symbol spans several tokens (GPT-2: "terpus" -> " ter" "p" "us"), so a node is represented by the
first token of " " + symbol and the first token of symbol (1 or 2 distinct ids; forms a compact vocabulary cannot
encode are skipped). Distinct symbols of one graph can share a first token (" r" for rompus and rorpus: about 22%
of nodes in prosqa/valid.json); a shared token's probability is split equally among the nodes that share it, so
the node scores of a thought sum to at most 1.

Per thought k, over the records that have it (`summarize`):
  top1/top2/top3_mass  mean cumulative score of the 1, 2, 3 best-scored nodes (parallelism: the gap between
                       top-1 and top-3 shows how many paths a thought keeps open)
  node_mass            mean total node score (the rest of the mass is on non-node tokens)
  frontier_mass        mean score on the frontier (nodes at BFS depth step+1 from the root, step = k // c_thought);
  frontier_frac        ... divided by node_mass
  pearson/spearman     correlation of node score with node value = 1 if the node can reach the target (pooled
                       over all nodes of all records; `frontier_*` the same over frontier nodes only)
"""
from __future__ import annotations

import functools
import json
import math
import pathlib
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latent_jax.data.prosqa import bfs_distances, graph_adjacency
from latent_jax.latent import feed_thoughts
from latent_jax.layout import layout_prompts
from latent_jax.models import forward, get_config, init_cache

GRAPH_KEYS = ("idx_to_symbol", "edges", "root", "target")


# --------------------------------------------------------------------------------------------------- graph + scores
def graph_facts(record: dict) -> dict[str, np.ndarray]:
    """depth: BFS distance from the root (-1 if unreachable); value: 1 if the node reaches the target (itself
    included)."""
    missing = [k for k in GRAPH_KEYS if k not in record]
    if missing:
        raise ValueError(f"record has no graph fields {missing} (latent analysis needs ProsQA-style records)")
    n = len(record["idx_to_symbol"])
    children, parents = graph_adjacency(record)

    def depths(adj, s):
        dist = np.full(n, -1, np.int64)
        for v, d in bfs_distances(adj, s).items():
            dist[v] = d
        return dist

    reaches_target = depths(parents, record["target"]) >= 0
    return {"depth": depths(children, record["root"]), "value": reaches_target.astype(np.float64)}


def node_token_ids(tok, symbols: Sequence[str]) -> list[list[int]]:
    """Per node: the distinct first tokens of " " + symbol and of symbol (see the module docstring)."""
    out = []
    for s in symbols:
        ids = []
        for text in (" " + s, s):
            try:
                enc = tok.encode(text, allow_special=False)
            except ValueError:  # a compact vocabulary without this form
                continue
            if enc and enc[0] not in ids:
                ids.append(enc[0])
        out.append(ids)
    return out


def node_scores(probs_V: np.ndarray, token_ids: list[list[int]]) -> np.ndarray:
    """Probability mass per node; a token shared by m nodes gives each p/m."""
    share: dict[int, int] = {}
    for ids in token_ids:
        for t in ids:
            share[t] = share.get(t, 0) + 1
    return np.array([sum(float(probs_V[t]) / share[t] for t in ids) for ids in token_ids], np.float64)


def thought_metrics(scores_N: np.ndarray, depth_N: np.ndarray, step: int) -> dict[str, float]:
    """Top-1/2/3 cumulative node mass, total node mass, frontier (depth step+1) mass and fraction."""
    top = np.cumsum(np.sort(scores_N)[::-1][:3])
    top = np.pad(top, (0, 3 - len(top)), mode="edge") if len(top) else np.zeros(3)
    total = float(scores_N.sum())
    frontier = float(scores_N[depth_N == step + 1].sum())
    return {"top1_mass": float(top[0]), "top2_mass": float(top[1]), "top3_mass": float(top[2]), "node_mass": total,
            "frontier_mass": frontier, "frontier_frac": frontier / total if total > 0 else math.nan}


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as scipy.stats.rankdata."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inv = np.unique(x, return_inverse=True)
    sums, counts = np.bincount(inv, ranks), np.bincount(inv)
    return sums[inv] / counts[inv] + 1.0


def correlations(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Pearson, Spearman); NaN when either side is constant or has < 2 points. scipy when installed."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    try:
        from scipy import stats
        return float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0])
    except ImportError:
        return float(np.corrcoef(x, y)[0, 1]), float(np.corrcoef(_rank(x), _rank(y))[0, 1])


# ------------------------------------------------------------------------------------------------ thought decoding
@functools.partial(jax.jit, static_argnames=("graphdef", "n_latent", "next_input"))
def thought_states(graphdef, params, prefix_BxP, prefix_mask_BxP, *, n_latent: int, next_input=None):
    """Left-padded prefix (ending in <bot>) -> n continuous thoughts. Returns (hidden [B, n, D], probs [B, n, V]):
    hidden[:, k] is the vector fed as input of latent slot k (as `latent.latent_generate_padded`), probs[:, k] its
    LM-head decoding softmax(h @ W_head^T) (the forward pass's logits at the position that produced it)."""
    cfg = get_config(graphdef, params)
    B, P = prefix_BxP.shape
    o = forward(graphdef, params, tokens=prefix_BxP, mask=prefix_mask_BxP, cache=init_cache(cfg, B, P + n_latent))

    *_, (h_nxBxD, logits_nxBxV) = feed_thoughts(graphdef, params, o.cache, o.hidden[:, -1], o.logits[:, -1],
                                                jnp.ones((n_latent, B), bool), collect=True, next_input=next_input)
    return jnp.swapaxes(h_nxBxD, 0, 1), jax.nn.softmax(jnp.swapaxes(logits_nxBxV, 0, 1).astype(jnp.float32), -1)


def decode_thoughts(graphdef, params, prompts, pad_id: int, batch_size: int | None = None, bucket: int = 16,
                    next_input=None):
    """Thoughts of a batch of `Prompt`s (all rows run the batch's max n_latent; row i keeps its first
    prompts[i].n_latent; `next_input`: the method's, e.g. CODI's projection). Returns numpy (hidden [B, n, D]: the
    vectors fed, probs [B, n, V]) for the len(prompts) rows."""
    prefix, mask, think, _ = layout_prompts(prompts, pad_id, bucket, batch_size)
    n = think.shape[1]
    if prefix.shape[1] + n > get_config(graphdef, params).max_positions:
        raise ValueError(f"prompt + {n} thoughts exceed the model's max_positions")
    h, p = thought_states(graphdef, params, prefix, mask, n_latent=n, next_input=next_input)
    return np.asarray(h)[:len(prompts)], np.asarray(p)[:len(prompts)]


# -------------------------------------------------------------------------------------------------------- analysis
def _clean(x):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def summarize(per_k: list[list[dict]]) -> list[dict[str, Any]]:
    """per_k[k]: one dict per record with metrics + 'scores', 'values', 'frontier' arrays -> per-thought summary."""
    out = []
    for k, rows in enumerate(per_k):
        if not rows:
            continue
        s = {"thought": k, "n_records": len(rows)}
        for key in ("top1_mass", "top2_mass", "top3_mass", "node_mass", "frontier_mass", "frontier_frac"):
            vals = np.array([r[key] for r in rows], np.float64)
            s[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
        sc = np.concatenate([r["scores"] for r in rows])
        va = np.concatenate([r["values"] for r in rows])
        fr = np.concatenate([r["frontier"] for r in rows])
        s["pearson"], s["spearman"] = correlations(sc, va)
        s["frontier_pearson"], s["frontier_spearman"] = correlations(sc[fr], va[fr])
        s["n_nodes"], s["n_frontier_nodes"] = int(len(sc)), int(fr.sum())
        out.append(s)
    return out


def analyze_records(method, records: Sequence[dict], graphdef, params, stage: int, top_k: int = 10,
                    batch_size: int = 32) -> dict[str, Any]:
    """Decode the continuous thoughts of `records` and score the graph nodes (see the module docstring)."""
    tok = method.tok
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    c = max(method.thoughts_per_step, 1)
    per_k: list[list[dict]] = []
    details = []
    for lo in range(0, len(records), batch_size):
        chunk = list(records[lo:lo + batch_size])
        prompts = [method.prompt(r, stage) for r in chunk]
        if max(p.n_latent for p in prompts) == 0:
            raise ValueError(f"stage {stage} prompts have no continuous thoughts")
        _, probs = decode_thoughts(graphdef, params, prompts, pad_id, batch_size=batch_size,
                                   next_input=method.next_input)
        for i, (r, p) in enumerate(zip(chunk, prompts)):
            g = graph_facts(r)
            ids = node_token_ids(tok, r["idx_to_symbol"])
            sym = r["idx_to_symbol"]
            thoughts = []
            for k in range(p.n_latent):
                pr = probs[i, k]
                scores = node_scores(pr, ids)
                m = thought_metrics(scores, g["depth"], k // c)
                while len(per_k) <= k:
                    per_k.append([])
                per_k[k].append({**m, "scores": scores, "values": g["value"], "frontier": g["depth"] == k // c + 1})
                top = np.argsort(pr)[::-1][:top_k]
                best = np.argsort(scores)[::-1][:3]
                thoughts.append({**m, "node_scores": scores.tolist(),
                                 "top_tokens": [[tok.decode([int(t)]), float(pr[t])] for t in top],
                                 "top_nodes": [{"node": sym[j], "score": scores[j], "value": int(g["value"][j]),
                                                "depth": int(g["depth"][j])} for j in best]})
            details.append({"index": lo + i, "question": r["question"][-80:], "root": sym[r["root"]],
                            "target": sym[r["target"]], "steps": r["steps"], "nodes": sym,
                            "value": g["value"].astype(int).tolist(), "depth": g["depth"].tolist(),
                            "untokenized_nodes": [s for s, x in zip(sym, ids) if not x], "thoughts": thoughts})
    return {"n_records": len(records), "stage": stage, "c_thought": c, "top_k": top_k,
            "per_thought": summarize(per_k), "records": details}


def token_table(result: dict, n_show: int = 5) -> str:
    """Markdown: per record, per thought, the top-k decoded tokens and the best-scored nodes."""
    lines = ["# Continuous thoughts decoded through the LM head", ""]
    for rec in result["records"][:n_show]:
        lines += [f"## record {rec['index']}: root {rec['root']}, target {rec['target']}", "",
                  f"question: ...{rec['question']}", f"steps: {' '.join(rec['steps'])}", "",
                  "| thought | top tokens (p) | top nodes (score, reaches target, depth) |", "|---|---|---|"]
        for k, t in enumerate(rec["thoughts"]):
            toks = ", ".join(f"`{s!r}` {p:.3f}" for s, p in t["top_tokens"])
            nodes = ", ".join(f"{n['node']} ({n['score']:.3f}, {n['value']}, {n['depth']})" for n in t["top_nodes"])
            lines.append(f"| {k} | {toks.replace('|', '&#124;')} | {nodes} |")
        lines.append("")
    return "\n".join(lines)


def run_analysis(cfg, model_dir, n: int | None = 200, top_k: int = 10, out=None, batch_size: int = 32,
                 progress: bool = True) -> dict[str, Any]:
    """`latent-jax analyze`: load an exported model folder (weights + tokenizer), analyze `n` validation records,
    write analysis.json, latent_tokens.md and PNG plots (+ training_curves.png if {run}/train/metrics.jsonl)."""
    from latent_jax.tokenizer import check_vocab_fits, load_tokenizer
    from latent_jax.experiment import reported_records, check_encoding, final_stage
    from latent_jax.hf import load_hf
    from latent_jax.methods import build_method

    model_dir = pathlib.Path(model_dir)
    out = pathlib.Path(out) if out is not None else model_dir.parent / "analysis"
    d = cfg.data
    check_encoding(model_dir, cfg, "--model-dir")
    records = reported_records({**d, "valid_n": n})  # the run's reported set, in its encoding (symbolic included)
    tok = load_tokenizer(model_dir)
    method = build_method(cfg.method["name"], tok, **cfg.method_options)
    if not method.uses_hidden_thoughts:
        raise ValueError(f"method {cfg.method['name']!r} has no continuous thoughts to analyze (needs coconut)")
    mcfg, graphdef, params = method.adapt_model(*load_hf(model_dir), training=False)
    check_vocab_fits(tok.vocab_size, mcfg.vocab_size, f"tokenizer of {model_dir} (with {method.name}'s tokens)",
                     str(model_dir))
    result = analyze_records(method, records, graphdef, params, final_stage(method, cfg), top_k, batch_size)
    result = _clean({"model_dir": str(model_dir), "task": d.task, **result})
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    (out / "latent_tokens.md").write_text(token_table(result))
    files = [out / "analysis.json", out / "latent_tokens.md"]
    try:
        from latent_jax import plots
        files += [plots.plot_thought_mass(result, out / "thought_mass.png"),
                  plots.plot_value_scatter(result, out / "value_vs_score.png")]
        metrics = model_dir.parent / "train" / "metrics.jsonl"
        if metrics.exists():
            files.append(plots.plot_training_curves(metrics, out / "training_curves.png"))
    except ImportError as e:
        print(f"latent-jax analyze: no plots ({e}; pip install 'latent_jax[plot]')", file=sys.stderr)
    result["files"] = [str(f) for f in files]
    return result
