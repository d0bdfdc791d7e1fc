"""Dataset registry: ``load_dataset(name, split, source, ...)`` returns a list of records.

========  ===================================  ============================================  ==================
name      ``split="valid"`` (``source="file"``)  ``split="train"``                             licence
========  ===================================  ============================================  ==================
prosqa    ``prosqa/valid.json`` (300)           generated (default 17,886, as Coconut's train)  MIT (real file)
prontoqa  ``prontoqa/valid.json`` (200)         generated (default 9,000)                      MIT / Apache-2.0
gsm8k     ``gsm8k/valid.json`` (500)            ``train_original.jsonl`` converted (6,884)     MIT
mult4..9  ``multiplication/NxN_valid.txt``      generated (default 808,000, as iCoT's train)  MIT (real files)
========  ===================================  ============================================  ==================

``source="generated"`` with ``split="valid"`` gives a generated set from a seed stream disjoint from the
training one (``seed`` -> ``-1 - seed``). Multiplication training sets never contain a validation operand pair.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Literal

from .gsm8k import convert_gsm8k
from .multiplication import generate_multiplication, valid_path
from .paths import find_data_file
from .prontoqa import generate_prontoqa
from .prosqa import generate_prosqa, graph_size
from .records import Record, read_json_records, read_records

Split = Literal["train", "valid"]
Source = Literal["generated", "file"]


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows about one task."""

    name: str
    valid_file: str
    default_train_n: int | None  # None: no generator (the real training file is used)
    licence: str
    description: str


_MULT_SIZES = (4, 5, 7, 9)
DATASETS: dict[str, DatasetInfo] = {
    "prosqa": DatasetInfo("prosqa", "prosqa/valid.json", 17886, "MIT",
                          "ProsQA (Coconut): DAG of made-up concepts, 'Is Tom a X or Y?'"),
    "prontoqa": DatasetInfo("prontoqa", "prontoqa/valid.json", 9000, "MIT / Apache-2.0",
                            "ProntoQA 5-hop with distractors, 'True or false: Alex is happy.'"),
    "gsm8k": DatasetInfo("gsm8k", "gsm8k/valid.json", None, "MIT",
                         "GSM8k, steps = calculator annotations (GSM8k-Aug format)"),
    **{f"mult{k}": DatasetInfo(f"mult{k}", valid_path(k), 808000, "MIT",
                               f"{k}x{k} multiplication, iCoT format (digits reversed)") for k in _MULT_SIZES},
}


def canonical_name(name: str, n_digits: int | None = None) -> str:
    """``"ProsQA"`` -> ``prosqa``; ``"mult4"``, ``"4x4"``, ``"multiplication"`` + n_digits=4 -> ``mult4``."""
    key = name.strip().lower().replace("-", "_")
    m = re.fullmatch(r"(?:mult|multiplication)_?(\d+)(?:x\d+)?|(\d+)x(\d+)(?:_mult)?", key)
    if m:
        return f"mult{m.group(1) or m.group(2)}"
    if key in ("mult", "multiplication"):
        if n_digits is None:
            raise ValueError("multiplication needs n_digits (or use the names mult4, mult5, mult7, mult9)")
        return f"mult{n_digits}"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or multN for any N >= 2)")
    return key


def _mult_digits(name: str) -> int | None:
    return int(name[4:]) if name.startswith("mult") else None


def generator_for(name: str, rung=None) -> Callable[[int, int], list[Record]]:
    """The generator ``(n, seed) -> records`` of a task (ValueError for GSM8k, which has none). ``rung``: a ProsQA
    graph size (``latent_jax.data.prosqa.RUNGS``); other tasks have none."""
    digits = _mult_digits(name)
    if rung is not None and name != "prosqa":
        raise ValueError(f"a graph-size rung is a ProsQA option; {name} has none (got rung={rung!r})")
    if digits is not None:
        return lambda n, seed: generate_multiplication(n, digits, seed)
    if name == "prosqa":
        return lambda n, seed: generate_prosqa(n, seed, rung)
    if name == "prontoqa":
        return lambda n, seed: generate_prontoqa(n, seed)
    raise ValueError(f"{name} has no generator; use source='file' (the original training set is converted)")


def load_dataset(name: str, split: Split = "train", source: Source | None = None, path: str | os.PathLike | None = None,
                 n: int | None = None, seed: int = 0, n_digits: int | None = None, rung=None) -> list[Record]:
    """Return the records of a dataset.

    Args:
      name: ``prosqa``, ``prontoqa``, ``gsm8k``, ``mult4``/``mult5``/``mult7``/``mult9`` (any ``multN``, N >= 2,
        for generated data), or ``multiplication`` with ``n_digits``.
      split: ``train`` or ``valid``.
      source: ``generated`` or ``file``; default: ``file`` for valid and for GSM8k, ``generated`` otherwise.
      path: read this file instead of the default one (``.json``: JSON list; otherwise iCoT text).
      n: number of records (generated: default the task's training size; file: the first ``n`` records).
      seed: seed of the generator; generated sets are deterministic in it.
      rung: ProsQA only: the generator's graph size (a name of ``latent_jax.data.prosqa.RUNGS`` or
        ``{nodes: [lo, hi], steps: [lo, hi]}``); a rung other than ``real`` has no file, only generated sets.
    """
    name = canonical_name(name, n_digits)
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    digits = _mult_digits(name)
    info = DATASETS.get(name) or DatasetInfo(name, valid_path(digits or 0), 808000, "-", "multiplication")
    if source is None:
        source = "file" if split == "valid" or info.default_train_n is None or path is not None else "generated"
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if source == "generated":
        count = info.default_train_n if n is None else n
        return generator_for(name, rung)(count, seed if split == "train" else -1 - seed)
    if source != "file":
        raise ValueError(f"source must be 'generated' or 'file', got {source!r}")
    if rung is not None and not graph_size(rung).is_real and path is None:
        raise ValueError(f"the ProsQA rung {rung!r} has no real file (only the real size does); use source='generated'")
    if path is not None:
        records = read_records(path)
    elif split == "valid":
        records = read_records(find_data_file(info.valid_file))
    elif name == "gsm8k":
        valid = {r["question"] for r in read_json_records(find_data_file(info.valid_file))}
        records, _ = convert_gsm8k(find_data_file("gsm8k/train_original.jsonl"), exclude_questions=valid)
    else:
        raise ValueError(f"no real training split of {name} is available; use source='generated' or pass path=")
    if n is not None:
        if n > len(records):
            raise ValueError(f"asked for {n} records but {name} {split} has only {len(records)}")
        records = records[:n]
    return records
