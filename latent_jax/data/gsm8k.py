"""GSM8k: convert the original training set (``train_original.jsonl``) into the GSM8k-Aug record format.

An original answer holds calculator annotations ``<<48/2=24>>`` and ends with ``#### 72``. The converted record
is ``{"question", "steps": ["<<48/2=24>>", ...], "answer": "72"}`` exactly as in ``gsm8k/valid.json`` (which is
itself a subset of the original training set). Records are dropped when an annotation does not evaluate to its
stated value, when they have no annotation at all, or (by default) when their question is one of the validation
questions; :func:`convert_gsm8k` reports how many of each.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from .records import DataFormatError, Record

_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_TOKEN = re.compile(r"\s*(\d+\.?\d*|\.\d+|//|[-+*/()])")


def evaluate(expr: str) -> Fraction:
    """Exactly evaluate an arithmetic expression of numbers, ``+ - * / //`` and parentheses (no ``eval``)."""
    tokens, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"bad expression {expr!r} at {pos}")
        tokens.append(m.group(1))
        pos = m.end()
    it = 0

    def peek() -> str | None:
        return tokens[it] if it < len(tokens) else None

    def take() -> str:
        nonlocal it
        it += 1
        return tokens[it - 1]

    def atom() -> Fraction:
        tok = peek()
        if tok == "-":
            take()
            return -atom()
        if tok == "+":
            take()
            return atom()
        if tok == "(":
            take()
            v = add()
            if peek() != ")":
                raise ValueError(f"unbalanced parentheses in {expr!r}")
            take()
            return v
        if tok is None or not (tok[0].isdigit() or tok[0] == "."):
            raise ValueError(f"bad expression {expr!r}")
        return Fraction(take())

    def mul() -> Fraction:
        v = atom()
        while peek() in ("*", "/", "//"):
            op, rhs = take(), atom()
            v = v * rhs if op == "*" else v / rhs if op == "/" else Fraction(v // rhs)
        return v

    def add() -> Fraction:
        v = mul()
        while peek() in ("+", "-"):
            op, rhs = take(), mul()
            v = v + rhs if op == "+" else v - rhs
        return v

    value = add()
    if it != len(tokens):
        raise ValueError(f"trailing tokens in {expr!r}")
    return value


def annotation_ok(annotation: str) -> bool:
    """``"48/2=24"`` -> True. The value may be rounded to the decimals it is written with (``10/3=3.33``)."""
    lhs, sep, rhs = annotation.rpartition("=")
    if not sep:
        return False
    try:
        got, stated = evaluate(lhs), evaluate(rhs)
    except (ValueError, ZeroDivisionError):
        return False
    if got == stated:
        return True
    decimals = len(rhs.strip().split(".")[1]) if "." in rhs else 0
    return decimals > 0 and abs(got - stated) <= Fraction(1, 2 * 10 ** decimals)


def convert_answer(question: str, answer: str, keep_unannotated: bool = False) -> tuple[Record | None, str]:
    """Convert one original record; returns (record or None, reason: ``ok``/``bad_annotation``/``no_annotation``).

    A record without any annotation is dropped unless ``keep_unannotated``; it then gets ``steps == [""]``, which
    is what the GSM8k-Aug files hold for such records (``"".split(" ")``).
    """
    if "####" not in answer:
        raise ValueError("answer has no '####' line")
    annotations = _ANNOTATION.findall(answer)
    if not annotations and not keep_unannotated:
        return None, "no_annotation"
    if not all(annotation_ok(a) for a in annotations):
        return None, "bad_annotation"
    final = answer.rsplit("####", 1)[1].strip()
    steps = [f"<<{a}>>" for a in annotations] or [""]
    return {"question": question, "steps": steps, "answer": final}, "ok"


@dataclass
class ConversionReport:
    """Counts of a conversion: kept, and dropped by reason."""

    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"bad_annotation": 0, "no_annotation": 0,
                                                              "in_valid": 0})
    bad_examples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.total} records: kept {self.kept}, dropped " + ", ".join(
            f"{v} {k}" for k, v in self.dropped.items())


def convert_gsm8k(path: str | os.PathLike, exclude_questions: set[str] | None = None,
                  keep_unannotated: bool = False) -> tuple[list[Record], ConversionReport]:
    """Convert ``train_original.jsonl``; questions in ``exclude_questions`` (the validation set) are dropped.

    Malformed lines raise :class:`DataFormatError` naming the file, the line number and the line.
    """
    path = Path(path)
    report, records = ConversionReport(), []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                question, answer = raw["question"], raw["answer"]
                rec, reason = convert_answer(question, answer, keep_unannotated)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataFormatError(f"{path}: line {lineno}: {e}: {line.rstrip()[:200]!r}") from e
            report.total += 1
            if exclude_questions and question in exclude_questions:
                report.dropped["in_valid"] += 1
            elif rec is None:
                report.dropped[reason] += 1
                if reason == "bad_annotation" and len(report.bad_examples) < 20:
                    report.bad_examples.append(next(a for a in _ANNOTATION.findall(answer) if not annotation_ok(a)))
            else:
                records.append(rec)
    report.kept = len(records)
    return records, report
