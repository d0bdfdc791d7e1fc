"""Curriculum trainer and grain pipeline: config validation, stage schedule, uniform_prob mixing, sharding and
padding, iterator state, optimizer resets, grad accumulation == big batch, learning, NaN handling."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_jax.curriculum import Curriculum
from latent_jax.train.checkpoint import Checkpointer
from latent_jax.train.pipeline import Placement, epoch_dataset, epoch_iterator, pad_batch
from latent_jax.latent import loss_fn
from latent_jax.layout import IGNORE, collate
from latent_jax.methods.base import uniform_example_stage as example_stage
from latent_jax.models import init_model
from latent_jax.testing import ToyMethod, quiet, tiny_config, toy_records
from latent_jax.train.trainer import TrainConfig, make_steps, train

@pytest.fixture(scope="module")
def model():
    return init_model(tiny_config("gpt2"), seed=0)


def test_config_validation_and_from_dict():
    for bad in [dict(epochs=0), dict(schedule="step"), dict(grad_clip=0.0), dict(lr=-1.0), dict(batch_size=0),
                dict(grad_accum=0), dict(lr="fast"),
                dict(checkpoint_every_steps=0), dict(max_len=1), dict(epochs=2.5)]:
        with pytest.raises(ValueError, match="TrainConfig." + next(iter(bad))):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match=r"unknown train config key.*'lrr'.*valid:.*'lr'"):
        TrainConfig.from_dict({"lrr": 1e-3})
    cfg = TrainConfig.from_dict({"lr": "1e-4", "output_dir": "/tmp/x", "grad_clip": 1})
    assert cfg.lr == 1e-4 and cfg.grad_clip == 1.0 and cfg.weight_decay == 0.01
    with pytest.raises(ValueError, match=r"train.epochs_per_stage is the method's now: set method.epochs_per_stage"):
        TrainConfig.from_dict({"epochs_per_stage": 2})


def test_curriculum_validation_and_split():
    for bad in [dict(uniform_prob=1.5), dict(reset_optimizer="always"), dict(epochs_per_stage=0),
                dict(epochs_per_stage=1.5)]:
        with pytest.raises(ValueError, match="method." + next(iter(bad))):
            Curriculum(**bad)
    cur, own = Curriculum.split({"epochs_per_stage": 3, "c_thought": 2, "uniform_prob": "0.25"})
    assert cur == Curriculum(3, 0.25, "stage") and own == {"c_thought": 2}
    assert Curriculum().reset_optimizer == "stage"


def test_stage_schedule_and_lr():
    cur = Curriculum(epochs_per_stage=2)
    assert [cur.stage(e, 2) for e in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert [cur.stage(e, None) for e in range(4)] == [0, 0, 1, 1]  # no max_latent_stage: counts as 0
    m = ToyMethod(max_latent_stage=2, epochs_per_stage=2)
    assert [m.stage_at(e, 0, 5) for e in range(10)] == [cur.stage(e, 2) for e in range(10)]
    c = TrainConfig(lr=1.0, warmup_steps=2, schedule="cosine")
    assert [round(c.lr_at(s, 12), 6) for s in (0, 1, 2, 7, 12)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert TrainConfig(lr=1.0, schedule="linear").lr_at(5, 10) == 0.5 and TrainConfig(lr=2.0).lr_at(99, 10) == 2.0


def test_uniform_prob_mixing_frequency():
    rec = {"steps": ["a", "b", "c"]}
    stages = np.array([example_stage(rec, i, epoch=4, stage=3, seed=0, uniform_prob=0.4) for i in range(6000)])
    # A random draw is uniform over [0, 3]: it differs from the scheduled stage 3 with probability 3/4.
    assert abs(np.mean(stages != 3) - 0.4 * 0.75) < 0.025
    assert all(abs(np.mean(stages == k) - 0.1) < 0.02 for k in range(3))
    again = [example_stage(rec, i, epoch=4, stage=3, seed=0, uniform_prob=0.4) for i in range(50)]
    assert again == list(stages[:50])  # deterministic in (seed, epoch, index)
    other = [example_stage(rec, i, epoch=5, stage=3, seed=0, uniform_prob=0.4) for i in range(50)]
    assert other != again
    assert all(example_stage(rec, i, 0, 2, 0, 0.0) == 2 for i in range(10))


def _questions(ds) -> list[tuple]:
    """The questions (5 tokens before <bot>) of the real rows, in batch order."""
    return [tuple(b.tokens[i, b.prefix_len - 6:b.prefix_len - 1].tolist()) for b in ds for i in range(len(b.mask))
            if b.mask[i].any()]


def test_pipeline_shuffle_shard_pad_and_resume():
    method, recs = ToyMethod(), toy_records(10)
    kw = dict(epoch=0, stage=1, seed=3, batch_size=4, bucket=16)
    ds = epoch_dataset(method, recs, **kw)
    batches = list(ds)
    assert len(ds) == 3 and all(b.tokens.shape[0] == 4 for b in batches)  # last partial batch padded
    assert batches[-1].mask.sum(1).tolist()[2:] == [0, 0] and (batches[-1].labels[2:] == IGNORE).all()
    assert all(b.n_latent == 1 and b.prefix_len == 16 for b in batches)
    order = _questions(batches)
    assert sorted(order) == sorted(tuple(r["question"]) for r in recs)
    order1 = _questions(epoch_dataset(method, recs, **{**kw, "epoch": 1}))
    assert order1 != order and sorted(order1) == sorted(order)  # reshuffled each epoch
    assert _questions(epoch_dataset(method, recs, **kw)) == order  # deterministic
    shards = [_questions(epoch_dataset(method, recs, **kw, process_index=p, process_count=3)) for p in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3] and len(set(sum(shards, []))) == 9  # disjoint, equal sizes
    it = epoch_iterator(ds)
    next(it)
    state = it.get_state()
    expected = next(it)
    it2 = epoch_iterator(ds)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2).tokens, expected.tokens)


def test_pad_batch_keeps_loss(model):
    graphdef, params = model
    method = ToyMethod(max_latent_stage=2)
    b = collate([method.encode(r, s) for r, s in zip(toy_records(3), (0, 1, 2))], 0, bucket=8)
    big = pad_batch(b, b.prefix_len + 8, b.n_latent + 2, b.tokens.shape[1] + 16)
    f = jax.jit(loss_fn, static_argnames=("graphdef", "prefix_len", "n_latent"))
    l1, a1 = f(params, graphdef, b.arrays(), b.prefix_len, b.n_latent)
    l2, a2 = f(params, graphdef, big.arrays(), big.prefix_len, big.n_latent)
    assert int(a1["n_tokens"]) == int(a2["n_tokens"]) and abs(float(l1) - float(l2)) < 1e-5


def test_grad_accum_equals_big_batch(model):
    """Token-weighted accumulation over 2 micro-batches (different layouts: 0 and 1 latent columns, different
    lengths) == the gradient of one batch's mean token loss."""
    graphdef, params = model
    method = ToyMethod()
    exs = [method.encode(r, int(i >= 4)) for i, r in enumerate(toy_records(8, seed=1))]
    _, micro_step, _ = make_steps(graphdef, 0.01, None)
    place = Placement(4)  # as `train` places them (single device): reuses the compiled steps
    params = place.tree(params)
    zeros = lambda: place.tree(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))  # noqa: E731
    big = collate(exs, 0, bucket=16)
    acc_big, s_big = micro_step(params, zeros(), place.batch(big), None, big.prefix_len, big.n_latent)
    acc, n_tok = zeros(), 0
    for k in (0, 4):
        mb = collate(exs[k:k + 4], 0, bucket=16)
        acc, s = micro_step(params, acc, place.batch(mb), None, mb.prefix_len, mb.n_latent)
        n_tok += int(s["n_tokens"])
    assert n_tok == int(s_big["n_tokens"]) and n_tok > 0
    for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(acc_big)):
        np.testing.assert_allclose(np.asarray(a) / n_tok, np.asarray(b) / n_tok, atol=1e-6, rtol=1e-5)


