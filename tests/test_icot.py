"""iCoT-SI (stepwise internalization): schedule vs the reference loop, optimizer resets in the real trainer,
removal smoothing distribution, layouts at several removal counts, prompts without CoT, config errors, and a
tiny end-to-end `run_train`."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import optax
import pytest

from latent_jax import trainer as trainer_mod
from latent_jax.compact_vocab import CompactTokenizer
from latent_jax.data.multiplication import generate_multiplication
from latent_jax.methods import build_method, method_config
from latent_jax.methods.base import IGNORE
from latent_jax.methods.icot import REMOVE_ALL, ICoTSI, ICoTSIConfig
from latent_jax.tokenizer import load_tokenizer


def texts_of(records):
    """Every piece either separator encodes, so one compact vocabulary serves both layouts."""
    out = []
    for r in records:
        out += [r["question"] + "\n", *(s + "\n" for s in r["steps"]), "###", " " + r["answer"],
                f" {r['question']} ", f" {' '.join(r['steps'])} ", f" #### {r['answer']} "]
    return out


@pytest.fixture(scope="module")
def records():
    return generate_multiplication(16, n_digits=2, seed=0)


@pytest.fixture(scope="module")
def tok(records):
    return CompactTokenizer.from_texts(load_tokenizer("gpt2"), texts_of(records))


def make(tok, **kw) -> ICoTSI:
    return build_method("icot_si", tok, **kw)


def reference_counts(S: int, rpe: float, epochs: int, start: int = 0, K: float = math.inf,
                     pretrain: int = 0) -> list[float]:
    """Deng et al. `src/train.py` removal schedule, transcribed as the stateful loop it is."""
    per_token = int(round(S / rpe))
    counter, n, out = 0, start, []
    for epoch in range(epochs):
        if n >= K:
            n = math.inf
        for _ in range(S):
            if counter == per_token or per_token == 0:
                n, counter = n + 1, 0
            if epoch >= pretrain:
                counter += 1
            if n >= K:
                n = math.inf
            out.append(n)
    return out


@pytest.mark.parametrize("S,rpe,start,K,pre", [(100, 8, 0, None, 0), (25, 8, 0, None, 0), (7, 2, 3, None, 0),
                                               (3, 8, 0, None, 0), (50, 8, 0, 13, 0), (10, 1.5, 0, 4, 0),
                                               (4, 8, 0, 0, 0), (1000, 8, 0, 39, 0), (100, 8, 0, None, 2),
                                               (7, 2, 3, 9, 1), (3, 8, 0, None, 1)])
def test_schedule_matches_reference_loop(tok, S, rpe, start, K, pre):
    m = make(tok, remove_per_epoch=rpe, remove_start_from=start, remove_all_beyond=K, pretrain_epochs=pre)
    ours = [m.scheduled_removal(e, s, S) for e in range(4) for s in range(S)]
    assert ours == reference_counts(S, rpe, 4, start, math.inf if K is None else K, pre)
    if pre:
        assert set(ours[:pre * S]) == {start} or rpe * 2 > S  # explicit CoT until the removal starts
    stages = [m.schedule(e, s, S) for e in range(4) for s in range(S)]
    assert stages == [min(n, K) if K is not None else n for n in ours] and all(isinstance(x, int) for x in stages)


def test_schedule_values(tok):
    m = make(tok)  # remove_per_epoch 8
    # S = 100: R = round(12.5) = 12 (half to even), so epochs drift from 8 per epoch: 8, 16, 25
    assert [m.schedule(e, 0, 100) for e in range(4)] == [0, 8, 16, 25]
    assert [m.schedule(0, s, 100) for s in (11, 12, 23, 24, 99)] == [0, 1, 1, 2, 8]
    assert [m.schedule(0, s, 96) for s in (0, 11, 12, 95)] == [0, 0, 1, 7] and m.schedule(1, 0, 96) == 8
    assert [m.schedule(0, s, 2) for s in range(2)] + [m.schedule(1, 0, 2)] == [1, 2, 3]  # R = 0: +1 each step
    assert not m.eligible_for_best(10 ** 6)  # no cap known yet: nothing counts as "all CoT removed"
    m.max_cot_tokens = 20  # prepare_data's cap: beyond the longest CoT the stage stops growing
    assert [m.eligible_for_best(s) for s in (0, 19, 20)] == [False, False, True]
    assert m.schedule(2, 60, 96) == 20 and m.scheduled_removal(2, 60, 96) == 21 and m.schedule(2, 40, 96) == 19
    k = make(tok, remove_all_beyond=10)
    assert k.scheduled_removal(1, 24, 96) == math.inf and k.schedule(1, 24, 96) == 10
    assert k.scheduled_removal(1, 23, 96) == 9


def test_prepare_data_longest_cot(tok, records):
    for sep in ("newline", "eos"):
        m = make(tok, separator=sep)
        m.prepare_data(records, None)
        assert m.max_cot_tokens == max(len(m._cot_tokens(tuple(r["steps"]))) for r in records) > 5


@pytest.mark.parametrize("lam,max_off", [(4.0, 99), (1.0, 99), (0.5, 3)])
def test_smoothing_distribution_by_sampling(tok, lam, max_off):
    m = make(tok, smoothing_lambda=lam, max_smoothing_offset=max_off)
    q = math.exp(-lam)
    expect = np.array([(1 - q) * q ** o for o in range(max_off)] + [q ** max_off])  # truncated geometric
    np.testing.assert_allclose(m.offset_probs, expect, rtol=1e-9, atol=1e-15)
    n = 20_000
    draws = np.array([m.sample_offset(seed=1, epoch=2, index=i) for i in range(n)])
    assert draws.min() >= 0 and draws.max() <= max_off
    freq = np.bincount(draws, minlength=max_off + 1)[:max_off + 1] / n
    tol = 5 * np.sqrt(expect * (1 - expect) / n) + 1e-3  # 5 sigma of a binomial frequency
    assert np.all(np.abs(freq - expect) <= tol), (freq[:5], expect[:5])
    # deterministic in (seed, epoch, index); a new epoch redraws
    again = [m.sample_offset(1, 2, i) for i in range(200)]
    assert again == draws[:200].tolist() and again != [m.sample_offset(1, 3, i) for i in range(200)]
    # example_stage = scheduled count + the offset of (seed, epoch, record index)
    per_example = [m.example_stage({}, i, 2, 5, 1, 0.0) for i in range(200)]
    assert per_example == [5 + o for o in again] and per_example != [m.example_stage({}, i, 3, 5, 1, 0.0)
                                                                      for i in range(200)]


def test_smoothing_edges(tok):
    for kw in (dict(smoothing_lambda="inf"), dict(smoothing_lambda=math.inf), dict(smoothing=False)):
        m = make(tok, **kw)
        assert {m.sample_offset(0, 0, i) for i in range(500)} == {0}
        assert m.example_stage({}, 3, 0, 7, 0, 0.0) == 7
    zero = make(tok, smoothing_lambda=0, max_smoothing_offset=5)  # reference limit: all mass on the max offset
    assert {zero.sample_offset(0, 0, i) for i in range(500)} == {5}
    m = make(tok, smoothing_lambda=4)
    assert any(m.example_stage({}, i, 0, 7, 0, 0.0) > 7 for i in range(2000))
    with pytest.raises(ValueError, match="uniform_prob"):
        m.example_stage({}, 0, 0, 7, 0, 0.5)


def test_encode_layout_removes_from_the_left(tok, records):
    r = records[3]
    for sep in ("newline", "eos"):
        m = make(tok, separator=sep)
        q, cot = list(m._question(r["question"])), list(m._cot_tokens(tuple(r["steps"])))
        ans = m._answer(r["answer"])
        assert len(cot) > 6
        for n in (0, 1, 5, len(cot) - 1, len(cot), len(cot) + 7, REMOVE_ALL):
            e = m.encode(r, n)
            assert e.tokens == q + cot[n:] + ans and e.n_latent == 0 and e.latent_start == len(q)
            assert e.labels == [IGNORE] * len(q) + cot[n:] + ans
        full = tok.decode(m.encode(r, 0).tokens)
        if sep == "newline":
            assert full == r["question"] + "\n" + "".join(s + "\n" for s in r["steps"]) + "### " + r["answer"] + \
                tok.decode([tok.eos_id])
        else:  # the reference text, Deng et al. data.py
            eos = tok.decode([tok.eos_id])
            assert full == f" {r['question']} {eos} {' '.join(r['steps'])} {eos} #### {r['answer']} {eos}"
            assert m.encode(r, REMOVE_ALL).tokens.count(tok.eos_id) == 3
        assert tok.decode(m.encode(r, 2).tokens[len(q):]) == tok.decode(cot[2:] + ans)
    with pytest.raises(ValueError, match=">= 0"):
        m.encode(r, -1)


def test_no_smoothing_offset_during_pretrain_epochs(tok):
    """Reference: `if epoch < args.pretrain_epoch: to_remove.fill_(args.remove_start_from)` (no offset)."""
    m = make(tok, pretrain_epochs=2, smoothing_lambda=0.5, remove_start_from=1)
    assert {m.example_stage({}, i, e, 1, 0, 0.0) for i in range(300) for e in (0, 1)} == {1}
    assert max(m.example_stage({}, i, 2, 1, 0, 0.0) for i in range(300)) > 1  # offsets from the first removal epoch


def test_remove_all_beyond(tok, records):
    r = records[0]
    m = make(tok, remove_all_beyond=4, smoothing=False)
    n_cot = len(m._cot_tokens(tuple(r["steps"])))
    assert n_cot > 5
    assert m.example_stage(r, 0, 0, 3, 0, 0.0) == 3 and m.example_stage(r, 0, 0, 4, 0, 0.0) == REMOVE_ALL
    assert m.encode(r, m.example_stage(r, 0, 0, 4, 0, 0.0)).tokens == m.encode(r, n_cot).tokens
    # with smoothing, count K-1 plus an offset removes K-1+o tokens, not all (reference semantics)
    s = make(tok, remove_all_beyond=4, smoothing_lambda=0.1)
    assert {s.example_stage(r, i, 0, 3, 0, 0.0) for i in range(50)} - {3} and \
        all(3 <= s.example_stage(r, i, 0, 3, 0, 0.0) < REMOVE_ALL for i in range(50))


def test_prompt_has_no_cot(tok, records):
    for sep in ("newline", "eos"):
        m = make(tok, separator=sep)
        for r in records[:4]:
            p = m.prompt(r, 0)
            assert p.n_latent == 0 and not p.suffix
            assert all(m.prompt(r, s) == p for s in (1, 5, 1000))
            # the prompt is exactly the fully internalized training sequence up to the answer text
            full = m.encode(r, REMOVE_ALL).tokens
            assert full[:len(p.prefix)] == p.prefix
            answer_text = tok.decode(full[len(p.prefix):-1]).strip()  # what generation must produce
            assert answer_text == (r["answer"] if sep == "newline" else "#### " + r["answer"])
            assert full[-1] == tok.eos_id
            text = tok.decode(p.prefix)
            assert r["steps"][0] not in text and r["question"] in text
    assert make(tok).init_token_id() == tok.eos_id and make(tok).num_stages() == 1 and make(tok).special_tokens == ()


@pytest.mark.parametrize("bad,match", [
    (dict(remove_per_epoch=0), "remove_per_epoch"), (dict(remove_per_epoch=-8), "remove_per_epoch"),
    (dict(remove_per_epoch="fast"), "remove_per_epoch"), (dict(remove_per_epoch="inf"), "remove_per_epoch"),
    (dict(smoothing_lambda=-1), "smoothing_lambda"), (dict(smoothing_lambda=float("nan")), "smoothing_lambda"),
    (dict(remove_all_beyond=-1), "remove_all_beyond"), (dict(remove_all_beyond=2.5), "remove_all_beyond"),
    (dict(max_smoothing_offset=-1), "max_smoothing_offset"), (dict(remove_start_from=-2), "remove_start_from"),
    (dict(pretrain_epochs=-1), "pretrain_epochs"),
    (dict(separator="space"), "separator"), (dict(smoothing="yes"), "smoothing"), (dict(lambda_=4), "unknown")])
def test_bad_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        method_config("icot_si", **bad)


def test_config_accepts_inf_and_yaml(tmp_path):
    from latent_jax.experiment import load_config

    c = method_config("icot_si", remove_all_beyond="inf", smoothing_lambda="inf", remove_per_epoch=8)
    assert c.remove_all_beyond is None and c.smoothing_lambda == math.inf and c.remove_per_epoch == 8.0
    assert ICoTSIConfig(remove_all_beyond=39).remove_all_beyond == 39
    cfg = load_config("multiplication_icot_si_cpu", ["method.remove_all_beyond=.inf"])
    assert cfg["method"]["name"] == "icot_si"
    with pytest.raises(ValueError, match="remove_per_epoch"):
        load_config("multiplication_icot_si_cpu", ["method.remove_per_epoch=0"])


def tiny_run_config(out, *overrides: str):
    """The CPU multiplication config shrunk to seconds: 24 records, batch 4, 2 epochs, a 1-layer d=32 model."""
    from latent_jax.experiment import load_config

    return load_config("multiplication_icot_si_cpu", [
        "data.train_n=24", "data.valid_n=8", "train.epochs=2", "train.batch_size=4", "train.progress=false",
        "method.remove_per_epoch=2", "model.overrides.n_layers=1", "model.overrides.d_model=32",
        "model.overrides.n_heads=2", "model.overrides.n_kv_heads=2", "model.overrides.head_dim=16",
        "model.overrides.d_ff=64", "eval.batch_size=8", "eval.max_new_tokens=12", f"output_dir={out}", *overrides])


def test_run_train_end_to_end_and_optimizer_resets(tmp_path, monkeypatch):
    """Tiny `run_train` (train -> eval -> export). 24 records, batch 4 -> S = 6 steps/epoch; remove_per_epoch 2
    -> a token every R = 3 steps: counts 0,0,0,1,1,1,2,2,2,3,3,3; remove_all_beyond 3 caps the stage there.
    AdamW is re-initialised exactly before the steps whose count grew (the real trainer, resets counted)."""
    from latent_jax.experiment import run_train

    real_opt, real_step, events = trainer_mod.make_optimizer, trainer_mod.train_step, []

    def counting_optimizer(*a, **k):  # the trainer's initial state and its resets
        tx = real_opt(*a, **k)

        def init(p):
            events.append("reset")
            return tx.init(p)
        return optax.GradientTransformation(init, tx.update)

    def counting_step(*a, **k):  # one optimizer step (latent_jax.train.step)
        events.append("step")
        return real_step(*a, **k)

    monkeypatch.setattr(trainer_mod, "make_optimizer", counting_optimizer)
    monkeypatch.setattr(trainer_mod, "train_step", counting_step)
    out = tmp_path / "run"
    res = run_train(tiny_run_config(out, "method.remove_all_beyond=3"), progress=False)
    assert res["method"] == "icot_si" and res["eval_stage"] == 0 and res["valid_records"] == 8
    assert 0 <= res["accuracy"] <= 1 and 1 <= res["mean_generated_tokens"] <= 12 and len(res["history"]) == 2
    assert json.loads((out / "result.json").read_text())["accuracy"] == res["accuracy"]
    rows = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    stages = [x["stage"] for x in rows if "loss" in x]
    assert stages == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # the removal count, logged per optimizer step
    assert all(math.isfinite(x["loss"]) for x in rows if "loss" in x)
    expected = ["reset"]  # the initial optimizer state, then one reset before each step whose count grew
    for i, s in enumerate(stages):
        expected += ["reset"] * (i > 0 and s != stages[i - 1]) + ["step"]
    assert events == expected and events.count("reset") == 4


# ---- keep_position (reference `--keep_position`) -----------------------------------------------------------------
def test_keep_position_layout_and_prompt(tok, records):
    """Every kept token sits at its position in the full (stage 0) sequence; the prompt's answer marker sits where
    training puts it once the whole CoT is removed. Off (the default): no shift anywhere."""
    from latent_jax.layout import Example

    r = records[5]
    for sep in ("newline", "eos"):
        m, plain = make(tok, separator=sep, keep_position=True), make(tok, separator=sep)
        q, cot = list(m._question(r["question"])), list(m._cot_tokens(tuple(r["steps"])))
        Q, L, n_full = len(q), len(cot), len(m.encode(r, 0).tokens)
        for n in (0, 1, 5, L - 1, L, L + 7, REMOVE_ALL):
            e, k = m.encode(r, n), min(n, L)
            assert e.tokens == plain.encode(r, n).tokens and e.position_shift == k
            assert e.positions().tolist() == [i for i in range(n_full) if not Q <= i < Q + k]
            assert plain.encode(r, n).position_shift == 0 and plain.encode(r, n).positions().tolist() == \
                list(range(len(e.tokens)))
        p, full = m.prompt(r, 3), m.encode(r, REMOVE_ALL)
        assert p.prefix == q and p.suffix == list(m.answer_marker) and p.position_shift == L and p.n_latent == 0
        assert p.prefix + p.suffix == full.tokens[:Q + len(p.suffix)]
        assert all(m.prompt(r, s) == p for s in (0, 1000))
        assert plain.prompt(r, 3).position_shift == 0 and plain.prompt(r, 3).prefix == q + list(m.answer_marker)
    with pytest.raises(ValueError, match="position_shift"):
        Example([1, 2, 3], [IGNORE, 2, 3], latent_start=1, position_shift=-1)
    with pytest.raises(ValueError, match="keep_position"):
        method_config("icot_si", keep_position="yes")


def test_keep_position_collate_loss_and_generation(tok, records):
    """Batches carry the shifted position ids (right-padded and aligned layouts); the latent loop's loss equals
    per-row full forwards with those ids written by hand and differs from the unshifted loss; generation from a
    shifted prompt equals a naive uncached greedy loop with explicit positions."""
    import jax.numpy as jnp

    from latent_jax.latent import loss_fn
    from latent_jax.layout import collate, token_loss
    from latent_jax.generate import SamplingConfig
    from latent_jax.models import forward, init_model
    from latent_jax.testing import naive_latent_greedy, tiny_config

    m, plain = make(tok, keep_position=True), make(tok)
    rows = [(records[i], n) for i, n in ((0, 0), (1, 2), (2, 5), (3, REMOVE_ALL))]
    exs = [m.encode(r, n) for r, n in rows]
    b = collate(exs, tok.eos_id, bucket=8)
    for i, e in enumerate(exs):
        assert b.extra["positions"][i, :len(e.tokens)].tolist() == e.positions().tolist()
        assert not b.extra["positions"][i, len(e.tokens):].any()
    aligned = collate(exs, tok.eos_id, bucket=8, align=True)  # rows left-padded to a common prefix column
    for i, e in enumerate(exs):
        off = aligned.prefix_len - e.latent_start
        assert aligned.extra["positions"][i, off:off + len(e.tokens)].tolist() == e.positions().tolist()
    assert "positions" not in collate([plain.encode(r, n) for r, n in rows], tok.eos_id, bucket=8).extra
    with pytest.raises(ValueError, match="position_shift"):  # the tokens fit, the skipped positions do not
        collate(exs[1:], tok.eos_id, bucket=8, max_len=max(len(e.tokens) for e in exs[1:]))

    g, p = init_model(tiny_config(vocab_size=tok.vocab_size, max_positions=128), seed=1)
    p["pos_embed"][...] = p["pos_embed"][...] * 100.0  # positions that move the greedy tokens (init std 0.01)
    loss, _ = loss_fn(p, g, {k: jnp.asarray(v) for k, v in b.arrays().items()}, 0, 0)
    total = count = 0
    for e in exs:
        logits = forward(g, p, tokens=jnp.asarray([e.tokens]), positions=jnp.asarray([e.positions()])).logits
        s, c, _ = token_loss(logits, jnp.asarray([e.labels]))
        total, count = total + float(s), count + int(c)
    assert float(loss) == pytest.approx(total / count, rel=1e-5)
    unshifted = {k: jnp.asarray(v) for k, v in b.arrays().items() if k != "positions"}
    assert abs(float(loss_fn(p, g, unshifted, 0, 0)[0]) - float(loss)) > 1e-4

    prompts = [m.prompt(r, 0) for r in records[:5]]
    sampling = SamplingConfig(max_new_tokens=6)
    out = m.generate(g, p, prompts, sampling, eos_id=-1, pad_id=tok.eos_id, batch_size=8)
    assert out == [naive_latent_greedy(g, p, pr, 6, width=64) for pr in prompts]
    assert all(pr.position_shift > 0 for pr in prompts)
    unmoved = [dataclasses.replace(pr, position_shift=0) for pr in prompts]
    assert m.generate(g, p, unmoved, sampling, eos_id=-1, pad_id=tok.eos_id, batch_size=8) != out


def test_keep_position_end_to_end(tmp_path):
    """`latent-jax train` with keep_position: training (shifted batches), evaluation (shifted prompts), export."""
    from latent_jax.experiment import run_train

    out = tmp_path / "run"
    res = run_train(tiny_run_config(out, "method.keep_position=true"), progress=False)
    assert res["method"] == "icot_si" and res["valid_records"] == 8 and len(res["history"]) == 2
    rows = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in rows if "loss" in x][-1] > 0 and all(math.isfinite(x["loss"]) for x in rows
                                                                      if "loss" in x)
