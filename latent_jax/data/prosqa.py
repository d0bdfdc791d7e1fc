"""ProsQA (Coconut, Hao et al. 2024): generator, verifier and statistics.

A question is a random DAG of made-up concepts. Nodes are numbered in creation order: nodes 0 and 1 are the two
main people; a few extra people (in-degree 0) are scattered later. Every other node is a concept that takes its
parents from earlier nodes of one of two "sides" (descendants of person 0 or of person 1); a few concepts take
parents from both sides, and nodes reachable from both sides (or from an extra person only) never become parents.
Parents are drawn preferring recent pool members (the main person itself rarely), which gives the real depth.
For each main person, its candidate target is the leaf farthest from it (shortest path) among the leaves reachable
from it and not from the other main person; the root is the person whose candidate is farther (ties at random),
the target that leaf, and the negative target a random leaf reachable from the other main person only.
``steps`` is a shortest path, uniform over all shortest paths. All parameters were fitted to
``prosqa/valid.json``; the real-vs-generated statistics are in the data notes (``latent-jax data stats prosqa``).
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import random
import re
from collections import deque
from collections.abc import Mapping
from typing import Any

from .records import Record
from .vocab import PROSQA_CONCEPTS, PROSQA_NAMES

# Number of concept (non-person) nodes: histogram of prosqa/valid.json (value: count).
_CONCEPT_HIST = {15: 7, 16: 5, 17: 19, 18: 25, 19: 41, 20: 57, 21: 62, 22: 37, 23: 32, 24: 12, 25: 3}
_INDEG = (1, 2, 3, 4, 5, 6)  # in-degree of a one-side concept
_INDEG_W = (0.45, 0.33, 0.15, 0.05, 0.015, 0.005)
_EXTRA_PEOPLE_RATE = 0.51  # Poisson mean of extra people
_CROSS = 0.075  # probability that a concept takes parents from both sides
_SIDE1 = 0.6  # probability that a one-side concept hangs below person 1
_ONLY_EXTRA = 0.3  # probability that an extra person's child has it as its only parent
_SECOND_CHILD = 0.14  # probability that an extra person gets a second child
_RECENCY = 0.93  # parent choice: weight of a pool member decays as _RECENCY ** (its age in the pool)
_PERSON_ACCEPT = 0.2  # ... and a main person (the oldest member) is accepted only with this probability
MIN_STEPS, MAX_STEPS = 3, 6
# Acceptance probability by path length (fitted so that the steps histogram matches the real file).
_ACCEPT_STEPS = {3: 0.70, 4: 0.90, 5: 1.0, 6: 1.0}
# Facts and nodes are kept within the ranges seen in the real file.
FACTS_RANGE = (22, 53)
NODES_RANGE = (17, 28)


@dataclasses.dataclass(frozen=True)
class GraphSize:
    """A rung of the ProsQA size ladder: total nodes and path length (hops) ranges, inclusive.

    ``real`` is the size of ``prosqa/valid.json`` (the fitted histograms above); a smaller rung draws its number of
    concepts uniformly so that the graph has ``nodes`` nodes, and accepts every path length in ``steps``."""

    nodes: tuple[int, int] = NODES_RANGE
    steps: tuple[int, int] = (MIN_STEPS, MAX_STEPS)

    def __post_init__(self):
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "steps", tuple(self.steps))
        (n0, n1), (s0, s1) = self.nodes, self.steps
        if not (4 <= n0 <= n1 <= MAX_NODES and 1 <= s0 <= s1 < n1 - 2):
            raise ValueError(f"graph size nodes={self.nodes} steps={self.steps} is invalid: need 4 <= nodes low <= "
                             f"nodes high <= {MAX_NODES} and 1 <= steps low <= steps high < nodes high - 2")

    @property
    def is_real(self) -> bool:
        return self == GraphSize()


MAX_NODES = 40  # the ladder's maximum graph size (and the symbolic vocabulary's node tokens)
# The size ladder. `real`: the size of prosqa/valid.json; the others are small enough for 2 CPU cores.
RUNGS = {"tiny": (6, 8, 2, 3), "small": (8, 12, 2, 4), "medium": (12, 18, 3, 5), "real": (*NODES_RANGE, 3, 6)}


def graph_size(rung: str | dict | GraphSize | None) -> GraphSize:
    """A rung name (``tiny``, ``small``, ``medium``, ``real``), ``{nodes: [lo, hi], steps: [lo, hi]}`` or None (real)."""
    if rung is None or isinstance(rung, GraphSize):
        return rung or GraphSize()
    if isinstance(rung, str):
        if rung not in RUNGS:
            raise ValueError(f"unknown ProsQA rung {rung!r}; valid: {sorted(RUNGS)} or {{nodes: [lo, hi], steps: [lo, hi]}}")
        n0, n1, s0, s1 = RUNGS[rung]
        return GraphSize((n0, n1), (s0, s1))
    if isinstance(rung, Mapping) and set(rung) <= {"nodes", "steps"}:
        return GraphSize(tuple(rung.get("nodes", NODES_RANGE)), tuple(rung.get("steps", (MIN_STEPS, MAX_STEPS))))
    raise ValueError(f"a ProsQA rung is a name {sorted(RUNGS)} or {{nodes: [lo, hi], steps: [lo, hi]}}, got {rung!r}")


def _cum(weights: Any) -> list[float]:
    return list(itertools.accumulate(weights))


_M_VALUES, _M_CUM = list(_CONCEPT_HIST), _cum(_CONCEPT_HIST.values())
_INDEG_CUM = _cum(_INDEG_W)


def _pick(rng: random.Random, values: Any, cum: list[float]) -> Any:
    return values[bisect.bisect_right(cum, rng.random() * cum[-1])]


def _poisson(rng: random.Random, lam: float) -> int:
    k, p, u = 0, math.exp(-lam), rng.random()
    s = p
    while u > s:
        k += 1
        p *= lam / k
        s += p
    return k


def _recent_sample(rng: random.Random, pool: list[int], k: int) -> list[int]:
    """``k`` distinct members of ``pool``, later members preferred (truncated geometric in the age)."""
    n = len(pool)
    k = min(k, n)
    if k == n:
        out = list(pool)
        rng.shuffle(out)
        return out
    tail = 1.0 - _RECENCY ** n
    log_b = math.log(_RECENCY)
    chosen: list[int] = []
    while len(chosen) < k:
        age = min(int(math.log(1.0 - rng.random() * tail) / log_b), n - 1)
        v = pool[n - 1 - age]
        if age == n - 1 and rng.random() > _PERSON_ACCEPT:
            continue
        if v not in chosen:
            chosen.append(v)
    return chosen


def _sample_dag(rng: random.Random, size: GraphSize) -> tuple[int, list[list[int]], list[int]]:
    """Return (number of nodes, parents of each node, person nodes)."""
    e = min(_poisson(rng, _EXTRA_PEOPLE_RATE), 4)
    if size.is_real:
        m = _pick(rng, _M_VALUES, _M_CUM)
    else:
        e = min(e, max(size.nodes[0] // 6, 0))
        m = rng.randint(max(size.nodes[0] - 2 - e, 2), max(size.nodes[1] - 2 - e, 2))
    n = 2 + m + e
    extra = sorted(rng.sample(range(2, n - 1), e))
    extra_set = set(extra)
    concepts_after = {x: [j for j in range(x + 1, n) if j not in extra_set] for x in extra}
    extra_parents: dict[int, list[int]] = {}
    for x in extra:
        kids = rng.sample(concepts_after[x], min(len(concepts_after[x]), 2 if rng.random() < _SECOND_CHILD else 1))
        for j in kids:
            extra_parents.setdefault(j, []).append(x)
    pool: tuple[list[int], list[int]] = ([0], [1])
    parents: list[list[int]] = [[], []]
    for i in range(2, n):
        if i in extra_set:
            parents.append([])
            continue
        k = _pick(rng, _INDEG, _INDEG_CUM)
        xs = extra_parents.get(i, [])
        if rng.random() < _CROSS:
            ps = [rng.choice(pool[0]), rng.choice(pool[1])]
            rest = [p for p in pool[0] + pool[1] if p not in ps]
            ps += rng.sample(rest, min(max(k - 2, 0), len(rest)))
            rng.shuffle(ps)
            parents.append(ps + xs)
            continue
        if xs and rng.random() < _ONLY_EXTRA:
            parents.append(list(xs))
            continue
        side = pool[1] if rng.random() < _SIDE1 else pool[0]
        ps = _recent_sample(rng, side, k) + xs
        rng.shuffle(ps)
        parents.append(ps)
        side.append(i)
    return n, parents, [0, 1] + extra


def graph_adjacency(record: Record) -> tuple[list[list[int]], list[list[int]]]:
    """(children, parents) lists of a record's `edges` over its `idx_to_symbol` nodes."""
    n = len(record["idx_to_symbol"])
    children: list[list[int]] = [[] for _ in range(n)]
    parents: list[list[int]] = [[] for _ in range(n)]
    for a, b in record["edges"]:
        children[a].append(b)
        parents[b].append(a)
    return children, parents


