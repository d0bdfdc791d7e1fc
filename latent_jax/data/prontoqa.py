"""ProntoQA (5 hops, with distractors, as in ``prontoqa/valid.json``): generator, verifier and statistics.

Every real question has the same shape, which the generator reproduces:

* a chain ``c0 -> c1 -> c2 -> c3 -> c4`` of concepts; each ``c_i`` (i < 4) has one more child ``side_i``, ``c4``
  has two (``side4a`` with a property, ``side4b`` without); the person is a ``c0`` and a ``dtype`` (a distractor
  type with one child ``dchild``); a distractor concept ``qdis`` has the queried property with the opposite
  polarity to ``c4``. 14 distinct concepts, 11 is-a facts, 12 property facts (one property family each, except
  that ``qdis`` repeats ``c4``'s), shuffled, then the two facts about the person in random order;
* the question ``True or false: Name is [not] prop.``; six steps ``Name is a c_i. <fact>`` and ``Name is [not]
  prop.``; answer ``True``/``False``;
* ``idx_to_symbol`` = name, the chain, then the other concepts sorted, where ``side4b`` and ``dchild`` are each
  listed (with their edge) with probability 1/2; ``edges`` are the listed is-a facts in random order; ``root`` 0,
  ``target`` 5, ``neg_target`` 6; ``chain_concepts`` the chain.
"""
from __future__ import annotations

import random
import re

from .records import Record
from .vocab import PRONTOQA_CONCEPTS, PRONTOQA_NAMES, PRONTOQA_PROPERTY_FAMILIES, article, plural

# Probability that a property fact is negated, by role (measured on prontoqa/valid.json).
_NEG = {"chain": 0.265, "c4": 0.5, "side": 1 / 3, "dtype": 0.35}
HOPS = 5


def _isa(rng: random.Random, a: str, b: str) -> str:
    u = rng.random()
    if u < 0.5:
        return f"{plural(a).capitalize()} are {plural(b)}."
    return f"{'Every' if u < 0.75 else 'Each'} {a} is {article(b)} {b}."


def _prop(rng: random.Random, a: str, p: str, neg: bool) -> str:
    u, no = rng.random(), "not " if neg else ""
    if u < 0.5:
        return f"{plural(a).capitalize()} are {no}{p}."
    return f"{'Every' if u < 0.75 else 'Each'} {a} is {no}{p}."


def _one(rng: random.Random) -> Record:
    name = rng.choice(PRONTOQA_NAMES)
    words = rng.sample(PRONTOQA_CONCEPTS, 14)
    chain, sides, side4a, side4b, dtype, dchild, qdis = words[:5], words[5:9], words[9], words[10], words[11], \
        words[12], words[13]
    families = rng.sample(PRONTOQA_PROPERTY_FAMILIES, 11)
    props = [rng.choice(f) for f in families]
    isa_pairs = [(chain[i], chain[i + 1]) for i in range(HOPS - 1)] + list(zip(chain[:4], sides)) + [
        (chain[4], side4a), (chain[4], side4b), (dtype, dchild)]
    isa_text = {pair: _isa(rng, *pair) for pair in isa_pairs}
    owners = chain + sides + [side4a, dtype]
    roles = ["chain"] * 4 + ["c4"] + ["side"] * 5 + ["dtype"]
    negs = [rng.random() < _NEG[role] for role in roles]
    prop_facts = [_prop(rng, c, p, n) for c, p, n in zip(owners, props, negs)]
    qprop, c4_neg = props[4], negs[4]
    prop_facts.append(_prop(rng, qdis, qprop, not c4_neg))
    facts = list(isa_text.values()) + prop_facts
    rng.shuffle(facts)
    person = [f"{name} is {article(chain[0])} {chain[0]}.", f"{name} is {article(dtype)} {dtype}."]
    rng.shuffle(person)
    q_neg = rng.random() < 0.5
    steps = [f"{name} is {article(chain[i])} {chain[i]}. {isa_text[(chain[i], chain[i + 1])]}" for i in range(4)]
    steps.append(f"{name} is {article(chain[4])} {chain[4]}. {prop_facts[4]}")
    steps.append(f"{name} is {'not ' if c4_neg else ''}{qprop}.")
    listed = sides + [side4a, dtype, qdis] + [w for w in (side4b, dchild) if rng.random() < 0.5]
    sym = [name] + chain + sorted(listed)
    index = {s: i for i, s in enumerate(sym)}
    edges = [[index[a], index[b]] for a, b in isa_pairs if a in index and b in index]
    rng.shuffle(edges)
    return {"question": " ".join(facts + person) + f" True or false: {name} is {'not ' if q_neg else ''}{qprop}.",
            "steps": steps, "answer": "True" if q_neg == c4_neg else "False", "idx_to_symbol": sym,
            "edges": edges, "root": 0, "target": HOPS, "neg_target": HOPS + 1, "chain_concepts": chain}


