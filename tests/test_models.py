"""Model correctness: parity with transformers, cache, padding, causality, bf16, embeds input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_jax.hf import load_hf
from latent_jax.models import forward, init_cache, init_model
from latent_jax.testing import TINY_HF_CONFIGS, check_logits_parity, hf_logits, make_hf_checkpoint, tiny_config

NAMES = sorted(TINY_HF_CONFIGS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {n: make_hf_checkpoint(tmp_path_factory.mktemp(n), n, seed=i) for i, n in enumerate(NAMES)}


def tokens(B=3, T=24, V=211, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T)).astype(np.int32)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(checkpoints, name):
    diff = check_logits_parity(checkpoints[name], tokens(T=24), atol=1e-5)
    assert diff <= 1e-5


def test_llama3_rope_scaling_long_sequence(checkpoints):
    # 200 positions >> original_max_position_embeddings=32: low/medium/high frequency bands all matter
    assert check_logits_parity(checkpoints["llama"], tokens(B=1, T=200), atol=2e-5) <= 2e-5


def test_rope_scaling_changes_frequencies():
    from latent_jax.models.layers import rope_inv_freq
    cfg = tiny_config("llama")
    assert not np.allclose(rope_inv_freq(cfg), rope_inv_freq(cfg.replace(rope_scaling=None)))


@pytest.mark.parametrize("name", NAMES)
def test_all_hidden_states_match_transformers(checkpoints, name):
    import torch
    import transformers
    toks = tokens(B=2, T=10)
    _, g, p = load_hf(checkpoints[name])
    ours = forward(g, p, tokens=toks, return_all_hidden=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.as_tensor(toks, dtype=torch.long), output_hidden_states=True).hidden_states
    assert len(ours.all_hidden) == len(ref) == 3
    for a, b in zip(ours.all_hidden, ref):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.hidden), ref[-1].numpy(), atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_decoding_equals_full_forward(family):
    cfg = tiny_config(family)
    g, p = init_model(cfg, seed=3)
    toks = tokens(B=2, T=12)
    full = forward(g, p, tokens=toks).logits
    cache = init_cache(cfg, 2, 16)
    o = forward(g, p, tokens=toks[:, :5], cache=cache)  # prefill 5, then one token at a time
    step_logits = [o.logits]
    cache = o.cache
    for t in range(5, 12):
        o = forward(g, p, tokens=toks[:, t:t + 1], cache=cache)
        cache = o.cache
        step_logits.append(o.logits)
    np.testing.assert_allclose(np.concatenate(step_logits, axis=1), full, atol=1e-5)
    assert int(cache.index) == 12


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_batch_equals_single_rows(family):
    cfg = tiny_config(family)
    g, p = init_model(cfg, seed=4)
    rows = [tokens(1, n, seed=n)[0] for n in (7, 12, 3)]
    T = 12
    padded = np.zeros((3, T), np.int32)
    mask = np.zeros((3, T), bool)
    for i, r in enumerate(rows):
        padded[i, T - len(r):], mask[i, T - len(r):] = r, True
    out = forward(g, p, tokens=padded, mask=mask).logits
    for i, r in enumerate(rows):
        single = forward(g, p, tokens=r[None]).logits[0]
        np.testing.assert_allclose(out[i, T - len(r):], single, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causality(family):
    cfg = tiny_config(family)
    g, p = init_model(cfg, seed=5)
    toks = tokens(B=1, T=16)
    base = np.asarray(forward(g, p, tokens=toks).logits)
    t = 9
    toks2 = toks.copy()
    toks2[0, t] = (toks2[0, t] + 1) % cfg.vocab_size
    pert = np.asarray(forward(g, p, tokens=toks2).logits)
    np.testing.assert_array_equal(pert[:, :t], base[:, :t])
    assert np.abs(pert[:, t:] - base[:, t:]).max() > 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_embeds_input_equals_token_input(family):
    from latent_jax.models import embed_tokens
    cfg = tiny_config(family)
    g, p = init_model(cfg, seed=6)
    toks = tokens(B=2, T=8)
    a = forward(g, p, tokens=toks)
    b = forward(g, p, embeds=embed_tokens(g, p, toks))
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
    with pytest.raises(ValueError, match="exactly one"):
        forward(g, p)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_forward_within_tolerance(checkpoints, name):
    _, g, p = load_hf(checkpoints[name])
    _, g16, p16 = load_hf(checkpoints[name], param_dtype="bfloat16")
    assert jax.tree.leaves(p16)[0].dtype == jnp.bfloat16
    toks = tokens(T=16)
    ref = np.asarray(forward(g, p, tokens=toks).logits)
    low = np.asarray(forward(g16, p16, tokens=toks).logits)
    assert low.dtype == np.float32  # logits always f32
    err = np.abs(low - ref).max() / (np.abs(ref).max() + 1e-6)
    assert err < 0.05, err
    # and the argmax mostly agrees
    assert (low.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    # f32 master weights with bf16 compute
    _, gm, pm = load_hf(checkpoints[name], param_dtype="float32", dtype="bfloat16")
    assert jax.tree.leaves(pm)[0].dtype == jnp.float32
    mixed = np.asarray(forward(gm, pm, tokens=toks).logits)
    assert np.abs(mixed - ref).max() / (np.abs(ref).max() + 1e-6) < 0.05


def test_hf_reference_left_padding_agrees_on_valid_rows(checkpoints):
    # transformers with an attention mask on a right-padded batch: real positions are unaffected
    folder = checkpoints["llama"]
    toks = tokens(B=2, T=10)
    mask = np.ones_like(toks)
    mask[1, 6:] = 0
    _, g, p = load_hf(folder)
    ours = np.asarray(forward(g, p, tokens=toks, mask=mask.astype(bool)).logits)
    ref = hf_logits(folder, toks, mask)
    np.testing.assert_allclose(ours[0], ref[0], atol=1e-5)
    np.testing.assert_allclose(ours[1, :6], ref[1, :6], atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scan", [False, True])
def test_every_weight_has_logical_axes(family, scan):
    """Every weight names its axes; scanned, exactly the block weights gain a leading "layers" axis of size L."""
    from flax import nnx

    from latent_jax.models import abstract_model
    cfg = (tiny_config(family, tie_embeddings=False) if family == "llama" else tiny_config(family)).replace(
        scan_layers=scan)
    _, abstract = abstract_model(cfg)
    flat = nnx.to_flat_state(abstract)
    assert len(flat) > 10
    known = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", None}
    for path, var in flat:
        axes = var.get_metadata()["axes"]
        shape = var.get_value().shape
        assert len(axes) == len(shape), path
        in_block = path[0] == "blocks"
        if scan and in_block:
            assert axes[0] == "layers" and shape[0] == cfg.n_layers and isinstance(path[1], str), (path, axes)
            axes = axes[1:]
        elif in_block:
            assert isinstance(path[1], int), path
        assert set(axes) <= known, (path, axes)