def bfs_distances(children: list[list[int]], s: int) -> dict[int, int]:
    """BFS distance from s of every node reachable from it."""
    dist = {s: 0}
    q = deque([s])
    while q:
        u = q.popleft()
        for v in children[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                q.append(v)
    return dist


def _random_shortest_path(rng: random.Random, parents: list[list[int]], dist: dict[int, int], target: int) -> list[int]:
    """A shortest root->target path, uniform over all shortest paths."""
    count: dict[int, int] = {}
    for v in sorted(dist, key=dist.get):
        count[v] = 1 if dist[v] == 0 else sum(count[p] for p in parents[v] if dist.get(p) == dist[v] - 1)
    path = [target]
    while dist[path[-1]] > 0:
        preds = [p for p in parents[path[-1]] if dist.get(p) == dist[path[-1]] - 1]
        path.append(rng.choices(preds, weights=[count[p] for p in preds])[0])
    return path[::-1]


def _try_question(rng: random.Random, size: GraphSize = GraphSize()) -> Record | None:
    n, parents, persons = _sample_dag(rng, size)
    n_edges = sum(len(ps) for ps in parents)
    facts_range = FACTS_RANGE if size.is_real else (size.nodes[0] - 2, 2 * size.nodes[1])
    if not (size.nodes[0] <= n <= size.nodes[1] and facts_range[0] <= n_edges <= facts_range[1]):
        return None
    children: list[list[int]] = [[] for _ in range(n)]
    for v, ps in enumerate(parents):
        for p in ps:
            children[p].append(v)
    d0, d1 = bfs_distances(children, 0), bfs_distances(children, 1)
    best: list[tuple[int, float, int]] = []  # (farthest own leaf distance, tie-break, side)
    for side, (dr, do) in enumerate(((d0, d1), (d1, d0))):
        far = max((d for v, d in dr.items() if d > 0 and not children[v] and v not in do), default=0)
        best.append((far, rng.random(), side))
    far, _, root = max(best)
    dr, do = (d0, d1) if root == 0 else (d1, d0)
    cands = [v for v, d in dr.items() if d == far and not children[v] and v not in do]
    negs = [v for v in do if not children[v] and v not in dr and v != 1 - root]
    accept = _ACCEPT_STEPS.get(far, 1.0) if size.is_real else 1.0
    if not (size.steps[0] <= far <= size.steps[1]) or not negs or rng.random() > accept:
        return None
    target = rng.choice(cands)
    neg = rng.choice(negs)
    path = _random_shortest_path(rng, parents, dr, target)
    is_person = set(persons)
    names = rng.sample(PROSQA_NAMES, len(persons))
    words = rng.sample(PROSQA_CONCEPTS, n - len(persons))
    it_names, it_words = iter(names), iter(words)
    sym = [next(it_names) if v in is_person else next(it_words) for v in range(n)]
    edges = [[p, v] for v in range(n) for p in parents[v]]
    facts = [_fact(sym, a, b, a in is_person) for a, b in edges]
    rng.shuffle(facts)
    first, second = (target, neg) if rng.random() < 0.5 else (neg, target)
    name = sym[root]
    steps = [_fact(sym, a, b, a in is_person) for a, b in zip(path, path[1:])]
    return {"question": " ".join(facts) + f" Is {name} a {sym[first]} or {sym[second]}?",
            "answer": f"{name} is a {sym[target]}.", "steps": steps, "idx_to_symbol": sym, "edges": edges,
            "root": root, "target": target, "neg_target": neg}


def _fact(sym: list[str], a: int, b: int, a_is_person: bool) -> str:
    return f"{sym[a]} is a {sym[b]}." if a_is_person else f"Every {sym[a]} is a {sym[b]}."


def generate_prosqa(n: int, seed: int = 0, rung: str | dict | GraphSize | None = None) -> list[Record]:
    """``n`` ProsQA records (fields and formatting as ``prosqa/valid.json``), deterministic in ``seed``.
    ``rung``: a graph size of the ladder (:data:`RUNGS`; default the real file's size)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    size = graph_size(rung)
    rng = random.Random(f"prosqa-{seed}" if size.is_real else f"prosqa-{seed}-{size.nodes}-{size.steps}")
    out: list[Record] = []
    hops = None
    while len(out) < n:
        # a smaller rung draws each record's path length uniformly from its range first, then retries until a graph
        # has it (short paths would dominate small graphs)
        if hops is None and not size.is_real:
            hops = rng.randint(*size.steps)
        rec = _try_question(rng, size if hops is None else dataclasses.replace(size, steps=(hops, hops)))
        if rec is not None:
            out.append(rec)
            hops = None
    return out


_FACT_RE = re.compile(r"(?:Every (\w+)|([A-Z]\w*)) is a (\w+)")
_QUERY_RE = re.compile(r"^Is ([A-Z]\w*) a (\w+) or (\w+)\?$")


def parse_prosqa_question(question: str) -> tuple[list[tuple[str, str, bool]], tuple[str, str, str]]:
    """Split a question into facts ``(subject, object, subject_is_person)`` and the query ``(name, X, Y)``."""
    body, sep, query = question.rpartition(" Is ")
    m = _QUERY_RE.match("Is " + query)
    if not sep or not m or not body.endswith("."):
        raise ValueError(f"not a ProsQA question: {question[-80:]!r}")
    facts = []
    for sentence in body[:-1].split(". "):
        f = _FACT_RE.fullmatch(sentence)
        if not f:
            raise ValueError(f"not a ProsQA fact: {sentence!r}")
        facts.append((f.group(1) or f.group(2), f.group(3), f.group(2) is not None))
    return facts, (m.group(1), m.group(2), m.group(3))


def verify_prosqa(record: Record) -> list[str]:
    """Check a record by graph search over the facts in its question; returns the problems (empty if sound).

    Checks: the answer's concept is reachable from the name and the other option is not; ``steps`` is a shortest
    chain of facts from the name to the answer; the graph fields agree with the facts.
    """
    problems: list[str] = []
    try:
        facts, (name, x, y) = parse_prosqa_question(record["question"])
    except ValueError as e:
        return [str(e)]
    children: dict[str, list[str]] = {}
    for s, o, _ in facts:
        children.setdefault(s, []).append(o)
    dist = {name: 0}
    q = deque([name])
    while q:
        u = q.popleft()
        for v in children.get(u, []):
            if v not in dist:
                dist[v] = dist[u] + 1
                q.append(v)
    if (x in dist) == (y in dist):
        problems.append(f"exactly one of {x}/{y} must be reachable from {name}")
    good = x if x in dist else y
    if record["answer"] != f"{name} is a {good}.":
        problems.append(f"answer {record['answer']!r} != {name} is a {good}.")
    fact_text = {(f"{s} is a {o}." if p else f"Every {s} is a {o}."): (s, o) for s, o, p in facts}
    chain = [fact_text.get(st) for st in record["steps"]]
    if None in chain or not chain or chain[0][0] != name or chain[-1][1] != good or any(
            a[1] != b[0] for a, b in zip(chain, chain[1:])):
        problems.append("steps are not a chain of facts from the name to the answer")
    elif good in dist and len(chain) != dist[good]:
        problems.append(f"steps have length {len(chain)}, shortest path is {dist[good]}")
    if "edges" in record:
        sym = record["idx_to_symbol"]
        if sorted((sym[a], sym[b]) for a, b in record["edges"]) != sorted((s, o) for s, o, _ in facts):
            problems.append("edges do not match the facts")
        if (sym[record["root"]], sym[record["target"]]) != (name, good) or sym[record["neg_target"]] not in (x, y):
            problems.append("root/target/neg_target do not match the question")
    return problems


def prosqa_stats(records: list[Record]) -> dict[str, list[float]]:
    """Per-record statistics: facts, steps, nodes, people, shortest-path count, reachable-from-root, ..."""
    out: dict[str, list[float]] = {k: [] for k in ("facts", "steps", "nodes", "people", "n_shortest",
                                                   "reach_root", "leaves", "root_is_1", "target_first")}
    for r in records:
        facts, (name, x, _) = parse_prosqa_question(r["question"])
        n = len(r["idx_to_symbol"])
        children, parents = graph_adjacency(r)
        dist = bfs_distances(children, r["root"])
        count: dict[int, int] = {}
        for v in sorted(dist, key=dist.get):
            count[v] = 1 if dist[v] == 0 else sum(count[p] for p in parents[v] if dist.get(p) == dist[v] - 1)
        out["facts"].append(len(facts))
        out["steps"].append(len(r["steps"]))
        out["nodes"].append(n)
        out["people"].append(sum(1 for v in range(n) if not parents[v]))
        out["n_shortest"].append(count[r["target"]])
        out["reach_root"].append(len(dist))
        out["leaves"].append(sum(1 for v in range(n) if not children[v]))
        out["root_is_1"].append(int(r["root"] == 1))
        out["target_first"].append(int(x == r["idx_to_symbol"][r["target"]]))
    return out
