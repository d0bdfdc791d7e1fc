"""Scanned layers (issue 20): one `lax.scan` over stacked block params equals the Python loop over a list of
blocks (logits, Coconut loss and gradients, dropout, remat), the compiled program stays the same size as depth
grows, both layouts share HF names and convert, and a checkpoint refuses the other layout with both named."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_jax.latent import loss_fn
from latent_jax.models import forward, init_model
from latent_jax.params import flatten_params, relayout, resize_vocab
from latent_jax.testing import ToyMethod, make_batch, quiet, tiny_config, toy_records

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}  # compile time on 2 cores


def _grads(cfg, batch, rng=None):
    g, p = init_model(cfg, seed=4)
    vg = jax.value_and_grad(lambda pr: loss_fn(pr, g, batch.arrays(), batch.prefix_len, batch.n_latent, rng)[0])
    loss, grads = jax.jit(vg, compiler_options=FAST)(p)
    return float(loss), {k: np.asarray(v) for k, v in flatten_params(grads).items()}


@pytest.mark.parametrize("family,remat", [("gpt2", "full"), ("llama", "none")])
def test_scanned_equals_list(family, remat):
    """Same seed -> the same weights in both layouts; the Coconut loss and every gradient agree (f32), with dropout
    (the layer index folds the key alike), without and with a remat policy on the scan body."""
    base = tiny_config(family, n_layers=3, resid_dropout=0.1, attn_dropout=0.1)
    flat_list = flatten_params(init_model(base.replace(scan_layers=False), seed=4)[1])
    flat_scan = flatten_params(init_model(base.replace(scan_layers=True), seed=4)[1])
    assert flat_list.keys() == flat_scan.keys() and "blocks.2.attn.wq" in flat_scan
    assert all(np.array_equal(flat_list[k], flat_scan[k]) for k in flat_list)
    batch = make_batch(np.random.default_rng(1), base.vocab_size, [(6, 3, 5), (9, 2, 4), (4, 1, 7)])
    assert batch.n_latent == 3
    rng = jax.random.PRNGKey(7)
    ref_loss, ref = _grads(base.replace(scan_layers=False), batch, rng)
    loss, grads = _grads(base.replace(scan_layers=True, remat=remat), batch, rng)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k in ref:
        np.testing.assert_allclose(grads[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_compiled_program_does_not_grow_with_depth():
    """Scanned, the lowered Coconut train step holds one block whatever the depth; the list unrolls every layer."""
    batch = make_batch(np.random.default_rng(0), 211, [(6, 2, 5), (5, 1, 4)])

    def program_lines(n_layers, scan):
        g, p = init_model(tiny_config("llama", n_layers=n_layers, scan_layers=scan))
        f = jax.grad(lambda pr: loss_fn(pr, g, batch.arrays(), batch.prefix_len, batch.n_latent)[0])
        return len(jax.jit(f).lower(p).as_text().splitlines())

    scan2, scan8 = program_lines(2, True), program_lines(8, True)
    list2, list8 = program_lines(2, False), program_lines(8, False)
    assert scan8 <= 1.02 * scan2, (scan2, scan8)  # only the stacked params' shapes change
    assert list8 > 2.5 * list2, (list2, list8)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layouts_share_hf_names_and_convert(family, tmp_path):
    from latent_jax.hf import load_hf, save_hf

    cfg = tiny_config(family, scan_layers=True)
    g, p = init_model(cfg, seed=2)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    ref = forward(g, p, tokens=tokens).logits
    save_hf(tmp_path / "m", cfg, p)
    cfg2, g2, p2 = relayout(*load_hf(tmp_path / "m")[::2], scan_layers=False)  # config.json names no layout
    assert not cfg2.scanned and "0" in str(jax.tree_util.tree_structure(p2["blocks"]))
    np.testing.assert_allclose(forward(g2, p2, tokens=tokens).logits, ref, rtol=1e-5, atol=1e-6)
    cfg3, g3, p3 = relayout(cfg2, p2, scan_layers=True)
    assert cfg3.scanned and p3["blocks"]["attn"]["wq"][...].shape[0] == cfg.n_layers
    np.testing.assert_array_equal(forward(g3, p3, tokens=tokens).logits, ref)
    cfg4, _, p4 = resize_vocab(cfg3, p3, cfg.vocab_size + 5, init_from=3)
    assert cfg4.scanned and p4["embed"][...].shape[0] == cfg.vocab_size + 5
    np.testing.assert_array_equal(p4["blocks"]["mlp"]["w_in"][...], p3["blocks"]["mlp"]["w_in"][...])


def test_checkpoint_of_the_other_layout_is_refused(tmp_path):
    from latent_jax.train.trainer import train

    recs = toy_records(8)
    cfg = quiet(epochs=1, batch_size=4, output_dir=str(tmp_path))
    g, p = init_model(tiny_config("gpt2", n_layers=1, scan_layers=False))
    train(ToyMethod(), recs, g, p, cfg)
    g2, p2 = init_model(tiny_config("gpt2", n_layers=1, scan_layers=True))
    with pytest.raises(ValueError, match=r"refusing to resume .* decoder layers are a list \(scan_layers=False.*"
                                         r"this run's are scanned \(scan_layers=True.*scan_layers: false"):
        train(ToyMethod(), recs, g2, p2, cfg)


def test_bad_layout_values_fail_at_load():
    with pytest.raises(ValueError, match=r"scan_layers='yes'"):
        tiny_config("gpt2", scan_layers="yes")
    with pytest.raises(ValueError, match=r"loss_chunk=-2 must be an integer >= 0"):
        tiny_config("gpt2", loss_chunk=-2)
