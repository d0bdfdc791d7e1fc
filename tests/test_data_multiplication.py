"""Multiplication generator: reproduces the real iCoT files byte for byte, excludes validation pairs."""
import re

import pytest

from latent_jax.data import (generate_multiplication, multiplication_line, parse_operands, read_icot_text,
                             write_icot_text)

SIZES = (4, 5, 7, 9)


def _digits(text: str) -> int:
    return int("".join(reversed(text.split(" "))))


@pytest.mark.parametrize("n", SIZES)
def test_regenerates_every_real_line(shared_dir, n):
    lines = (shared_dir / f"data/multiplication/{n}x{n}_valid.txt").read_text().splitlines()
    assert len(lines) == 1000
    mismatched = [line for line in lines if multiplication_line(*parse_operands(line.split("||")[0]), n) != line]
    assert not mismatched, mismatched[:2]


@pytest.mark.parametrize("n", SIZES)
def test_generated_set_is_correct_unique_and_disjoint_from_valid(shared_dir, tmp_path, n):
    real = read_icot_text(shared_dir / f"data/multiplication/{n}x{n}_valid.txt")
    valid_pairs = {parse_operands(r["question"]) for r in real}
    gen = generate_multiplication(3000, n_digits=n, seed=1)
    pairs = [parse_operands(r["question"]) for r in gen]
    assert len(set(pairs)) == len(pairs)
    assert not set(pairs) & valid_pairs and not {(b, a) for a, b in pairs} & valid_pairs
    shape = re.compile(r"[\d ]+ \* [\d ]+\|\|[\d ()+]+ #### [\d ]+")
    for (a, b), rec in zip(pairs, gen):
        assert 10 ** (n - 1) <= a < 10 ** n and 10 ** (n - 1) <= b < 10 ** n
        assert _digits(rec["answer"]) == a * b and len(rec["answer"].split()) == 2 * n
        assert len(rec["steps"]) == n
    out = tmp_path / "gen.txt"
    write_icot_text(gen, out)
    lines = out.read_text().splitlines()
    assert all(shape.fullmatch(line) for line in lines)
    # same token layout as the real lines of the same size
    real_lines = (shared_dir / f"data/multiplication/{n}x{n}_valid.txt").read_text().splitlines()
    assert {len(line.split()) for line in lines} == {len(line.split()) for line in real_lines}
    # leading operand digit distribution: uniform 1..9 (no leading zero), lowest digit includes 0
    assert {a % 10 for a, _ in pairs} == set(range(10)) and {a // 10 ** (n - 1) for a, _ in pairs} == set(range(1, 10))


def test_deterministic_in_seed():
    assert generate_multiplication(50, 4, seed=3) == generate_multiplication(50, 4, seed=3)
    assert generate_multiplication(50, 4, seed=3) != generate_multiplication(50, 4, seed=4)


def test_small_sizes_and_exhaustion():
    every = generate_multiplication(90 * 90, n_digits=2, seed=0)
    assert len({r["question"] for r in every}) == 8100
    with pytest.raises(ValueError, match="only 8100"):
        generate_multiplication(8101, n_digits=2)
    with pytest.raises(ValueError, match="n_digits"):
        generate_multiplication(10, n_digits=1)
    with pytest.raises(ValueError, match="exactly 3 digits"):
        multiplication_line(12, 345, 3)
