"""Token Assorted: end-to-end tiny run (VQ-VAE + LM), the mixed layout, the distribution of m, the vqvae CLI,
bad configs."""
import collections
import json
import pathlib

import numpy as np
import pytest

from latent_jax.train.pipeline import epoch_dataset
from latent_jax.experiment import experiment_records, build, load_config, run_train
from latent_jax.methods import IGNORE, build_method
from latent_jax.methods.token_assorted import BOL, EOL
from latent_jax.tokenizer import load_tokenizer
from latent_jax.methods.vqvae import load_vqvae

L = 4
TINY = ["data.train_n=24", "data.valid_n=6", "train.epochs=1", "train.batch_size=8", "train.progress=false",
        "model.overrides.n_layers=1", "model.overrides.d_model=32", "model.overrides.head_dim=8",
        "model.overrides.d_ff=64", "eval.batch_size=6", "eval.max_new_tokens=8", "method.vqvae.codebook_size=8",
        f"method.vqvae.chunk_len={L}", "method.vqvae.d_model=16", "method.vqvae.n_layers=1",
        "method.vqvae.n_heads=2", "method.vqvae.steps=30", "method.vqvae.batch_size=16",
        "method.vqvae.codebook_update=loss"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ta_run")
    cfg = load_config("prosqa_token_assorted_cpu", [*TINY, f"output_dir={out}"])
    return cfg, run_train(cfg, progress=False)


@pytest.fixture(scope="module")
def prepared(run):
    """The run's tokenizer + method, prepare_data loading the run's saved VQ-VAE (no retraining)."""
    cfg, _ = run
    train, valid = experiment_records(cfg)
    _, method, _, _, _ = build(cfg, train, valid)
    folder = pathlib.Path(cfg["output_dir"]) / "vqvae"
    weights = folder / "vqvae.safetensors"
    mtime = weights.stat().st_mtime_ns
    method.prepare_data(train, cfg["output_dir"])
    assert weights.stat().st_mtime_ns == mtime and method.vqvae is not None  # loaded, not retrained
    return method, train, folder


def test_end_to_end_run(run):
    cfg, result = run
    assert result["method"] == "token_assorted" and result["train_records"] == 24 and 0 <= result["accuracy"] <= 1
    assert result["valid_records"] == 6 and len(result["history"]) == 1
    meta = json.loads((pathlib.Path(cfg["output_dir"]) / "vqvae" / "vqvae.json").read_text())
    before, after = meta["metrics"]["before"], meta["metrics"]["after"]
    assert meta["vqvae"]["codebook_update"] == "loss" and after["chunks"] > 24
    assert after["codes_used"] + after["dead_codes"] == 8 and after["perplexity"] >= 1
    assert after["recon_loss"] < before["recon_loss"]  # 30 steps of the codebook-loss variant learn something


def test_layout_codes_and_labels(prepared):
    method, train, folder = prepared
    tok, vq = method.tok, load_vqvae(folder)
    rec = max(train, key=lambda r: sum(len(tok.encode(s + "\n")) for s in r["steps"]))
    q = tok.encode(rec["question"] + "\n")
    cot = [t for s in rec["steps"] for t in tok.encode(s + "\n")]
    a = tok.encode("### " + rec["answer"]) + [tok.eos_id]
    n = len(cot) // L
    codes = vq.codes(np.array(cot[:n * L]).reshape(n, L))
    assert n >= 2 and method.allowed_chunks(rec) == list(range(n + 1))
    for k in range(n + 2):
        ex = method.encode(rec, k)
        kk = min(k, n)  # more chunks than the CoT has: clipped
        latent = [method.bol_id, *(method.code_ids[c] for c in codes[:kk]), method.eol_id] if kk else []
        assert ex.tokens == q + latent + cot[kk * L:] + a  # m = kk * L text tokens replaced by kk codes
        assert ex.labels == [IGNORE] * len(q) + ex.tokens[len(q):]  # loss on codes, markers, rest, answer
        assert ex.latent_start == len(q) and ex.n_latent == 0
    text = tok.decode(method.encode(rec, 1).tokens)
    assert BOL in text and EOL in text and "<|latent_" in text
    assert method.prompt(rec, 0).prefix == q and method.num_stages() == 1 and method.schedule(3, 5, 10) == 0


def test_m_distribution_and_pipeline(prepared):
    method, train, _ = prepared
    rec = max(train, key=lambda r: len(method.allowed_chunks(r)))
    allowed = method.allowed_chunks(rec)
    draws = [method.example_stage(rec, i, e, 0, s, 0.0) for s in range(4) for e in range(3) for i in range(10)]
    assert set(draws) == set(allowed) and len(allowed) >= 3
    assert max(collections.Counter(draws).values()) < 0.6 * len(draws)  # roughly uniform, not stuck
    assert method.example_stage(rec, 3, 1, 0, 2, 0.0) == method.example_stage(rec, 3, 1, 0, 2, 0.0)
    # m_choices: only those multiples of L that fit the CoT are drawn
    cfg = build_method("token_assorted", load_tokenizer("gpt2"), vqvae={"chunk_len": L, "codebook_size": 4},
                       m_choices=[0, 2 * L, 1000 * L])
    draws = {cfg.example_stage(rec, i, 0, 0, 0, 0.0) for i in range(40)}
    assert draws == {0, 2}
    # the training pipeline mixes: some rows open a latent span, some are plain CoT; codes carry labels
    rows = with_latent = 0
    for b in epoch_dataset(method, train, epoch=0, stage=0, seed=0, batch_size=8):
        for toks, labs, m in zip(b.tokens, b.labels, b.mask):
            if not m.any():
                continue
            rows += 1
            hit = np.isin(toks, method.code_ids) & m
            with_latent += bool(hit.any())
            assert (labs[hit] == toks[hit]).all()
    assert rows == len(train) and 0 < with_latent < rows


def test_encode_needs_prepare_data():
    m = build_method("token_assorted", load_tokenizer("gpt2"), vqvae={"chunk_len": L, "codebook_size": 4})
    rec = {"question": "Every wumpus is a yumpus. Is Max a yumpus?", "steps": ["Max is a wumpus.", "So yes."],
           "answer": "Max is a yumpus."}
    assert m.encode(rec, 0).tokens[-1] == m.tok.eos_id  # k = 0: plain CoT, no codes needed
    with pytest.raises(ValueError, match="prepare_data.*first|Every wumpus is a yumpus.*prepare_data"):
        m.encode(rec, 1)


@pytest.mark.parametrize("override,match", [
    ("method.vqvae.codebook_size=1", "codebook_size"), ("method.vqvae.chunk_len=0", "chunk_len"),
    ("method.m_choices=[0,10]", "m_choices.*multiples of vqvae.chunk_len=16"), ("method.m_choices=[]", "m_choices"),
    ("method.vqvae.beta=-1", "beta"), ("method.vqvae.decay=1.5", "decay"), ("method.vqvae.decay=0", "decay"),
    ("method.vqvae.codebok_size=8", "unknown vqvae option"), ("method.vqvae=3", "mapping"),
])
def test_bad_configs_at_load(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("prosqa_token_assorted_cpu", [override])


def test_vqvae_cli_and_mismatched_checkpoint(run, prepared, tmp_path, capsys):
    from latent_jax.cli import main

    cfg, _ = run
    method, train, folder = prepared
    assert main(["vqvae", "prosqa_token_assorted_cpu", *TINY, f"output_dir={cfg['output_dir']}",
                 "--out", str(tmp_path / "vq")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["vqvae"] == str(tmp_path / "vq") and "codes_used" in printed["after"]
    data = method.chunk_data(train)  # same config and seed: the same codes as the run's VQ-VAE
    np.testing.assert_array_equal(load_vqvae(tmp_path / "vq").codes(data.chunks), load_vqvae(folder).codes(data.chunks))
    assert main(["vqvae", "prosqa_coconut_cpu"]) == 2 and "token_assorted" in capsys.readouterr().err
    # the run's folder holds a VQ-VAE with other options: refused unless named explicitly with vqvae_dir
    other = load_config("prosqa_token_assorted_cpu", [*TINY, "method.vqvae.steps=31"])
    t, v = experiment_records(other)
    _, m2, _, _, _ = build(other, t, v)
    with pytest.raises(ValueError, match="other options"):
        m2.prepare_data(t, cfg["output_dir"])
    explicit = load_config("prosqa_token_assorted_cpu", [*TINY, "method.vqvae.steps=31", f"method.vqvae_dir={folder}"])
    _, m3, _, _, _ = build(explicit, t, v)
    m3.prepare_data(t, tmp_path / "unused")
    assert m3.codes(t[0]) == method.codes(t[0]) and not (tmp_path / "unused").exists()
