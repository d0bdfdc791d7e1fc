"""Method layouts (Coconut, CoT, No-CoT, ablations, Pause), special tokens, latent generation, evaluation."""
import jax
import numpy as np
import pytest

import latent_jax.evaluate as ev
from latent_jax.generate import SamplingConfig
from latent_jax.methods import IGNORE, build_method, prepare_model
from latent_jax.methods.base import Prompt
from latent_jax.methods.coconut import BOT, EOT, LATENT, PAUSE
from latent_jax.models import init_model
from latent_jax.params import flatten_params
from latent_jax.testing import naive_latent_greedy, tiny_config
from latent_jax.tokenizer import load_tokenizer

REC = {"question": "Every a is a b. Alex is a a. Is Alex a b or c?",
       "steps": ["Alex is a a.", "Every a is a b.", "Every b is a d."], "answer": "Alex is a b."}


def method(name, **kw):
    return build_method(name, load_tokenizer("gpt2"), **kw)


def labelled_text(m, ex):
    return m.tok.decode([t for t, l in zip(ex.tokens, ex.labels) if l != IGNORE])


@pytest.mark.parametrize("stage,n_skip", [(0, 0), (1, 1), (2, 2), (3, 3), (7, 3)])
def test_coconut_layout_per_stage(stage, n_skip):
    m = method("coconut", max_latent_stage=6)
    ex = m.encode(REC, stage)
    tok = m.tok
    q = tok.encode(REC["question"] + "\n")
    assert ex.tokens[:len(q)] == q
    assert ex.tokens[len(q)] == m.ids[BOT] and ex.latent_start == len(q) + 1
    assert ex.n_latent == n_skip
    assert ex.tokens[len(q) + 1:len(q) + 1 + n_skip] == [m.ids[LATENT]] * n_skip
    assert ex.tokens[len(q) + 1 + n_skip] == m.ids[EOT]
    rest = "".join(s + "\n" for s in REC["steps"][n_skip:]) + "### " + REC["answer"] + "<|endoftext|>"
    assert labelled_text(m, ex) == rest


def test_c_thought_and_max_stage():
    m = method("coconut", c_thought=2, max_latent_stage=2)
    assert m.encode(REC, 1).n_latent == 2
    ex = m.encode(REC, 3)  # beyond max: all steps removed, min(3, max=2) * c latents
    assert ex.n_latent == 4 and labelled_text(m, ex) == "### Alex is a b.<|endoftext|>"
    assert method("coconut", c_thought=2, max_latent_stage=2, pad_latent_to_max=True).encode(
        {**REC, "steps": REC["steps"][:1]}, 5).n_latent == 4


def test_baselines_and_ablations():
    cot, nocot = method("cot"), method("no_cot")
    assert cot.special_tokens == () and labelled_text(cot, cot.encode(REC, 3)).startswith("Alex is a a.\n")
    assert labelled_text(nocot, nocot.encode(REC, 0)) == "### Alex is a b.<|endoftext|>"
    nocur = method("no_curriculum", max_latent_stage=6)
    assert nocur.encode(REC, 0).n_latent == 3 and nocur.num_stages() == 1
    nothought = method("no_thought")
    ex = nothought.encode(REC, 2)
    assert ex.n_latent == 0 and LATENT not in nothought.tok.decode(ex.tokens)
    assert labelled_text(nothought, ex).startswith("Every b is a d.")
    pat = method("pause_as_thought")
    ex = pat.encode(REC, 2)
    assert ex.n_latent == 0 and ex.tokens.count(pat.ids[PAUSE]) == 2  # pauses are tokens, not hidden states
    pause = method("pause", n_pause=4)
    ex = pause.encode(REC, 0)
    assert ex.tokens.count(pause.pause_id) == 4 and labelled_text(pause, ex) == "### Alex is a b.<|endoftext|>"
    # keep-best: a curriculum variant only from its last latent stage on (the form the final evaluation uses)
    for name in ("coconut", "no_thought", "pause_as_thought"):
        m = method(name, max_latent_stage=3)
        assert [m.eligible_for_best(s) for s in (0, 2, 3, 4)] == [False, False, True, True], name
    assert all(method(n, max_latent_stage=3).eligible_for_best(0) for n in ("cot", "no_cot", "no_curriculum"))


def test_bad_method_input():
    with pytest.raises(ValueError, match="unknown method 'coconutt'.*valid"):
        method("coconutt")
    with pytest.raises(ValueError, match="unknown option.*c_thougth.*valid"):
        method("coconut", c_thougth=1)
    with pytest.raises(ValueError, match="record .* is missing steps"):
        method("coconut").encode({"question": "q", "answer": "a"}, 0)


def test_special_tokens_added_and_initialised_from_init_token():
    m = method("coconut")
    assert m.tok.vocab_size == 50257 + 3 and m.tok.encode(BOT + LATENT) == [m.ids[BOT], m.ids[LATENT]]
    cfg = tiny_config("gpt2", vocab_size=50257)
    g, p = init_model(cfg)
    cfg2, g2, p2 = prepare_model(m, cfg, g, p)
    emb = np.asarray(flatten_params(p2)["embed"])
    assert cfg2.vocab_size == 50260
    for t in (BOT, EOT, LATENT):
        np.testing.assert_array_equal(emb[m.ids[t]], emb[m.init_token_id()])
    assert m.init_token_id() == 16791  # "<<" in GPT-2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_latent_generation_equals_naive_and_batching(family):
    cfg = tiny_config(family)
    g, p = init_model(cfg, seed=7)
    p = jax_scale(p, 8.0)  # bigger weights: varied greedy outputs
    rng = np.random.default_rng(0)
    prompts = [Prompt([int(x) for x in rng.integers(3, 200, n)], k, [5]) for n, k in ((9, 3), (4, 0), (13, 2))]
    sampling = SamplingConfig(max_new_tokens=6)
    batched = ev.generate_prompts(g, p, prompts, sampling, eos_id=-1, pad_id=0, batch_size=4)
    for pr, out in zip(prompts, batched):
        assert out == naive_latent_greedy(g, p, pr, 6, width=32)
        assert ev.generate_prompts(g, p, [pr], sampling, eos_id=-1, pad_id=0) == [out]
    assert len({tuple(o) for o in batched}) == 3


