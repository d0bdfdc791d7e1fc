"""Where a CoT model fails on ProntoQA: are its steps the question's rules, and does its answer follow its own CoT?

    python benchmarks/prontoqa_cot_check.py runs/repro/cpu/prontoqa_cot/export [--out FILE.json]

Greedy-decodes the real validation file (`../shared/data/prontoqa/valid.json`, or the packaged copy) with the
exported CoT model and reports, besides exact-match accuracy:
  - first_step_exact / steps_exact_in_place / whole_cot_exact: the generated lines against the gold steps;
  - rules_stated_in_question: of the rules the CoT writes (`Tumpuses are gorpuses.`), the share that the question
    states (`Tumpuses are gorpuses.` / `Every tumpus is a gorpus.` / `Each tumpus is a gorpus.`); a model that
    looks its rules up in the context scores ~1, one that writes plausible rules from the training distribution
    scores near the share of such pairs a question happens to state;
  - answer_consistent_with_own_last_step: the answer is True iff the CoT's last line and the question's claim agree
    in polarity (`not`); a model whose answer reads its own CoT scores ~1 whatever the CoT's quality.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from latent_jax.data import parse_prontoqa_question, parse_prontoqa_rule


def written_rules(line: str) -> list[tuple[str, str, bool]]:
    """The rules one generated CoT line states (`Alex is a tumpus. Tumpuses are gorpuses.` -> the second)."""
    return [r for r in map(parse_prontoqa_rule, re.split(r"(?<=\.)\s+", line.strip())) if r is not None]


def implied_answer(claim_negated: bool, cot_lines: list[str]) -> str:
    """The answer a CoT's last line implies for the question's claim (`True or false: Alex is (not) happy.`):
    True iff both say `not` or neither does."""
    last = cot_lines[-1] if cot_lines else ""
    return "True" if claim_negated == (" not " in f" {last} ") else "False"


def check(records: list[dict], generated: list[str]) -> dict:
    """The report above from records (question, steps, answer) and the generated texts."""
    n = len(records)
    if n == 0 or n != len(generated):
        raise ValueError(f"need one generated text per record (got {len(generated)} for {n})")
    consistent = first = whole = in_place = gold_steps = stated = written = 0
    for r, text in zip(records, generated):
        body = [line for line in text.split("\n") if line.strip() and not line.startswith("###")]
        context, _, (_, _, claim_negated) = parse_prontoqa_question(r["question"])
        consistent += text.split("#")[-1].strip() == implied_answer(claim_negated, body)
        gold = r["steps"]
        gold_steps += len(gold)
        in_place += sum(a == b for a, b in zip(body, gold))
        first += bool(body) and body[0] == gold[0]
        whole += body == gold
        for line in body:
            for rule in written_rules(line):
                written += 1
                stated += rule in context
    return {"n": n, "first_step_exact": first / n, "steps_exact_in_place": in_place / max(gold_steps, 1),
            "whole_cot_exact": whole / n, "rules_written": written,
            "rules_stated_in_question": stated / written if written else None,
            "answer_consistent_with_own_last_step": consistent / n}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", help="an exported CoT model folder (RUN/export)")
    ap.add_argument("--n", type=int, default=None, help="first N validation questions (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None, help="also write the report here (JSON)")
    args = ap.parse_args(argv)

    from latent_jax.compact_vocab import load_any_tokenizer
    from latent_jax.data import load_dataset
    from latent_jax.evaluate import evaluate
    from latent_jax.hf import load_hf
    from latent_jax.methods import build_method

    valid = load_dataset("prontoqa", split="valid", source="file", n=args.n)
    method = build_method("cot", load_any_tokenizer(args.model_dir))
    _, graphdef, params = load_hf(args.model_dir)
    res = evaluate(method, valid, graphdef, params, 0, batch_size=100, max_new_tokens=args.max_new_tokens,
                   progress=False, n_show=len(valid))
    given = argv if argv is not None else sys.argv[1:]
    report = {"model_dir": args.model_dir, "accuracy": res["accuracy"],
              **check(valid, [e["generated"] for e in res["examples"]]),
              "command": "python benchmarks/prontoqa_cot_check.py " + " ".join(given)}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
