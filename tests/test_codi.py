"""CODI (self-distillation into continuous thoughts): the batched loss and its gradients against a naive
computation (n + 1 full passes without cache or scan, as the reference runs it), the distillation term (zero at
equal states, stop-gradient on the teacher side, pulls the student toward the teacher), layouts and bad input, and
the projection's round trip through train -> checkpoint -> export -> reload -> evaluate."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latent_jax.data import generate_prosqa, symbolic_records, symbolic_vocab
from latent_jax.layout import IGNORE
from latent_jax.methods import build_method, method_config, prepare_model
from latent_jax.methods.codi import FILLER, STUDENT, TEACHER, codi_loss, distill_terms
from latent_jax.models import embed_tokens, forward, init_model, project_thought
from latent_jax.testing import naive_latent_greedy, tiny_config
from latent_jax.word_tokenizer import WordTokenizer

RECORDS = symbolic_records(generate_prosqa(3, seed=1, rung="tiny"), "test")


def setup(n_latent=2, proj_dim=24, tie=True, **kw):
    m = build_method("codi", WordTokenizer(symbolic_vocab(), newlines=False), n_latent=n_latent, proj_dim=proj_dim,
                     **kw)
    cfg = tiny_config(vocab_size=m.tok.vocab_size, d_model=32, head_dim=8, d_ff=64, tie_embeddings=tie)
    graphdef, params = init_model(cfg, seed=3)
    cfg, graphdef, params = prepare_model(m, cfg, graphdef, params)
    return m, graphdef, params


def naive_parts(params, graphdef, b, teacher_consts=None):
    """(student CE, teacher CE, student states [L+1, B, D], teacher states [L+1, B, D]) of a collated CODI batch,
    the reference's way: no cache and no scan, n + 1 full passes, each filling the next thought slot with the
    projection of the previous column's final hidden state; the three parts written out here."""
    a = {k: jnp.asarray(v) for k, v in b.arrays().items()}
    P, n = b.prefix_len, b.n_latent
    x = embed_tokens(graphdef, params, a["tokens"])
    for k in range(n):
        h = forward(graphdef, params, embeds=x, mask=a["mask"]).hidden[:, P + k - 1]
        x = x.at[:, P + k].set(jnp.where(a["latent"][:, P + k, None], project_thought(graphdef, params, h),
                                         x[:, P + k]))
    out = forward(graphdef, params, embeds=x, mask=a["mask"], return_all_hidden=True)
    lab = a["labels"][:, 1:]
    keep = lab != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], jnp.where(keep, lab, 0)) * keep
    half = len(a["role"]) // 2
    rows = jnp.arange(2 * half)
    states = jnp.stack([hs[rows, P + a["distill_col"]] for hs in out.all_hidden])  # [L+1, 2B, D]
    real = np.asarray(b.extra["role"][:half]) == STUDENT
    s_ce = ce[:half].sum() / keep[:half].sum()
    t_ce = ce[half:].sum() / keep[half:].sum()
    t = states[:, half:][:, real] if teacher_consts is None else teacher_consts
    return s_ce, t_ce, states[:, :half][:, real], t


def naive_distill(s, t, kind="smooth_l1", std_norm=True):
    d = s - jax.lax.stop_gradient(t)
    per = {"smooth_l1": jnp.where(jnp.abs(d) < 1, 0.5 * d * d, jnp.abs(d) - 0.5), "l1": jnp.abs(d), "l2": d * d}[kind]
    loss = per.mean(axis=(1, 2))
    if std_norm:
        std = jnp.std(jax.lax.stop_gradient(t), axis=(1, 2), ddof=1)
        loss = loss / (std * std if kind == "l2" else std)
    return loss.mean()


def batched(m, graphdef, params, records, batch_size=None, weights=None):
    b = m.collate([m.encode(r, 0) for r in records], pad_id=0, bucket=8, batch_size=batch_size)
    loss = m.loss_for_stage(0) if weights is None else \
        lambda *a: codi_loss(*a, next_input=m.next_input, weights=weights, kind="smooth_l1", std_norm=True)
    return b, lambda p: loss(p, graphdef, {k: jnp.asarray(v) for k, v in b.arrays().items()}, b.prefix_len,
                             b.n_latent)


