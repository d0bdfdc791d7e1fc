"""The VQ-VAE of Token Assorted: training raises reconstruction accuracy, codebook usage, save/load, bad configs."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from latent_jax.methods.vqvae import (CONFIG_FILE, WEIGHTS_FILE, ChunkData, VQVAEConfig, codebook_usage, evaluate_vqvae,
                              load_vqvae, quantize, save_vqvae, train_vqvae)

V, L, N_PATTERNS = 20, 4, 16


def toy_data(seed=0):
    """Chunks drawn from 16 fixed 4-token patterns over a 20-token vocabulary (chance accuracy ~ 1/20)."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(2, V, (N_PATTERNS, L))
    items = [(list(rng.integers(2, V, 5)), [t for c in rng.integers(0, N_PATTERNS, 3) for t in patterns[c]]
              + [1, 1]) for _ in range(64)]  # + a partial tail chunk that must be skipped
    return ChunkData.build(items, L)


@pytest.fixture(scope="module")
def trained():
    cfg = VQVAEConfig(codebook_size=16, chunk_len=L, d_model=32, n_layers=1, n_heads=2, steps=200, batch_size=32,
                      lr=3e-3, restart_after=50, codebook_update="ema")
    data = toy_data()
    return cfg, data, train_vqvae(cfg, data, V, progress=False)


def test_chunk_data_skips_partial_tail():
    d = ChunkData.build([([5, 6], [1, 2, 3, 4, 5, 6, 7]), ([7], [9, 9, 9, 9])], 3)
    np.testing.assert_array_equal(d.chunks, [[1, 2, 3], [4, 5, 6], [9, 9, 9]])
    np.testing.assert_array_equal(d.chunk_prompt, [0, 0, 1])
    b = d.batch(np.array([2]))
    assert b["prompt"][0, 0] == 7 and b["prompt_mask"][0].tolist() == [True, False]


def test_reconstruction_accuracy_rises(trained):
    cfg, data, vq = trained
    before, after = vq.meta["metrics"]["before"], vq.meta["metrics"]["after"]
    assert len(data) == 64 * 3 and before["chunks"] == after["chunks"] == 192
    assert after["recon_accuracy"] > before["recon_accuracy"] + 0.4, (before, after)
    assert after["recon_accuracy"] > 0.5 > 3 / V  # far above chance
    assert after["recon_loss"] < before["recon_loss"]
    # usage reported and consistent; 16 patterns need several codes
    assert after["codes_used"] + after["dead_codes"] == cfg.codebook_size and after["codes_used"] >= 8
    assert 1.0 <= after["perplexity"] <= after["codes_used"]
    assert evaluate_vqvae(vq, data) == pytest.approx(after)  # deterministic re-evaluation


def test_codebook_usage_constructed_case():
    u = codebook_usage(np.array([0, 0, 1, 3]), 5)
    assert u["codes_used"] == 3 and u["dead_codes"] == 2
    assert u["perplexity"] == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))))
    assert codebook_usage(np.array([2, 2, 2]), 4) == {"codes_used": 1, "dead_codes": 3, "perplexity": 1.0}
    # quantize picks the nearest row: vectors near rows 0 and 2 of a 4-row codebook leave rows 1 and 3 dead
    codebook = jnp.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    z = jnp.array([[0.5, -0.2], [1.0, 9.0], [-3.0, 8.0], [2.0, 1.0]])
    idx, z_q = quantize(codebook, z)
    assert idx.tolist() == [0, 2, 2, 0] and np.allclose(z_q, codebook[np.array([0, 2, 2, 0])])
    assert codebook_usage(np.asarray(idx), 4)["dead_codes"] == 2


def test_save_load_round_trip(trained, tmp_path):
    cfg, data, vq = trained
    folder = save_vqvae(vq, tmp_path / "vq")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["vqvae"]["codebook_size"] == 16 and "after" in meta["metrics"]
    vq2 = load_vqvae(folder)
    assert vq2.cfg == cfg and vq2.model_cfg == vq.model_cfg
    np.testing.assert_array_equal(vq2.codes(data.chunks), vq.codes(data.chunks))
    np.testing.assert_array_equal(vq2.params["codebook"], vq.params["codebook"])
    # broken checkpoints fail loudly, naming the file and the tensor
    flat = load_file(str(folder / WEIGHTS_FILE))
    save_file({**flat, "codebook": flat["codebook"][:3]}, str(folder / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="codebook.*expected shape"):
        load_vqvae(folder)
    save_file({k: v for k, v in flat.items() if k != "dec.embed"}, str(folder / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"\(dec\).*missing.*embed"):
        load_vqvae(folder)
    with pytest.raises(FileNotFoundError, match="vqvae.json"):
        load_vqvae(tmp_path)


@pytest.mark.parametrize("kw,match", [
    ({"codebook_size": 1}, "codebook_size"), ({"chunk_len": 0}, "chunk_len"), ({"beta": -0.1}, "beta"),
    ({"decay": 0.0}, "decay"), ({"decay": 1.0}, "decay"), ({"codebook_update": "kmeans"}, "codebook_update"),
    ({"steps": 1.5}, "steps must be an integer"), ({"d_model": 30, "n_heads": 4}, "d_model"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        VQVAEConfig(**kw)


def test_unknown_option_and_empty_data():
    with pytest.raises(ValueError, match=r"unknown vqvae option.*codebok_size.*valid"):
        VQVAEConfig.from_dict({"codebok_size": 8})
    with pytest.raises(ValueError, match="no full 16-token CoT chunk"):
        train_vqvae(VQVAEConfig(), ChunkData.build([([1], [2, 3])], 16), V)