def generate_prontoqa(n: int, seed: int = 0) -> list[Record]:
    """``n`` ProntoQA records (fields and formatting as ``prontoqa/valid.json``), deterministic in ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"prontoqa-{seed}")
    return [_one(rng) for _ in range(n)]


_SINGULAR = {plural(c): c for c in PRONTOQA_CONCEPTS}
_RULE = re.compile(r"(?:(?:Every|Each) (\w+) is|(\w+) are) (not )?(?:an? )?(\w+)")
_PERSON = re.compile(r"([A-Z]\w*) is (?:an? )?(\w+)")


def parse_prontoqa_question(question: str) -> tuple[list[tuple[str, str, bool]], list[str], tuple[str, str, bool]]:
    """Split a question into rules ``(concept, concept-or-property, negated)``, the person's concepts and the
    query ``(name, property, negated)``."""
    body, sep, query = question.partition(" True or false: ")
    qm = re.fullmatch(r"([A-Z]\w*) is (not )?(\w+)\.", query)
    if not sep or not qm or not body.endswith("."):
        raise ValueError(f"not a ProntoQA question: {question[-80:]!r}")
    name = qm.group(1)
    rules, types = [], []
    for sentence in body[:-1].split(". "):
        pm = _PERSON.fullmatch(sentence)
        if pm and pm.group(1) == name:
            types.append(pm.group(2))
            continue
        rule = parse_prontoqa_rule(sentence)
        if rule is None:
            raise ValueError(f"not a ProntoQA sentence: {sentence!r}")
        rules.append(rule)
    return rules, types, (name, qm.group(3), qm.group(2) is not None)


def parse_prontoqa_rule(sentence: str) -> tuple[str, str, bool] | None:
    """``(concept, concept-or-property, negated)`` of one rule sentence (``Every tumpus is a gorpus``, ``Tumpuses
    are not hot``; a final period is allowed), in singular form; None if the sentence is not a rule."""
    m = _RULE.fullmatch(sentence.strip().removesuffix("."))
    if not m:
        return None
    subj = m.group(1) or _SINGULAR.get(m.group(2).lower(), m.group(2).lower())
    obj = m.group(4) if m.group(1) else _SINGULAR.get(m.group(4), m.group(4))
    return subj, obj, m.group(3) is not None


def verify_prontoqa(record: Record) -> list[str]:
    """Prove the answer from the facts by forward chaining; returns the problems (empty if sound).

    Checks: exactly one polarity of the queried property is derivable for the person, the answer is its truth
    value, every step's rule sentence is a fact of the question and the steps follow the derivation.
    """
    try:
        rules, types, (name, prop, q_neg) = parse_prontoqa_question(record["question"])
    except ValueError as e:
        return [str(e)]
    concepts = set(PRONTOQA_CONCEPTS)
    known, frontier = set(types), list(types)
    while frontier:
        c = frontier.pop()
        for s, o, neg in rules:
            if s == c and o in concepts and not neg and o not in known:
                known.add(o)
                frontier.append(o)
    derived = {neg for s, o, neg in rules if s in known and o == prop}
    problems = []
    if len(derived) != 1:
        return [f"{'both polarities' if derived else 'no polarity'} of {prop!r} derivable for {name}"]
    truth = "True" if derived == {q_neg} else "False"
    if record["answer"] != truth:
        problems.append(f"answer {record['answer']!r} but the facts prove {truth}")
    sentences = set(record["question"].split(" True or false: ")[0][:-1].split(". "))
    cur = None
    for i, step in enumerate(record["steps"][:-1]):
        m = re.fullmatch(r"([A-Z]\w*) is (?:an? )?(\w+)\. (.+)\.", step)
        if not m or m.group(1) != name or m.group(3) not in sentences:
            problems.append(f"step {i} is not 'Name is a X. <fact>': {step!r}")
            break
        rule = parse_prontoqa_rule(m.group(3))
        if rule is None or rule[0] != m.group(2) or (cur is not None and cur != m.group(2)) \
                or (i == 0 and m.group(2) not in types):
            problems.append(f"step {i} does not follow the chain: {step!r}")
            break
        cur = rule[1]
    final = f"{name} is {'not ' if True in derived else ''}{prop}."
    if not record["steps"] or record["steps"][-1] != final:
        problems.append(f"last step should be {final!r}")
    return problems


def prontoqa_stats(records: list[Record]) -> dict[str, list[float]]:
    """Per-record statistics: sentences, steps, symbols, edges, answer, negations, sentence templates."""
    out: dict[str, list[float]] = {k: [] for k in ("sentences", "steps", "symbols", "edges", "answer_true",
                                                   "query_not", "negated_rules", "plural_rules")}
    for r in records:
        rules, types, (_, _, q_neg) = parse_prontoqa_question(r["question"])
        body = r["question"].split(" True or false: ")[0]
        out["sentences"].append(len(rules) + len(types))
        out["steps"].append(len(r["steps"]))
        out["symbols"].append(len(r["idx_to_symbol"]))
        out["edges"].append(len(r["edges"]))
        out["answer_true"].append(int(r["answer"] == "True"))
        out["query_not"].append(int(q_neg))
        out["negated_rules"].append(sum(neg for _, _, neg in rules))
        out["plural_rules"].append(sum(1 for s in body[:-1].split(". ") if " are " in s))
    return out
