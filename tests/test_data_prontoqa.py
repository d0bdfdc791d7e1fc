"""ProntoQA generator: statistics against the real file and a verifier that proves the answer."""
import statistics

import pytest

from latent_jax.data import (generate_prontoqa, parse_prontoqa_question, prontoqa_stats, read_json_records,
                             verify_prontoqa)
from latent_jax.data.vocab import PRONTOQA_CONCEPTS, PRONTOQA_NAMES, PRONTOQA_PROPERTY_FAMILIES


@pytest.fixture(scope="module")
def real(shared_dir):
    return read_json_records(shared_dir / "data/prontoqa/valid.json")


@pytest.fixture(scope="module")
def generated():
    return generate_prontoqa(5000, seed=0)


def test_real_records_pass_the_verifier(real):
    assert len(real) == 200
    assert [p for r in real for p in verify_prontoqa(r)] == []


def test_generated_records_pass_the_verifier(generated):
    assert [(i, p) for i, r in enumerate(generated) for p in verify_prontoqa(r)] == []


def test_verifier_catches_wrong_records(real):
    rec = real[0]
    flipped = "False" if rec["answer"] == "True" else "True"
    assert verify_prontoqa({**rec, "answer": flipped})
    # flip the polarity of the deciding fact (the rule in the fifth step) in the question
    rule = rec["steps"][4].split(". ", 1)[1]
    if " not " in rule:
        negated = rule.replace(" not ", " ")
    else:
        negated = rule.replace(" are ", " are not ").replace(" is ", " is not ")
    assert verify_prontoqa({**rec, "question": rec["question"].replace(rule, negated)})
    assert verify_prontoqa({**rec, "steps": rec["steps"][1:]})


@pytest.mark.parametrize("key", ["sentences", "steps", "symbols", "edges", "answer_true", "query_not",
                                 "negated_rules", "plural_rules"])
def test_statistics_match_the_real_file(real, generated, key):
    from scipy.stats import ks_2samp

    r, g = prontoqa_stats(real)[key], prontoqa_stats(generated)[key]
    assert ks_2samp(r, g).pvalue > 0.01, (key, statistics.mean(r), statistics.mean(g))
    assert min(r) <= statistics.mean(g) <= max(r)


def test_structure_matches_the_real_file(real, generated):
    for records in (real, generated[:1000]):
        for r in records:
            rules, types, (name, prop, _) = parse_prontoqa_question(r["question"])
            sym = r["idx_to_symbol"]
            assert sym[0] == name and sym[1:6] == r["chain_concepts"] and sym[6:] == sorted(sym[6:])
            assert (r["root"], r["target"], r["neg_target"]) == (0, 5, 6)
            isa = {(s, o) for s, o, _ in rules if o in PRONTOQA_CONCEPTS}
            assert {(sym[a], sym[b]) for a, b in r["edges"]} == {(s, o) for s, o in isa if s in sym and o in sym}
            assert len(rules) == 23 and len(isa) == 11 and len(types) == 2
            fams = [next(i for i, f in enumerate(PRONTOQA_PROPERTY_FAMILIES) if o in f)
                    for _, o, _ in rules if o not in PRONTOQA_CONCEPTS]
            assert len(fams) == 12 and len(set(fams)) == 11
    assert {r["idx_to_symbol"][0] for r in generated} == set(PRONTOQA_NAMES) == {r["idx_to_symbol"][0] for r in real}
    assert list(generated[0]) == list(real[0])


def test_deterministic_and_disjoint(real):
    assert generate_prontoqa(20, seed=1) == generate_prontoqa(20, seed=1)
    assert generate_prontoqa(20, seed=1) != generate_prontoqa(20, seed=2)
    assert {r["question"] for r in generate_prontoqa(2000, seed=3)}.isdisjoint(r["question"] for r in real)
