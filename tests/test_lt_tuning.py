"""LT-Tuning: config validation, fusion vs numpy, confidence-driven insertion statistics, data layout and state,
the K+1-pass training loss/gradient vs a naive one-thought-at-a-time reference, batched generation vs a naive loop,
batched confidence scoring, and a 3-stage training run."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_jax.compact_vocab import CompactTokenizer
from latent_jax.generate import SamplingConfig
from latent_jax.latent import token_loss
from latent_jax.methods import IGNORE, build_method, method_config
from latent_jax.methods.base import Prompt
from latent_jax.methods.lt_fusion import embedding_matrices, fuse, lt_loss, nucleus_probs
from latent_jax.methods.lt_tuning import LTTuningConfig, plan_record, record_key
from latent_jax.models import embed_tokens, forward, init_model
from latent_jax.params import flatten_params, path_str
from latent_jax.testing import tiny_config
from latent_jax.tokenizer import load_tokenizer
from latent_jax.train.trainer import TrainConfig, train

NAMES = ["Alex", "Tom", "Sam", "Max", "Jo", "Kim", "Lee", "Ann"]
RECS = [{"question": "Every wumpus is a yumpus. " + "Every zumpus is a rumpus. " * (i % 3) + f"{n} is a wumpus. Is {n} a yumpus or zumpus?",
         "steps": [f"{n} is a wumpus.", "Every wumpus is a yumpus."][:1 + i % 2], "answer": f"{n} is a yumpus."}
        for i, n in enumerate(NAMES)]


@pytest.fixture(scope="module")
def tok():
    texts = [t for r in RECS for t in [r["question"] + "\n", *(s + "\n" for s in r["steps"]), "### " + r["answer"]]]
    return CompactTokenizer.from_texts(load_tokenizer("gpt2"), texts)


def make(tok, **kw):
    return build_method("lt_tuning", CompactTokenizer(tok.base, tok.base_ids), **kw)


@pytest.fixture(scope="module")
def model(tok):
    m = make(tok)
    return init_model(tiny_config("gpt2", vocab_size=m.tok.vocab_size), seed=3)


@pytest.mark.parametrize("bad", [dict(alpha=[0.5, 1.2, 0.6]), dict(alpha=[-0.1, 0.5, 0.6]), dict(alpha=[0.5, 0.5]),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(temperature=0.0), dict(temperature=-1.0),
                                 dict(p_insert=[0, 1.1, 0.9]), dict(p_double=[0, 0.1, -0.2]),
                                 dict(thresholds=[0, 2, 0]), dict(alpha="abc"), dict(epochs_per_stage=0),
                                 dict(max_consecutive=0)])
def test_bad_config_errors(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        method_config("lt_tuning", **bad)


def test_config_defaults_and_alpha_reading():
    c = method_config("lt_tuning", alpha=[0.4, 0.5, 0.7], top_p=1)
    assert c.alpha == (0.4, 0.5, 0.7) and [c.alpha_at(s) for s in (0, 1, 2, 3)] == [0.4, 1.0, 0.7, 0.7]
    assert LTTuningConfig(stage1_raw_hidden=False).alpha_at(1) == 0.5


def np_fuse(h, z, E, alpha, think, T, top_p):
    z = z.astype(np.float64) / T
    z[:, think] = -np.inf
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = np.zeros_like(p)
    for b in range(len(p)):
        order = np.argsort(-p[b])
        before = np.cumsum(p[b, order]) - p[b, order]
        keep = order[:max(int(np.sum(before < top_p)), 1)]
        out[b, keep] = p[b, keep] / p[b, keep].sum()
    return alpha * h + (1 - alpha) * out @ E, out


@pytest.mark.parametrize("alpha,T,top_p", [(0.5, 1.0, 0.9), (0.6, 0.7, 0.3), (0.0, 2.0, 1e-6), (0.25, 1.0, 1.0)])
def test_fusion_matches_numpy(alpha, T, top_p):
    rng = np.random.default_rng(0)
    h, z, E = rng.normal(size=(3, 8)), 3 * rng.normal(size=(3, 50)), rng.normal(size=(50, 8))
    z[0, 7] = 20.0  # <thinking> would take all the mass
    want, p_want = np_fuse(h, z.copy(), E, alpha, 7, T, top_p)
    p = np.asarray(nucleus_probs(jnp.asarray(z, jnp.float32), 7, T, top_p))
    np.testing.assert_allclose(p, p_want, atol=1e-6)
    assert np.all(p[:, 7] == 0) and np.allclose(p.sum(1), 1)
    if top_p < 1e-3:
        assert np.all((p > 0).sum(1) == 1)
    got = fuse(jnp.asarray(h, jnp.float32), jnp.asarray(z, jnp.float32), jnp.asarray(E, jnp.float32), alpha=alpha,
               think_id=7, temperature=T, top_p=top_p)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_insertion_respects_thresholds_and_probabilities():
    cfg = LTTuningConfig(tokens_per_stage=2)
    probs = np.linspace(0.0, 0.99, 20)  # positions 0..6 below 0.3 (stage 1), 0..4 below 0.2 (stage 2)
    for stage, thr, n in ((1, 0.3, 2), (2, 0.2, 4)):
        n_cand = int(np.sum(probs < thr))
        picks, doubles, plans = np.zeros(20), 0, []
        for i in range(3000):
            plan = plan_record(probs, stage, cfg, f"{i:016x}")
            plans.append(plan)
            for j, c in plan:
                assert probs[j] < thr and c in (1, 2)
                picks[j] += 1
                doubles += c == 2
            assert len(plan) <= n and [j for j, _ in plan] == sorted({j for j, _ in plan})
        inserted = picks.sum()
        assert abs(inserted / (3000 * n) - cfg.p_insert[stage]) < 0.02
        assert abs(doubles / inserted - cfg.p_double[stage]) < 0.025
        want = 3000 * n / n_cand * cfg.p_insert[stage]  # candidates are sampled uniformly
        assert np.all(np.abs(picks[:n_cand] - want) < 0.08 * want) and not picks[n_cand:].any()
    key = record_key(RECS[0])
    assert plan_record(probs, 2, cfg, key) == plan_record(probs, 2, cfg, key)  # deterministic in (seed, stage, key)
    other = [plan_record(probs, 2, LTTuningConfig(seed=1), f"{i:016x}") for i in range(50)]
    assert other != [plan_record(probs, 2, cfg, f"{i:016x}") for i in range(50)]
    assert plan_record(probs, 0, cfg, key) == [] and plan_record(np.full(9, 0.9), 2, cfg, key) == []
    assert len(plan_record(np.array([0.9, 0.1, 0.9]), 2, LTTuningConfig(p_insert=(0, 1, 1)), key)) == 1


def test_layout_collate_and_state(tok):
    m = make(tok, think_bucket=2)
    T = m.think_id
    m.set_state({"stage": 1, "plan": {record_key(RECS[0]): [[0, 1], [3, 2]], record_key(RECS[1]): []}})
    q, rest = m._parts(RECS[0])
    ex = m.encode(RECS[0], 1)
    assert ex.tokens == q + [T] + rest[:3] + [T, T] + rest[3:] and ex.latent_start == len(q)
    assert ex.labels == [IGNORE] * len(q) + ex.tokens[len(q):]  # `<thinking>` is a label: the model learns to emit
    assert m.tok.decode(m.encode(RECS[0], 0).tokens) == RECS[0]["question"] + "\n" + "".join(
        s + "\n" for s in RECS[0]["steps"]) + "### " + RECS[0]["answer"] + "<|endoftext|>"
    with pytest.raises(ValueError, match="no insertion plan for stage 2"):
        m.encode(RECS[0], 2)
    with pytest.raises(ValueError, match="not in the stage-1 insertion plan"):
        m.encode(RECS[2], 1)
    b = m.collate([m.encode(RECS[0], 1), m.encode(RECS[1], 1)], 0, bucket=16)
    assert b.latent.sum(1).tolist() == [3, 0] and b.n_latent == 4  # 3 thoughts, bucketed to 4 passes
    assert np.all(b.tokens[b.latent] == T) and np.all(b.labels[b.latent] == T)
    bad = {**RECS[1], "question": RECS[1]["question"] + "<thinking>"}
    with pytest.raises(ValueError, match="inside a question"):
        m.collate([m.encode(bad, 0)], 0)
    m2 = make(tok)
    m2.set_state(json.loads(json.dumps(m.get_state())))
    assert m2.encode(RECS[0], 1) == ex
    assert m.schedule(0, 0, 5) == 0 and m.schedule(1, 3, 5) == 1 and m.schedule(9, 0, 5) == 2
    assert make(tok, epochs_per_stage=2).schedule(3, 0, 5) == 1 and m.num_stages() == 3


@functools.partial(jax.jit, static_argnums=(1, 5))
def naive_row_loss(params, g, tokens_L, labels_L, think_pos_M, fusion):
    """One unpadded row (right-filled buffer; causal, so the tail never matters), one thought at a time: thought m at
    column think_pos[m] (-1: none) is filled from a forward pass over the row with thoughts < m already filled."""
    e_in, _ = embedding_matrices(g, params)

    def fill(m, emb):
        t = think_pos_M[m]
        o = forward(g, params, embeds=emb)
        e = fuse(o.hidden[:, t - 1], o.logits[:, t - 1], e_in, **dict(fusion))
        return jnp.where(t >= 0, emb.at[:, t].set(e[0]), emb)

    emb = jax.lax.fori_loop(0, think_pos_M.shape[0], fill, embed_tokens(g, params, tokens_L[None]))
    return token_loss(forward(g, params, embeds=emb).logits, labels_L[None])[:2]


def naive_loss(params, g, examples, think_id, fusion, L=96, M=4):
    total = count = 0
    for e in examples:
        pos = [i for i, x in enumerate(e.tokens) if x == think_id]
        s, c = naive_row_loss(params, g, jnp.asarray(e.tokens + [0] * (L - len(e.tokens))),
                              jnp.asarray(e.labels + [IGNORE] * (L - len(e.tokens))),
                              jnp.asarray(pos + [-1] * (M - len(pos))), fusion)
        total, count = total + s, count + c
    return total / count


def test_loss_and_grad_equal_naive_reference(tok, model):
    g, p = model
    m = make(tok)
    stage, plans = 2, [[[0, 1], [4, 2], [7, 1]], [[2, 1]], [], [[0, 2]]]
    m.set_state({"stage": stage, "plan": {record_key(r): pl for r, pl in zip(RECS, plans)}})
    exs = [m.encode(r, stage) for r in RECS[:4]]
    b = m.collate(exs, 0, bucket=16)
    assert b.n_latent == 4 and len({e.latent_start for e in exs}) > 1  # left padding, aligned at the question end
    assert dict(m.fusion(2))["alpha"] == 0.6 and dict(m.fusion(1))["alpha"] == 1.0  # stage 1: raw hidden state
    loss_fn = m.loss_for_stage(stage)
    assert m.loss_for_stage(stage) is loss_fn and m.loss_for_stage(5) is m.loss_for_stage(2)
    batch = {k: jnp.asarray(v) for k, v in b.arrays().items()}
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(1, 3, 4))(
        p, g, batch, b.prefix_len, b.n_latent)
    want, want_grads = jax.value_and_grad(naive_loss)(p, g, exs, m.think_id, m.fusion(stage))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    assert int(aux["n_tokens"]) == sum(sum(x != IGNORE for x in e.labels[1:]) for e in exs)
    for a, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-4, atol=2e-6)
    plain = lt_loss(p, g, batch, b.prefix_len, 0, fusion=m.fusion(stage))[0]  # thoughts as token embeddings
    assert abs(float(plain) - float(loss)) > 1e-4


@functools.partial(jax.jit, static_argnums=0)
def last_step(g, p, emb_1xLxD, n):
    """(hidden, logits) at position n - 1 of a fixed-length buffer (causal: the rest does not matter)."""
    o = forward(g, p, embeds=emb_1xLxD)
    return o.hidden[:, n - 1], o.logits[:, n - 1]


def naive_generate(g, p, prompt, n_new, think_id, cap, fusion):
    """One example, no cache, no padding: a full forward pass per new token."""
    e_in, _ = embedding_matrices(g, p)
    emb = jnp.zeros((1, 32, e_in.shape[1])).at[:, :len(prompt)].set(embed_tokens(g, p, jnp.asarray([prompt])))
    out, run, n = [], 0, len(prompt)
    for _ in range(n_new):
        h, z = last_step(g, p, emb, n)
        t = int(jnp.argmax(z[0].at[think_id].set(-jnp.inf) if run >= cap else z[0]))
        run = run + 1 if t == think_id else 0
        x = fuse(h, z, e_in, **fusion) if t == think_id else embed_tokens(g, p, jnp.asarray([[t]]))[:, 0]
        emb, n = emb.at[:, n].set(x[0]), n + 1
        out.append(t)
    return out


def test_generation_batched_equals_naive_and_caps_thoughts(tok):
    m = make(tok, max_consecutive=2)
    g, p = init_model(tiny_config("gpt2", vocab_size=m.tok.vocab_size, tie_embeddings=False), seed=5)
    p = jax.tree.map(lambda x: 4 * x, p)  # bigger weights: varied greedy outputs
    rng = np.random.default_rng(1)
    prompts = [Prompt([int(x) for x in rng.integers(0, m.think_id, n)]) for n in (9, 4, 13)]
    sampling = SamplingConfig(max_new_tokens=10)
    gen = functools.partial(m.generate, sampling=sampling, eos_id=-1, pad_id=0, keep_thinking=True)
    common = np.bincount(np.concatenate(gen(g, p, prompts=prompts, batch_size=4))).argmax()
    head = flatten_params(p)["lm_head"]  # `<thinking>` now wins wherever the most common token was likely
    p = jax.tree_util.tree_map_with_path(lambda k, x: x.at[m.think_id].set(2 * head[common])
                                         if path_str(k) == "lm_head" else x, p)
    batched = gen(g, p, prompts=prompts, batch_size=4)
    fusion = dict(m.fusion(2))
    for pr, out in zip(prompts, batched):
        assert out == naive_generate(g, p, pr.prefix, 10, m.think_id, 2, fusion)
        assert gen(g, p, prompts=[pr]) == [out]
    shape = lambda outs: " ".join("".join("T" if t == m.think_id else "x" for t in o) for o in outs)  # noqa: E731
    assert "TT" in shape(batched) and "TTT" not in shape(batched) and "x" in shape(batched), shape(batched)
    uncapped = [naive_generate(g, p, pr.prefix, 10, m.think_id, 32, fusion) for pr in prompts]
    assert "TTT" in shape(uncapped)  # the cap changed something
    stripped = m.generate(g, p, prompts, sampling, eos_id=-1, pad_id=0)
    assert stripped == [[t for t in o if t != m.think_id] for o in batched]


def test_confidences_match_unbatched(tok, model):
    g, p = model
    m = make(tok, score_batch_size=4)
    conf = m.confidences(g, p, RECS[:5])
    logits = jax.jit(lambda t: forward(g, p, tokens=t).logits)
    for r, c in zip(RECS[:5], conf):
        q, rest = m._parts(r)
        probs = jax.nn.softmax(logits(jnp.asarray([q + rest + [0] * (96 - len(q + rest))]))[0], axis=-1)  # causal
        want = [float(probs[len(q) + j - 1, t]) for j, t in enumerate(rest)]
        np.testing.assert_allclose(c, want, rtol=1e-5)


def test_three_stage_training_rebuilds_data(tok, model):
    g, p = model  # one compile per stage: every row thinks (K = 1 then 2, bucketed to 2 passes), one length bucket
    m = make(tok, epochs_per_stage=1, thresholds=[0, 0.5, 0.5], p_insert=[0, 1, 1], p_double=[0, 0, 0],
             tokens_per_stage=1, think_bucket=2, remat_passes=False)
    seen = []
    orig = m.on_stage_start
    m.on_stage_start = lambda s, *a: (seen.append(s), orig(s, *a))
    r = train(m, RECS, g, p, TrainConfig(epochs=3, batch_size=4, lr=1e-3, bucket=64, progress=False))
    assert seen == [0, 1, 2] and [h["stage"] for h in r.history] == [0, 1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in r.history)
    assert m.plan_stage == 2 and all(len(v) == 2 for v in m.plan.values())
    state = json.loads(json.dumps(m.get_state()))
    m.on_stage_start(2, g, r.params, RECS)  # deterministic given the model and the seed
    assert m.get_state() == state


def test_thought_forward_with_dropout_equals_full_passes_under_the_same_rng():
    """Training-mode dropout in LT-Tuning's K fill passes + final pass (prefix cache reused) draws the masks that
    K + 1 full passes without a cache draw (masks keyed by layer, site and column): same logits."""
    from latent_jax.methods.lt_fusion import thought_forward

    with jax.default_matmul_precision("highest"):
        g, p = init_model(tiny_config("gpt2", embd_dropout=0.1, resid_dropout=0.2, attn_dropout=0.15), seed=4)
        rng = np.random.default_rng(3)
        B, T, P = 3, 16, 6
        tokens = jnp.asarray(rng.integers(10, 200, (B, T)))
        mask = np.ones((B, T), bool)
        mask[0, :2] = mask[2, :4] = False  # left-padded questions
        latent = np.zeros((B, T), bool)
        latent[0, [7, 9]] = latent[1, [6, 10]] = latent[2, [12]] = True
        fusion = dict(alpha=0.6, think_id=7, temperature=1.0, top_p=0.95)
        key = jax.random.PRNGKey(11)
        fast = jax.jit(lambda p, k: thought_forward(g, p, tokens, jnp.asarray(mask), jnp.asarray(latent), P, 2,
                                                    remat=False, dropout_rng=k, **fusion))
        cols = [np.flatnonzero(r).tolist() for r in latent]

        @jax.jit
        def naive(p, key):
            e_in, _ = embedding_matrices(g, p)
            emb = embed_tokens(g, p, tokens)
            for k in range(2):
                o = forward(g, p, embeds=emb, mask=jnp.asarray(mask), dropout_rng=key)
                for b, cs in enumerate(cols):
                    if k < len(cs):
                        c = cs[k]
                        e = fuse(o.hidden[b:b + 1, c - 1], o.logits[b:b + 1, c - 1], e_in, **fusion)
                        emb = emb.at[b, c].set(e[0])
            return forward(g, p, embeds=emb, mask=jnp.asarray(mask), dropout_rng=key).logits

        got = fast(p, key)
        np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(naive(p, key))[mask], atol=2e-5, rtol=1e-4)
        assert float(jnp.abs(fast(p, None) - got).max()) > 1e-3  # no key: no dropout
