"""Sharding on the fake 8-device CPU mesh: the same loss and gradients (Coconut batch with continuous thoughts) for
every (data, fsdp, tensor) mesh, parameters really split, checkpoints restored across meshes, the trainer's mesh
option, and clear errors for impossible meshes / non-dividing axes."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from latent_jax.train.checkpoint import Checkpointer, abstract_like
from latent_jax.train.pipeline import Placement
from latent_jax.latent import loss_fn
from latent_jax.models import forward, init_model
from latent_jax.sharding import MeshConfig, batch_sharding, make_mesh, shard_params, tree_shardings
from latent_jax.testing import ToyMethod, make_batch, quiet, tiny_config, toy_records
from latent_jax.train.trainer import TrainConfig, train

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
# compile-time bound on 2 CPU cores: skip LLVM's expensive passes (numerics are unchanged, only speed)
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def block_weight(params, *path):
    """A block weight and the PartitionSpec prefix of its layer axis: (array, ()) unscanned (layer 0),
    (array [L, ...], (None,)) scanned (the "layers" axis is never sharded)."""
    blocks = params["blocks"]
    scanned = "attn" in blocks
    node = blocks if scanned else blocks[0]
    for k in path:
        node = node[k]
    return node[...], ((None,) if scanned else ())


def mesh_of(d, f, t):
    return make_mesh(MeshConfig(ici_data=d, ici_fsdp=f, ici_tensor=t), jax.devices()[:d * f * t])


@pytest.fixture(scope="module", params=[False, True], ids=["list", "scan"])
def setup(request):
    """8 heads, vocab 256, d_ff 256: every weight axis divides every mesh above. 8 rows, 0-4 thoughts each. Both
    layer layouts (a Python list of blocks, one scan over stacked blocks)."""
    cfg = tiny_config("gpt2", n_heads=8, n_kv_heads=8, head_dim=8, vocab_size=256, n_layers=1,
                      scan_layers=request.param)
    g, p = init_model(cfg, seed=3)
    specs = [(6, 3, 5), (9, 2, 4), (5, 4, 7), (12, 0, 3), (7, 1, 6), (4, 3, 2), (8, 2, 5), (3, 4, 4)]
    b = make_batch(np.random.default_rng(0), cfg.vocab_size, specs)
    assert b.n_latent == 4 and b.latent.any()
    vg = jax.value_and_grad(lambda pr, batch: loss_fn(pr, g, batch, b.prefix_len, b.n_latent)[0])
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(vg, compiler_options=FAST)(p, {k: jnp.asarray(v) for k, v in b.arrays().items()})
    return g, p, b, vg, ref


@pytest.mark.parametrize("shape", MESHES, ids=["x".join(map(str, m)) for m in MESHES])
def test_loss_and_grads_equal_on_every_mesh(setup, shape):
    g, p, b, vg, (ref_loss, ref_grads) = setup
    mesh = mesh_of(*shape)
    params = shard_params(mesh, p)
    batch = jax.device_put(b.arrays(), batch_sharding(mesh))
    with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
        loss, grads = jax.jit(vg, compiler_options=FAST)(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-4)
    # the parameters really are split: wq [D=64, N=8, H=8] -> embed over fsdp, heads over tensor
    d, f, t = shape
    wq, lead = block_weight(params, "attn", "wq")
    assert wq.sharding.spec == P(*lead, "fsdp", "tensor", None)
    assert {s.data.shape for s in wq.addressable_shards} == {(*wq.shape[:len(lead)], 64 // f, 8 // t, 8)}
    emb = params["embed"][...]
    assert {s.data.shape for s in emb.addressable_shards} == {(256 // t, 64 // f)}
    assert len(wq.sharding.device_set) == d * f * t


def test_llama_gqa_sharded_logits_equal_single_device():
    cfg = tiny_config("llama", n_heads=8, n_kv_heads=2, head_dim=8, vocab_size=256, n_layers=1)
    g, p = init_model(cfg, seed=1)
    tokens = np.random.default_rng(1).integers(0, 256, (4, 12)).astype(np.int32)
    f = jax.jit(lambda pr, t: forward(g, pr, tokens=t).logits, compiler_options=FAST)
    mesh = mesh_of(1, 2, 2)  # kv_heads 2 over tensor 2
    with jax.default_matmul_precision("highest"):
        ref = f(p, tokens)
        with jax.set_mesh(mesh):
            out = f(shard_params(mesh, p), jax.device_put(tokens, batch_sharding(mesh)))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert out.sharding.spec[-1] == "tensor"  # the logits constraint: vocab over tensor


def test_checkpoint_saved_on_one_mesh_restores_onto_another(setup, tmp_path):
    _, p, *_ = setup
    src, dst = mesh_of(2, 4, 1), mesh_of(1, 2, 4)
    saved = shard_params(src, p)
    ck = Checkpointer(tmp_path / "ck", 2)
    ck.save(1, saved, {"step": 1})
    ck.wait()
    target = abstract_like(p, tree_shardings(dst, p))  # abstract: shapes, dtypes and the new mesh's shardings
    restored, _ = ck.restore(1, target)
    ck.close()
    for a, r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(p), jax.tree.leaves(target)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
        assert a.sharding == t.sharding
    wq, lead = block_weight(restored, "attn", "wq")
    assert {s.data.shape for s in wq.addressable_shards} == {(*wq.shape[:len(lead)], 32, 2, 8)}


@pytest.mark.parametrize("scan", [False, True])
def test_trainer_mesh_option_equals_data_parallel(scan):
    """Two optimizer steps with mesh 2x2x2 + remat == the default placement (same losses and parameters);
    params and AdamW moments stay sharded by the rules through the donated, jitted steps. Both layer layouts."""
    cfg = tiny_config("gpt2", n_heads=8, n_kv_heads=8, head_dim=8, vocab_size=256, n_layers=1, scan_layers=scan)
    g, p = init_model(cfg, seed=0)
    recs = toy_records(16, seed=2)
    kw = dict(epochs=1, batch_size=8, lr=1e-2)
    with jax.default_matmul_precision("highest"):
        ref = train(ToyMethod(), recs, g, p, quiet(**kw))
        res = train(ToyMethod(), recs, g, p, quiet(mesh={"ici_data": 2, "ici_fsdp": 2, "ici_tensor": -1},
                                                    remat="full", **kw))
    assert res.step == ref.step == 2
    np.testing.assert_allclose([h["train_loss"] for h in res.history], [h["train_loss"] for h in ref.history],
                               rtol=1e-5)
    for a, r in zip(jax.tree.leaves(res.params), jax.tree.leaves(ref.params)):  # lr 1e-2 steps; bk's gradient is
        np.testing.assert_allclose(a, r, atol=2e-4)  # analytically 0 (float noise that Adam scales up to ~1e-4)
    wq, lead = block_weight(res.params, "attn", "wq")
    assert wq.sharding.spec == P(*lead, "fsdp", "tensor", None) and len(wq.sharding.device_set) == 8
    mu, _ = block_weight(res.opt_state[0].mu, "mlp", "w_in")
    assert mu.sharding.spec == P(*lead, "fsdp", "tensor")


def test_bad_meshes_and_non_dividing_axes_fail_clearly():
    with pytest.raises(ValueError, match=r"needs 3 devices, but 8 are available"):
        make_mesh(MeshConfig(ici_data=3))
    with pytest.raises(ValueError, match=r"do not divide the 8 devices"):
        make_mesh(MeshConfig(ici_data=-1, ici_fsdp=3))
    with pytest.raises(ValueError, match=r"at most one axis may be -1"):
        MeshConfig(ici_data=-1, ici_fsdp=-1)
    with pytest.raises(ValueError, match=r"MeshConfig.ici_tensor=0"):
        MeshConfig(ici_tensor=0)
    with pytest.raises(ValueError, match=r"unknown mesh config key\(s\) \['model'\]"):
        TrainConfig(mesh={"model": 2})
    with pytest.raises(ValueError, match=r"TrainConfig.remat='some'"):
        TrainConfig(remat="some")
    # tiny_config: 4 heads, vocab 211 -> a tensor axis of 8 splits neither; the error names the param and sizes
    _, p = init_model(tiny_config("gpt2", scan_layers=False))
    with pytest.raises(ValueError, match=r"param \['embed'\]: axis 'vocab' has size 211, not divisible by mesh axes"
                                         r" \('tensor',\) of size 8 \(mesh \{'data': 1, 'fsdp': 1, 'tensor': 8\}\)"):
        shard_params(mesh_of(1, 1, 8), {"embed": p["embed"]})
    with pytest.raises(ValueError, match=r"param \['blocks'\]\[0\]\['attn'\]\['bk'\]: axis 'kv_heads' has size 4"):
        tree_shardings(mesh_of(1, 1, 8), p)
    with pytest.raises(ValueError, match=r"param \['x'\]: unknown logical axis 'model'"):
        tree_shardings(mesh_of(1, 1, 8), {"x": nnx.Param(jnp.zeros(4), axes=("model",))})
    with pytest.raises(ValueError, match=r"global batch 6 is not divisible by the mesh's batch axes \(data×fsdp = 8"):
        Placement(6, {"ici_fsdp": -1})


def test_placement_shards_opt_state_and_keeps_scalars_replicated():
    _, p = init_model(tiny_config("gpt2", n_heads=8, n_kv_heads=8, head_dim=8, vocab_size=256))
    place = Placement(8, {"ici_fsdp": 4, "ici_data": 2})
    import optax

    state = place.tree(optax.adamw(1.0).init(p))
    assert state[0].count.sharding.spec == P()
    nu = state[0].nu["embed"][...]
    assert nu.sharding.spec == P("tensor", "fsdp") and {s.data.shape for s in nu.addressable_shards} == {(256, 16)}
    assert place.batch(collate_rows()).get("tokens").sharding.spec == P(("data", "fsdp"))


@functools.lru_cache
def collate_rows():
    return make_batch(np.random.default_rng(0), 200, [(3, 1, 2)] * 8)


def test_latent_generation_on_a_mesh_equals_single_device():
    """Decode (prefill, continuous thoughts, compiled while_loop) with params split over a 2x2x2 mesh and the model's
    activation constraints active (batch over data x fsdp): the same greedy tokens as on one device."""
    import latent_jax.evaluate as ev
    from latent_jax.generate import SamplingConfig
    from latent_jax.methods.base import Prompt

    cfg = tiny_config("llama", n_heads=8, n_kv_heads=2, head_dim=8, vocab_size=256, n_layers=1)
    g, p = init_model(cfg, seed=5)
    p = jax.tree.map(lambda x: x * 6.0, p)  # varied greedy outputs
    rng = np.random.default_rng(1)
    prompts = [Prompt([int(x) for x in rng.integers(3, 250, n)], k, [5]) for n, k in
               ((9, 3), (4, 0), (13, 2), (6, 1))]
    sampling = SamplingConfig(max_new_tokens=5)
    ref = ev.generate_prompts(g, p, prompts, sampling, eos_id=-1, pad_id=0, batch_size=4)
    mesh = mesh_of(2, 2, 2)
    sharded = shard_params(mesh, p)
    assert len(sharded["embed"][...].sharding.device_set) == 8
    with jax.set_mesh(mesh):
        out = ev.generate_prompts(g, sharded, prompts, sampling, eos_id=-1, pad_id=0, batch_size=4)
    assert out == ref and len({tuple(o) for o in ref}) > 1
