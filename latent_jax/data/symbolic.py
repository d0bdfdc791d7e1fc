"""Symbolic ProsQA (Zhu et al. 2025, "Reasoning by Superposition"): one token per graph node, no BPE.

A record's graph fields (``idx_to_symbol``, ``edges``, ``root``, ``target``, ``neg_target``) become::

    question:  s t | s t | ... | [Q] c1 c2 [R] root        (edges shuffled; c1 c2 = target / negative, text order)
    steps:     one node a step: the nodes of the record's own path after the root (the last step is the target)
    answer:    the target node

Node ``v`` of a record is written ``n{perm[v]}``, with ``perm`` a random permutation of ``range(max_nodes)``
seeded by the question text: the same question always gets the same tokens, and a token's number says nothing about
the node's creation order (which would leak the DAG's topological order). The methods add their own separators
(``\\n`` after the question and each step, ``### `` before the answer), so a CoT sequence is
``edges [Q] c1 c2 [R] r \\n v1 \\n v2 \\n ### t <eos>``. The vocabulary (:func:`symbolic_vocab`) is ~50 words.
Pure Python.
"""
from __future__ import annotations

import random
import re
from typing import Sequence

from .prosqa import MAX_NODES, _FACT_RE, bfs_distances, graph_adjacency, parse_prosqa_question
from .records import Record

ENCODINGS = ("text", "symbolic")
MARKERS = ("|", "[Q]", "[R]")
EOS, NEWLINE, ANSWER = "<eos>", "\n", "###"
INIT = "<<"  # the token new special-token rows copy (Coconut's reference init token), so every method config works
_GRAPH_FIELDS = ("idx_to_symbol", "edges", "root", "target", "neg_target")
_NODE_RE = re.compile(r"n(\d+)")


def node_token(i: int) -> str:
    return f"n{i}"


def symbolic_vocab(max_nodes: int = MAX_NODES) -> list[str]:
    """The word vocabulary: EOS (id 0), the separators the methods write, the markers, then the node tokens."""
    return [EOS, NEWLINE, ANSWER, INIT, *MARKERS, *(node_token(i) for i in range(max_nodes))]


IDS = ("shuffled", "index")


def to_symbolic(record: Record, index: int | None = None, source: str = "records",
                max_nodes: int = MAX_NODES, ids: str = "shuffled") -> Record:
    """One ProsQA record in its symbolic form (ValueError naming ``source``, the record index and the field when the
    record cannot be represented: missing graph fields, more nodes than ``max_nodes``, a step or query naming a
    node the graph does not have). ``ids``: ``shuffled`` (default: a per-question random permutation of the node
    tokens) or ``index`` (node ``v`` is ``n{v}``, the record's own numbering: creation order, as Zhu et al.)."""
    if ids not in IDS:
        raise ValueError(f"symbolic node ids must be one of {IDS}, got {ids!r}")
    where = f"{source} record {index}" if index is not None else source
    for key in _GRAPH_FIELDS:
        if key not in record:
            raise ValueError(f"{where}: field {key!r} missing; the symbolic encoding is built from the graph fields"
                             f" {list(_GRAPH_FIELDS)} (ProsQA records carry them)")
    sym = record["idx_to_symbol"]
    n = len(sym)
    if n > max_nodes:
        raise ValueError(f"{where}: field 'idx_to_symbol' has {n} nodes, more than the symbolic vocabulary's"
                         f" {max_nodes} node tokens (the ladder's maximum graph size)")
    index_of = {s: i for i, s in enumerate(sym)}
    for key in ("root", "target", "neg_target"):
        if not (isinstance(record[key], int) and 0 <= record[key] < n):
            raise ValueError(f"{where}: field {key!r}={record[key]!r} is not a node index in [0, {n})")
    for e in record["edges"]:
        if not (len(e) == 2 and all(isinstance(v, int) and 0 <= v < n for v in e)):
            raise ValueError(f"{where}: field 'edges' has {e!r}, not a pair of node indices in [0, {n})")
    rng = random.Random(f"symbolic-{record['question']}")
    perm = rng.sample(range(max_nodes), n) if ids == "shuffled" else list(range(n))
    tok = [node_token(perm[v]) for v in range(n)]
    try:
        _, (_, x, y) = parse_prosqa_question(record["question"])
        first, second = index_of[x], index_of[y]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{where}: field 'question': the query's candidates are not graph nodes ({e})") from None
    path = []
    for j, step in enumerate(record["steps"]):
        m = _FACT_RE.match(step)
        if not m or m.group(3) not in index_of:
            raise ValueError(f"{where}: field 'steps'[{j}]={step!r} does not name a node of 'idx_to_symbol'")
        path.append(index_of[m.group(3)])
    edges = [list(e) for e in record["edges"]]
    rng.shuffle(edges)
    question = " ".join(f"{tok[a]} {tok[b]} |" for a, b in edges) + f" [Q] {tok[first]} {tok[second]} [R] " \
        + tok[record["root"]]
    return {"question": question, "steps": [tok[v] for v in path], "answer": tok[record["target"]],
            "idx_to_symbol": tok, "edges": record["edges"], "root": record["root"], "target": record["target"],
            "neg_target": record["neg_target"]}


