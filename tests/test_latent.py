"""The compiled latent loop equals the naive reference algorithm (n+1 full forward passes, no cache)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_jax.latent import loss_fn, token_loss
from latent_jax.methods.base import IGNORE, Example, collate
from latent_jax.models import embed_tokens, forward, init_model
from latent_jax.testing import tiny_config


def naive_loss(params, graphdef, batch, slots):
    """The reference algorithm. slots[b] = row b's latent columns. Pass j recomputes the whole sequence with no
    cache and fills every row's j-th latent slot with the final hidden state of the column before it; one last
    pass gives the logits: n_latent + 1 full forward passes."""
    emb = embed_tokens(graphdef, params, batch["tokens"])
    for j in range(max(map(len, slots))):
        hidden = forward(graphdef, params, embeds=emb, mask=batch["mask"]).hidden
        for b, cols in enumerate(slots):
            if j < len(cols):
                emb = emb.at[b, cols[j]].set(hidden[b, cols[j] - 1])
    logits = forward(graphdef, params, embeds=emb, mask=batch["mask"]).logits
    total, count, _ = token_loss(logits, batch["labels"])
    return total / count


def make_batch(rng, vocab, specs, latent_id=7):
    """specs: list of (prefix_len, n_latent, rest_len)."""
    exs = []
    for p, n, r in specs:
        toks = list(rng.integers(10, vocab, p)) + [latent_id] * n + list(rng.integers(10, vocab, r))
        labels = [IGNORE] * (p + n) + toks[p + n:]
        exs.append(Example([int(t) for t in toks], [int(t) for t in labels], latent_start=p, n_latent=n))
    return collate(exs, pad_id=0, bucket=8)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("specs", [
    [(9, 2, 4), (5, 4, 7), (12, 0, 3)],  # left padding, different n per row, a row without latents
])
def test_loss_and_grads_equal_naive_reference(family, specs):
    with jax.default_matmul_precision("highest"):
        cfg = tiny_config(family)
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
