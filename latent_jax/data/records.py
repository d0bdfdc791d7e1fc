"""The common record type and the readers/writers for the two on-disk formats.

A *record* is a plain ``dict`` with at least ``question: str``, ``steps: list[str]`` and ``answer: str``
(see ``METHODS.md``, "Common data format"). ProsQA/ProntoQA records also carry the graph behind the question
(``idx_to_symbol``, ``edges``, ``root``, ``target``, ``neg_target``; ProntoQA adds ``chain_concepts``).

Two file formats are supported:

* JSON: one list of records, written like the real files (``json.dumps`` default separators, no indent).
* iCoT text: one record a line, ``question||step step ... #### answer``. GSM8k-Aug steps are the
  space-separated ``<<expr=value>>`` tokens; multiplication steps are the partial products, each later one
  starting with ``+`` (so that ``" ".join(steps)`` gives back the chain of thought byte for byte).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal

Record = dict[str, Any]
StepSplit = Literal["auto", "space", "plus"]

_MULT_QUESTION = re.compile(r"^\d( \d)* \* \d( \d)*$")


class DataFormatError(ValueError):
    """A data file (or record) does not follow the expected format; the message names file and location."""


def _describe(path: str | os.PathLike | None, where: str) -> str:
    return f"{os.fspath(path) if path is not None else '<records>'}: {where}"


def validate_record(record: Any, index: int, path: str | os.PathLike | None = None) -> Record:
    """Check that ``record`` has ``question`` (str), ``steps`` (list of str) and ``answer`` (str).

    Raises :class:`DataFormatError` naming the file and the record index.
    """
    if not isinstance(record, dict):
        raise DataFormatError(_describe(path, f"record {index} is a {type(record).__name__}, not an object"))
    missing = [k for k in ("question", "steps", "answer") if k not in record]
    if missing:
        raise DataFormatError(_describe(path, f"record {index} is missing {', '.join(missing)}: "
                                              f"{json.dumps(record)[:200]}"))
    if not isinstance(record["question"], str) or not isinstance(record["answer"], str):
        raise DataFormatError(_describe(path, f"record {index}: question and answer must be strings"))
    steps = record["steps"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise DataFormatError(_describe(path, f"record {index}: steps must be a list of strings"))
    return record


def read_json_records(path: str | os.PathLike) -> list[Record]:
    """Read a JSON list of records (the format of ``prosqa/valid.json`` etc.) and validate every record."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        lines = e.doc.splitlines()
        line = lines[e.lineno - 1] if 0 < e.lineno <= len(lines) else ""
        raise DataFormatError(_describe(path, f"line {e.lineno}: invalid JSON ({e.msg}): {line[:200]!r}")) from e
    if not isinstance(data, list):
        raise DataFormatError(_describe(path, f"expected a JSON list of records, got {type(data).__name__}"))
    return [validate_record(r, i, path) for i, r in enumerate(data)]


def write_json_records(records: Iterable[Record], path: str | os.PathLike) -> int:
    """Write records as one JSON list, formatted like the real files. Returns the number written."""
    records = list(records)
    for i, r in enumerate(records):
        validate_record(r, i, path)
    Path(path).write_text(json.dumps(records), encoding="utf-8")
    return len(records)


def split_steps(cot: str, question: str = "", mode: StepSplit = "auto") -> list[str]:
    """Split an iCoT chain of thought into steps such that ``" ".join(steps) == cot``.

    ``space``: every space-separated token is a step (GSM8k-Aug; an empty CoT gives ``[""]`` as in the
    reference conversion). ``plus``: a new step starts at every ``+`` token (multiplication partial products).
    ``auto`` picks ``plus`` when the question looks like ``d d d * d d d``.
    """
    if mode == "auto":
        mode = "plus" if _MULT_QUESTION.match(question) else "space"
    if mode == "space":
        return cot.split(" ")
    if mode == "plus":
        parts = cot.split(" + ")
        return [parts[0]] + ["+ " + p for p in parts[1:]]
    raise ValueError(f"unknown step split mode {mode!r}")


def parse_icot_line(line: str, lineno: int = 0, path: str | os.PathLike | None = None,
                    step_split: StepSplit = "auto") -> Record:
    """Parse one ``question||cot #### answer`` line into a record (errors name file, line number and line)."""
    bad = DataFormatError(_describe(path, f"line {lineno}: expected 'question||steps #### answer': {line!r}"))
    if line.count("||") != 1:
        raise bad
    question, rest = line.split("||", 1)
    if rest.startswith("#### "):  # empty chain of thought
        cot, answer = "", rest[len("#### "):]
    elif " #### " in rest:
        cot, answer = rest.rsplit(" #### ", 1)
    else:
        raise bad
    if not question.strip() or not answer.strip():
        raise DataFormatError(_describe(path, f"line {lineno}: empty question or answer: {line!r}"))
    return {"question": question, "steps": split_steps(cot, question, step_split), "answer": answer}


def format_icot_line(record: Record) -> str:
    """Format a record as one iCoT line (inverse of :func:`parse_icot_line`)."""
    return f"{record['question']}||{' '.join(record['steps'])} #### {record['answer']}"


def read_icot_text(path: str | os.PathLike, step_split: StepSplit = "auto") -> list[Record]:
    """Read an iCoT text file (one record a line; a trailing newline is allowed, blank lines are not)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [parse_icot_line(line, i + 1, path, step_split) for i, line in enumerate(lines)]


def write_icot_text(records: Iterable[Record], path: str | os.PathLike) -> int:
    """Write records as iCoT text lines (each line ends with a newline). Returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            validate_record(r, i, path)
            f.write(format_icot_line(r) + "\n")
            n += 1
    return n


def read_records(path: str | os.PathLike) -> list[Record]:
    """Read records from ``.json`` (JSON list) or any other extension (iCoT text)."""
    return read_json_records(path) if str(path).endswith(".json") else read_icot_text(path)