def test_micro_batch_normalization_is_the_mean_of_micro_batch_means(model):
    """loss_normalization "micro_batch" (the reference's accumulation): the step's gradient is the mean over its
    micro-batches of d(mean token loss); it differs from the token-weighted gradient when token counts differ."""
    graphdef, params = model
    method = ToyMethod()
    exs = [method.encode(r, int(i >= 4)) for i, r in enumerate(toy_records(8, seed=1))]
    _, micro_tok, _ = make_steps(graphdef, 0.01, None)
    _, micro_mb, _ = make_steps(graphdef, 0.01, None, normalization="micro_batch")
    place = Placement(4)
    params = place.tree(params)
    zeros = lambda: place.tree(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))  # noqa: E731
    acc, means, counts = zeros(), [], []
    for k in (0, 4):
        mb = collate(exs[k:k + 4], 0, bucket=16)
        acc, s = micro_mb(params, acc, place.batch(mb), None, mb.prefix_len, mb.n_latent)
        g, s2 = micro_tok(params, zeros(), place.batch(mb), None, mb.prefix_len, mb.n_latent)
        counts.append(int(s2["n_tokens"]))
        means.append(jax.tree.map(lambda x, n=counts[-1]: np.asarray(x) / n, g))
    assert counts[0] != counts[1]
    want = jax.tree.map(lambda a, b: (a + b) / 2, *means)
    for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a) / 2, b, atol=1e-6, rtol=1e-5)
    r = train(method, toy_records(8), graphdef, params, quiet(batch_size=4, grad_accum=2,
                                                               loss_normalization="micro_batch"))
    assert r.step == 1 and np.isfinite(r.history[-1]["train_loss"])
    with pytest.raises(ValueError, match="loss_normalization"):
        TrainConfig(loss_normalization="mean")