def test_loss_and_gradients_match_the_naive_computation():
    kind = "smooth_l1"
    m, graphdef, params = setup(distill_loss=kind, teacher_weight=0.5, distill_weight=2.0)
    b, loss = batched(m, graphdef, params, RECORDS, batch_size=4)  # one filler row in each half
    assert list(b.extra["role"]) == [STUDENT] * 3 + [FILLER] + [TEACHER] * 3 + [FILLER]

    def naive(p):
        s_ce, t_ce, s, t = naive_parts(p, graphdef, b)
        return s_ce + 0.5 * t_ce + 2.0 * naive_distill(s, t, kind)

    (got, aux), g_got = jax.jit(jax.value_and_grad(lambda p: loss(p), has_aux=True))(params)
    want, g_want = jax.jit(jax.value_and_grad(naive))(params)
    s_ce, t_ce, *_ = jax.jit(lambda p: naive_parts(p, graphdef, b))(params)
    np.testing.assert_allclose([aux["student_ce"], aux["teacher_ce"]], [s_ce, t_ce], rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(aux["distill"]) > 0.01 and float(aux["loss_sum"]) == pytest.approx(float(got) * float(aux["n_tokens"]))
    flat_got, flat_want = jax.tree.leaves(g_got), jax.tree.leaves(g_want)
    scale = max(float(jnp.max(jnp.abs(g))) for g in flat_want)
    for a, w in zip(flat_got, flat_want):
        np.testing.assert_allclose(a, w, atol=2e-5 * scale, rtol=1e-4)
    proj = [k for k in jax.tree_util.tree_leaves_with_path(g_got) if "thought_proj" in jax.tree_util.keystr(k[0])]
    assert proj and all(float(jnp.max(jnp.abs(g))) > 0 for _, g in proj)  # the projection is trained


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "l2"])
def test_distillation_terms_against_the_formula(kind):
    rng = np.random.default_rng(1)
    s, t = (jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32) for _ in range(2))
    w = jnp.array([True, True, False, True, True])
    got = distill_terms(s, t, w, kind, True).mean()
    np.testing.assert_allclose(got, naive_distill(s[:, w], t[:, w], kind), rtol=1e-6)
    np.testing.assert_allclose(distill_terms(s, t, w, kind, False).mean(), naive_distill(s[:, w], t[:, w], kind,
                                                                                         std_norm=False), rtol=1e-6)


def test_distillation_zero_at_equal_states_stops_the_teacher_gradient_and_pulls_the_student():
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32)
    w = jnp.array([True, True, False, True])
    assert float(jnp.max(jnp.abs(distill_terms(s, s, w, "smooth_l1", True)))) == 0.0
    t = s + 0.3
    g_s, g_t = jax.grad(lambda a, b: distill_terms(a, b, w, "l1", True).sum(), argnums=(0, 1))(s, t)
    assert float(jnp.max(jnp.abs(g_t))) == 0.0 and float(jnp.max(jnp.abs(g_s[:, 2]))) == 0.0  # filler row: none
    assert float(jnp.min(jnp.abs(g_s[:, w]))) > 0
    # through the model: the KD-only gradient equals one where the teacher's states are constants, and differs
    # from one that (wrongly) differentiates the teacher side too
    m, graphdef, params = setup()
    b, kd = batched(m, graphdef, params, RECORDS, weights=(0.0, 0.0, 1.0))
    value_grad = jax.jit(jax.value_and_grad(lambda p: kd(p)[0]))
    first, g = value_grad(params)
    t_const = jax.jit(lambda p: naive_parts(p, graphdef, b)[3])(params)
    g_const = jax.jit(jax.grad(lambda p: naive_distill(naive_parts(p, graphdef, b, t_const)[2], t_const)))(params)

    def both_sides(p):
        _, _, s, t = naive_parts(p, graphdef, b)
        d = s - t
        return (jnp.where(jnp.abs(d) < 1, 0.5 * d * d, jnp.abs(d) - 0.5).mean(axis=(1, 2))
                / jnp.std(jax.lax.stop_gradient(t), axis=(1, 2), ddof=1)).mean()

    g_both = jax.jit(jax.grad(both_sides))(params)
    diff = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa
    assert diff(g, g_const) < 1e-5 < diff(g, g_both)
    # and on this toy problem, descending the KD term alone brings the student's states to the teacher's
    tx = optax.adam(3e-3)
    opt = tx.init(params)
    for _ in range(30):
        _, g = value_grad(params)
        updates, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, updates)
    assert float(value_grad(params)[0]) < 0.5 * float(first)


