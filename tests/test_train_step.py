"""The public one-call train step: `TrainState.create` + `train_step` against a naive optax step (jax.grad of the
mean token loss of the latent loop, AdamW), gradient accumulation over micro-batches, and the README example."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_jax.data import generate_prosqa, symbolic_records, symbolic_vocab
from latent_jax.latent import loss_fn
from latent_jax.methods import build_method, collate
from latent_jax.models import init_model
from latent_jax.testing import tiny_config
from latent_jax.train.step import TrainState, train_step
from latent_jax.word_tokenizer import WordTokenizer


def _setup(stage=1):
    tok = WordTokenizer(symbolic_vocab())
    method = build_method("coconut", tok, max_latent_stage=2)
    records = symbolic_records(generate_prosqa(8, seed=3, rung="tiny"), "generated")
    graphdef, params = init_model(tiny_config("gpt2", vocab_size=tok.vocab_size), seed=0)
    exs = [method.encode(r, stage) for r in records]
    return graphdef, params, exs, tok


def test_one_step_equals_a_naive_optax_step():
    graphdef, params, exs, tok = _setup()
    batch = collate(exs, tok.pad_id, bucket=16)
    assert batch.n_latent > 0  # the latent loop is in the step
    arrays = {k: jnp.asarray(v) for k, v in batch.arrays().items()}
    naive_loss = lambda p: loss_fn(p, graphdef, arrays, batch.prefix_len, batch.n_latent)[0]  # noqa: E731
    loss, grads = jax.jit(jax.value_and_grad(naive_loss))(params)  # jitted: eager autodiff of a scan is slow
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3, weight_decay=0.01))
    updates, _ = tx.update(grads, tx.init(params), params)
    want = optax.apply_updates(params, updates)

    state = TrainState.create(graphdef, jax.tree.map(jnp.copy, params), lr=3e-3, weight_decay=0.01, grad_clip=1.0)
    rng0 = state.rng
    state, m = train_step(state, batch)
    assert abs(m["loss"] - float(loss)) < 1e-5 and m["n_tokens"] == int((batch.labels[:, 1:] != -100).sum())
    assert int(state.step) == 1 and not np.array_equal(np.asarray(state.rng), np.asarray(rng0))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)  # Adam: ~lr*sign(g) where g ~ eps


def test_accumulated_micro_batches_equal_one_batch_and_training_learns():
    graphdef, params, exs, tok = _setup()
    big = collate(exs, tok.pad_id, bucket=16)
    parts = [collate(exs[:4], tok.pad_id, bucket=16), collate(exs[4:], tok.pad_id, bucket=16)]
    opts = dict(lr=3e-3, weight_decay=0.01, grad_clip=1.0)  # the first test's settings: its compiled steps are reused
    s1, m1 = train_step(TrainState.create(graphdef, jax.tree.map(jnp.copy, params), **opts), big)
    s2, m2 = train_step(TrainState.create(graphdef, jax.tree.map(jnp.copy, params), **opts), parts)
    assert m2["micro_batches"] == 2 and m1["n_tokens"] == m2["n_tokens"]
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    losses = []
    for _ in range(8):
        s1, m = train_step(s1, big)
        losses.append(m["loss"])
    assert losses[-1] < losses[0] - 0.1
    s1 = s1.reset_optimizer()
    assert int(optax.tree_utils.tree_get(s1.opt_state, "count")) == 0


def test_readme_train_step_example_runs(capsys):
    import pathlib

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    at = readme.index("## One Coconut training step")
    start = readme.index("```python", at) + len("```python")
    code = readme[start:readme.index("```", start)]
    assert len(code.strip().splitlines()) <= 16
    exec(compile(code, "README.md", "exec"), {})
    loss, step = capsys.readouterr().out.split()
    assert int(step) == 10 and 0 < float(loss) < 5


def test_explicit_positions_as_the_reference_collator_writes_them():
    """position_ids as the reference's collator builds them (0 on left padding, then 0, 1, ... over the row's
    tokens) give the loss of the default positions; other positions change it (GPT-2's learned positions)."""
    graphdef, params, exs, tok = _setup()
    batch = collate(exs, tok.pad_id, bucket=16)
    arrays = {k: jnp.asarray(v) for k, v in batch.arrays().items()}
    mask = np.asarray(batch.mask)
    ref_pos = np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    f = jax.jit(lambda p, a: loss_fn(p, graphdef, a, batch.prefix_len, batch.n_latent)[0])
    base = float(f(params, arrays))
    same = float(f(params, {**arrays, "positions": jnp.asarray(ref_pos)}))
    moved = float(f(params, {**arrays, "positions": jnp.asarray(ref_pos + 3)}))
    assert abs(base - same) < 1e-6 and abs(base - moved) > 1e-4


def test_dropout_draws_from_the_state_rng():
    """With dropout rates in the model config, a step draws its masks from the state's key: the same state gives
    the same step, another key another loss, and the deterministic loss (no key) differs from both."""
    graphdef, params, exs, tok = _setup()
    g_drop, _ = init_model(tiny_config("gpt2", vocab_size=tok.vocab_size, embd_dropout=0.1, resid_dropout=0.2,
                                       attn_dropout=0.1), seed=0)
    batch = collate(exs, tok.pad_id, bucket=16)
    opts = dict(lr=3e-3, weight_decay=0.01, grad_clip=1.0)
    runs = [train_step(TrainState.create(g_drop, jax.tree.map(jnp.copy, params), seed=s, **opts), batch)
            for s in (0, 0, 1)]
    (s0, m0), (s1, m1), (_, m2) = runs
    assert m0["loss"] == m1["loss"] and abs(m0["loss"] - m2["loss"]) > 1e-4
    for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    arrays = {k: jnp.asarray(v) for k, v in batch.arrays().items()}
    plain = float(jax.jit(lambda p: loss_fn(p, g_drop, arrays, batch.prefix_len, batch.n_latent)[0])(params))
    assert abs(plain - m0["loss"]) > 1e-4 and abs(plain - m2["loss"]) > 1e-4
