"""HF import/export: round trips through transformers, sharding, resizing, and bad checkpoints."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from latent_jax.hf import load_hf, save_hf
from latent_jax.models import forward
from latent_jax.params import flatten_params, resize_vocab
from latent_jax.testing import check_logits_parity, make_hf_checkpoint

TOKS = np.random.default_rng(0).integers(0, 200, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama-untied", seed=1)


def copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("which", ["gpt2_dir", "llama_dir"])
def test_export_reloads_in_transformers(which, request, tmp_path):
    cfg, g, p = load_hf(request.getfixturevalue(which))
    out = save_hf(tmp_path / "export", cfg, p)
    assert check_logits_parity(out, TOKS, atol=1e-5) <= 1e-5
    # and our own reload is bit-identical
    _, g2, p2 = load_hf(out)
    np.testing.assert_array_equal(forward(g, p, tokens=TOKS).logits, forward(g2, p2, tokens=TOKS).logits)


def test_sharded_export_and_import(llama_dir, tmp_path):
    cfg, g, p = load_hf(llama_dir)
    out = save_hf(tmp_path / "sharded", cfg, p, max_shard_bytes=60_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    assert not (out / "model.safetensors").exists()
    assert check_logits_parity(out, TOKS) <= 1e-5


def test_original_gpt2_names_without_prefix(gpt2_dir, tmp_path):
    d = copy(gpt2_dir, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 4, 4), np.float32))  # buffer in old checkpoints
    save_file(renamed, str(d / "model.safetensors"))
    _, g, p = load_hf(d)
    _, g0, p0 = load_hf(gpt2_dir)
    np.testing.assert_array_equal(forward(g, p, tokens=TOKS).logits, forward(g0, p0, tokens=TOKS).logits)


def test_bf16_checkpoint_loads(llama_dir, tmp_path):
    import ml_dtypes
    d = copy(llama_dir, tmp_path)
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(str(d / "model.safetensors")).items()}
    save_file(tensors, str(d / "model.safetensors"))
    _, g, p = load_hf(d)
    _, g0, p0 = load_hf(llama_dir)
    a, b = forward(g, p, tokens=TOKS).logits, forward(g0, p0, tokens=TOKS).logits
    assert 0 < np.abs(a - b).max() < 0.05 * np.abs(b).max()


@pytest.mark.parametrize("which", ["gpt2_dir", "llama_dir"])
def test_resize_vocab_grow_and_shrink(which, request, tmp_path):
    cfg, g, p = load_hf(request.getfixturevalue(which))
    V = cfg.vocab_size
    cfg2, g2, p2 = resize_vocab(cfg, p, V + 3, init_from=7)
    flat, flat2 = flatten_params(p), flatten_params(p2)
    for name in ("embed", "lm_head"):
        if name in flat:
            assert flat2[name].shape[0] == V + 3
            np.testing.assert_array_equal(flat2[name][:V], flat[name])
            for r in range(V, V + 3):
                np.testing.assert_array_equal(flat2[name][r], flat[name][7])
    # old tokens' logits are unchanged on the old vocabulary
    np.testing.assert_allclose(forward(g2, p2, tokens=TOKS).logits[..., :V], forward(g, p, tokens=TOKS).logits,
                               atol=1e-6)
    # the resized model exports to a folder transformers loads with identical logits
    out = save_hf(tmp_path / "grown", cfg2, p2)
    toks = np.concatenate([TOKS, np.full((2, 1), V + 2, np.int32)], axis=1)
    assert check_logits_parity(out, toks) <= 1e-5
    cfg3, g3, p3 = resize_vocab(cfg2, p2, V - 11)
    assert cfg3.vocab_size == V - 11
    assert forward(g3, p3, tokens=TOKS % (V - 11)).logits.shape[-1] == V - 11
    with pytest.raises(ValueError, match="init_from"):
        resize_vocab(cfg, p, V + 1, init_from=V + 5)


# ---------------------------------------------------------------- bad input: one clear error, never a partial load
def test_missing_folder_and_config(gpt2_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        load_hf(tmp_path / "nope")
    d = copy(gpt2_dir, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(d)


def test_missing_weights_file(gpt2_dir, tmp_path):
    d = copy(gpt2_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(d)


def test_missing_shard(llama_dir, tmp_path):
    cfg, _, p = load_hf(llama_dir)
    out = save_hf(tmp_path / "sharded", cfg, p, max_shard_bytes=60_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_hf(out)


def test_unknown_model_type(gpt2_dir, tmp_path):
    d = copy(gpt2_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown model_type 'mamba'.*config.json|config.json.*mamba"):
        load_hf(d)


def _edit_tensors(d, fn):
    tensors = load_file(str(d / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_mismatched_shape_names_tensor(llama_dir, tmp_path):
    d = copy(llama_dir, tmp_path)
    _edit_tensors(d, lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", np.zeros((7, 64), np.float32)))
    with pytest.raises(ValueError, match="blocks.1.mlp.w_in"):
        load_hf(d)


def test_unsupported_dtype_names_file_and_tensor(llama_dir, tmp_path):
    d = copy(llama_dir, tmp_path)
    _edit_tensors(d, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].astype(np.int8)))
    with pytest.raises(ValueError, match=r"model.safetensors.*model.norm.weight.*I8"):
        load_hf(d)


def test_missing_and_unexpected_tensors(llama_dir, tmp_path):
    d = copy(llama_dir, tmp_path)
    _edit_tensors(d, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.k_proj.weight.*missing"):
        load_hf(d)
    d2 = copy(llama_dir, tmp_path, "b")
    _edit_tensors(d2, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="unexpected tensors.*extra"):
        load_hf(d2)
