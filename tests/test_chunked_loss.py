"""The chunked loss (issue 20): LM head + cross-entropy over chunks of positions, with a fused custom VJP, equals
the full-logits loss (values, counts, every gradient; GPT-2 and Llama, with and without thoughts, a chunk that
does not divide the sequence), and the backward pass saves no [B, T, V] tensor."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from latent_jax.latent import latent_forward, loss_fn
from latent_jax.loss import chunked_token_loss
from latent_jax.models import init_model
from latent_jax.params import flatten_params
from latent_jax.testing import make_batch, tiny_config

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}  # compile time on 2 cores


def _batch(cfg, n_latent):
    """Random rows; a few labels set to the model's own argmax, so the correct-token count is not 0."""
    specs = [(6, n_latent, 6), (8, max(n_latent - 1, 0), 5), (5, n_latent, 8)]
    b = make_batch(np.random.default_rng(5), cfg.vocab_size, specs)
    arrays = {k: jnp.asarray(v) for k, v in b.arrays().items()}
    g, p = init_model(cfg, seed=1)
    logits = latent_forward(g, p, arrays["tokens"], arrays["mask"], arrays["latent"], b.prefix_len, b.n_latent)
    guess = jnp.roll(jnp.argmax(logits, -1), 1, axis=1)  # labels at t+1 = argmax at t
    labels = arrays["labels"]
    pick = (labels != -100) & (jnp.arange(labels.shape[1]) % 3 == 0)
    arrays["labels"] = jnp.where(pick, guess, labels)
    return b.prefix_len, b.n_latent, arrays


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("n_latent", [0, 3])
def test_chunked_loss_equals_full_logits(family, n_latent):
    full = tiny_config(family)
    P, n, batch = _batch(full, n_latent)
    T = batch["tokens"].shape[1]

    def run(cfg):
        g, p = init_model(cfg, seed=1)
        (loss, aux), grads = jax.jit(jax.value_and_grad(
            lambda pr: loss_fn(pr, g, batch, P, n), has_aux=True), compiler_options=FAST)(p)
        return float(loss), {k: int(v) for k, v in aux.items() if k != "loss_sum"}, flatten_params(grads)

    ref_loss, ref_aux, ref = run(full)
    assert ref_aux["n_correct"] > 0
    assert (T - 1) % 4  # the last chunk is padded
    loss, aux, grads = run(full.replace(loss_chunk=4))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert aux == ref_aux
    scale = max(float(jnp.max(jnp.abs(v))) for v in ref.values())
    for k in ref:
        np.testing.assert_allclose(grads[k], ref[k], rtol=1e-5, atol=1e-6 * scale, err_msg=k)


def test_chunked_loss_keeps_no_logits_for_the_backward_pass():
    cfg = tiny_config("llama", vocab_size=997)  # V larger than every other dimension: a V axis is the logits'
    P, n, batch = _batch(cfg, 2)
    B, T, V = *batch["tokens"].shape, cfg.vocab_size

    def vocab_residuals(chunk):
        g, p = init_model(cfg.replace(loss_chunk=chunk), seed=1)
        res = saved_residuals(lambda pr: loss_fn(pr, g, batch, P, n)[0], p)
        return [a.shape for a, why in res if V in a.shape and "from the argument" not in why]

    assert any(np.prod(s) >= B * (T - 1) * V for s in vocab_residuals(0))  # the full loss keeps its logits
    chunked = vocab_residuals(4)
    assert chunked and all(np.prod(s) <= V * cfg.d_model for s in chunked), chunked  # only dL/dW [V, D]


def test_bad_chunk():
    with pytest.raises(ValueError, match="chunk must be > 0"):
        chunked_token_loss(jnp.zeros((1, 4, 8)), jnp.zeros((5, 8)), jnp.zeros((1, 4), jnp.int32), 0)