def jax_scale(p, s):
    return jax.tree.map(lambda x: x * s, p)


def test_evaluate_counts_exact_matches(monkeypatch, tmp_path):
    m = method("coconut")
    recs = [{**REC, "answer": f"Alex is a b{i}."} for i in range(5)]
    right = {0, 2, 3}

    def fake_generate(graphdef, params, prompts, sampling, eos_id, pad_id, batch_size=None, **kw):
        i0 = fake_generate.seen
        fake_generate.seen += len(prompts)
        return [m.tok.encode(f"### Alex is a b{i if i in right else 'x'}.") + [eos_id]
                for i in range(i0, i0 + len(prompts))]

    fake_generate.seen = 0
    monkeypatch.setattr(m, "generate", fake_generate)  # the Method hook evaluate() decodes with
    res = ev.evaluate(m, recs, None, None, stage=6, batch_size=2, out_path=tmp_path / "r.json", progress=False)
    assert res["accuracy"] == pytest.approx(3 / 5) and res["n"] == 5
    assert (tmp_path / "r.json").exists()
    assert ev.extract_answer("x # 1,234 ") == "1234"


@pytest.mark.parametrize("name", ["coconut", "pause", "lt_tuning", "token_assorted"])
def test_init_token_that_encodes_to_nothing_is_an_error(name):
    from latent_jax.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2")
    assert build_method(name, tok, init_token="<<").init_token_id() == tok.encode("<<")[0]
    with pytest.raises(ValueError, match="encodes to no token"):
        build_method(name, tok, init_token="").init_token_id()


def _reference_layout(q, steps, a, stage, m, c, pad, ids):
    """A transcription of the reference code's rules (dataset.py: the training example of a stage, and the
    question-only evaluation prompt), on already tokenized pieces. Returns (tokens, labels, prompt_tokens)."""
    start, latent, end = ids
    if stage > m:
        n_skip, n_lat = 10000, (m if pad else min(len(steps), m))
    else:
        n_skip, n_lat = stage, stage
    n_lat *= c
    tokens = q + [start] + [latent] * n_lat + [end] + [t for s in steps[n_skip:] for t in s] + a
    labels = [IGNORE] * (len(q) + n_lat + 2) + tokens[len(q) + n_lat + 2:]
    k = min(m if pad else min(m, len(steps)), stage) * c
    return tokens, labels, q + [start] + [latent] * k + [end]


@pytest.mark.parametrize("c,m,pad", [(1, 6, True), (1, 6, False), (2, 3, False), (1, 2, True)])
def test_stage_layout_matches_the_reference_on_every_real_record_and_stage(shared_dir, c, m, pad):
    import json

    records = json.loads((shared_dir / "data" / "prosqa" / "valid.json").read_text())
    mth = method("coconut", c_thought=c, max_latent_stage=m, pad_latent_to_max=pad)
    ids = (mth.ids[BOT], mth.ids[LATENT], mth.ids[EOT])
    short = 0
    for r in records:
        t = mth.record_tokens(r)
        q, steps, a = t.question, t.steps, t.answer
        short += len(steps) < m
        for stage in range(m + 2):
            tokens, labels, prompt = _reference_layout(q, steps, a, stage, m, c, pad, ids)
            ex = mth.encode(r, stage)
            assert (ex.tokens, ex.labels) == (tokens, labels), (r["question"][:40], stage)
            assert ex.n_latent == tokens.count(ids[1]) and ex.latent_start == len(q) + 1
            p = mth.prompt(r, stage)
            assert p.prefix + [ids[1]] * p.n_latent + p.suffix == prompt, (r["question"][:40], stage)
    if m < 4:  # every real record has >= 3 steps
        return
    assert short > 0  # records with fewer steps than stages exist: there the capped layout differs
    capped = method("coconut", c_thought=c, max_latent_stage=m, pad_latent_to_max=pad, stage_layout="capped")
    r = next(r for r in records if len(r["steps"]) < m)
    assert capped.encode(r, m).n_latent == len(r["steps"]) * c < mth.encode(r, m).n_latent == m * c


def test_methods_share_one_record_encoding():
    """Coconut's CoT layout, LT-Tuning's, Token Assorted's and Pause's question all come from
    `Method.record_tokens` (question + newline, each step + newline, "### answer" + EOS)."""
    tok = load_tokenizer("gpt2")
    t = method("cot").record_tokens(REC)
    assert t.question == tok.encode(REC["question"] + "\n") and t.steps == [tok.encode(s + "\n") for s in REC["steps"]]
    assert t.answer == tok.encode("### " + REC["answer"]) + [tok.eos_id] and t.cot == sum(t.steps, [])
    assert method("cot").encode(REC, 0).tokens == t.question + t.cot + t.answer
    lt, ta, pause = method("lt_tuning"), method("token_assorted"), method("pause", n_pause=2)
    assert lt._parts(REC) == (t.question, t.cot + t.answer) and ta._parts(REC) == (t.question, t.cot, t.answer)
    assert pause.prompt(REC, 0).prefix == t.question + [pause.pause_id] * 2
