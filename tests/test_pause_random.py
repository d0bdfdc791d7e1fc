"""Pause tokens with random insertion (pause-pretraining variant): layout, loss targets, spread, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from latent_jax.train.pipeline import epoch_dataset
from latent_jax.methods.base import uniform_example_stage as example_stage
from latent_jax.methods import IGNORE, build_method, method_config
from latent_jax.tokenizer import load_tokenizer

REC = {"question": "Every a is a b. Alex is a a. Is Alex a b or c?",
       "steps": ["Alex is a a.", "Every a is a b."], "answer": "Alex is a b."}


def method(**kw):
    return build_method("pause", load_tokenizer("gpt2"), **kw)


def test_default_layout_unchanged_and_prompt_unchanged():
    m = method(n_pause=3)
    tok = m.tok
    q, a = tok.encode(REC["question"] + "\n"), tok.encode("### " + REC["answer"]) + [tok.eos_id]
    ex = m.encode(REC, 0)
    assert ex.tokens == q + [m.pause_id] * 3 + a and ex.labels == [IGNORE] * (len(q) + 3) + a
    r = method(n_pause=3, random_insert=4)
    assert r.prompt(REC, 0) == m.prompt(REC, 0)  # inference: M pauses after the question, nothing else
    assert r.example_stage(REC, 5, 2, 0, 0, 0.0) != m.example_stage(REC, 5, 2, 0, 0, 0.0)
    for args in [(REC, 5, 2, 0, 0, 0.0), (REC, 7, 1, 0, 3, 0.5)]:  # R = 0: the pipeline default
        assert m.example_stage(*args) == example_stage(*args)


@pytest.mark.parametrize("R", [1, 5])
def test_random_insert_layout_and_loss_targets(R):
    plain, m = method(n_pause=2), method(n_pause=2, random_insert=R)
    base = plain.encode(REC, 0)
    P = base.latent_start  # question + M pauses
    for stage in range(20):
        ex = m.encode(REC, stage)
        tok, lab = np.array(ex.tokens), np.array(ex.labels)
        assert ex.latent_start == P and ex.tokens[:P] == base.tokens[:P] and ex.labels[:P] == base.labels[:P]
        is_pause = tok == m.pause_id
        assert is_pause.sum() == 2 + R and len(ex.tokens) == len(base.tokens) + R
        assert (lab[is_pause] == IGNORE).all() and m.pause_id not in ex.labels  # no loss for predicting a pause
        assert tok[~is_pause].tolist() == [t for t in base.tokens if t != m.pause_id]  # the real text, in order
        assert lab[~is_pause].tolist() == [t for t, x in zip(base.labels, base.tokens) if x != m.pause_id]
        assert ex.tokens[P] != m.pause_id and ex.tokens[-1] == m.tok.eos_id  # pauses strictly inside the target
        assert ex.labels[P] == ex.tokens[P]  # the appended pauses' last output still predicts the first target


def test_positions_spread_uniformly_and_deterministic():
    m = method(n_pause=1, random_insert=2)
    n_target = len(m.tok.encode("### " + REC["answer"])) + 1
    gaps = np.concatenate([m.insert_gaps(REC, s, n_target) for s in range(600)])
    counts = np.bincount(gaps, minlength=n_target)
    assert counts[0] == 0 and (counts[1:] > 0).all()  # every gap inside the target is used, never before it
    expected = len(gaps) / (n_target - 1)
    assert np.abs(counts[1:] - expected).max() < 0.25 * expected  # ~uniform (1200 draws over 6 gaps)
    assert m.encode(REC, 3) == method(n_pause=1, random_insert=2).encode(REC, 3)  # deterministic, new process-safe
    assert len({tuple(m.encode(REC, s).tokens) for s in range(10)}) > 3  # the draw id changes the layout
    other = {**REC, "answer": "Alex is a c."}
    assert [m.insert_gaps(REC, s, n_target).tolist() for s in range(5)] != \
        [m.insert_gaps(other, s, n_target).tolist() for s in range(5)]  # the record's text seeds the draw


def test_pipeline_gives_fresh_positions_each_epoch():
    m = method(n_pause=2, random_insert=3)
    recs = [{**REC, "answer": f"Alex is a {c}."} for c in "bcdefgh"]

    def layouts(epoch):
        (batch,) = list(epoch_dataset(m, recs, epoch=epoch, stage=0, seed=0, batch_size=8, bucket=16))
        rows = [tuple(t[k]) for t, k in zip(batch.tokens, batch.mask)][:len(recs)]
        assert ((batch.tokens == m.pause_id) & batch.mask).sum(1)[:len(recs)].tolist() == [5] * len(recs)
        assert not ((batch.labels == m.pause_id)).any()
        return sorted(rows)

    assert layouts(0) == layouts(0)  # deterministic in (seed, epoch, index)
    assert layouts(0) != layouts(1)  # but re-drawn every epoch


def test_config_errors():
    for bad in [dict(random_insert=-1), dict(random_insert=1.5), dict(random_insert=True), dict(n_pause=0)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            method_config("pause", **bad)
    assert method_config("pause", random_insert=3).random_insert == 3
