"""Batched KV-cache decoding against a naive uncached loop; EOS, sampling, compile buckets."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_jax.generate import SamplingConfig, generate, generate_padded, pad_left
from latent_jax.hf import load_hf
from latent_jax.models import forward
from latent_jax.testing import make_hf_checkpoint


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tmp_path_factory):
    _, g, p = load_hf(make_hf_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=2,
                                                 initializer_range=0.5))
    return g, p


PROMPTS = [[5, 9, 33, 61, 2, 17, 4], [44, 3], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112,
                                                113, 114, 115, 116, 117]]


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(g, p, buf):
    return forward(g, p, tokens=buf).logits


def naive_greedy(g, p, prompt, n, eos):
    """No cache: a full forward over the whole sequence for every new token (right-padded fixed buffer,
    one compile; causality makes the padding irrelevant to the last real position)."""
    seq, out = list(prompt), []
    for _ in range(n):
        buf = np.zeros((1, 64), np.int32)
        buf[0, :len(seq)] = seq
        t = int(jnp.argmax(_full_forward(g, p, buf)[0, len(seq) - 1]))
        out.append(t)
        seq.append(t)
        if t in eos:
            break
    return out


def test_greedy_batched_equals_naive_loop(model):
    g, p = model
    outs = generate(g, p, PROMPTS, SamplingConfig(max_new_tokens=12), eos_id=[])
    assert len({tuple(o) for o in outs}) > 1 and all(len(o) == 12 for o in outs)
    for prompt, out in zip(PROMPTS, outs):
        assert out == naive_greedy(g, p, prompt, 12, ())


def test_stops_at_eos(model):
    g, p = model
    free = generate(g, p, PROMPTS, SamplingConfig(max_new_tokens=12), eos_id=[])
    # make EOS a token that some row first emits at step k >= 1
    i, k = next((i, k) for i, row in enumerate(free) for k in range(1, 12) if row[k] not in row[:k])
    eos = free[i][k]
    outs = generate(g, p, PROMPTS, SamplingConfig(max_new_tokens=12), eos_id=eos, pad_id=0)
    assert outs[i] == free[i][:k + 1]
    for prompt, out in zip(PROMPTS, outs):
        assert out == naive_greedy(g, p, prompt, 12, (eos,))


def test_sampling_seeded_and_topk1_is_greedy(model):
    g, p = model
    s = SamplingConfig(max_new_tokens=8, temperature=1.0)
    a = generate(g, p, PROMPTS, s, eos_id=[], seed=1)
    b = generate(g, p, PROMPTS, s, eos_id=[], seed=1)
    c = generate(g, p, PROMPTS, s, eos_id=[], seed=2)
    assert a == b and a != c
    greedy = generate(g, p, PROMPTS, SamplingConfig(max_new_tokens=8), eos_id=[])
    assert generate(g, p, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=1), eos_id=[]) == greedy
    assert generate(g, p, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0.7, top_p=1e-6),
                    eos_id=[]) == greedy


def test_one_compile_per_bucket(model):
    g, p = model
    s = SamplingConfig(max_new_tokens=4)
    generate(g, p, [[1, 2, 3], [4, 5]], s, eos_id=[])
    n = generate_padded._cache_size()
    generate(g, p, [[7, 8, 9, 10, 11], [12]], s, eos_id=[])  # same bucket (16), same batch
    assert generate_padded._cache_size() == n
    generate(g, p, [[1] * 20, [2]], s, eos_id=[])  # bucket 32: one new compile
    assert generate_padded._cache_size() == n + 1


def test_bad_generation_input(model):
    g, p = model
    with pytest.raises(ValueError, match="max_positions"):
        generate(g, p, [[1] * 100], SamplingConfig(max_new_tokens=200))
    with pytest.raises(ValueError, match="at least one token"):
        pad_left([[1], []], 0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("scan", [False, True])
def test_decode_step_copies_no_cache(family, batch, scan):
    """The compiled decode loop updates the KV cache in place: no float buffer is copied inside the while body,
    so a decode step's data movement does not grow with the prompt (only the [B, S] bool slot mask is copied, and
    with scanned layers a few scalar loop counters). Both layer layouts: the scanned one keeps its stacked cache in
    the layer scan's carry."""
    from latent_jax.models import init_model
    from latent_jax.testing import tiny_config, while_body_copies

    g, p = init_model(tiny_config(family).replace(scan_layers=scan))
    for P in (16, 96):
        hlo = generate_padded.lower(g, p, jnp.ones((batch, P), jnp.int32), jnp.ones((batch, P), bool),
                                    jax.random.PRNGKey(0), sampling=SamplingConfig(max_new_tokens=8), eos_ids=(1,),
                                    pad_id=0).compile().as_text()
        copies = while_body_copies(hlo)
        assert "while(" in hlo and copies, "expected a while loop (and the tiny mask copies) in the compiled decode"
        floats = [(shape, n) for shape, n in copies if not shape.startswith(("pred", "s32"))]
        assert floats == [], floats
        assert sum(n for _, n in copies) <= 2 * batch * (P + 8) + 32
