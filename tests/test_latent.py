"""The compiled latent loop equals the naive reference algorithm (n+1 full forward passes, no cache)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_jax.latent import loss_fn, token_loss
from latent_jax.methods.base import IGNORE, Example, collate
from latent_jax.models import embed_tokens, forward, init_model
from latent_jax.testing import make_batch, tiny_config


def naive_loss(params, graphdef, batch, slots, rng=None):
    """The reference algorithm. slots[b] = row b's latent columns. Pass j recomputes the whole sequence with no
    cache and fills every row's j-th latent slot with the final hidden state of the column before it; one last
    pass gives the logits: n_latent + 1 full forward passes (each with dropout key `rng` when given)."""
    emb = embed_tokens(graphdef, params, batch["tokens"])
    for j in range(max(map(len, slots))):
        hidden = forward(graphdef, params, embeds=emb, mask=batch["mask"], dropout_rng=rng).hidden
        for b, cols in enumerate(slots):
            if j < len(cols):
                emb = emb.at[b, cols[j]].set(hidden[b, cols[j] - 1])
    logits = forward(graphdef, params, embeds=emb, mask=batch["mask"], dropout_rng=rng).logits
    total, count, _ = token_loss(logits, batch["labels"])
    return total / count


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("specs", [
    [(9, 2, 4), (5, 4, 7), (12, 0, 3)],  # left padding, different n per row, a row without latents
])
@pytest.mark.parametrize("smear", [False, True], ids=["plain", "smeared_keys"])
def test_loss_and_grads_equal_naive_reference(family, specs, smear):
    with jax.default_matmul_precision("highest"):
        cfg = tiny_config(family, smear_keys=smear)
        g, p = init_model(cfg, seed=11)
        b = make_batch(np.random.default_rng(0), cfg.vocab_size, specs)
        arrays = {k: jnp.asarray(v) for k, v in b.arrays().items()}
        assert b.n_latent == max(n for _, n, _ in specs)
        fast = jax.jit(jax.value_and_grad(lambda pr: loss_fn(pr, g, arrays, b.prefix_len, b.n_latent)[0]))
        loss, grads = fast(p)
        slots = [np.argwhere(row).ravel().tolist() for row in b.latent]
        ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda pr: naive_loss(pr, g, arrays, slots)))(p)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
        for a, r in zip(flat, ref_flat):
            np.testing.assert_allclose(a, r, atol=2e-6, rtol=1e-4)
        # the thoughts matter: treating latent slots as plain tokens gives a different loss
        plain = loss_fn(p, g, {**arrays, "latent": jnp.zeros_like(arrays["latent"])}, b.prefix_len, 0)[0]
        assert abs(float(plain) - float(loss)) > 1e-4


DROPOUT = dict(embd_dropout=0.2, resid_dropout=0.3, attn_dropout=0.25)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dropout_latent_loop_equals_naive_reference_under_the_same_rng(family):
    """Training-mode dropout at every site: the compiled loop (prefix pass, one column per scan step, rest pass
    over the cache) draws the masks the n+1 full passes draw (keyed by layer, site and column), so loss and grads
    agree; the masks are real (another key, or no key, changes the loss)."""
    with jax.default_matmul_precision("highest"):
        g, p = init_model(tiny_config(family, **DROPOUT), seed=5)
        b = make_batch(np.random.default_rng(1), 211, [(9, 2, 4), (5, 4, 7), (12, 0, 3)])
        arrays = {k: jnp.asarray(v) for k, v in b.arrays().items()}
        slots = [np.argwhere(row).ravel().tolist() for row in b.latent]
        key = jax.random.PRNGKey(7)
        fast = jax.jit(jax.value_and_grad(lambda pr, k: loss_fn(pr, g, arrays, b.prefix_len, b.n_latent, k)[0]))
        loss, grads = fast(p, key)
        ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda pr, k: naive_loss(pr, g, arrays, slots, k)))(p, key)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, r, atol=2e-6, rtol=1e-4)
        other = float(fast(p, jax.random.PRNGKey(8))[0])
        off = float(loss_fn(p, g, arrays, b.prefix_len, b.n_latent)[0])
        assert abs(other - float(loss)) > 1e-3 and abs(off - float(loss)) > 1e-3


def test_dropout_rates_zero_or_no_key_is_the_deterministic_pass():
    """Rates 0 with a key, or rates > 0 without one, give exactly the deterministic logits; the kept fraction of
    a site is about 1 - rate and kept values are scaled by 1 / (1 - rate)."""
    from latent_jax.models.dropout import dropout_BxT

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 211, (3, 20)))
    g0, p = init_model(tiny_config("gpt2"), seed=2)
    g1, _ = init_model(tiny_config("gpt2", **DROPOUT), seed=2)
    base = forward(g0, p, tokens=tokens).logits
    np.testing.assert_array_equal(forward(g0, p, tokens=tokens, dropout_rng=jax.random.PRNGKey(0)).logits, base)
    np.testing.assert_array_equal(forward(g1, p, tokens=tokens).logits, base)
    assert float(jnp.abs(forward(g1, p, tokens=tokens, dropout_rng=jax.random.PRNGKey(0)).logits - base).max()) > 1e-3
    x = jnp.ones((4, 64, 32))
    y = dropout_BxT(x, 0.3, jax.random.PRNGKey(3), jnp.arange(64))
    assert abs(float((y > 0).mean()) - 0.7) < 0.02
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.7], rtol=1e-6)
    assert not np.array_equal(y[0], y[1])  # rows draw different masks


def test_one_compile_per_bucket():
    cfg = tiny_config("llama")
    g, p = init_model(cfg, seed=3)
    step = jax.jit(functools.partial(loss_fn, graphdef=g), static_argnames=("prefix_len", "n_latent"))
    rng = np.random.default_rng(2)
    for specs in ([(5, 2, 3), (7, 1, 4)], [(3, 2, 6), (8, 2, 2)], [(6, 1, 5), (2, 2, 1)]):  # same bucket
        b = make_batch(rng, cfg.vocab_size, specs)
        step(p, batch={k: jnp.asarray(v) for k, v in b.arrays().items()}, prefix_len=b.prefix_len,
             n_latent=b.n_latent)
    assert step._cache_size() == 1


def test_collate_aligns_first_latent_and_rejects_bad_input():
    exs = [Example([1, 2, 3, 9, 9, 4], [IGNORE] * 5 + [4], 3, 2), Example([1, 9, 5, 6], [IGNORE, IGNORE, 5, 6], 1, 1)]
    b = collate(exs, pad_id=0, bucket=4)
    assert b.prefix_len == 4 and b.n_latent == 2
    assert b.latent[0, 4:6].all() and b.latent[1, 4] and not b.latent[1, 5]
    assert (b.tokens[:, 4] == 9).all() and b.mask.sum() == 10
    with pytest.raises(ValueError, match="more than the model"):
        collate(exs, pad_id=0, max_len=5)
    with pytest.raises(ValueError, match="does not fit"):
        Example([1, 2], [1, 2], 2, 1)


def test_collate_without_thoughts_only_right_pads_and_keeps_the_loss():
    """No latent slots: rows start at column 0 (prefix_len 0), T is the bucketed longest row; the loss equals that
    of the aligned layout (align=True, what LT-Tuning asks for)."""
    exs = [Example([1, 2, 3, 4, 5, 6, 7], [IGNORE] * 3 + [4, 5, 6, 7], 3),
           Example([3, 8, 9, 2], [IGNORE, 8, 9, 2], 1), Example([5, 6, 7, 8, 2], [IGNORE] * 4 + [2], 4)]
    b, aligned = collate(exs, pad_id=0, bucket=4), collate(exs, pad_id=0, bucket=4, align=True)
    assert (b.prefix_len, b.n_latent, b.tokens.shape) == (0, 0, (3, 8))
    assert aligned.prefix_len == 4 and aligned.tokens.shape == (3, 8)  # 4 + max(4, 3, 1) = 8
    assert b.mask[:, 0].all() and list(b.mask.sum(1)) == [7, 4, 5] and list(b.tokens[1, :4]) == [3, 8, 9, 2]
    assert not aligned.mask[:, 0].all()
    cfg = tiny_config("gpt2")
    g, p = init_model(cfg, seed=0)
    losses = [float(loss_fn(p, g, {k: jnp.asarray(v) for k, v in x.arrays().items()}, x.prefix_len, 0)[0])
              for x in (b, aligned)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
