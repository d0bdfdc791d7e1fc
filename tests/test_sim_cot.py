"""SIM-CoT (step-level supervision of continuous thoughts): the batched loss and its gradients against a naive
computation (n + 1 full passes for the thoughts, then the decoder on each thought's step, one sequence at a time,
unpadded), on Coconut and on CODI; the training-only decoder (weight 0 leaves the base loss, the same compiled
decode as the base method, export without decoder tensors, exact resume of decoder and moments) and bad configs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latent_jax.data import generate_prosqa, symbolic_records, symbolic_vocab
from latent_jax.generate import SamplingConfig
from latent_jax.latent import latent_generate_padded
from latent_jax.methods import build_method, method_config, prepare_model
from latent_jax.models import embed_tokens, forward, init_model
from latent_jax.testing import tiny_config
from latent_jax.word_tokenizer import WordTokenizer

RECORDS = symbolic_records(generate_prosqa(4, seed=2, rung="tiny"), "test")


def tokenizer():
    return WordTokenizer(symbolic_vocab(), newlines=False)


def setup(base="coconut", weight=0.7, **base_options):
    m = build_method("sim_cot", tokenizer(), base=base, step_weight=weight, base_options=base_options)
    cfg = tiny_config(vocab_size=m.tok.vocab_size, d_model=32, head_dim=8, d_ff=64)
    graphdef, params = init_model(cfg, seed=3)
    cfg, graphdef, params = prepare_model(m, cfg, graphdef, params)
    aux = m.init_aux_params(graphdef, params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), aux["decoder"], params))
    noise = init_model(cfg, seed=9)[1]  # the decoder moves away from its backbone copy: a mixed-up tree would show
    aux = {"decoder": jax.tree.map(lambda a, b: a + 0.5 * b, aux["decoder"], noise)}
    return m, graphdef, params, aux


def batch_of(m, stage, batch_size=None):
    exs = [m.encode(r, stage) for r in RECORDS]
    b = m.collate(exs, pad_id=0, bucket=8, batch_size=batch_size)
    return exs, b, {k: jnp.asarray(v) for k, v in b.arrays().items()}


def naive_step_loss(m, graphdef, params, decoder, b, exs):
    """Mean token CE of the decoder over every thought group with a target: the thoughts from n + 1 full passes (no
    cache, no scan; each slot filled with the previous column's final hidden state, or CODI's projection of it),
    then one unpadded decoder pass per group (its c thoughts, then the target's tokens)."""
    a = {k: jnp.asarray(v) for k, v in b.arrays().items()}
    P, n = b.prefix_len, b.n_latent
    x = embed_tokens(graphdef, params, a["tokens"])
    for k in range(n):
        h = forward(graphdef, params, embeds=x, mask=a["mask"]).hidden[:, P + k - 1]
        z = h if m.next_input is None else m.next_input(graphdef, params, h)
        x = x.at[:, P + k].set(jnp.where(a["latent"][:, P + k, None], z, x[:, P + k]))
    total, count, c = 0.0, 0, m.base.thoughts_per_step
    for i, e in enumerate(exs):
        for g, target in enumerate(e.thought_targets):
            if not target:
                continue
            t = jnp.asarray(target)
            z = x[i, P + g * c:P + g * c + c]
            inp = jnp.concatenate([z, embed_tokens(graphdef, decoder, t[None, :-1])[0]])[None]
            logits = forward(graphdef, decoder, embeds=inp).logits[0, c - 1:]
            total = total + optax.softmax_cross_entropy_with_integer_labels(logits, t).sum()
            count += len(target)
    assert count > 0
    return total / count


# (base, options, stage, the steps each thought group decodes): Coconut at stage 2 with c = 2 (groups 0 and 1:
# steps 0 and 1); Coconut past its last stage (one group: every step); CODI's 3 thoughts (the last takes the rest)
CASES = [("coconut", {"c_thought": 2, "max_latent_stage": 3}, 2, lambda n: [[0], [1]]),
         ("coconut", {"c_thought": 1, "max_latent_stage": 1}, 2, lambda n: [list(range(n))]),
         ("codi", {"n_latent": 3, "proj_dim": 24}, 0, lambda n: [[0], [1], list(range(2, n))])]


@pytest.mark.parametrize("base,opts,stage,groups", CASES)
def test_loss_and_gradients_match_the_naive_computation(base, opts, stage, groups):
    m, graphdef, params, aux = setup(base, weight=0.7, **opts)
    exs, b, arrays = batch_of(m, stage, batch_size=6)  # filler rows too
    c = m.base.thoughts_per_step
    assert b.extra["thought_steps"].shape[:2] == (b.tokens.shape[0], b.n_latent // c) and b.n_latent > 0
    assert sorted({len(r["steps"]) for r in RECORDS}) == [2, 3]
    for e, r in zip(exs, RECORDS):  # each group: its steps' tokens, then <eos>; a group without a step: nothing
        steps = m.base.record_tokens(r).steps
        assert e.n_latent == c * len(groups(len(steps)))
        assert [list(t) for t in e.thought_targets] == [[t for k in ks for t in steps[k]] + [m.tok.eos_id] if ks
                                                         else [] for ks in groups(len(steps))]
    base_loss = m.base.loss_for_stage(stage)
    loss = m.loss_for_stage(stage)
    assert m.loss_for_stage(stage) is loss  # one object per stage: the jitted step is cached on it
    P, n = b.prefix_len, b.n_latent

    def batched(tree):
        return loss(tree, graphdef, arrays, P, n)

    def naive(tree):
        base_total = base_loss(tree["model"], graphdef, arrays, P, n)[0]
        return base_total + 0.7 * naive_step_loss(m, graphdef, tree["model"], tree["aux"]["decoder"], b, exs)

    tree = {"model": params, "aux": aux}
    (total, out), g = jax.value_and_grad(batched, has_aux=True)(tree)
    want, g_want = jax.value_and_grad(naive)(tree)
    np.testing.assert_allclose(float(total), float(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(out["loss_sum"]), float(total) * float(out["n_tokens"]), rtol=1e-6)
    assert float(out["step_loss"]) > 0.1 and int(out["step_tokens"]) > 0
    flat_g, flat_w = jax.tree.leaves(g), jax.tree.leaves(g_want)
    scale = max(float(jnp.abs(w).max()) for w in flat_w)
    assert max(float(jnp.abs(a - w).max()) for a, w in zip(flat_g, flat_w)) < 1e-5 * scale
    # the step loss reaches the backbone through the thoughts: its gradient differs from the base loss's alone
    g_base = jax.grad(lambda p: base_loss(p, graphdef, arrays, P, n)[0])(params)
    assert max(float(jnp.abs(a - w).max()) for a, w in zip(jax.tree.leaves(g["model"]), jax.tree.leaves(g_base))) \
        > 1e-4 * scale


def test_weight_zero_is_the_base_loss_and_stage_zero_has_no_step_loss():
    m, graphdef, params, aux = setup("coconut", weight=0.0, c_thought=1, max_latent_stage=2)
    _, b, arrays = batch_of(m, 2)
    tree = {"model": params, "aux": aux}
    (total, out), g = jax.value_and_grad(m.loss_for_stage(2), has_aux=True)(tree, graphdef, arrays, b.prefix_len,
                                                                            b.n_latent)
    base, base_out = m.base.loss_for_stage(2)(params, graphdef, arrays, b.prefix_len, b.n_latent)
    assert float(total) == pytest.approx(float(base), rel=1e-6) and float(out["step_loss"]) > 0
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g["aux"]))
    exs0, b0, arrays0 = batch_of(m, 0)  # stage 0: no thoughts, so no targets and no decoder pass
    assert b0.n_latent == 0 and all(e.thought_targets == () for e in exs0)
    total0, out0 = m.loss_for_stage(0)(tree, graphdef, arrays0, b0.prefix_len, 0)
    assert float(out0["step_loss"]) == 0.0 and float(total0) == pytest.approx(
        float(m.base.loss_for_stage(0)(params, graphdef, arrays0, b0.prefix_len, 0)[0]), rel=1e-6)


@pytest.mark.parametrize("base,opts", [("coconut", {"c_thought": 1, "max_latent_stage": 2}),
                                       ("codi", {"n_latent": 2, "proj_dim": 16})])
def test_generation_is_the_base_methods_compiled_decode(base, opts):
    """SIM-CoT generates with the base method's compiled function and the model's params alone: after the base
    method generated, SIM-CoT's generation compiles nothing new and writes the same tokens."""
    m, graphdef, params, _ = setup(base, **opts)
    plain = build_method(base, tokenizer(), **opts)
    assert plain.tok.vocab_size == m.tok.vocab_size
    sampling = SamplingConfig(max_new_tokens=5)
    stage = m.num_stages() - 1
    want = plain.generate(graphdef, params, [plain.prompt(r, stage) for r in RECORDS], sampling, plain.tok.eos_id,
                          0)
    compiled = latent_generate_padded._cache_size()
    got = m.generate(graphdef, params, [m.prompt(r, stage) for r in RECORDS], sampling, m.tok.eos_id, 0)
    assert got == want and latent_generate_padded._cache_size() == compiled


def test_bad_configs_are_refused_at_load():
    with pytest.raises(ValueError, match="continuous thoughts"):
        method_config("sim_cot", base="cot")
    with pytest.raises(ValueError, match="continuous thoughts"):
        method_config("sim_cot", base="pause_as_thought")
    with pytest.raises(ValueError, match="c_thought"):
        method_config("sim_cot", base="coconut", base_options={"c_thought": 0})
    with pytest.raises(ValueError, match="curriculum keys"):
        method_config("sim_cot", base_options={"epochs_per_stage": 2})
    with pytest.raises(ValueError, match="n_latnt"):
        method_config("sim_cot", base="codi", base_options={"n_latnt": 2})
    with pytest.raises(ValueError, match="decoder_init"):
        method_config("sim_cot", decoder_init="zeros")
    from latent_jax.experiment import load_config

    with pytest.raises(ValueError, match="continuous thoughts"):
        load_config("prosqa_symbolic_cpu", ["method={name: sim_cot, base: no_cot}"])
    with pytest.raises(ValueError, match="c_thought"):  # a YAML section (frozen) is validated the same way
        load_config("gsm8k_sim_cot", ["method.base_options.c_thought=0"])
    assert load_config("gsm8k_sim_cot", []).method["base_options"]["c_thought"] == 2


def test_train_resume_export(tmp_path):
    """Through `latent-jax train` (base: Coconut w/o curriculum, thoughts from the first step, one AdamW state for
    the run): the decoder is checkpointed as its own item; a run resumed after epoch 0 ends with exactly the params
    of an uninterrupted run (decoder weights and AdamW moments restored, else the step loss's gradient into the
    backbone would differ); the export holds the model's tensors only."""
    from safetensors.numpy import load_file

    from latent_jax.cli import main

    ov = ["compare=null", "method={name: sim_cot, base: no_curriculum, base_options: {c_thought: 1,"
          " max_latent_stage: 2}}", "data.rung=tiny", "data.train_n=16", "data.valid_n=8", "data.select_n=8",
          "train.batch_size=8", "train.progress=false", "model.overrides.d_model=32", "model.overrides.head_dim=8",
          "model.overrides.d_ff=64", "eval.batch_size=8",
          "train.schedule=constant", "train.warmup_steps=0"]  # a constant lr: extending the epochs resumes the run
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "prosqa_symbolic_cpu", *ov, "train.epochs=2", f"output_dir={a}"]) == 0
    assert main(["train", "prosqa_symbolic_cpu", *ov, "train.epochs=1", f"output_dir={b}"]) == 0
    steps = sorted((b / "train" / "checkpoints").iterdir())
    assert (steps[-1] / "aux").is_dir() and (steps[-1] / "params").is_dir()
    assert main(["train", "prosqa_symbolic_cpu", *ov, "train.epochs=2", f"output_dir={b}"]) == 0
    ta, tb = (load_file(str(d / "export" / "model.safetensors")) for d in (a, b))
    assert set(ta) == set(tb) and all(np.array_equal(ta[k], tb[k]) for k in ta)
    ha = json.loads((a / "result.json").read_text())["history"]
    hb = json.loads((b / "result.json").read_text())["history"]
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
    coconut = tmp_path / "c"  # the export of SIM-CoT(Coconut) is a Coconut export: the same tensors
    assert main(["train", "prosqa_symbolic_cpu", *ov[:1], "method={name: no_curriculum, c_thought: 1,"
                 " max_latent_stage: 2}", *ov[2:], "train.epochs=1", f"output_dir={coconut}"]) == 0
    tc = load_file(str(coconut / "export" / "model.safetensors"))
    assert set(ta) == set(tc) and all(ta[k].shape == tc[k].shape for k in ta)
    assert not np.array_equal(ta["transformer.wte.weight"], tc["transformer.wte.weight"])
