"""Experiments from YAML configs: tokenizer + data + model + method -> train -> evaluate -> export -> table.

A config is a frozen `ExperimentConfig` (`latent_jax.experiment_config`: sections, defaults, validation at load);
`key=value` overrides use dotted keys (`train.epochs=3`, `model.pretrained=path/or/hub-id`). Unknown keys are
errors that list the valid ones.
"""
from __future__ import annotations

import json
import pathlib
import time

from latent_jax.experiment_config import (REPO_CONFIGS, RUNTIME_OVERRIDES, STEP_SEPARATORS,  # noqa: F401
                                          ExperimentConfig, check_select, load_config, resolve_config_path,
                                          step_separator, thaw)


def valid_is_generated(d: dict) -> bool:
    """A ProsQA rung other than the real size, or a task without a real file (e.g. 3x3 multiplication, `mult3`),
    has no real validation file: its reported set is generated (a held-out stream, training questions removed)."""
    from latent_jax.data import DATASETS, canonical_name, graph_size

    if d.get("valid_path") is not None:
        return False
    rung = d.get("rung")
    return (rung is not None and not graph_size(rung).is_real) or canonical_name(d["task"]) not in DATASETS


def experiment_records(cfg: ExperimentConfig):
    """(train, valid) records of the config's task, rung and encoding (`data.encoding: symbolic`: ProsQA written
    one token per node, `latent_jax.data.symbolic`). The data section was checked at load (`DataSection`)."""
    from latent_jax.data import load_dataset

    d = cfg.data
    train = load_dataset(d.task, split="train", source=d.train_source, path=d.train_path, n=d.train_n,
                         seed=d.seed, rung=d.rung)
    train, valid = _encode(d, train, "training records"), reported_records(d)
    if valid_is_generated(d):  # a generated reported set never holds a training question
        seen = {r["question"] for r in train}
        valid = [r for r in valid if r["question"] not in seen]
    return train, valid


def reported_records(d: dict):
    """The reported records: the real file (or `valid_path`), or a generated held-out set for a smaller rung."""
    from latent_jax.data import load_dataset

    if valid_is_generated(d):
        valid = load_dataset(d["task"], split="valid", source="generated", n=d["valid_n"] or 300, seed=d["seed"],
                             rung=d["rung"])
    else:
        valid = load_dataset(d["task"], split="valid", source="file", path=d["valid_path"], n=d["valid_n"])
    return _encode(d, valid, d["valid_path"] or f"{d['task']} validation records")


def _encode(d: dict, records, source: str):
    from latent_jax.data import symbolic_records

    if d.get("encoding", "text") != "symbolic":
        return records
    return symbolic_records(records, source, ids=d.get("symbolic_ids", "shuffled"))


def _select_records(cfg: dict, train_records, valid_records) -> list:
    """The records keep-best chooses the epoch on. `data.select: valid` (default): the validation file, which is
    also the one reported. `data.select: generated`: a held-out generated set (`select_n` records, default as many
    as the validation file; questions of the training set and of the validation file removed), so that the reported
    accuracy did not choose its own epoch."""
    from latent_jax.data import load_dataset

    d = cfg["data"]
    check_select(d)
    if d["select"] == "valid":
        return list(valid_records)
    n = d["select_n"] or len(valid_records)
    seen = {r["question"] for r in list(train_records) + list(valid_records)}
    size, out = n + n // 10 + 10, []
    # the validation stream when the reported file is real; another stream when the reported set is generated too
    split, seed = ("train", d["seed"] + 7919) if valid_is_generated(d) else ("valid", d["seed"])
    while len(out) < n and size <= 16 * n + 100:  # draw more while repeats of seen questions eat the pool
        try:
            pool = _encode(d, load_dataset(d["task"], split=split, source="generated", n=size, seed=seed,
                                           rung=d.get("rung")), "selection records")
        except ValueError:  # e.g. more distinct problems asked for than exist
            break
        out, size = [r for r in pool if r["question"] not in seen][:n], 2 * size
    if len(out) < n:
        raise ValueError(f"only {len(out)} generated {d['task']} selection records are new (asked for {n})")
    return out


def _records_and_build(cfg: dict):
    """(train, valid, select records), then `build` with a compact vocabulary that also covers the selection
    records: training and `run_export` go through here, so an export rebuilds the run's vocabulary."""
    train_records, valid_records = experiment_records(cfg)
    select_records = _select_records(cfg, train_records, valid_records)
    extra = [] if cfg.data.select == "valid" else select_records
    return train_records, valid_records, select_records, build(cfg, train_records, list(valid_records) + extra)


