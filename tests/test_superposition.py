"""Coconut trained on BFS frontiers (`superposition`, Zhu et al. 2025): frontier sets, layouts, prompt, errors."""
import pytest

from latent_jax.data import generate_prosqa, symbolic_records, symbolic_vocab
from latent_jax.layout import IGNORE
from latent_jax.methods import build_method, method_config
from latent_jax.methods.superposition import frontiers
from latent_jax.word_tokenizer import WordTokenizer

# root a -> b, c; b -> d; c -> e; d -> t (target, 3 hops: a b d t); e -> x; y -> z (z: the negative, unreachable)
GRAPH = {"idx_to_symbol": ["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8"],
         "edges": [[0, 1], [0, 2], [1, 3], [2, 4], [3, 5], [4, 6], [7, 8]], "root": 0, "target": 5,
         "neg_target": 8, "question": "n0 n1 | n0 n2 | n1 n3 | n2 n4 | n3 n5 | n4 n6 | n7 n8 | [Q] n5 n8 [R] n0",
         "steps": ["n1", "n3", "n5"], "answer": "n5"}


def method(**kw):
    return build_method("superposition", WordTokenizer(symbolic_vocab(), newlines=False), **kw)


def test_frontiers_are_bfs_levels_and_on_path_keeps_those_reaching_the_target():
    assert frontiers(GRAPH) == [["n1", "n2"], ["n3", "n4"], ["n5", "n6"]]
    assert frontiers(GRAPH, "on_path") == [["n1"], ["n3"], ["n5"]]
    for r in symbolic_records(generate_prosqa(20, seed=3, rung="tiny"), "gen"):
        reach, on_path = frontiers(r), frontiers(r, "on_path")
        for k, (a, b) in enumerate(zip(reach, on_path)):
            assert set(b) <= set(a) and r["steps"][k] in b  # the record's own path is one of the paths
        assert on_path[-1] == [r["answer"]]


def test_layouts_per_stage_and_the_final_prompt():
    m = method(max_latent_stage=3)
    tok = m.tok
    lat = tok.token_to_id("<|latent|>")
    q = tok.encode(GRAPH["question"])
    for stage, allowed in enumerate(frontiers(GRAPH)):
        ex = m.encode(GRAPH, stage)
        assert ex.tokens[:len(q)] == q and ex.tokens[len(q):-1] == [lat] * stage
        assert ex.latent_start == len(q) and ex.n_latent == stage
        assert [x for x in ex.labels if x != IGNORE] == [ex.tokens[-1]]  # one supervised token: a frontier node
        assert tok.decode([ex.tokens[-1]]) in allowed
        assert m.encode(GRAPH, stage).tokens == ex.tokens  # deterministic
    final = m.encode(GRAPH, 3)
    assert final.n_latent == 3 and tok.decode(final.tokens[len(q) + 3:]) == "### n5 <eos>"
    assert final.tokens[len(q):len(q) + 3] == [lat] * 3 and m.encode(GRAPH, 7).tokens == final.tokens
    assert [x for x in final.labels if x != IGNORE] == tok.encode("### n5") + [tok.eos_id]
    p = m.prompt(GRAPH, 0)
    assert (p.prefix, p.n_latent, list(p.suffix)) == (q, 3, [])
    assert not m.eligible_for_best(3) and m.eligible_for_best(4) and m.num_stages() == 4
    capped = method(max_latent_stage=0)  # past max_latent_stage every record is at its final layout
    assert capped.encode(GRAPH, 1).tokens == final.tokens
    # the on_path frontier asks for the path's own nodes here
    assert method(frontier="on_path").tok.decode([method(frontier="on_path").encode(GRAPH, 1).tokens[-1]]) == "n3"


