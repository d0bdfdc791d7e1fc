"""benchmarks/throughput.py on a tiny model: the JSON it reports, its FLOP count and its MFU arithmetic."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import throughput  # noqa: E402

from latent_jax.config import gpt2_config, llama_config  # noqa: E402


def test_train_flops_per_token_by_hand():
    # GPT-2 124M: 124.44M params incl. 1024x768 position embeddings (not matmuls), tied head; 12 layers x 768
    cfg = gpt2_config("124m")
    n = cfg.num_params() - 1024 * 768
    assert throughput.train_flops_per_token(cfg, 512) == 6 * n + 12 * 12 * 768 * 512
    assert 6 * n / 1e6 == pytest.approx(6 * 123.65, rel=1e-3)
    llama = llama_config("3.2-1b")  # tied embeddings: the one [V, D] matrix is the head's matmul
    assert throughput.train_flops_per_token(llama, 64) == 6 * llama.num_params() + 12 * 16 * 32 * 64 * 64


@pytest.mark.parametrize("optimizer", ["sgd"])  # adamw (the default) is the trainer's optimizer, tested there
def test_throughput_runs_and_reports(optimizer):
    out = throughput.main(["--size", "tiny", "--batch", "2", "--length", "32", "--n-latent", "2", "--steps", "1",
                           "--decode-new", "4", "--decode-batches", "1,2", "--peak-tflops", "0.5",
                           "--optimizer", optimizer])
    assert out["optimizer"] == optimizer and out["n_latent"] == 2
    for part in ("train_plain", "train_coconut"):
        r = out[part]
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s"], rel=1e-2)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * out["train_flops_per_token"] / 0.5e12, rel=1e-2)
    assert out["coconut_vs_plain_step_time"] > 0
    assert set(out) >= {"decode_b1", "decode_b2"} and out["decode_b2"]["new_tokens_per_s"] > 0
