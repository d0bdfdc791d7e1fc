"""The latent-jax CLI on a tiny HF checkpoint with the real GPT-2 vocabulary."""
import json
import subprocess
import sys

import pytest

from latent_jax.cli import main
from latent_jax.testing import make_hf_checkpoint


@pytest.fixture(scope="module")
def gpt2_full_vocab(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("g"), "gpt2", vocab_size=50257, n_embd=32, n_layer=1,
                              n_head=2, bos_token_id=50256, eos_token_id=50256, initializer_range=0.3)


def test_info(gpt2_full_vocab, capsys):
    assert main(["info", "--model", str(gpt2_full_vocab)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "gpt2" and info["vocab_size"] == 50257 and info["n_layers"] == 1


def test_generate_batch(gpt2_full_vocab, capsys):
    rc = main(["generate", "--model", str(gpt2_full_vocab), "--tokenizer", "gpt2", "--prompt", "Every cat is",
               "--prompt", "Alex is a wumpus. Is Alex", "--max-new-tokens", "5"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == ["Every cat is", "Alex is a wumpus. Is Alex"]
    assert all(1 <= x["tokens"] <= 5 and isinstance(x["completion"], str) for x in lines)


def test_errors_are_clear(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    small = make_hf_checkpoint(tmp_path / "small", "gpt2")  # 211-token vocab
    assert main(["generate", "--model", str(small), "--tokenizer", "gpt2", "--prompt", "x"]) == 2
    assert "wrong tokenizer" in capsys.readouterr().err


def test_python_dash_m_and_data_subcommand(tmp_path):
    out = tmp_path / "m.txt"
    r = subprocess.run([sys.executable, "-m", "latent_jax", "data", "generate", "mult4", "--n", "5", "--out",
                        str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 5 and all("||" in x and "####" in x for x in lines)