def test_layouts_and_bad_input():
    m, _, _ = setup(n_latent=3)
    tok, r = m.tok, RECORDS[0]
    ex = m.encode(r, 0)
    q = tok.encode(r["question"])
    assert tok.decode(ex.tokens[len(q):]).split()[:1] == ["<|start-latent|>"] and ex.n_latent == 3
    assert tok.decode([ex.tokens[ex.student_pos]]) == "###" == tok.decode([ex.teacher_tokens[ex.teacher_pos]])
    assert tok.decode(list(ex.teacher_tokens[len(q):ex.teacher_pos])).split() == r["steps"]
    assert [t for t in ex.labels if t != IGNORE] == tok.encode("### " + r["answer"]) + [tok.eos_id]
    p = m.prompt(r, 0)
    assert (p.prefix, p.n_latent, tok.decode(list(p.suffix))) == (q + [ex.tokens[len(q)]], 3, "<|end-latent|>")
    with pytest.raises(ValueError, match=r"distill_token .\[Q\]. is not in the answer layout .* of record"):
        build_method("codi", WordTokenizer(symbolic_vocab(), newlines=False), distill_token="[Q]").encode(r, 0)
    for bad, msg in ((dict(n_latent=0), "n_latent=0 is invalid"), (dict(distill_loss="kl"), "distill_loss='kl'"),
                     (dict(proj_dim=-1), "proj_dim=-1 is invalid"), (dict(teacher_weight=-1), "teacher_weight")):
        with pytest.raises(ValueError, match=msg):
            method_config("codi", **bad)