def build(cfg: ExperimentConfig, train_records, valid_records):
    """Tokenizer, method and (model_cfg, graphdef, params) for an experiment config."""
    from latent_jax.compact_vocab import META as COMPACT_META
    from latent_jax.compact_vocab import CompactTokenizer
    from latent_jax.config import gpt2_config, llama_config
    from latent_jax.hf import load_hf, resolve_checkpoint
    from latent_jax.methods import build_method, prepare_model
    from latent_jax.models import init_model
    from latent_jax.data import symbolic_vocab
    from latent_jax.tokenizer import load_tokenizer
    from latent_jax.word_tokenizer import WordTokenizer

    m = cfg.model
    pretrained = m.pretrained
    folder = resolve_checkpoint(pretrained) if pretrained else None
    symbolic = cfg.data.encoding == "symbolic"
    if folder is not None:
        check_encoding(folder, cfg, "model.pretrained")
    if symbolic:  # one token per node: the word vocabulary is already compact, `tokenizer` and compact_vocab unused
        newlines = step_separator(cfg.data) == "newline"
        tok = WordTokenizer.load(folder) if folder is not None else WordTokenizer(symbolic_vocab(), newlines=newlines)
        if tok.newlines != newlines:
            raise ValueError(f"model.pretrained {pretrained!r} was trained with data.step_separator="
                             f"{'newline' if tok.newlines else 'none'}; this config uses the other layout")
    elif folder is not None and (pathlib.Path(folder) / COMPACT_META).exists():
        tok = load_tokenizer(folder)  # our export of a compact-vocabulary model (e.g. the CoT stage to continue
    else:  # from, as Coconut and iCoT-SI do): its vocabulary is the model's, whatever `tokenizer` says
        tok = load_tokenizer(cfg.tokenizer or folder or ("gpt2" if m.family == "gpt2" else None))
    if m.compact_vocab and not symbolic:
        if pretrained:
            raise ValueError("model.compact_vocab is for random-init models; a pretrained model keeps its vocab")
        texts = [t for r in list(train_records) + list(valid_records)
                 for t in [r["question"] + "\n", *(s + "\n" for s in r["steps"]), "### " + r["answer"]]]
        tok = CompactTokenizer.from_texts(tok, texts)
    method = build_method(cfg.method["name"], tok, **cfg.method_options)
    if pretrained:
        mcfg, graphdef, params = load_hf(folder, param_dtype=m.param_dtype, dtype=m.dtype)
        runtime = {k: m.overrides[k] for k in RUNTIME_OVERRIDES if k in m.overrides}
        if runtime:  # how the loaded weights run (layer layout, chunked loss): the weights themselves are kept
            from latent_jax.params import relayout

            mcfg, graphdef, params = relayout(mcfg, params, **runtime)
        if tok.vocab_size < mcfg.vocab_size:  # more tokens than rows is fine: prepare_model grows the vocabulary
            from latent_jax.tokenizer import check_vocab_fits

            check_vocab_fits(tok.vocab_size, mcfg.vocab_size, f"tokenizer (with {method.name}'s tokens)",
                             f"model.pretrained {pretrained}")
    else:
        maker = gpt2_config if m.family == "gpt2" else llama_config
        mcfg = maker(m.size, **{**thaw(m.overrides), "vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id,
                                "bos_token_id": tok.bos_id, "param_dtype": m.param_dtype, "dtype": m.dtype})
        graphdef, params = init_model(mcfg, seed=m.seed)
    mcfg, graphdef, params = prepare_model(method, mcfg, graphdef, params)
    return tok, method, mcfg, graphdef, params


def check_encoding(folder, cfg: ExperimentConfig, what: str = "model") -> None:
    """Refuse a model folder whose vocabulary is of the other encoding than `data.encoding` (a symbolic model has a
    word vocabulary, `latent_jax.word_tokenizer.META`; a text model has none)."""
    from latent_jax.word_tokenizer import META as WORD_META

    symbolic = cfg.data.encoding == "symbolic"
    if (pathlib.Path(folder) / WORD_META).exists() != symbolic:
        have, want = ("symbolic", "text") if not symbolic else ("text", "symbolic")
        raise ValueError(f"{what} {str(folder)!r} was trained on the {have} encoding but this config uses"
                         f" data.encoding={want}: its vocabulary cannot read these records (train from scratch, or"
                         f" set data.encoding={have})")


def stage_note(method, stage: int) -> str | None:
    """What an evaluated curriculum stage means, where the number alone does not say it (`Method.stage_note`:
    a Coconut-family stage past `max_latent_stage`, every written step removed)."""
    return method.stage_note(stage)


def final_stage(method, cfg: ExperimentConfig) -> int:
    """The configured eval stage, else the final one (beyond max_latent_stage: all steps removed)."""
    if cfg.eval.stage is not None:
        return cfg.eval.stage
    n = method.num_stages()
    return n if n > 1 else 0


