"""Smeared-key attention (`ModelConfig.smear_keys`): cached and uncached passes agree, the mixing weight really
mixes, exports keep it, and the latent loop still equals the naive n+1-pass reference with it."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_jax.generate import SamplingConfig, generate
from latent_jax.hf import load_hf, save_hf
from latent_jax.models import forward, get_config, init_model
from latent_jax.params import flatten_params, params_from_flat
from latent_jax.testing import tiny_config


def smeared_model(family, smear_logit=None, seed=3):
    """A tiny random model with smeared keys; smear_logit: set every head's mixing logit (else random per head)."""
    cfg = tiny_config(family, smear_keys=True)
    g, p = init_model(cfg, seed=seed)
    flat = dict(flatten_params(p))
    rng = np.random.default_rng(seed)
    for name in [n for n in flat if n.endswith("attn.smear")]:
        flat[name] = (np.full(flat[name].shape, smear_logit, np.float32) if smear_logit is not None
                      else rng.normal(0, 2, flat[name].shape).astype(np.float32))
    return cfg, *params_from_flat(cfg, flat)


@functools.partial(jax.jit, static_argnums=0)
def _logits(g, p, tokens):
    return forward(g, p, tokens=tokens).logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_cached_decoding_equals_uncached_full_passes(family):
    """The smear reads the previous cache slot, which is padding for a row's first token and the last written slot
    in a decode step: batched, left-padded, cached greedy decoding equals a full pass per new token per prompt."""
    with jax.default_matmul_precision("highest"):
        cfg, g, p = smeared_model(family)
        prompts = [[5, 9, 33, 61, 2, 17, 4], [44, 3], [100 + i for i in range(18)]]
        outs = generate(g, p, prompts, SamplingConfig(max_new_tokens=8), eos_id=[], pad_id=0)
        for prompt, out in zip(prompts, outs):
            seq = list(prompt)
            for _ in range(8):
                buf = np.zeros((1, 32), np.int32)
                buf[0, :len(seq)] = seq
                seq.append(int(jnp.argmax(_logits(g, p, buf)[0, len(seq) - 1])))
            assert out == seq[len(prompt):]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mixing_weight_one_is_plain_attention_and_zero_is_the_previous_key(family):
    tokens = np.random.default_rng(0).integers(1, 200, (2, 12)).astype(np.int32)
    cfg, g, p = smeared_model(family, smear_logit=40.0)  # sigmoid(40) = 1: keys unchanged
    plain_cfg = cfg.replace(smear_keys=False)
    flat = {k: v for k, v in flatten_params(p).items() if not k.endswith("attn.smear")}
    pg, pp = params_from_flat(plain_cfg, flat)
    np.testing.assert_allclose(_logits(g, p, tokens), _logits(pg, pp, tokens), atol=1e-5)
    _, g2, p2 = smeared_model(family, smear_logit=-40.0)  # same weights, keys = the previous token's
    assert float(jnp.max(jnp.abs(_logits(g2, p2, tokens) - _logits(g, p, tokens)))) > 1e-3


def test_export_round_trip_keeps_the_smear(tmp_path):
    cfg, g, p = smeared_model("gpt2")
    save_hf(tmp_path / "m", cfg, p)
    cfg2, g2, p2 = load_hf(tmp_path / "m")
    assert cfg2.smear_keys and get_config(g2, p2).smear_keys
    tokens = np.arange(1, 13, dtype=np.int32)[None]
    np.testing.assert_allclose(_logits(g2, p2, tokens), _logits(g, p, tokens), atol=1e-6)
