"""``latent-jax data ...``: generate training sets, compare them with the real files, list the datasets.

    latent-jax data generate TASK --n N --seed S --out FILE   # prosqa, prontoqa, gsm8k, mult4 ... mult9
    latent-jax data stats TASK [--n N] [--seed S] [--rung R]  # real-vs-generated statistics (+ prosqa: the ladder)
    latent-jax data list

The top-level CLI calls :func:`main` with the arguments after ``data``.
"""
from __future__ import annotations

import argparse
import sys
import time

from .paths import find_data_file
from .records import read_json_records, read_records, write_icot_text, write_json_records
from .registry import DATASETS, canonical_name, generator_for, load_dataset
from .stats import STATS, comparison_rows, ladder_table, markdown_table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latent-jax data", description="Datasets: generate, compare, list.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write a training set (JSON; iCoT text for multiplication)")
    g.add_argument("task", help="prosqa | prontoqa | gsm8k | mult4 | mult5 | mult7 | mult9 (any multN, N >= 2)")
    g.add_argument("--n", type=int, default=None, help="number of records (default: the task's training size)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--rung", default=None, help="prosqa: a graph size of the ladder (tiny, small, medium, real)")
    g.add_argument("--encoding", choices=("text", "symbolic"), default="text",
                   help="prosqa: symbolic writes one token per node (latent_jax.data.symbolic)")
    g.add_argument("--out", required=True, help="output file")
    g.add_argument("--format", choices=("json", "icot"), default=None,
                   help="default: icot for multiplication, json otherwise")
    s = sub.add_parser("stats", help="real-vs-generated statistics (prosqa, prontoqa)")
    s.add_argument("task")
    s.add_argument("--n", type=int, default=20000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rung", default=None, help="prosqa: compare one rung of the size ladder (default: real size)")
    sub.add_parser("list", help="list the datasets")
    return p


def _generate(args: argparse.Namespace) -> int:
    name = canonical_name(args.task)
    start = time.perf_counter()
    if name == "gsm8k":
        from .gsm8k import convert_gsm8k
        valid = {r["question"] for r in read_json_records(find_data_file(DATASETS["gsm8k"].valid_file))}
        records, report = convert_gsm8k(find_data_file("gsm8k/train_original.jsonl"), exclude_questions=valid)
        print(f"gsm8k: {report}", file=sys.stderr)
        if args.n is not None:
            if args.n > len(records):
                raise ValueError(f"asked for {args.n} records but only {len(records)} GSM8k records are usable")
            records = records[: args.n]
    else:
        records = load_dataset(name, "train", "generated", n=args.n, seed=args.seed, rung=args.rung)
        if args.encoding == "symbolic":
            if name != "prosqa":
                raise ValueError(f"--encoding symbolic is for prosqa, not {name}")
            from .symbolic import symbolic_records
            records = symbolic_records(records, "generated records")
    fmt = args.format or ("icot" if name.startswith("mult") else "json")
    count = (write_icot_text if fmt == "icot" else write_json_records)(records, args.out)
    print(f"wrote {count} {name} records to {args.out} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


def _stats(args: argparse.Namespace) -> int:
    name = canonical_name(args.task)
    if name not in STATS:
        raise ValueError(f"stats are available for {', '.join(STATS)}; multiplication lines are exact by construction")
    real = read_records(find_data_file(DATASETS[name].valid_file))
    start = time.perf_counter()
    gen = generator_for(name, args.rung)(args.n, args.seed)
    took = time.perf_counter() - start
    what = f" (rung {args.rung}: the real column is the real file's size, for scale)" if args.rung else ""
    print(markdown_table(comparison_rows(real, gen, name), len(real), len(gen)) + what)
    print(f"\n(generated {len(gen)} records in {took:.1f}s, seed {args.seed})")
    if name == "prosqa":
        print(f"\nThe size ladder ({min(args.n, 2000)} generated records a rung; `data.rung` in a config):\n")
        print(ladder_table(min(args.n, 2000), args.seed))
    return 0


def _list() -> int:
    print("| task | valid file | train | licence |\n|---|---|---|---|")
    for info in DATASETS.values():
        train = "converted train_original.jsonl" if info.default_train_n is None else \
            f"generated (default {info.default_train_n})"
        print(f"| {info.name} | {info.valid_file} | {train} | {info.licence} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` are the arguments after ``data``. Returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "stats":
            return _stats(args)
        return _list()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