@pytest.mark.parametrize("policy,epochs_per_stage,expected_count", [("stage", 1, 2), ("stage", 2, 4),
                                                                    ("never", 1, 4), ("epoch", 2, 2)])
def test_optimizer_reset(model, policy, epochs_per_stage, expected_count):
    """2 epochs x 2 steps: AdamW's count (and moments) restart when the policy says so."""
    graphdef, params = model
    r = train(ToyMethod(epochs_per_stage=epochs_per_stage, reset_optimizer=policy), toy_records(8), graphdef,
              params, quiet(epochs=2, batch_size=4))
    adam = r.opt_state[0]
    assert r.step == 4 and int(adam.count) == expected_count


def test_stage_reset_needs_stages(model):
    """A method with one stage and no schedule (CoT, No-CoT, Pause) keeps its AdamW state across epochs even
    though the scheduled stage number grows (reset_optimizer "stage")."""
    graphdef, params = model
    r = train(ToyMethod(max_latent_stage=0, reset_optimizer="stage"), toy_records(8), graphdef, params,
              quiet(epochs=2, batch_size=4))
    assert r.step == 4 and int(r.opt_state[0].count) == 4


@pytest.mark.parametrize("accs,best_epoch", [((0.0, 0.0, 0.0), 2), ((0.2, 0.5, 0.1), 1), ((0.5, 0.2, 0.5), 2)])
def test_keep_best_prefers_the_later_epoch_on_ties(model, accs, best_epoch):
    graphdef, params = model
    seen = []

    def eval_fn(g, p, stage):
        seen.append(jax.tree.map(np.asarray, p))
        return {"accuracy": accs[len(seen) - 1]}
    r = train(ToyMethod(), toy_records(4), graphdef, params,
              quiet(epochs=3, batch_size=4, lr=1e-2), eval_fn=eval_fn)
    assert r.best_accuracy == max(accs) and len(seen) == 3
    for a, b in zip(jax.tree.leaves(r.best_params), jax.tree.leaves(seen[best_epoch])):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_keep_best_only_among_eligible_stages(model):
    """A method's `eligible_for_best(stage)` (iCoT-SI: all CoT removed) restricts keep-best: the accurate epoch-0
    model (stage 0) is not kept; with no eligible epoch there is no best (the run's final weights are used)."""
    graphdef, params = model

    class Late(ToyMethod):
        def eligible_for_best(self, stage):
            return stage >= self.need
    for need, want in ((1, 0.2), (9, None)):
        m = Late()
        m.need = need
        accs = iter((0.9, 0.1, 0.2))
        r = train(m, toy_records(4), graphdef, params, quiet(epochs=3, batch_size=4),
                  eval_fn=lambda g, p, stage: {"accuracy": next(accs)})
        assert r.best_accuracy == want and (r.best_params is None) == (want is None)


def test_training_reduces_loss(model):
    """batch_size 8: data parallel over the 8 CPU devices (params replicated, batch split)."""
    graphdef, params = model
    r = train(ToyMethod(epochs_per_stage=100), toy_records(8), graphdef, params,
              quiet(epochs=16, batch_size=8, lr=1e-2))
    losses = [h["train_loss"] for h in r.history]
    assert len(jax.tree.leaves(r.params)[0].sharding.device_set) == jax.device_count() == 8
    assert losses[-1] < 0.5 * losses[0], losses


