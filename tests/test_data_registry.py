"""load_dataset registry, packaged files and the `latent-jax data` CLI."""
import json

import pytest

from latent_jax.data import (DATASETS, generate_multiplication, load_dataset, multiplication_line, parse_operands,
                             read_records)
from latent_jax.data.cli import main
from latent_jax.data.paths import PACKAGE_FILES


def test_valid_files(shared_dir):
    sizes = {"prosqa": 300, "prontoqa": 200, "gsm8k": 500, "mult4": 1000, "mult9": 1000}
    for name, size in sizes.items():
        records = load_dataset(name, split="valid")
        assert len(records) == size
        assert records == read_records(shared_dir / "data" / DATASETS[name].valid_file)
    assert load_dataset("multiplication", split="valid", n_digits=5) == load_dataset("5x5", split="valid")


def test_packaged_copies_equal_the_shared_files(shared_dir):
    for info in DATASETS.values():
        packaged = PACKAGE_FILES / info.valid_file
        assert packaged.stat().st_size < 2 * 2 ** 20
        assert packaged.read_bytes() == (shared_dir / "data" / info.valid_file).read_bytes()


def test_generated_training_sets_are_deterministic():
    a = load_dataset("prosqa", n=20, seed=3)
    assert a == load_dataset("prosqa", split="train", source="generated", n=20, seed=3)
    assert a != load_dataset("prosqa", n=20, seed=4)
    assert load_dataset("prosqa", split="valid", source="generated", n=20, seed=3) != a
    assert load_dataset("prontoqa", n=5) == load_dataset("prontoqa", n=5)
    assert load_dataset("mult7", n=5, seed=2) == generate_multiplication(5, 7, seed=2)


def test_gsm8k_train_is_the_converted_original(shared_dir):
    train = load_dataset("gsm8k", split="train")
    valid = {r["question"] for r in load_dataset("gsm8k", split="valid")}
    assert len(train) > 6500 and not {r["question"] for r in train} & valid
    assert load_dataset("gsm8k", n=3) == train[:3]


def test_file_source_with_path_and_env(tmp_path, monkeypatch, shared_dir):
    rec = {"question": "q", "steps": ["s"], "answer": "a"}
    f = tmp_path / "mine.json"
    f.write_text(json.dumps([rec, rec]))
    assert load_dataset("prosqa", source="file", path=f) == [rec, rec]
    (tmp_path / "prosqa").mkdir()
    (tmp_path / "prosqa/valid.json").write_text(json.dumps([rec]))
    monkeypatch.setenv("LATENT_JAX_DATA", str(tmp_path))
    assert load_dataset("prosqa", split="valid") == [rec]


def test_bad_requests():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="no generator"):
        load_dataset("gsm8k", source="generated")
    with pytest.raises(ValueError, match="no real training split"):
        load_dataset("prosqa", source="file")
    with pytest.raises(ValueError, match="only 300"):
        load_dataset("prosqa", split="valid", n=301)
    with pytest.raises(ValueError, match="n_digits"):
        load_dataset("multiplication")
    with pytest.raises(ValueError, match="n_digits"):
        load_dataset("mult1", n=3)


def test_cli_generate(tmp_path, capsys, shared_dir):  # gsm8k needs shared/data/gsm8k/train_original.jsonl
    out = tmp_path / "p.json"
    assert main(["generate", "prosqa", "--n", "10", "--seed", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == load_dataset("prosqa", n=10, seed=1)
    out = tmp_path / "m.txt"
    assert main(["generate", "mult4", "--n", "25", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 25 and all(multiplication_line(*parse_operands(x.split("||")[0]), 4) == x for x in lines)
    out = tmp_path / "g.json"
    assert main(["generate", "gsm8k", "--n", "7", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 7
    assert "dropped" in capsys.readouterr().err


def test_cli_errors_and_stats(tmp_path, capsys):
    assert main(["generate", "mult2", "--n", "9000", "--out", str(tmp_path / "x.txt")]) == 2
    assert "only 8100" in capsys.readouterr().err
    assert main(["generate", "nope", "--n", "1", "--out", str(tmp_path / "x.txt")]) == 2
    assert main(["stats", "prontoqa", "--n", "300"]) == 0
    assert "| steps |" in capsys.readouterr().out
    assert main(["list"]) == 0