def test_projection_round_trip_train_resume_export_reload(tmp_path):
    """Through the experiment runner: the projection is trained, checkpointed, exported (`latent_jax.prj.*`) and
    reloaded for evaluation with the same accuracy; an export without it is refused for CODI."""
    from safetensors.numpy import load_file, save_file

    from latent_jax.cli import main
    from latent_jax.experiment import load_config, run_eval
    from latent_jax.hf import load_hf
    from latent_jax.params import flatten_params

    out = tmp_path / "run"
    ov = ["compare=null", "method={name: codi, n_latent: 2, proj_dim: 16}", "data.rung=tiny", "data.train_n=16",
          "data.valid_n=8", "data.select_n=8", "train.epochs=1", "train.batch_size=8", "train.progress=false",
          "model.overrides.d_model=32", "model.overrides.head_dim=8", "model.overrides.d_ff=64", "eval.batch_size=8",
          "train.schedule=constant", "train.warmup_steps=0",  # a constant lr: extending the epochs resumes the run
          f"output_dir={out}"]
    assert main(["train", "prosqa_symbolic_cpu", *ov]) == 0
    res = json.loads((out / "result.json").read_text())
    export = out / "export"
    cfg_json = json.loads((export / "config.json").read_text())
    assert cfg_json["latent_jax_thought_proj_dim"] == 16
    tensors = load_file(str(export / "model.safetensors"))
    assert tensors["latent_jax.prj.1.weight"].shape == (16, 32) and tensors["latent_jax.prj.ln.bias"].shape == (32,)
    mcfg, _, params = load_hf(export)
    assert mcfg.thought_proj_dim == 16 and np.array_equal(np.asarray(flatten_params(params)["thought_proj.w_in"]),
                                                          tensors["latent_jax.prj.1.weight"].T)
    cfg = load_config("prosqa_symbolic_cpu", [*ov[:-1], f"output_dir={tmp_path / 'ev'}"])
    ev = run_eval(cfg, str(export), progress=False, out=str(tmp_path / "ev.json"))
    assert ev["accuracy"] == res["accuracy"] and ev["n"] == 8
    assert main(["train", "prosqa_symbolic_cpu", *ov[:-1], "train.epochs=2", f"output_dir={out}"]) == 0  # resumes
    hist = json.loads((out / "result.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [0, 1] and hist[0] == res["history"][0]  # epoch 0 restored, not re-run
    # an export without the projection: refused for CODI, with the reason
    save_file({k: v for k, v in tensors.items() if not k.startswith("latent_jax.prj")}, str(export / "model.safetensors"),
              metadata={"format": "pt"})
    (export / "config.json").write_text(json.dumps({k: v for k, v in cfg_json.items() if "thought_proj" not in k}))
    with pytest.raises(ValueError, match="export without CODI's projection weights"):
        run_eval(cfg, str(export), progress=False, out=str(tmp_path / "ev2.json"))


def test_generation_feeds_projected_thoughts_and_transformers_still_loads_the_export(tmp_path):
    """`CODI.generate` = greedy decoding after n thoughts that are each the projection of the previous final hidden
    state (full passes, no cache); without the projection the output differs. The export's extra `latent_jax.prj.*`
    tensors do not stop transformers from running the base model."""
    from latent_jax.generate import SamplingConfig
    from latent_jax.hf import save_hf
    from latent_jax.params import flatten_params
    from latent_jax.testing import hf_logits

    m, graphdef, params = setup(n_latent=2, proj_dim=16, tie=False)  # untied: the tokens depend on the states
    flat = flatten_params(params)
    assert flat["thought_proj.w_in"].shape == (32, 16)
    prompts = [m.prompt(r, 0) for r in RECORDS[:2]]
    k = 4
    got = m.generate(graphdef, params, prompts, SamplingConfig(max_new_tokens=k), m.tok.eos_id, 0)
    for p, g in zip(prompts, got):
        assert g == naive_latent_greedy(graphdef, params, p, k, lambda h: project_thought(graphdef, params, h),
                                        m.tok.eos_id)
    # the thought loop itself: the logits after the projected thoughts are the naive ones, and not those of the
    # hidden states fed back unprojected
    from latent_jax.latent import feed_thoughts
    from latent_jax.models import get_config, init_cache

    p = prompts[0]
    o = forward(graphdef, params, tokens=jnp.array([p.prefix]),
                cache=init_cache(get_config(graphdef, params), 1, len(p.prefix) + p.n_latent))
    x = embed_tokens(graphdef, params, jnp.array([p.prefix]))
    for _ in range(p.n_latent - 1):
        x = jnp.concatenate([x, project_thought(graphdef, params, forward(graphdef, params, embeds=x).hidden[:, -1])
                             [:, None]], axis=1)
    want_h = forward(graphdef, params, embeds=x).hidden[:, -1]
    want = forward(graphdef, params, embeds=jnp.concatenate(
        [x, project_thought(graphdef, params, want_h)[:, None]], axis=1)).logits[0, -1]
    args = (graphdef, params, o.cache, o.hidden[:, -1], o.logits[:, -1], jnp.ones((p.n_latent, 1), bool))
    np.testing.assert_allclose(feed_thoughts(*args, next_input=m.next_input)[2][0], want, atol=1e-5)
    assert float(jnp.max(jnp.abs(feed_thoughts(*args)[2][0] - want))) > 1e-3
    # analysis decodes the same thoughts: the vectors fed are the projections
    from latent_jax.analysis import decode_thoughts

    fed, _ = decode_thoughts(graphdef, params, [p], pad_id=0, next_input=m.next_input)
    want_fed = jnp.concatenate([x[0, len(p.prefix):], project_thought(graphdef, params, want_h)], axis=0)
    np.testing.assert_allclose(fed[0], want_fed, atol=1e-5)
    _, graphdef, params = setup(n_latent=2, proj_dim=16)  # GPT-2 exports are tied
    cfg = tiny_config(vocab_size=m.tok.vocab_size, d_model=32, head_dim=8, d_ff=64, thought_proj_dim=16)
    folder = save_hf(tmp_path / "export", cfg, params)
    tokens = np.array([prompts[0].prefix])
    np.testing.assert_allclose(hf_logits(folder, tokens), forward(graphdef, params, tokens=jnp.asarray(tokens)).logits,
                               atol=1e-5)