def test_nan_stops_and_keeps_last_good_checkpoint(model, tmp_path):
    graphdef, params = model
    recs = toy_records(8)
    recs[5]["poison_stage"] = 1  # NaN in epoch 1 (stage 1) only
    cfg = quiet(epochs=3, batch_size=4, checkpoint_every_steps=1, output_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"loss is nan at optimizer step (3|4) .*last good checkpoint: step"):
        train(ToyMethod(), recs, graphdef, params, cfg)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ck = Checkpointer(tmp_path / "checkpoints")
    last = ck.latest_step()
    assert last == lines[-1]["step"] >= 2 and all(np.isfinite(x["loss"]) for x in lines)
    restored, _ = ck.restore(last, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))
    assert ck.restore_meta(last)["step"] == last
    ck.close()


class HookMethod(ToyMethod):
    """Uses the optional Method hooks: a per-step schedule, per-stage loss, on_stage_start and checkpointed state."""

    def __init__(self, **curriculum):
        super().__init__(max_latent_stage=3, **curriculum)
        self.started, self.loss_stages, self.restored = [], [], None

    def schedule(self, epoch, step, steps_per_epoch):  # the stage grows every 2 optimizer steps
        return (epoch * steps_per_epoch + step) // 2

    def loss_for_stage(self, stage):
        self.loss_stages.append(stage)
        return loss_fn

    def on_stage_start(self, stage, graphdef, params, records):
        assert len(records) == 8 and jax.tree.leaves(params)
        self.started.append(stage)

    def get_state(self):
        return {"started": self.started}

    def set_state(self, state):
        self.restored = state


@pytest.mark.parametrize("policy,expected_count", [("stage", 2), ("never", 8)])
def test_method_hooks(model, tmp_path, policy, expected_count):
    """2 epochs x 4 steps, stages [0 0 1 1 | 2 2 3 3]: the optimizer restarts at each change (steps 3, 5, 7), the
    batches are encoded at their step's stage, on_stage_start runs before epochs that begin a new stage, and the
    method state is saved in checkpoints and handed back on resume."""
    graphdef, params = model
    m, seen = HookMethod(reset_optimizer=policy), []
    cfg = quiet(epochs=2, batch_size=2, output_dir=str(tmp_path))
    r = train(m, toy_records(8), graphdef, params, cfg, on_step=lambda rec: seen.append(rec["stage"]))
    assert seen == [0, 0, 1, 1, 2, 2, 3, 3] == m.loss_stages
    assert int(r.opt_state[0].count) == expected_count and m.started == [0, 2]
    m2 = HookMethod(reset_optimizer=policy)
    r2 = train(m2, toy_records(8), graphdef, params, cfg)  # finished run: restores the final state
    assert m2.restored == {"started": [0, 2]} and m2.started == [] and r2.step == 8


def test_schedule_sets_the_stage_of_each_batch():
    m = HookMethod()
    ds = epoch_dataset(m, toy_records(8, n_steps=4), epoch=1, stage=0, seed=0, batch_size=2, bucket=16,
                       stage_fn=lambda micro: m.schedule(1, micro, 4))
    assert [b.n_latent for b in ds] == [2, 2, 3, 3]  # ToyMethod: stage k -> k latent slots


def test_group_by_length_is_a_deterministic_permutation_of_sorted_windows():
    from latent_jax.train.pipeline import group_by_length

    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 90, 203).tolist()
    order = group_by_length(lengths, batch=8, groups=4, seed=1)
    assert sorted(order) == list(range(203)) and order == group_by_length(lengths, 8, 4, seed=1)
    assert order != group_by_length(lengths, 8, 4, seed=2)
    batches = [order[i:i + 8] for i in range(0, 200, 8)]
    for w in range(0, 200, 32):  # each window of 4 batches holds the same items, now sorted into batches
        window = [i for b in batches[w // 8:w // 8 + 4] for i in b]
        assert sorted(window) == list(range(w, min(w + 32, 203))) or w + 32 > 200
    spread = lambda bs: np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs])  # noqa
    plain = [list(range(i, i + 8)) for i in range(0, 200, 8)]
    assert spread(batches) < spread(plain) / 2  # rows of a batch have similar lengths
    last = sorted(range(192, 203), key=lambda i: lengths[i])  # the last window: the partial batch comes last
    assert order[-3:] == last[-3:] and order[-11:-3] == last[:8]


