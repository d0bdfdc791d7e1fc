"""Coconut trained on BFS frontiers: Zhu et al. 2025 ("Reasoning by Superposition", arXiv 2505.12514), ProsQA only.

The Coconut reference supervises the thoughts with the record's one written path. Zhu et al. train graph
reachability differently (their public `dataset.py`, read for its layout; nothing copied): at curriculum stage s a
record with n path steps gives, for s < n,

    question <latent>×s  v          v = one node of the (s+1)-th frontier; the loss is on v only

and for s >= n (the final layout, also the evaluation prompt)

    question <latent>×n ### target <eos>

(no <bot> / <eot> markers, as Zhu et al.: the first thought is the hidden state of the root token itself, so at
stage 0 predicting a child of the root is one lookup from the current token).
so a thought is never asked for *the* path's node, only for some node the search could be at: over the training
set the cross-entropy is minimised by spreading the prediction over the frontier, which is the superposition the
paper proves a 2-layer model can carry (each thought = the set of nodes reached so far, a parallel BFS), and the
answer is read off by checking which candidate the search reached.

frontier: "reachable" (default): the nodes at BFS distance exactly s+1 from the root; "on_path": those of them that
also reach the target in the remaining n-s-1 steps (the nodes of some root-target path of the record's length). The
node of a record and stage is fixed (a hash of the question and the stage picks it from the sorted set), so an
epoch's data is deterministic; a record whose set is empty falls back to its own path's node. Records must be
symbolic ProsQA (`data.encoding: symbolic`: one token per node, the graph fields kept).

target: "sampled" (default, Zhu et al.): the one node above is the label. "set" (our deviation): a frontier-labelled
position is trained on the whole set S at once, loss -(1/|S|) sum_{v in S} log p(v) (the cross-entropy against the
uniform distribution over S): the expectation of the sampled loss over the node, without its sampling noise, so
the label is a function of the graph the model can learn exactly. `collate` then adds `label_sets` [B, T, K] (the
set's ids at each such position, IGNORE-padded; K rounded up to 4) and the plain labels there are IGNORE.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from latent_jax.config import check_rules, coerce_numbers
from latent_jax.data.prosqa import bfs_distances, graph_adjacency
from latent_jax.latent import latent_forward, loss_fn
from latent_jax.layout import IGNORE, Batch, Example, Prompt, collate, round_up, token_loss
from latent_jax.methods.base import Method, first_token_id
from latent_jax.methods.coconut import LATENT
from latent_jax.methods.lt_fusion import embedding_matrices
from latent_jax.tokenizer import Tokenizer

FRONTIERS = ("reachable", "on_path")
THOUGHTS = ("hidden", "soft_token")
TARGETS = ("sampled", "set")


@dataclasses.dataclass(frozen=True)
class SuperpositionConfig:
    """max_latent_stage: the last intermediate stage (the trainer's curriculum goes 0..max_latent_stage+1; a record
    reaches its final layout at stage min(n, max_latent_stage + 1)); frontier: see the module docstring. dense: every
    stage's loss in one example (the final layout with a frontier node as the label of each thought; no curriculum,
    one stage). label_thoughts: keep the curriculum, and also label each of a stage's thoughts with its frontier node
    (stage s then trains s + 1 frontier lookups an example instead of one). thought: what a thought slot is fed,
    "hidden" (Coconut: the previous final hidden state) or "soft_token" (the mix of token embeddings that hidden
    state predicts, `soft_token_thought`: a superposition of the node embeddings by construction). target: "sampled"
    (one frontier node a label) or "set" (the whole frontier, see the module docstring)."""

    max_latent_stage: int = 4
    frontier: str = "reachable"
    dense: bool = False
    label_thoughts: bool = False
    thought: str = "hidden"
    target: str = "sampled"
    init_token: str = "<<"

    def __post_init__(self):
        coerce_numbers(self, "SuperpositionConfig", strict_types=True)
        check_rules(self, "SuperpositionConfig", [
            ("max_latent_stage", self.max_latent_stage >= 0, ">= 0"),
            ("frontier", self.frontier in FRONTIERS, f"one of {FRONTIERS}"),
            ("thought", self.thought in THOUGHTS, f"one of {THOUGHTS}"),
            ("target", self.target in TARGETS, f"one of {TARGETS}"),
            ("label_thoughts", not (self.label_thoughts and self.dense), "not with dense (dense labels every thought)")])


def frontiers(record: dict[str, Any], kind: str = "reachable") -> list[list[str]]:
    """The node tokens of frontier 1..n (n = the record's path length), each sorted."""
    children, parents = graph_adjacency(record)
    sym, n = record["idx_to_symbol"], len(record["steps"])
    dist = bfs_distances(children, record["root"])
    to_target = bfs_distances(parents, record["target"])  # distance to the target along the edges
    out = []
    for k in range(1, n + 1):
        nodes = [v for v, d in dist.items() if d == k and (kind == "reachable" or to_target.get(v) == n - k)]
        out.append(sorted(sym[v] for v in nodes))
    return out


def soft_token_thought(graphdef, params, h_BxD):
    """The embedding a final hidden state [B, D] predicts: softmax(h W_head^T) @ E_in, the mix of token embeddings
    weighted by the model's next-token probabilities (Soft Thinking's input, here trained through)."""
    embed_VxD, head_VxD = embedding_matrices(graphdef, params)
    probs_BxV = jax.nn.softmax(jnp.einsum("BD,VD->BV", h_BxD, head_VxD.astype(h_BxD.dtype),
                                          preferred_element_type=jnp.float32), axis=-1)
    return jnp.einsum("BV,VD->BD", probs_BxV, embed_VxD.astype(jnp.float32)).astype(h_BxD.dtype)


@dataclasses.dataclass(frozen=True)
class SetExample(Example):
    label_sets: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (token index, the ids its label is spread over)


def set_loss(params, graphdef, batch: dict, prefix_len: int, n_latent: int, rng=None, *, next_input=None):
    """`latent.loss_fn`'s token loss (full logits: a node vocabulary is small) plus the set-labelled positions (`batch["label_sets"]` [B, T, K], aligned with the labels:
    the logits at t score the set at t + 1): each adds -mean_{v in S} log p(v) to the sum and 1 to the token count;
    it counts as correct when the argmax is in S. Shape letters: B batch, T positions, K set slots, V vocab."""
    logits_BxTxV = latent_forward(graphdef, params, batch["tokens"], batch["mask"], batch["latent"], prefix_len,
                                  n_latent, batch.get("positions"), dropout_rng=rng, next_input=next_input)
    plain_sum, plain_count, plain_correct = token_loss(logits_BxTxV, batch["labels"])
    logits_BxTxV = logits_BxTxV[:, :-1].astype(jnp.float32)  # the head over a node vocabulary: small, computed once
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    sets_BxTxK = batch["label_sets"][:, 1:]
    valid_BxTxK = sets_BxTxK != IGNORE
    safe_BxTxK = jnp.where(valid_BxTxK, sets_BxTxK, 0)
    picked_BxTxK = jnp.take_along_axis(logp_BxTxV, safe_BxTxK, axis=-1)
    size_BxT = jnp.sum(valid_BxTxK, axis=-1)
    ce_BxT = -jnp.sum(picked_BxTxK * valid_BxTxK, axis=-1) / jnp.maximum(size_BxT, 1)
    top_BxT = jnp.argmax(logits_BxTxV, axis=-1)
    hit_BxT = jnp.any((safe_BxTxK == top_BxT[..., None]) & valid_BxTxK, axis=-1)
    total = plain_sum + jnp.sum(ce_BxT)
    count = plain_count + jnp.sum(size_BxT > 0)
    correct = plain_correct + jnp.sum(hit_BxT)
    aux = {"loss_sum": total, "n_tokens": count, "n_correct": correct}
    return total / jnp.maximum(count, 1), aux


class Superposition(Method):
    name = "superposition"
    uses_hidden_thoughts = True

    def __init__(self, tokenizer: Tokenizer, cfg: SuperpositionConfig = SuperpositionConfig()):
        self.tok, self.cfg = tokenizer, cfg
        self.special_tokens = (LATENT,)
        self.ids = dict(zip(self.special_tokens, tokenizer.add_special_tokens(list(self.special_tokens))))
        self._nodes: dict[str, tuple[list[int], list[tuple[int, ...]]]] = {}  # question -> (sampled ids, sets)
        if cfg.thought == "soft_token":
            self.next_input = soft_token_thought
        self._loss = functools.partial(set_loss if cfg.target == "set" else loss_fn, next_input=self.next_input)

    @property
    def max_latent_stage(self) -> int | None:
        return None if self.cfg.dense else self.cfg.max_latent_stage

    def num_stages(self) -> int:
        return 1 if self.cfg.dense else self.cfg.max_latent_stage + 1  # as Coconut: the final stage is this number

    def eligible_for_best(self, stage: int) -> bool:  # before the last stage not every record's answer is trained
        return self.cfg.dense or stage > self.cfg.max_latent_stage

    def loss_for_stage(self, stage: int):
        return self._loss

    def init_token_id(self) -> int:
        return first_token_id(self.tok, self.cfg.init_token)

    def frontier_ids(self, record: dict[str, Any]) -> list[int]:
        """The token id each thought is asked for, per stage (the graph searched once per question, then cached)."""
        return self._frontier(record)[0]

    def frontier_sets(self, record: dict[str, Any]) -> list[tuple[int, ...]]:
        """Per stage, the ids of the whole frontier (`target: set`; the record's own node when the set is empty)."""
        return self._frontier(record)[1]

    def _frontier(self, record):
        q = record["question"]
        if q not in self._nodes:
            if not all(f in record for f in ("idx_to_symbol", "edges", "root", "target")):
                raise ValueError("superposition trains on ProsQA graphs: set data.encoding=symbolic (the record has"
                                 " no graph fields)")
            ids, sets = [], []
            for stage, nodes in enumerate(frontiers(record, self.cfg.frontier)):
                nodes = nodes or [record["steps"][stage]]
                enc = [self.tok.encode(v) for v in nodes]
                bad = [v for v, e in zip(nodes, enc) if len(e) != 1]
                if bad:
                    raise ValueError(f"node {bad[0]!r} is not one token: superposition needs data.encoding=symbolic")
                h = int.from_bytes(hashlib.sha256(f"{q}\x1f{stage}".encode()).digest()[:8], "little")
                ids.append(enc[h % len(nodes)][0])
                sets.append(tuple(e[0] for e in enc))
            self._nodes[q] = (ids, sets)
        return self._nodes[q]

    def _example(self, tokens, labels, latent_start, n_latent, record, labelled_stages) -> Example:
        """labelled_stages: (token index, stage) of each frontier-labelled position; with target "set" their plain
        label becomes IGNORE and the set goes to `SetExample.label_sets`."""
        if self.cfg.target == "sampled":
            return Example(tokens, labels, latent_start=latent_start, n_latent=n_latent)
        sets = self.frontier_sets(record)
        labels = list(labels)
        for i, _ in labelled_stages:
            labels[i] = IGNORE
        return SetExample(tokens, labels, latent_start=latent_start, n_latent=n_latent,
                          label_sets=tuple((i, sets[k]) for i, k in labelled_stages))

    def encode(self, record: dict[str, Any], stage: int) -> Example:
        t = self.record_tokens(record)
        q, n = t.question, len(t.steps)
        L = len(q)
        if stage < n and stage <= self.cfg.max_latent_stage and not self.cfg.dense:
            ids = self.frontier_ids(record)
            thoughts = ids[:stage] if self.cfg.label_thoughts else [IGNORE] * stage
            labelled = [(L + k, k) for k in range(stage + 1 if self.cfg.label_thoughts else 0)] or [(L + stage, stage)]
            return self._example(q + [self.ids[LATENT]] * stage + [ids[stage]], [IGNORE] * L + thoughts + [ids[stage]],
                                 L, stage, record, labelled)
        tokens = q + [self.ids[LATENT]] * n + t.answer
        labelled = self.cfg.dense or self.cfg.label_thoughts
        thoughts = self.frontier_ids(record) if labelled else [IGNORE] * n
        return self._example(tokens, [IGNORE] * L + thoughts + t.answer, L, n, record,
                             [(L + k, k) for k in range(n)] if labelled else [])

    def collate(self, examples, pad_id: int, bucket: int = 32, max_len: int | None = None,
                batch_size: int | None = None) -> Batch:
        """`layout.collate`; with target "set" plus `label_sets` [B, T, K] (IGNORE where a position has no set)."""
        b = collate(examples, pad_id, bucket, max_len, batch_size)
        if self.cfg.target == "sampled":
            return b
        R, T = b.tokens.shape
        K = round_up(max((len(ids) for e in examples for _, ids in e.label_sets), default=1), 4)
        sets = np.full((R, T, K), IGNORE, np.int32)
        for i, e in enumerate(examples):
            off = int(np.argmax(b.mask[i]))  # the column of the row's first token
            for pos, ids in e.label_sets:
                sets[i, off + pos, :len(ids)] = ids
        return dataclasses.replace(b, extra={**b.extra, "label_sets": sets})

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        t = self.record_tokens(record)  # every stage is evaluated on the final layout: the answer after n thoughts
        return Prompt(t.question, len(t.steps))