def run_train(cfg: ExperimentConfig, progress: bool = True, fresh: bool = False) -> dict:
    """Train + evaluate + export. Returns the result dict (also written to {output_dir}/result.json). The run
    folder is locked for the call (`latent_jax.train.runlock`); `fresh`: delete its earlier training state
    ({output_dir}/train: checkpoints, kept-best, metrics) and start from scratch instead of resuming."""
    import jax

    from latent_jax.train.runlock import RunLock

    t0 = time.perf_counter()
    out = pathlib.Path(cfg.output_dir)
    if jax.process_index() != 0:
        return _run_train(cfg, progress, fresh, t0)
    with RunLock(out):
        return _run_train(cfg, progress, fresh, t0)


def _run_train(cfg: ExperimentConfig, progress: bool, fresh: bool, t0: float) -> dict:
    import shutil

    from latent_jax.evaluate import evaluate
    from latent_jax.hf import save_hf
    from latent_jax.train.trainer import TrainConfig, train

    out = pathlib.Path(cfg.output_dir)
    if fresh and (out / "train").exists():
        shutil.rmtree(out / "train")
    train_records, valid_records, select_records, (tok, method, mcfg, graphdef, params) = _records_and_build(cfg)
    tcfg = TrainConfig.from_dict({"output_dir": str(out / "train"), **thaw(cfg.train)})
    ev = cfg.eval

    def eval_fn(g, p, stage):  # keep-best and the per-epoch history: on the selection records
        return evaluate(method, select_records, g, p, stage, batch_size=ev.batch_size,
                        max_new_tokens=ev.max_new_tokens, progress=False)

    method.prepare_data(train_records, out)  # e.g. Token Assorted fits its VQ-VAE on the training CoTs
    result = train(method, train_records, graphdef, params, tcfg, eval_fn=eval_fn, wall_start=t0)
    best = result.best_params if result.best_params is not None else result.params
    stage = final_stage(method, cfg)
    final = evaluate(method, valid_records, graphdef, best, stage, batch_size=ev.batch_size,
                     max_new_tokens=ev.max_new_tokens, out_path=out / "eval.json", progress=progress)
    export = save_hf(out / "export", mcfg, best)
    tok.save(export)
    summary = {"name": cfg.name, "method": method.name, "task": cfg.data.task,
               "train_source": cfg.data.train_source, "train_records": len(train_records),
               "valid_records": len(valid_records), "select": cfg.data.select,
               "select_records": len(select_records), "model_params": mcfg.num_params(), "eval_stage": stage,
               "accuracy": final["accuracy"], "mean_generated_tokens": final["mean_generated_tokens"],
               "seconds_per_question": final["seconds_per_question"], "epochs": tcfg.epochs,
               "stage_note": stage_note(method, stage),
               "wall_seconds": result.wall_before + time.perf_counter() - t0, "export": str(export), "history": result.history,
               "train_seconds": result.history[-1].get("train_seconds") if result.history else None,
               "examples": final["examples"], "config": cfg.to_dict()}
    (out / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_eval(cfg: ExperimentConfig, model_dir: str, progress: bool = True, out: str | None = None,
             overwrite: bool = False) -> dict:
    """Evaluate an exported model folder (HF weights + tokenizer, as `run_train` writes) on the config's task.
    The result goes to `out` (a JSON file) or, by default, to `{model_dir}/eval.json`: never into the config's
    `output_dir`, whose `eval.json` is the training run's own. An existing `out` is kept unless `overwrite`."""
    from latent_jax.evaluate import evaluate
    from latent_jax.hf import load_hf
    from latent_jax.methods import build_method
    from latent_jax.tokenizer import check_vocab_fits, load_tokenizer

    check_encoding(model_dir, cfg, "--model-dir")
    out_path = pathlib.Path(out) if out else pathlib.Path(model_dir) / "eval.json"
    if out and out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists: pass --overwrite to replace it, or another --out")
    valid = reported_records(cfg.data)
    tok = load_tokenizer(model_dir)
    method = build_method(cfg.method["name"], tok, **cfg.method_options)
    mcfg, graphdef, params = method.adapt_model(*load_hf(model_dir), training=False)
    check_vocab_fits(tok.vocab_size, mcfg.vocab_size, f"tokenizer of {model_dir} (with {method.name}'s tokens)",
                     str(model_dir))
    res = evaluate(method, valid, graphdef, params, final_stage(method, cfg), batch_size=cfg.eval.batch_size,
                   max_new_tokens=cfg.eval.max_new_tokens, progress=progress, out_path=out_path)
    return {**res, "out": str(out_path)}


def run_compare(cfg: ExperimentConfig, progress: bool = True, on_result=None, fresh: bool = False) -> dict:
    """Train and evaluate every method of `cfg.compare` at the config's one budget (data, model, train, eval),
    each in `{output_dir}/{method}`; returns `{"rows": [result, ...], "summary": sentence}` (also written to
    `{output_dir}/compare.json`). `on_result(result)` is called after each method (e.g. to print its row)."""
    from latent_jax.train.runlock import RunLock

    with RunLock(cfg.output_dir, "comparison"):
        return _run_compare(cfg, progress, on_result, fresh)


def _run_compare(cfg: ExperimentConfig, progress: bool, on_result, fresh: bool) -> dict:
    rows, out = [], pathlib.Path(cfg.output_dir)
    for entry in cfg.compare:
        entry = thaw(entry)
        src, own = entry.pop("init_from", None), entry.pop("train", {})
        model = cfg.model if src is None else cfg.model.replace(pretrained=str(out / src / "export"))
        sub = cfg.replace(name=f"{cfg.name}_{entry['name']}", output_dir=str(out / entry["name"]), method=entry,
                          compare=None, model=model, train={**thaw(cfg.train), **own})
        rows.append(run_train(sub, progress=progress, fresh=fresh))
        if src is not None:  # its training continued that entry's: its train time is on top of that entry's
            rows[-1]["init_from"] = src
        if on_result is not None:
            on_result(rows[-1])
    summary = compare_summary(rows, cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2, default=str))
    return {"rows": rows, "summary": summary}