def test_length_groups_cut_padding_and_keep_every_record():
    from latent_jax.data import generate_prosqa, symbolic_records
    from latent_jax.data.symbolic import symbolic_vocab
    from latent_jax.methods import build_method
    from latent_jax.word_tokenizer import WordTokenizer

    recs = symbolic_records(generate_prosqa(256, seed=0, rung="small"))
    method = build_method("coconut", WordTokenizer(symbolic_vocab()), max_latent_stage=4)
    kw = dict(epoch=0, stage=2, seed=0, batch_size=16, bucket=8)
    pads = {}
    for g in (0, 8):
        batches = list(epoch_dataset(method, recs, **kw, length_groups=g))
        pads[g] = 1 - sum(b.mask.sum() for b in batches) / sum(b.mask.size for b in batches)
        assert sum(int(b.mask.any(1).sum()) for b in batches) == 256
    assert pads[8] < 0.75 * pads[0]  # the rest is the rounding of prefix and length to the bucket
    with pytest.raises(ValueError, match="length_groups"):
        TrainConfig(length_groups=-1)


def test_fixed_shapes_give_one_compile_shape_per_stage_with_thoughts():
    from latent_jax.data import generate_prosqa, symbolic_records
    from latent_jax.data.symbolic import symbolic_vocab
    from latent_jax.methods import build_method
    from latent_jax.word_tokenizer import WordTokenizer

    recs = symbolic_records(generate_prosqa(200, seed=0, rung="small"))
    method = build_method("coconut", WordTokenizer(symbolic_vocab()), max_latent_stage=4)
    for stage in (0, 2, 5):
        kw = dict(epoch=0, stage=stage, seed=0, batch_size=16, bucket=8, length_groups=8)
        free = list(epoch_dataset(method, recs, **kw))
        fixed = list(epoch_dataset(method, recs, **kw, fixed_shapes=True))
        shapes = {(b.tokens.shape, b.prefix_len, b.n_latent) for b in fixed}
        assert len({(b.tokens.shape, b.prefix_len) for b in free}) > 1, stage
        assert len(shapes) == (1 if stage else len({(b.tokens.shape, b.prefix_len) for b in free})), stage
        for a, b in zip(free, fixed):  # same rows, same real tokens, only more padding
            assert a.n_latent == b.n_latent and a.mask.sum() == b.mask.sum()
            assert (a.tokens[a.mask] == b.tokens[b.mask]).all() and (a.labels[a.mask] == b.labels[b.mask]).all()


def test_a_field_added_later_at_its_default_does_not_block_resume():
    from latent_jax.train.trainer import comparable_trajectory

    saved = {"lr": 1e-3, "batch_size": 8, "method": "coconut"}
    now = {**saved, "length_groups": 0}
    assert comparable_trajectory(now, saved) == saved  # an older checkpoint resumes
    assert comparable_trajectory({**saved, "length_groups": 8}, saved)["length_groups"] == 8  # a real change stays
    assert comparable_trajectory({**saved, "batch_size": 16}, saved)["batch_size"] == 16


def test_a_model_field_added_later_at_its_default_does_not_block_resume():
    """A checkpoint written before ModelConfig had dropout rates resumes when they are 0 now; a real dropout
    setting is a difference that is refused."""
    from latent_jax.train.checkpoint import check_compatible

    now = tiny_config("gpt2").to_dict()
    older = {k: v for k, v in now.items() if not k.endswith("_dropout")}
    check_compatible({"model_config": older}, now, {})
    with pytest.raises(ValueError, match="model.resid_dropout"):
        check_compatible({"model_config": older}, {**now, "resid_dropout": 0.1}, {})


def test_old_module_names_are_aliases_of_the_training_wing():
    """`latent_jax.trainer`, `train_step`, `checkpoint`, `runlock`, `data.pipeline` and `vqvae` moved (to
    `latent_jax.train.*` and `latent_jax.methods.vqvae`); the old names are the same module objects, so user code
    and monkeypatching keep working. `Placement` lives in `latent_jax.sharding`."""
    import importlib

    import latent_jax.sharding as sharding
    import latent_jax.train.pipeline as pipeline

    pairs = {"trainer": "train.trainer", "train_step": "train.step", "checkpoint": "train.checkpoint",
             "runlock": "train.runlock", "data.pipeline": "train.pipeline", "vqvae": "methods.vqvae"}
    for old, new in pairs.items():
        assert importlib.import_module(f"latent_jax.{old}") is importlib.import_module(f"latent_jax.{new}"), old
    assert pipeline.Placement is sharding.Placement
