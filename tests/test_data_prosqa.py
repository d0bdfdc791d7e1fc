"""ProsQA generator: statistics against the real file, verifier on real and generated records, speed."""
import json
import statistics
import time

import pytest

from latent_jax.data import generate_prosqa, prosqa_stats, read_json_records, verify_prosqa
from latent_jax.data.vocab import PROSQA_CONCEPTS, PROSQA_NAMES

N_GEN = 20000


@pytest.fixture(scope="module")
def real(shared_dir):
    return read_json_records(shared_dir / "data/prosqa/valid.json")


@pytest.fixture(scope="module")
def generated():
    start = time.perf_counter()
    records = generate_prosqa(N_GEN, seed=0)
    return records, time.perf_counter() - start


def test_20k_generate_all_and_distinct(generated):
    """(The time is printed by `latent-jax data stats`, never asserted: this CPU is shared.)"""
    records, _ = generated
    assert len(records) == N_GEN and len({r["question"] for r in records}) > 0.99 * N_GEN


def test_real_records_pass_the_verifier(real):
    assert len(real) == 300
    assert [p for r in real for p in verify_prosqa(r)] == []


def test_generated_records_pass_the_verifier(generated):
    records, _ = generated
    problems = [(i, p) for i, r in enumerate(records[:5000]) for p in verify_prosqa(r)]
    assert problems == []


def test_verifier_catches_wrong_records(real):
    rec = dict(real[0])
    sym = rec["idx_to_symbol"]
    name, neg = sym[rec["root"]], sym[rec["neg_target"]]
    assert verify_prosqa({**rec, "answer": f"{name} is a {neg}."})
    # make the distractor reachable: add "<name> is a <neg>." to the facts
    body, query = rec["question"].rsplit(" Is ", 1)
    assert verify_prosqa({**rec, "question": f"{body} {name} is a {neg}. Is {query}"})
    assert verify_prosqa({**rec, "steps": rec["steps"][:-1]})
    assert verify_prosqa({**rec, "steps": rec["steps"][::-1]})


@pytest.mark.parametrize("key", ["facts", "steps", "nodes", "people", "leaves", "n_shortest", "reach_root",
                                 "root_is_1", "target_first"])
def test_statistics_match_the_real_file(real, generated, key):
    from scipy.stats import ks_2samp

    r, g = prosqa_stats(real)[key], prosqa_stats(generated[0][:5000])[key]
    assert ks_2samp(r, g).pvalue > 0.01, (key, statistics.mean(r), statistics.mean(g))


def test_means_and_ranges(real, generated):
    r, g = prosqa_stats(real), prosqa_stats(generated[0])
    for key, tol in (("facts", 1.0), ("steps", 0.1), ("nodes", 0.4)):
        assert abs(statistics.mean(r[key]) - statistics.mean(g[key])) < tol, key
        assert min(r[key]) <= min(g[key]) and max(g[key]) <= max(r[key]), key  # never outside the real range
    # the published mean statistics of the real file
    assert round(statistics.mean(r["facts"]), 1) == 36.3 and round(statistics.mean(r["steps"]), 2) == 3.75


def test_format_and_vocabulary(real, generated):
    records = generated[0]
    assert all(list(r) == list(real[0]) for r in records[:1000])  # same fields, same order
    names = {r["idx_to_symbol"][r["root"]] for r in records}
    words = {s for r in records for s in r["idx_to_symbol"] if s[0].islower()}
    real_names = {r["idx_to_symbol"][r["root"]] for r in real}
    real_words = {s for r in real for s in r["idx_to_symbol"] if s[0].islower()}
    assert names == set(PROSQA_NAMES) == real_names
    assert words == set(PROSQA_CONCEPTS) == real_words
    assert {r["question"] for r in records}.isdisjoint(r["question"] for r in real)
    json.dumps(records[0])


def _concordance(record):
    """Fraction of fact pairs that appear in the question in the same order as in ``edges`` (0.5 = shuffled)."""
    sym = record["idx_to_symbol"]
    people = {a for a, _ in record["edges"]} - {b for _, b in record["edges"]}
    text = [f"{sym[a]} is a {sym[b]}." if a in people else f"Every {sym[a]} is a {sym[b]}." for a, b in record["edges"]]
    facts = [f + "." for f in record["question"].rsplit(" Is ", 1)[0][:-1].split(". ")]
    pos = [facts.index(t) for t in text]
    pairs = [(i, j) for i in range(len(pos)) for j in range(i + 1, len(pos))]
    return sum(pos[i] < pos[j] for i, j in pairs) / len(pairs)


def test_facts_are_shuffled_like_the_real_file(real, generated):
    r = statistics.mean(_concordance(x) for x in real)
    g = statistics.mean(_concordance(x) for x in generated[0][:500])
    assert abs(r - 0.5) < 0.03 and abs(g - 0.5) < 0.03


def test_deterministic_and_bad_input():
    assert generate_prosqa(30, seed=5) == generate_prosqa(30, seed=5)
    assert generate_prosqa(30, seed=5) != generate_prosqa(30, seed=6)
    with pytest.raises(ValueError):
        generate_prosqa(-1)