def test_label_thoughts_labels_every_thought_with_its_frontier_node():
    m, plain = method(max_latent_stage=3, label_thoughts=True), method(max_latent_stage=3)
    q = m.tok.encode(GRAPH["question"])
    nodes = m.frontier_ids(GRAPH)
    assert [m.tok.decode([v]) in f for v, f in zip(nodes, frontiers(GRAPH))] == [True] * 3
    for stage in range(3):
        ex, ref = m.encode(GRAPH, stage), plain.encode(GRAPH, stage)
        assert ex.tokens == ref.tokens and ex.n_latent == ref.n_latent == stage  # the same layout as the curriculum
        # the label at thought k's own slot (predicted from the thought before it, or the root) is frontier k + 1
        assert ex.labels[len(q):] == nodes[:stage + 1] and ex.labels[:len(q)] == [IGNORE] * len(q)
    final = m.encode(GRAPH, 3)
    assert final.labels[len(q):] == nodes + m.tok.encode("### n5") + [m.tok.eos_id]
    assert final.tokens == plain.encode(GRAPH, 3).tokens


def test_target_set_labels_each_frontier_position_with_its_whole_frontier():
    """target: set keeps the layout of target: sampled; each frontier-labelled position's plain label becomes IGNORE
    and its label set is the whole frontier (per stage, with and without label_thoughts, and at the final layout)."""
    sets = [tuple(method().tok.encode(" ".join(f))) for f in frontiers(GRAPH)]
    for lab in (False, True):
        m, ref = method(max_latent_stage=3, target="set", label_thoughts=lab), method(max_latent_stage=3,
                                                                                     label_thoughts=lab)
        L = len(m.tok.encode(GRAPH["question"]))
        assert m.frontier_sets(GRAPH) == sets
        for stage in range(4):
            ex, r = m.encode(GRAPH, stage), ref.encode(GRAPH, stage)
            assert ex.tokens == r.tokens and ex.n_latent == r.n_latent
            want = ([(L + k, sets[k]) for k in range(3)] if lab else []) if stage == 3 else (
                [(L + k, sets[k]) for k in range(stage + 1)] if lab else [(L + stage, sets[stage])])
            assert list(ex.label_sets) == want
            moved = {i for i, _ in want}
            assert [x for i, x in enumerate(ex.labels) if i not in moved] == [
                x for i, x in enumerate(r.labels) if i not in moved]
            assert all(ex.labels[i] == IGNORE != r.labels[i] for i in moved)


