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
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp

from latent_jax.config import check_rules, coerce_numbers
from latent_jax.data.prosqa import bfs_distances, graph_adjacency
from latent_jax.latent import loss_fn
from latent_jax.layout import IGNORE, Example, Prompt
from latent_jax.methods.base import Method, first_token_id
from latent_jax.methods.coconut import LATENT
from latent_jax.methods.lt_fusion import embedding_matrices
from latent_jax.tokenizer import Tokenizer

FRONTIERS = ("reachable", "on_path")
THOUGHTS = ("hidden", "soft_token")


@dataclasses.dataclass(frozen=True)
class SuperpositionConfig:
    """max_latent_stage: the last intermediate stage (the trainer's curriculum goes 0..max_latent_stage+1; a record
    reaches its final layout at stage min(n, max_latent_stage + 1)); frontier: see the module docstring. dense: every
    stage's loss in one example (the final layout with a frontier node as the label of each thought; no curriculum,
    one stage). label_thoughts: keep the curriculum, and also label each of a stage's thoughts with its frontier node
    (stage s then trains s + 1 frontier lookups an example instead of one). thought: what a thought slot is fed,
    "hidden" (Coconut: the previous final hidden state) or "soft_token" (the mix of token embeddings that hidden
    state predicts, `soft_token_thought`: a superposition of the node embeddings by construction)."""

    max_latent_stage: int = 4
    frontier: str = "reachable"
    dense: bool = False
    label_thoughts: bool = False
    thought: str = "hidden"
    init_token: str = "<<"

    def __post_init__(self):
        coerce_numbers(self, "SuperpositionConfig", strict_types=True)
        check_rules(self, "SuperpositionConfig", [
            ("max_latent_stage", self.max_latent_stage >= 0, ">= 0"),
            ("frontier", self.frontier in FRONTIERS, f"one of {FRONTIERS}"),
            ("thought", self.thought in THOUGHTS, f"one of {THOUGHTS}"),
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


class Superposition(Method):
    name = "superposition"
    uses_hidden_thoughts = True

    def __init__(self, tokenizer: Tokenizer, cfg: SuperpositionConfig = SuperpositionConfig()):
        self.tok, self.cfg = tokenizer, cfg
        self.special_tokens = (LATENT,)
        self.ids = dict(zip(self.special_tokens, tokenizer.add_special_tokens(list(self.special_tokens))))
        self._nodes: dict[str, list[int]] = {}
        if cfg.thought == "soft_token":
            self.next_input = soft_token_thought
        self._loss = functools.partial(loss_fn, next_input=self.next_input)

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
        q = record["question"]
        if q not in self._nodes:
            if not all(f in record for f in ("idx_to_symbol", "edges", "root", "target")):
                raise ValueError("superposition trains on ProsQA graphs: set data.encoding=symbolic (the record has"
                                 " no graph fields)")
            ids = []
            for stage, nodes in enumerate(frontiers(record, self.cfg.frontier)):
                nodes = nodes or [record["steps"][stage]]
                h = int.from_bytes(hashlib.sha256(f"{q}\x1f{stage}".encode()).digest()[:8], "little")
                node = self.tok.encode(nodes[h % len(nodes)])
                if len(node) != 1:
                    raise ValueError(f"node {nodes[h % len(nodes)]!r} is not one token: superposition needs"
                                     " data.encoding=symbolic")
                ids.append(node[0])
            self._nodes[q] = ids
        return self._nodes[q]

    def encode(self, record: dict[str, Any], stage: int) -> Example:
        t = self.record_tokens(record)
        q, n = t.question, len(t.steps)
        if stage < n and stage <= self.cfg.max_latent_stage and not self.cfg.dense:
            ids = self.frontier_ids(record)
            thoughts = ids[:stage] if self.cfg.label_thoughts else [IGNORE] * stage
            return Example(q + [self.ids[LATENT]] * stage + [ids[stage]], [IGNORE] * len(q) + thoughts + [ids[stage]],
                           latent_start=len(q), n_latent=stage)
        tokens = q + [self.ids[LATENT]] * n + t.answer
        labelled = self.cfg.dense or self.cfg.label_thoughts
        thoughts = self.frontier_ids(record) if labelled else [IGNORE] * n
        return Example(tokens, [IGNORE] * len(q) + thoughts + t.answer, latent_start=len(q), n_latent=n)

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        t = self.record_tokens(record)  # every stage is evaluated on the final layout: the answer after n thoughts
        return Prompt(t.question, len(t.steps))
