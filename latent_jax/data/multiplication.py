"""N x N digit multiplication in the iCoT format (Deng et al.), reproducing ``NxN_valid.txt`` byte for byte.

Line format (all numbers written least-significant digit first, digits space separated)::

    a_rev * b_rev||p0 + p1 ( s1 ) + p2 ( s2 ) ... + p_{N-1} #### product

``p_i = a * b_i * 10**i`` written with ``N + 1 + i`` digits (``a * b_i`` padded to ``N + 1`` digits, then ``i``
leading zeros in reversed order); ``s_i = p_0 + ... + p_i`` written with ``N + 1 + i`` digits; the last partial
product has no running sum; the product has ``2 N`` digits. Operands have exactly N digits (no leading zero).
"""
from __future__ import annotations

import random
from functools import lru_cache

from .paths import find_data_file
from .records import Record, format_icot_line, read_icot_text

VALID_SIZES = (4, 5, 7, 9)


def _rev(x: int, width: int) -> str:
    """``x`` as ``width`` digits, least significant first, space separated."""
    s = str(x)
    if len(s) > width:
        raise ValueError(f"{x} does not fit in {width} digits")
    return " ".join(reversed(s.zfill(width)))


def _check_digits(n_digits: int) -> None:
    if not isinstance(n_digits, int) or n_digits < 2:
        raise ValueError(f"n_digits must be an integer >= 2, got {n_digits!r}")


def multiplication_record(a: int, b: int, n_digits: int) -> Record:
    """The iCoT record for ``a * b`` (both exactly ``n_digits`` digits)."""
    _check_digits(n_digits)
    lo, hi = 10 ** (n_digits - 1), 10 ** n_digits
    if not (lo <= a < hi and lo <= b < hi):
        raise ValueError(f"operands must have exactly {n_digits} digits, got {a} and {b}")
    steps: list[str] = []
    total = 0
    for i, digit in enumerate(reversed(str(b))):
        part = a * int(digit) * 10 ** i
        total += part
        text = _rev(part, n_digits + 1 + i)
        if i == 0:
            steps.append(text)
        elif i < n_digits - 1:
            steps.append(f"+ {text} ( {_rev(total, n_digits + 1 + i)} )")
        else:
            steps.append(f"+ {text}")
    return {"question": f"{_rev(a, n_digits)} * {_rev(b, n_digits)}", "steps": steps,
            "answer": _rev(a * b, 2 * n_digits)}


def multiplication_line(a: int, b: int, n_digits: int) -> str:
    """The iCoT text line for ``a * b``."""
    return format_icot_line(multiplication_record(a, b, n_digits))


def parse_operands(question: str) -> tuple[int, int]:
    """``"5 6 3 2 * 7 4 3 4"`` -> ``(2365, 4347)``."""
    try:
        left, right = question.split(" * ")
        return int("".join(reversed(left.split(" ")))), int("".join(reversed(right.split(" "))))
    except ValueError as e:
        raise ValueError(f"not a multiplication question: {question!r}") from e


def valid_path(n_digits: int) -> str:
    """Relative path of the real validation file for ``n_digits``."""
    return f"multiplication/{n_digits}x{n_digits}_valid.txt"


@lru_cache(maxsize=None)
def valid_operand_pairs(n_digits: int) -> frozenset[tuple[int, int]]:
    """Operand pairs of the real validation file (empty for sizes that have none)."""
    if n_digits not in VALID_SIZES:
        return frozenset()
    return frozenset(parse_operands(r["question"]) for r in read_icot_text(find_data_file(valid_path(n_digits))))


def generate_multiplication(n: int, n_digits: int = 4, seed: int = 0,
                            exclude_valid: bool = True) -> list[Record]:
    """``n`` distinct random ``n_digits x n_digits`` problems (uniform operands), deterministic in ``seed``.

    With ``exclude_valid`` every operand pair of the real validation file is left out, in either order
    (users evaluate on those). Raises ValueError if ``n`` exceeds the number of distinct problems left.
    """
    _check_digits(n_digits)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lo, hi = 10 ** (n_digits - 1), 10 ** n_digits
    excluded: set[tuple[int, int]] = set()
    if exclude_valid:
        for a, b in valid_operand_pairs(n_digits):
            excluded.update({(a, b), (b, a)})
    available = (hi - lo) ** 2 - len(excluded)
    if n > available:
        raise ValueError(f"asked for {n} distinct {n_digits}x{n_digits} problems but only {available} exist"
                         f"{' after excluding the validation pairs' if excluded else ''}")
    rng = random.Random(f"multiplication-{n_digits}-{seed}")
    seen = set(excluded)
    records: list[Record] = []
    if n > available // 2:  # dense request: enumerate and sample without replacement
        pool = [(a, b) for a in range(lo, hi) for b in range(lo, hi) if (a, b) not in excluded]
        pairs = rng.sample(pool, n)
    else:
        pairs = []
        while len(pairs) < n:
            pair = (rng.randrange(lo, hi), rng.randrange(lo, hi))
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
    for a, b in pairs:
        records.append(multiplication_record(a, b, n_digits))
    return records