_WRITTEN = ("cot", "no_cot")  # the explicit baselines; every other method reasons (at least partly) latently


def compare_summary(rows: list[dict], cfg: ExperimentConfig) -> str:
    """One sentence saying what a comparison shows, from its numbers: the best latent method against the best
    explicit baseline (CoT / No-CoT) and against answering directly."""
    acc = {r["method"]: 100 * r["accuracy"] for r in rows}
    d = cfg["data"]
    notes = ([f"{d['encoding']} encoding, rung {d['rung'] or 'real'}"] if d["encoding"] != "text" or d["rung"] else [])
    notes += ["chance is 50%: two candidates"] if d["task"] in ("prosqa", "prontoqa") else []
    where = f"{rows[0]['valid_records']} held-out {d['task']} questions" + (f" ({'; '.join(notes)})" if notes else "")
    latent = [m for m in acc if m not in _WRITTEN]
    base = [m for m in acc if m in _WRITTEN]
    if not latent or not base:
        best = max(acc, key=acc.get)
        return f"On {where}, {best} is best with {acc[best]:.1f}%."
    lm = max(latent, key=acc.get)
    bm = max(base, key=acc.get)
    gap = acc[lm] - acc[bm]
    direct = f"; answering directly (no_cot) gets {acc['no_cot']:.1f}%" if "no_cot" in acc and bm != "no_cot" else ""
    src = next((r.get("init_from") for r in rows if r["method"] == lm), None)
    start = f" (started from {src}'s trained model, so its training continues {src}'s)" if src else ""
    if gap > 0:
        verdict = f"{lm}{start} reasons in latent space better than any written baseline: {acc[lm]:.1f}% against" \
                  f" {bm}'s {acc[bm]:.1f}% (+{gap:.1f} points){direct}."
    else:
        verdict = f"no latent method beats the written baselines here: {lm}{start} {acc[lm]:.1f}% against {bm}'s" \
                  f" {acc[bm]:.1f}% ({gap:+.1f} points){direct}."
    return f"On {where}, {verdict}"


def format_table(rows: list[dict]) -> str:
    cols = [("method", "method"), ("task", "task"), ("eval_stage", "stage"), ("accuracy", "accuracy"),
            ("mean_generated_tokens", "gen tokens"), ("seconds_per_question", "s/question"),
            ("train_records", "train records"), ("train_source", "train data"), ("wall_seconds", "wall s")]
    fmt = lambda k, v: f"{100 * v:.1f}%" if k == "accuracy" else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa
    table = [[h for _, h in cols]] + [[fmt(k, r.get(k, "")) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    notes = sorted({f"{r['method']}: {r['stage_note']}" for r in rows if r.get("stage_note")})
    return "\n".join(lines + [f"  ({n})" for n in notes])


def run_export(cfg: ExperimentConfig, checkpoint_dir: str, out: str, step: int | None = None) -> pathlib.Path:
    """Restore params from an orbax checkpoint of this config's run and write a HF folder (+ tokenizer)."""
    from latent_jax.train.checkpoint import Checkpointer, abstract_like
    from latent_jax.hf import save_hf

    *_, (tok, _, mcfg, _, params) = _records_and_build(cfg)
    ckpt = Checkpointer(checkpoint_dir, async_save=False)
    try:
        restored = ckpt.restore_good(abstract_like(params), step=step)[2]
    finally:
        ckpt.close()
    folder = save_hf(out, mcfg, restored)
    tok.save(folder)
    return folder
