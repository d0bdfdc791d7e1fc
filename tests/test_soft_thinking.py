"""Soft Thinking: concept tokens, greedy equivalence at top_k=1, cold stop, batching, the method and `eval`."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_jax.generate import SamplingConfig, generate
from latent_jax.methods import IGNORE, build_method, method_config
from latent_jax.methods.soft_thinking import SoftThinkingConfig, concept_embedding, entropy, soft_think_generate
from latent_jax.models import abstract_model, embed_tokens, forward, init_model
from latent_jax.testing import tiny_config

V, EOS, FORCE = 211, 1, [7, 8]
PROMPTS = [[5, 17, 42, 99, 3], [120, 7, 61, 12, 150, 33, 80, 9, 21], [44, 45]]


@pytest.fixture(scope="module")
def peaked():
    """A tiny random GPT-2 with params scaled x4: peaked, varied next-token distributions (entropy 0.4..3.8)."""
    g, p = init_model(tiny_config("gpt2"), seed=0)
    return g, jax.tree.map(lambda x: x * 4.0, p)


S, N = 10, 6  # thinking budget and answer length shared by the tests below: compiles are shared too


def run(model, prompts, cfg, marker, **kw):
    return soft_think_generate(*model, prompts, cfg, SamplingConfig(max_new_tokens=N), EOS, 0, marker, FORCE, **kw)


def greedy(model, prompts):
    return generate(*model, prompts, SamplingConfig(max_new_tokens=S + N), eos_id=EOS, pad_id=0)


def np_concept(logits, E, k, top_p, T):
    z = logits / T
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    order = np.argsort(-p)[:k]
    pk = p[order] / p[order].sum()
    keep = np.cumsum(pk) - pk < top_p
    pk = np.where(keep, pk, 0) / pk[keep].sum()
    w = np.zeros_like(p)
    w[order] = pk
    return w @ E, -(p[p > 0] * np.log(p[p > 0])).sum()


@functools.partial(jax.jit, static_argnums=(0, 3))
def concept(g, p, logits, k, top_p, T):
    return *concept_embedding(g, p, logits, k, top_p, T), entropy(logits, T)


def test_concept_token_and_entropy_equal_numpy(peaked):
    g, p = peaked
    logits = np.random.default_rng(0).normal(0, 3, (3, V)).astype(np.float32)
    logits[2, :4] = 20.0 + np.arange(4)  # a peaked row: the nucleus cuts inside the top-k
    E = np.asarray(embed_tokens(g, p, jnp.arange(V)[None]))[0].astype(np.float64)
    for k, top_p, T in [(7, 0.8, 0.7), (15, 1.0, 1.0), (1, 0.5, 2.0), (5, 0.3, 0.6)]:
        cfg = SoftThinkingConfig(top_k=k, top_p=top_p, temperature=T)
        e, top1, H = concept(g, p, jnp.asarray(logits), cfg.top_k, cfg.top_p, cfg.temperature)
        for i in range(3):
            want_e, want_h = np_concept(logits[i].astype(np.float64), E, k, top_p, T)
            np.testing.assert_allclose(np.asarray(e[i]), want_e, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(float(H[i]), want_h, rtol=1e-5)
        assert np.asarray(top1).tolist() == np.argmax(logits, -1).tolist()


def test_top1_without_cold_stop_is_greedy_decoding(peaked):
    ref = greedy(peaked, PROMPTS)
    assert all(EOS not in gr for gr in ref)
    marker = ref[0][3]  # row 0 stops at the marker's first occurrence; other rows maybe later or never
    cfg = SoftThinkingConfig(top_k=1, temperature=0.5, entropy_threshold=0.0, max_thinking_steps=S)
    r = run(peaked, PROMPTS, cfg, marker)
    kinds = set()
    for gr, out, top1, n, why in zip(ref, r["outputs"], r["think_top1"], r["n_think"], r["reason"]):
        if marker in gr[:S + 1]:
            j = gr.index(marker)
            assert (why, n, top1, out) == ("marker", j, gr[:j], gr[j:j + N])  # answer decoding starts at "###"
        else:
            assert (why, n, top1) == ("budget", S, gr[:S])
            assert out[:len(FORCE)] == FORCE and len(out) == len(FORCE) + N
        kinds.add(why)
    assert "marker" in kinds and r["n_think"][0] <= 3


def test_cold_stop_triggers_at_the_right_step(peaked):
    """Entropies of the greedy trajectory (top_k=1) recomputed without cache; the stop step simulated here."""
    g, p = peaked
    T, k = 0.8, 2
    gr = greedy(peaked, PROMPTS)[0]
    seq = jnp.asarray([PROMPTS[0] + gr])
    H = np.asarray(entropy(forward(g, p, tokens=seq).logits[0, len(PROMPTS[0]) - 1:], T))[:S]
    def stop_step(tau):  # the reference counter: stop at the step completing k consecutive H < tau
        low = 0
        for t, h in enumerate(H):
            low = low + 1 if h < tau else 0
            if low >= k:
                return t
        return None

    srt = np.sort(H)  # thresholds halfway between two entropies >= 0.01 apart (far from any H), widest gap first
    cands = [(b - a, (a + b) / 2) for a, b in zip(srt[:-1], srt[1:]) if b - a >= 0.01]
    tau, want = next(((tau, stop_step(tau)) for _, tau in sorted(cands, reverse=True)
                      if (stop_step(tau) or 0) >= 1), (None, None))
    assert want is not None and want >= 1, (H, tau)
    unused = next(t for t in range(2, V) if t not in gr)
    cfg = SoftThinkingConfig(top_k=1, temperature=T, entropy_threshold=tau, cold_stop_steps=k, max_thinking_steps=S)
    r = run(peaked, PROMPTS, cfg, unused)
    assert (r["reason"][0], r["n_think"][0], r["think_top1"][0]) == ("cold_stop", want, gr[:want])
    assert r["outputs"][0][:2] == FORCE
    # the forced text is fed: the answer continues greedily after prompt + thoughts + FORCE
    after = greedy(peaked, [PROMPTS[0] + gr[:want] + FORCE] + PROMPTS[1:])[0]
    assert r["outputs"][0][2:] == after[:N]


def test_batched_equals_per_example(peaked):
    g, p = peaked
    cfg = SoftThinkingConfig(top_k=5, top_p=0.9, temperature=0.8, entropy_threshold=2.6, cold_stop_steps=2,
                             max_thinking_steps=10)
    whole = run(peaked, PROMPTS, cfg, marker=105, batch_size=4)  # + one filler row
    alone = [run(peaked, [q], cfg, marker=105, batch_size=4) for q in PROMPTS]  # + three filler rows
    for key in ("outputs", "think_top1", "n_think", "reason"):
        assert whole[key] == [a[key][0] for a in alone], key
    assert len(set(whole["n_think"])) > 1  # rows really stopped at different steps


def test_bad_configs():
    for bad in [dict(top_k=0), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=0.0),
                dict(entropy_threshold=-0.1), dict(cold_stop_steps=0), dict(max_thinking_steps=0),
                dict(answer_marker="")]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            method_config("soft_thinking", **bad)
    with pytest.raises(ValueError, match="unknown option"):
        method_config("soft_thinking", top_n=3)
    with pytest.raises(ValueError, match="exceeds the model's vocabulary"):
        soft_think_generate(*abstract_model(tiny_config("gpt2", vocab_size=8)), [[1, 2]],
                            SoftThinkingConfig(top_k=9, max_thinking_steps=8), SamplingConfig(max_new_tokens=2), EOS,
                            0, 3, FORCE)


@pytest.fixture(scope="module")
def prosqa_small():
    from latent_jax.compact_vocab import CompactTokenizer
    from latent_jax.data import load_dataset
    from latent_jax.tokenizer import load_tokenizer

    recs = load_dataset("prosqa", split="valid", n=2)
    texts = [t for r in recs for t in [r["question"] + "\n", *(s + "\n" for s in r["steps"]), "### " + r["answer"]]]
    tok = CompactTokenizer.from_texts(load_tokenizer("gpt2"), texts)
    g, p = init_model(tiny_config("gpt2", vocab_size=tok.vocab_size, max_positions=640, eos_token_id=tok.eos_id),
                      seed=1)
    return recs, tok, g, p


def test_method_layout_generate_hook_and_eval_command(prosqa_small, tmp_path):
    from latent_jax.evaluate import evaluate
    from latent_jax.experiment import load_config, run_eval
    from latent_jax.hf import save_hf

    recs, tok, g, p = prosqa_small
    m = build_method("soft_thinking", tok, max_thinking_steps=4)
    cot = build_method("cot", tok)
    assert m.num_stages() == 1 and m.special_tokens == ()
    ex, want = m.encode(recs[0], 0), cot.encode(recs[0], 0)
    assert (ex.tokens, ex.labels) == (want.tokens, want.labels) and IGNORE in ex.labels
    assert m.prompt(recs[0], 0).prefix == tok.encode(recs[0]["question"] + "\n")
    assert m.marker_id == tok.encode("###")[0] and m.force_ids == tok.encode("\n###")
    res = evaluate(m, recs, g, p, 0, batch_size=2, max_new_tokens=4, progress=False)
    assert res["n"] == 2 and len(m.log) == 2 and m.thinking_stats()["n"] == 2
    # `latent-jax eval configs/prosqa_soft_thinking.yaml --model-dir EXPORT` on a (here random) exported model
    export = save_hf(tmp_path / "export", tiny_config("gpt2", vocab_size=tok.vocab_size, max_positions=640,
                                                       eos_token_id=tok.eos_id), p)
    tok.save(export)
    cfg = load_config("prosqa_soft_thinking", ["data.valid_n=2", "method.max_thinking_steps=4", "eval.batch_size=2",
                                               "eval.max_new_tokens=4", f"output_dir={tmp_path / 'run'}"])
    out = run_eval(cfg, str(export), progress=False)
    assert out["method"] == "soft_thinking" and out["n"] == 2
    assert [e["generated"] for e in out["examples"]] == [e["generated"] for e in res["examples"]]  # same decoding
    assert (export / "eval.json").is_file() and not (tmp_path / "run").exists()  # the model's folder, not a run's