def symbolic_records(records: Sequence[Record], source: str = "records", max_nodes: int = MAX_NODES,
                     ids: str = "shuffled") -> list[Record]:
    return [to_symbolic(r, i, source, max_nodes, ids) for i, r in enumerate(records)]


def parse_symbolic_question(question: str) -> tuple[list[tuple[str, str]], tuple[str, str], str]:
    """``(edges, (c1, c2), root)`` of a symbolic question (ValueError if it is not one)."""
    body, sep, query = question.partition(" [Q] ")
    q = query.split()
    if not sep or len(q) != 4 or q[2] != "[R]":
        raise ValueError(f"not a symbolic ProsQA question: {question[-60:]!r}")
    words = body.split()
    if len(words) % 3 or any(w != "|" for w in words[2::3]):
        raise ValueError(f"symbolic edges must be 's t |' triples: {body[:60]!r}")
    return [(words[i], words[i + 1]) for i in range(0, len(words), 3)], (q[0], q[1]), q[3]


def verify_symbolic(record: Record) -> list[str]:
    """Check a symbolic record by graph search over its question's edges; returns the problems (empty if sound):
    exactly one candidate is reachable from the root, the answer is that one, the steps are a shortest path to it,
    and the question's edges are the record's graph under its node tokens."""
    try:
        edges, (x, y), root = parse_symbolic_question(record["question"])
    except ValueError as e:
        return [str(e)]
    problems = []
    if any(not _NODE_RE.fullmatch(w) for e in edges for w in e) or not all(map(_NODE_RE.fullmatch, (x, y, root))):
        problems.append("a node token is not of the form n<k>")
    children: dict[str, list[str]] = {}
    for s, t in edges:
        children.setdefault(s, []).append(t)
    names = sorted({w for e in edges for w in e} | {x, y, root})
    idx = {w: i for i, w in enumerate(names)}
    dist_i = bfs_distances([[idx[c] for c in children.get(w, [])] for w in names], idx[root])
    dist = {names[i]: d for i, d in dist_i.items()}
    if (x in dist) == (y in dist):
        problems.append(f"exactly one of {x}/{y} must be reachable from {root}")
    good = x if x in dist else y
    if record["answer"] != good:
        problems.append(f"answer {record['answer']!r} != reachable candidate {good!r}")
    chain = [root, *record["steps"]]
    if not record["steps"] or chain[-1] != good or any(b not in children.get(a, []) for a, b in zip(chain, chain[1:])):
        problems.append("steps are not a path of edges from the root to the answer")
    elif len(record["steps"]) != dist.get(good):
        problems.append(f"steps have length {len(record['steps'])}, shortest path is {dist.get(good)}")
    if "edges" in record and "idx_to_symbol" in record:
        tok = record["idx_to_symbol"]
        if sorted((tok[a], tok[b]) for a, b in record["edges"]) != sorted(edges):
            problems.append("edges do not match the question")
        if tok[record["root"]] != root or tok[record["target"]] != good:
            problems.append("root/target do not match the question")
    return problems


def symbolic_hops(record: Record) -> int:
    """Shortest-path length (hops) from the root to the answer of a symbolic record."""
    children, _ = graph_adjacency(record)
    return bfs_distances(children, record["root"])[record["target"]]