def test_target_set_collate_and_loss_against_a_written_out_cross_entropy():
    """collate puts each set at its token's column (rows left-padded to align the thoughts); the loss is the plain
    token loss plus -mean_{v in S} log p(v) per set position, counted as one token; with singleton sets it equals
    target: sampled's loss with those nodes as labels."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from latent_jax.latent import latent_forward
    from latent_jax.methods import prepare_model
    from latent_jax.models import init_model
    from latent_jax.testing import tiny_config

    m = method(max_latent_stage=2, label_thoughts=True, target="set")
    records = symbolic_records(generate_prosqa(6, seed=4, rung="tiny"), "gen")
    exs = [m.encode(r, 2) for r in records]
    b = m.collate(exs, pad_id=0, bucket=8)
    S = b.extra["label_sets"]
    assert S.shape[:2] == b.tokens.shape and S.shape[2] % 4 == 0
    for i, e in enumerate(exs):
        off = int(np.argmax(b.mask[i]))
        assert {int(c) for c in np.nonzero((S[i] != IGNORE).any(-1))[0]} == {off + pos for pos, _ in e.label_sets}
        for pos, ids in e.label_sets:
            assert [int(v) for v in S[i, off + pos] if v != IGNORE] == list(ids)
    assert max(len(ids) for e in exs for _, ids in e.label_sets) > 1  # some set has several nodes
    cfg = tiny_config(vocab_size=m.tok.vocab_size, d_model=32, head_dim=8, d_ff=64)
    graphdef, params = init_model(cfg, seed=1)
    _, graphdef, params = prepare_model(m, cfg, graphdef, params)
    a = {k: jnp.asarray(v) for k, v in b.arrays().items()}
    P, n = b.prefix_len, b.n_latent
    loss, aux = jax.jit(lambda p: m.loss_for_stage(2)(p, graphdef, a, P, n))(params)
    logits = np.asarray(latent_forward(graphdef, params, a["tokens"], a["mask"], a["latent"], P, n), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    total, count = 0.0, 0
    for i in range(len(exs)):
        for t in range(1, b.tokens.shape[1]):
            if b.labels[i, t] != IGNORE:
                total, count = total - logp[i, t - 1, b.labels[i, t]], count + 1
            ids = [v for v in S[i, t] if v != IGNORE]
            if ids:
                total, count = total - np.mean([logp[i, t - 1, v] for v in ids]), count + 1
    assert int(aux["n_tokens"]) == count
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
    # re-padded to a larger layout (train.fixed_shapes, multi-host): the padding holds no set, the loss is the same
    from latent_jax.train.pipeline import pad_batch

    big = pad_batch(b, P + 8, n + 1, b.tokens.shape[1] + 16)
    assert int((big.extra["label_sets"] != IGNORE).sum()) == int((S != IGNORE).sum())
    a_big = {k: jnp.asarray(v) for k, v in big.arrays().items()}
    loss_big = m.loss_for_stage(2)(params, graphdef, a_big, big.prefix_len, big.n_latent)[0]
    np.testing.assert_allclose(float(loss_big), float(loss), rtol=1e-5)
    # singleton sets = the sampled target with the same node
    single = method(max_latent_stage=2, label_thoughts=True, frontier="on_path", target="set")
    plain = method(max_latent_stage=2, label_thoughts=True, frontier="on_path")
    rec = [r for r in records if all(len(f) == 1 for f in frontiers(r, "on_path"))]
    assert rec
    bs, bp = (x.collate([x.encode(r, 2) for r in rec], pad_id=0, bucket=8) for x in (single, plain))
    np.testing.assert_array_equal(bs.tokens, bp.tokens)
    got = single.loss_for_stage(2)(params, graphdef, {k: jnp.asarray(v) for k, v in bs.arrays().items()},
                                   bs.prefix_len, bs.n_latent)[0]
    want = plain.loss_for_stage(2)(params, graphdef, {k: jnp.asarray(v) for k, v in bp.arrays().items()},
                                   bp.prefix_len, bp.n_latent)[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_bad_config_and_records_without_graphs():
    with pytest.raises(ValueError, match="frontier='bfs' is invalid"):
        method_config("superposition", frontier="bfs")
    with pytest.raises(ValueError, match="max_latent_stage=-1 is invalid"):
        method_config("superposition", max_latent_stage=-1)
    with pytest.raises(ValueError, match="target='soft' is invalid"):
        method_config("superposition", target="soft")
    with pytest.raises(ValueError, match="label_thoughts=True is invalid"):
        method_config("superposition", dense=True, label_thoughts=True)
    text = {k: GRAPH[k] for k in ("question", "steps", "answer")}
    with pytest.raises(ValueError, match="data.encoding=symbolic"):
        method().encode(text, 0)


@pytest.mark.parametrize("options", ["dense: false", "dense: true", "label_thoughts: true, thought: soft_token",
                                     "label_thoughts: true, target: set"])
def test_trains_and_evaluates_end_to_end(tmp_path, options):
    """Through the experiment runner: the curriculum reaches the final layout (or dense: one stage), the loss falls,
    and evaluation decodes `### node` answers after the thoughts."""
    import json

    from latent_jax.cli import main

    dense = options == "dense: true"
    out = tmp_path / "run"
    ov = ["compare=null", f"method={{name: superposition, max_latent_stage: 1, {options}}}",
          "data.rung=tiny", "data.train_n=48", "data.valid_n=10", "data.select_n=10", "train.epochs=3",
          "train.batch_size=8", "train.progress=false", "model.overrides.d_model=32", "model.overrides.head_dim=8",
          "model.overrides.d_ff=64", "eval.batch_size=10", f"output_dir={out}"]
    assert main(["train", "prosqa_symbolic_cpu", *ov]) == 0
    res = json.loads((out / "result.json").read_text())
    hist = res["history"]
    assert [h["stage"] for h in hist] == ([0, 1, 1] if dense else [0, 1, 2])
    losses = [json.loads(x)["loss"] for x in (out / "train" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert losses[-1] < losses[0]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == 10 and all(not e["correct"] or e["generated"].startswith("###") for e in ev["examples"])
    assert res["eval_stage"] == (0 if dense else 2)  # the final stage (the prompt is the final layout at any)


def _soft_setup(tie):
    import jax

    from latent_jax.methods import prepare_model
    from latent_jax.models import init_model
    from latent_jax.testing import tiny_config

    m = method(max_latent_stage=2, label_thoughts=True, thought="soft_token")
    cfg = tiny_config(vocab_size=m.tok.vocab_size, d_model=32, head_dim=8, d_ff=64, tie_embeddings=tie)
    graphdef, params = init_model(cfg, seed=5)
    _, graphdef, params = prepare_model(m, cfg, graphdef, params)
    return jax, m, graphdef, params


@pytest.mark.parametrize("tie", [True, False])
def test_soft_token_thoughts_loss_gradients_and_generation_match_naive_full_passes(tie):
    """thought: soft_token feeds each thought slot softmax(h W_head^T) @ E of the previous column's final hidden
    state. The batched latent loop (one cached scan) gives the loss and every gradient of n + 1 uncached full passes
    that feed that mix written out here, and generation writes the tokens of the same naive loop."""
    import jax.numpy as jnp
    import numpy as np
    import optax

    from latent_jax.generate import SamplingConfig
    from latent_jax.methods.superposition import soft_token_thought
    from latent_jax.models import embed_tokens, forward, lm_head
    from latent_jax.testing import naive_latent_greedy

    jax, m, graphdef, params = _soft_setup(tie)

    def soft(p, h):  # written out: probabilities from the head, the mix from the embedding table
        probs = jax.nn.softmax(h @ lm_head(graphdef, p).T, axis=-1)
        return probs @ p["embed"][...]

    h = jax.random.normal(jax.random.key(0), (3, 32))
    np.testing.assert_allclose(soft_token_thought(graphdef, params, h), soft(params, h), rtol=1e-5, atol=1e-6)
    records = symbolic_records(generate_prosqa(4, seed=2, rung="tiny"), "gen")
    b = m.collate([m.encode(r, 2) for r in records], pad_id=0, bucket=8)
    a = {k: jnp.asarray(v) for k, v in b.arrays().items()}
    P, n = b.prefix_len, b.n_latent
    assert n >= 2 and int((a["labels"][:, P:P + n] != IGNORE).sum()) > 0  # labelled thoughts in the batch

    def naive(p):
        x = embed_tokens(graphdef, p, a["tokens"])
        for k in range(n):
            hk = forward(graphdef, p, embeds=x, mask=a["mask"]).hidden[:, P + k - 1]
            x = x.at[:, P + k].set(jnp.where(a["latent"][:, P + k, None], soft(p, hk), x[:, P + k]))
        logits = forward(graphdef, p, embeds=x, mask=a["mask"]).logits
        lab = a["labels"][:, 1:]
        keep = lab != IGNORE
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.where(keep, lab, 0)) * keep
        return ce.sum() / keep.sum()

    loss = m.loss_for_stage(2)
    (got, _), g_got = jax.jit(jax.value_and_grad(lambda p: loss(p, graphdef, a, P, n), has_aux=True))(params)
    want, g_want = jax.jit(jax.value_and_grad(naive))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    hidden_fed = method(max_latent_stage=2, label_thoughts=True).loss_for_stage(2)(params, graphdef, a, P, n)[0]
    assert abs(float(hidden_fed) - float(got)) > 1e-3  # the soft mix is what the slots get, not the hidden state
    flat_got, flat_want = jax.tree.leaves(g_got), jax.tree.leaves(g_want)
    scale = max(float(jnp.max(jnp.abs(g))) for g in flat_want)
    for x, w in zip(flat_got, flat_want):
        np.testing.assert_allclose(x, w, atol=2e-5 * scale, rtol=1e-4)

    prompts = [m.prompt(r, 0) for r in records[:2]]
    got_tokens = m.generate(graphdef, params, prompts, SamplingConfig(max_new_tokens=4), m.tok.eos_id, 0)
    for pr, g in zip(prompts, got_tokens):
        assert g == naive_latent_greedy(graphdef, params, pr, 4, lambda h: soft(params, h), m.tok.eos_id)
