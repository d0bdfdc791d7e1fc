"""Memory options: decoder-layer remat (none / full / dots) leaves loss and gradients of the latent loop unchanged;
bf16 compute with f32 master weights trains and keeps the params in f32; the memory benchmark runs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_jax.config import ModelConfig
from latent_jax.latent import loss_fn
from latent_jax.models import forward, init_model
from latent_jax.models.transformer import with_remat
from latent_jax.testing import ToyMethod, make_batch, quiet, tiny_config, toy_records
from latent_jax.train.trainer import train


def test_remat_keeps_latent_loss_and_grads():
    cfg = tiny_config("llama", n_layers=2)
    g, p = init_model(cfg, seed=5)
    b = make_batch(np.random.default_rng(3), cfg.vocab_size, [(6, 3, 5), (9, 2, 4), (4, 0, 6)])

    def vg(graphdef):  # compile-time bound on CPU: LLVM's cheap pipeline (same numerics)
        f = jax.jit(jax.value_and_grad(lambda pr: loss_fn(pr, graphdef, b.arrays(), b.prefix_len, b.n_latent)[0]),
                    compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
        return f(p)

    with jax.default_matmul_precision("highest"):
        ref_loss, ref_grads = vg(g)
        for remat in ("full", "dots"):
            g_r = with_remat(g, p, remat)
            assert g_r != g
            loss, grads = vg(g_r)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
            for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
                np.testing.assert_allclose(a, r, atol=1e-6, rtol=1e-5)
    assert with_remat(g, p, "none") is g


def test_remat_config_values():
    assert tiny_config("gpt2", remat="dots").remat == "dots"
    assert tiny_config("gpt2", remat=True).remat == "full"  # older boolean configs
    assert ModelConfig.from_dict(tiny_config("gpt2").to_dict()).remat == "none"
    with pytest.raises(ValueError, match=r"ModelConfig.remat='some'; valid: \('none', 'full', 'dots'\)"):
        tiny_config("gpt2", remat="some")


def test_bf16_compute_with_f32_master_weights():
    cfg = tiny_config("gpt2", dtype="bfloat16", param_dtype="float32", n_layers=1)
    g, p = init_model(cfg, seed=0)
    out = forward(g, p, tokens=jnp.ones((1, 4), jnp.int32))
    assert out.hidden.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
    r = train(ToyMethod(), toy_records(8), g, p, quiet(epochs=1, batch_size=4, lr=1e-2, remat="dots"))
    assert r.step == 2 and np.isfinite(r.history[0]["train_loss"])
    assert {x.dtype for x in jax.tree.leaves(r.params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(r.opt_state) if x.ndim} == {jnp.dtype("float32")}
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(r.params), jax.tree.leaves(p))]
    assert all(changed)  # small updates are not lost to bf16 rounding: the master copy is f32


@pytest.mark.slow
def test_memory_benchmark_runs(tmp_path):
    """The benchmark on a small model: compiles on the fake mesh, remat lowers the saved residuals, bad meshes -> error row."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "benchmarks"))
    import memory

    rows = memory.main(["--models", "gpt2-tiny", "--meshes", "2x2x2,1x1x8", "--remat", "none,full", "--batch", "8",
                        "--length", "64", "--devices", "0", "--out", str(tmp_path / "m.json")])
    ok = {r["remat"]: r for r in rows if r["mesh"] == "2x2x2"}
    assert ok["none"]["peak_gib"] > 0 and ok["full"]["residuals_gib"] < ok["none"]["residuals_gib"]
    assert all("not divisible" in r["error"] for r in rows if r["mesh"] == "1x1x8")  # 4 heads over tensor=8
    # issue 20: scanned layers and the chunked loss; only the full-logits row keeps a B*(T-1)*V residual
    rows = memory.main(["--models", "gpt2-tiny", "--meshes", "2x2x2", "--remat", "none", "--batch", "8",
                        "--length", "64", "--n-latent", "2", "--scan", "true", "--loss-chunk", "0,16"])
    full, chunked = rows
    assert full["scanned"] and full["btv_residuals"] == 1 and chunked["btv_residuals"] == 0
    assert chunked["largest_vocab_residual"] == "float32[50304, 64]"  # dL/dW of the head, [V, D]
