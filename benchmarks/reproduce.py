"""Reproduce the papers' comparison table with latent_jax: every method trained from scratch on generated data with
the same model and budget, evaluated on the real validation files.

    python benchmarks/reproduce.py --write-configs            # (re)write configs/repro/*.yaml from the table below
    python benchmarks/reproduce.py [--profile cpu|gpu|lab] [--only prosqa_coconut,mult4_icot_si] [--list]

Each run is `latent-jax train configs/repro/NAME.yaml` in a subprocess (writes runs/repro/NAME/), then its summary
goes to results/NAME.json (command, seed, model size, epochs, wall time) and the table of every finished run to
results/README.md, BUILD_NOTES.md and README.md (between the `repro-table` / `readme-repro-table` markers).
Finished runs are skipped; an unfinished one resumes from its last orbax checkpoint, so the table can be completed
across sessions.
Profiles: `cpu` = the 2-layer d=128 model of the default job (compact vocabulary), 800 generated records, 7 epochs
for the QA tasks, 8000 records and 12 epochs for multiplication (~5-15 min a run on 2 cores); `gpu` = GPT-2 124M
shape, the full generated set, 50 epochs, effective batch 128. `--force` re-runs from scratch. Keep-best chooses the
epoch on held-out generated questions (`data.select: generated`); the table reports the real validation file.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "repro"
RESULTS = REPO / "results"
MARK = "<!-- repro-table -->"
README_MARK = "<!-- readme-repro-table -->"

# max_new_tokens: room for the longest CoT + answer of the real validation file (GPT-2 tokens, as the compact vocab)
TASKS = {"prosqa": {"max_new_tokens": 96}, "prontoqa": {"max_new_tokens": 128},
         "mult4": {"max_new_tokens": 96}, "mult5": {"max_new_tokens": 128}}
QA_METHODS = {
    "cot": {"name": "cot"},
    "no_cot": {"name": "no_cot"},
    "pause": {"name": "pause", "n_pause": 6},
    "coconut": {"name": "coconut", "c_thought": 1, "max_latent_stage": 6},
    "no_curriculum": {"name": "no_curriculum", "c_thought": 1, "max_latent_stage": 6},
    "no_thought": {"name": "no_thought", "max_latent_stage": 6},
    "pause_as_thought": {"name": "pause_as_thought", "c_thought": 1, "max_latent_stage": 6},
    "icot_si": {"name": "icot_si"},
    "lt_tuning": {"name": "lt_tuning"},
    "token_assorted": {"name": "token_assorted"},
}
MULT_METHODS = {k: QA_METHODS[k] for k in ("cot", "no_cot", "icot_si")}
# One budget for every method of a task (records, epochs, batch, lr); the curriculum of Coconut and its ablations
# uses epochs_per_stage, iCoT-SI its own removal schedule over the same epochs.
PROFILES = {  # (the lab profile's budgets are LAB_BUDGETS below)
    "cpu": {"model": {"family": "gpt2", "size": "small", "compact_vocab": True,
                      "overrides": {"n_layers": 2, "d_model": 128, "n_heads": 4, "n_kv_heads": 4, "head_dim": 32,
                                    "d_ff": 512, "max_positions": 1024}},
            "train": {"epochs": 7, "epochs_per_stage": 1, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.01,
                      "grad_clip": 1.0, "bucket": 64, "seed": 0, "checkpoint_every_steps": 100},
            "train_n": 800},
    "gpu": {"model": {"family": "gpt2", "size": "124m", "compact_vocab": True, "overrides": {"max_positions": 1024}},
            "train": {"epochs": 50, "epochs_per_stage": 5, "batch_size": 128, "lr": 1e-4, "weight_decay": 0.01,
                      "grad_clip": 1.0, "bucket": 64, "seed": 0, "checkpoint_every_steps": 500},
            "train_n": None},
}


# Per-task budget of a profile (still one budget for every method of a task). CPU multiplication: the sequences are
# ~6x shorter than ProsQA's, so the same ~10 minutes buy 10x the records and epochs; bucket 16 keeps the padding low.
# 4x4: a cosine learning rate (with constant 1e-3, CoT reached 99.8% at epoch 7 and then wobbled to 75.8%).
TASK_BUDGETS = {
    "cpu": {"mult4": {"train_n": 8000, "train": {"epochs": 12, "bucket": 16, "schedule": "cosine"}},
            "mult5": {"train_n": 8000, "train": {"epochs": 12, "bucket": 16, "schedule": "cosine"}}},
    "gpu": {},
}


# Keep-best: the reported validation file chose the epoch (runs before data.select existed), or held-out generated
# questions did (the reported accuracy is then not also the selection criterion).
SELECT_LABEL = {"valid": "the reported file", "generated": "held-out generated"}


# The lab (`--profile lab`, issue 15): from-scratch regimes where the published effects show on 2 CPU cores.
# Symbolic ProsQA (one token per node) on two rungs of the size ladder, every method at one budget per rung; the
# real-size rung reports prosqa/valid.json, the small rung 300 generated held-out questions. Multiplication: CoT /
# No-CoT / iCoT-SI on 2x2 and 3x3 (generated held-out questions) and 4x4 (the real file). Token Assorted is left out of
# the symbolic rungs: its VQ-VAE compresses 16-token CoT chunks and a symbolic CoT has at most 12 tokens. The
# symbolic models have smeared keys (session 10: edge lookup learnable in ~10^4 samples, BUILD_NOTES issue 15) and
# write the path node after node (data.step_separator defaults to none for the symbolic encoding).
LAB_TASKS = {
    "sym_tiny": {"data": {"task": "prosqa", "encoding": "symbolic", "rung": "tiny"}, "max_new_tokens": 12},
    # the tiny rung with a 4x wider model (d_model 256, 8 heads: 1.65M parameters), for the width ablation
    "sym_tiny_wide": {"data": {"task": "prosqa", "encoding": "symbolic", "rung": "tiny"}, "max_new_tokens": 12},
    "sym_small": {"data": {"task": "prosqa", "encoding": "symbolic", "rung": "small"}, "max_new_tokens": 16},
    "sym_real": {"data": {"task": "prosqa", "encoding": "symbolic"}, "max_new_tokens": 24},
    # 2x2 has 8100 distinct problems: 5000 train, and the held-out set drawn from 800 after removing training ones
    "mult2": {"data": {"task": "mult2", "valid_n": 800}, "max_new_tokens": 32},
    "mult3": {"data": {"task": "mult3"}, "max_new_tokens": 64},
    "mult4": {"data": {"task": "mult4"}, "max_new_tokens": 96},
}
LAB_QA = {k: v for k, v in QA_METHODS.items() if k != "token_assorted"}
LAB_QA.update({m: {**LAB_QA[m], "max_latent_stage": 4, "pad_latent_to_max": True}
               for m in ("coconut", "no_curriculum", "pause_as_thought")})
LAB_QA["no_thought"] = {**LAB_QA["no_thought"], "max_latent_stage": 4}
LAB_QA["superposition"] = {"name": "superposition", "max_latent_stage": 4}  # Coconut on BFS frontiers (Zhu et al.)
# the same, with each thought also labelled with a node of its frontier at every stage (session 15)
LAB_QA["superposition_labelled"] = {**LAB_QA["superposition"], "label_thoughts": True}
LAB_QA["codi"] = {"name": "codi", "n_latent": 4}  # CODI (Shen et al.): as many thoughts as Coconut's last stage
# SIM-CoT (Wei et al.): a step decoder on each thought of the lab's Coconut and CODI, at their budget
LAB_QA["sim_cot_coconut"] = {"name": "sim_cot", "base": "coconut", "base_options": {
    k: v for k, v in LAB_QA["coconut"].items() if k != "name"}}
LAB_QA["sim_cot_codi"] = {"name": "sim_cot", "base": "codi", "base_options": {"n_latent": 4}}
_LAB_MODEL = {"family": "gpt2", "size": "small", "overrides": {"n_layers": 2, "d_model": 128, "n_heads": 4,
                                                               "n_kv_heads": 4, "head_dim": 32, "d_ff": 512}}
_LAB_TRAIN = {"batch_size": 64, "lr": 1e-3, "warmup_steps": 100, "schedule": "cosine", "weight_decay": 0.01,
              "grad_clip": 1.0, "bucket": 16, "length_groups": 8, "seed": 0, "checkpoint_every_steps": 200}
LAB_BUDGETS = {  # one budget per task: records, epochs (Coconut: epochs_per_stage), max_positions, model overrides
    "sym_tiny": {"train_n": 8000, "train": {"epochs": 20, "epochs_per_stage": 4, "batch_size": 32},
                 "max_positions": 128},
    "sym_tiny_wide": {"train_n": 8000, "train": {"epochs": 20, "epochs_per_stage": 4, "batch_size": 32},
                      "max_positions": 128, "model": {"d_model": 256, "n_heads": 8, "n_kv_heads": 8, "d_ff": 1024}},
    "sym_small": {"train_n": 16000, "train": {"epochs": 16, "epochs_per_stage": 2}, "max_positions": 256},
    "sym_real": {"train_n": 16000, "train": {"epochs": 18, "epochs_per_stage": 3}, "max_positions": 256},
    # multiplication: "icot" = the task's iCoT-SI schedule (CoT epochs first, then tokens removed per epoch)
    "mult2": {"train_n": 5000, "train": {"epochs": 40, "bucket": 16, "batch_size": 32}, "max_positions": 128,
              "icot": {"pretrain_epochs": 10, "remove_per_epoch": 1}},
    "mult3": {"train_n": 16000, "train": {"epochs": 22, "bucket": 16, "batch_size": 32}, "max_positions": 512,
              "icot": {"pretrain_epochs": 3, "remove_per_epoch": 2}},
    "mult4": {"train_n": 16000, "train": {"epochs": 16, "bucket": 16}, "max_positions": 512},
}
LAB_CONFIGS = REPO / "configs" / "lab"


# iCoT-SI in the lab: plain CoT epochs first, then CoT tokens removed (default 4 epochs, then 4 a epoch; a task's
# budget may set its own "icot" schedule). keep_position (the later tokens keep their position ids) and no optimizer
# reset: from scratch with learned absolute positions both cut the loss spike at each removal (session 16 probes).
LAB_MULT = {**MULT_METHODS, "icot_si": {"name": "icot_si", "pretrain_epochs": 4, "remove_per_epoch": 4,
                                        "keep_position": True, "reset_optimizer": "never"}}


def experiments(profile: str = "cpu") -> dict[str, tuple[str, dict]]:
    out = {}
    tasks = LAB_TASKS if profile == "lab" else TASKS
    for task in tasks:
        if profile == "lab":
            methods = LAB_MULT if task.startswith("mult") else LAB_QA
        else:
            methods = MULT_METHODS if task.startswith("mult") else QA_METHODS
        for m, opts in methods.items():
            out[f"{task}_{m}"] = (task, opts)
    return out


def lab_config(name: str) -> dict:
    task, method = experiments("lab")[name]
    t, budget = LAB_TASKS[task], LAB_BUDGETS[task]
    symbolic = t["data"].get("encoding") == "symbolic"
    model = {**_LAB_MODEL, "overrides": {**_LAB_MODEL["overrides"], "max_positions": budget["max_positions"],
                                         **budget.get("model", {}), **({"smear_keys": True} if symbolic else {})}}
    if not symbolic:
        model["compact_vocab"] = True
    if method["name"] == "icot_si":
        method = {**method, **budget.get("icot", {})}
    cfg = {"name": f"lab_{name}", "output_dir": f"runs/lab/{name}", "model": model, "method": dict(method),
           "data": {**t["data"], "train_source": "generated", "train_n": budget["train_n"], "seed": 0,
                    "select": "generated", "select_n": 300},
           "train": {**_LAB_TRAIN, **budget["train"]},
           "eval": {"batch_size": 300 if symbolic else 100, "max_new_tokens": t["max_new_tokens"]}}
    if not symbolic:
        cfg["tokenizer"] = "gpt2"
    return _curriculum_to_method(cfg)


def _curriculum_to_method(cfg: dict) -> dict:
    """The budget's `epochs_per_stage` is the method's curriculum (`method.epochs_per_stage`)."""
    train = dict(cfg["train"])
    if "epochs_per_stage" in train:
        cfg["method"] = {**cfg["method"], "epochs_per_stage": train.pop("epochs_per_stage")}
        cfg["train"] = train
    return cfg


def config_for(name: str, profile: str) -> dict:
    if profile == "lab":
        return lab_config(name)
    task, method = experiments()[name]
    prof = PROFILES[profile]
    budget = TASK_BUDGETS[profile].get(task, {})
    return _curriculum_to_method({
            "name": f"repro_{name}", "output_dir": f"runs/repro/{profile}/{name}", "tokenizer": "gpt2",
            "model": prof["model"], "method": dict(method),
            "data": {"task": task, "train_source": "generated", "train_n": budget.get("train_n", prof["train_n"]),
                     "seed": 0, "select": "generated"},
            "train": {**prof["train"], **budget.get("train", {})},
            "eval": {"batch_size": 100, "max_new_tokens": TASKS[task]["max_new_tokens"]}})


def config_dir(profile: str) -> pathlib.Path:
    return LAB_CONFIGS if profile == "lab" else CONFIGS


def write_configs() -> None:
    for profile, folder in (("cpu", CONFIGS), ("lab", LAB_CONFIGS)):
        folder.mkdir(parents=True, exist_ok=True)
        text = (f"# benchmarks/reproduce.py --write-configs (profile {profile}"
                + ("; --profile gpu overrides the budget)\n" if profile == "cpu" else ")\n"))
        for name in experiments(profile):
            (folder / f"{name}.yaml").write_text(text + yaml.safe_dump(config_for(name, profile), sort_keys=False))


def overrides(cfg: dict, prefix: str = "") -> list[str]:
    """A config dict as dotted key=value overrides (how the CLI receives the profile)."""
    out = []
    for k, v in cfg.items():
        if isinstance(v, dict) and v and k != "overrides":
            out += overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def run_one(name: str, profile: str, fresh: bool = False, single_thread: bool = False) -> dict:
    """Train + evaluate one experiment in a subprocess; `fresh` deletes its run folder first (otherwise an
    unfinished run resumes from its checkpoints, and a finished one would only be re-evaluated). `single_thread`:
    XLA on one thread (`--jobs 2` runs two experiments at once: on 2 cores, a small model's step is only 1.35x
    faster on two threads than on one, so two single-threaded runs get ~1.5x the work done)."""
    cfg = config_for(name, profile)
    if fresh:
        shutil.rmtree(REPO / cfg["output_dir"], ignore_errors=True)
    cmd = [sys.executable, "-m", "latent_jax", "train", str((config_dir(profile) / f"{name}.yaml").relative_to(REPO))]
    if profile == "gpu":
        cmd += overrides({k: cfg[k] for k in ("output_dir", "model", "method", "data", "train")})
    t0 = time.time()
    env = None
    if single_thread:
        import os
        env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + SINGLE_THREAD).strip()}
    log = REPO / cfg["output_dir"] / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:  # the run's own log (progress bars off when several run at once)
        subprocess.run(cmd + (["train.progress=false"] if single_thread else []), check=True, cwd=REPO, env=env,
                       stdout=f if single_thread else None, stderr=f if single_thread else None)
    summary = json.loads((REPO / cfg["output_dir"] / "result.json").read_text())
    keep = ("method", "task", "select", "accuracy", "mean_generated_tokens", "seconds_per_question", "model_params",
            "train_records", "valid_records", "epochs", "eval_stage", "history", "train_seconds")
    result = {"name": name, "profile": profile, **{k: summary.get(k) for k in keep},
              "data": {k: cfg["data"].get(k) for k in ("task", "encoding", "rung", "train_n")},
              "seed": cfg["train"]["seed"], "command": "python " + " ".join(cmd[1:]),
              # the run's own cumulative wall (every process of a resumed run); this call's when the run lacks it
              "wall_seconds": summary.get("wall_seconds") or time.time() - t0}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{profile}_{name}.json").write_text(json.dumps(result, indent=2))
    return result


def table(profile: str) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{profile}_*.json"))]
    head = ("| task | method | accuracy | generated tokens | s / question | params | train records | epochs | "
            "best epoch chosen on | wall |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['task']} | {r['method']} | {100 * r['accuracy']:.1f}% | {r['mean_generated_tokens']:.1f} | "
             f"{r['seconds_per_question']:.4f} | {r['model_params'] / 1e6:.2f}M | {r.get('train_records', '?')} | "
             f"{r['epochs']} | {SELECT_LABEL[r.get('select') or 'valid']} | "
             f"{r['wall_seconds'] / 60:.1f} min |" for r in rows]
    return "\n".join([head, *lines])


LAB_MARK, LAB_README_MARK = "<!-- lab-table -->", "<!-- readme-lab-table -->"
REPORTED = {"sym_tiny": "300 generated held-out (rung tiny)", "sym_tiny_wide": "300 generated held-out (rung tiny)",
            "sym_small": "300 generated held-out (rung small)",
            "sym_real": "prosqa/valid.json (real)",
            "mult2": "generated held-out (2x2)", "mult3": "generated held-out (3x3)", "mult4": "4x4_valid.txt (real)"}


def lab_task_and_label(name: str) -> tuple[str, str]:
    """(task, row label) of a lab experiment name: "sym_tiny_sim_cot_codi" -> ("sym_tiny", "sim_cot_codi")."""
    task = max((t for t in LAB_TASKS if name.startswith(t + "_")), key=len, default=name.split("_")[0])
    return task, name[len(task) + 1:]


def lab_table() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("lab_*.json"))]
    order = {n: i for i, n in enumerate(experiments("lab"))}
    rows.sort(key=lambda r: order.get(r["name"], 1e9))
    head = ("| task | method | accuracy | reported on | params | train records | epochs | train time |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [f"| {task} | {label} | {100 * r['accuracy']:.1f}% | {REPORTED.get(task, '?')} | "
             f"{r['model_params'] / 1e6:.2f}M | {r['train_records']} | {r['epochs']} | "
             f"{(r.get('train_seconds') or r['wall_seconds']) / 60:.1f} min |"
             for r in rows for task, label in [lab_task_and_label(r["name"])]]
    return "\n".join([head, *lines])


def plot_lab() -> list[pathlib.Path]:
    """results/lab_<task>_accuracy_vs_time.png: held-out accuracy per epoch against training time, per method."""
    from latent_jax.plots import plot_accuracy_vs_time

    out = []
    for task in LAB_TASKS:
        runs = {}
        for name in experiments("lab"):
            p = RESULTS / f"lab_{name}.json"
            if lab_task_and_label(name)[0] == task and p.exists():
                r = json.loads(p.read_text())
                runs[lab_task_and_label(name)[1]] = r["history"]
        if runs:
            out.append(plot_accuracy_vs_time(runs, RESULTS / f"lab_{task}_accuracy_vs_time.png",
                                             f"{task}: accuracy on held-out generated questions per epoch"))
    return out


def publish(profile: str) -> None:
    if profile == "lab":
        t = lab_table()
        (RESULTS / "LAB.md").write_text(f"# latent_jax lab (2 CPU cores, from scratch)\n\n{t}\n")
        _replace_between(t, LAB_MARK, LAB_README_MARK)
        try:
            plot_lab()
        except ImportError:  # matplotlib is optional
            pass
        return
    t = table(profile)
    (RESULTS / "README.md").write_text(f"# latent_jax reproduction ({profile} profile)\n\n{t}\n")
    _replace_between(t, MARK, README_MARK)


def _replace_between(t: str, notes_mark: str, readme_mark: str) -> None:
    for doc, mark in ((REPO / "BUILD_NOTES.md", notes_mark), (REPO / "README.md", readme_mark)):
        text = doc.read_text() if doc.exists() else ""
        if text.count(mark) == 2:
            a, b = text.index(mark), text.rindex(mark) + len(mark)
            doc.write_text(text[:a] + f"{mark}\n{t}\n{mark}" + text[b:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="cpu", choices=sorted([*PROFILES, "lab"]))
    ap.add_argument("--only", default=None, help="comma-separated experiment names (see --list)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="experiments at once (> 1: each on one XLA thread)")
    ap.add_argument("--write-configs", action="store_true")
    ap.add_argument("--force", action="store_true",
                    help="re-run finished experiments from scratch (deletes their run folders)")
    args = ap.parse_args()
    if args.write_configs:
        write_configs()
        return
    valid = experiments(args.profile)
    names = list(valid) if args.only is None else args.only.split(",")
    unknown = sorted(set(names) - set(valid))
    if unknown:
        raise SystemExit(f"unknown experiment(s) {unknown} for profile {args.profile}; valid: {sorted(valid)}")
    if args.list:
        print("\n".join(names))
        return
    todo = []
    for name in names:
        done = RESULTS / f"{args.profile}_{name}.json"
        if done.exists() and not args.force:
            print(f"{name}: done ({done})", flush=True)
        else:
            todo.append(name)

    def one(name: str) -> None:
        r = run_one(name, args.profile, fresh=args.force, single_thread=args.jobs > 1)
        print(json.dumps({k: r[k] for k in ("name", "accuracy", "wall_seconds")}), flush=True)
        publish(args.profile)

    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, todo))
    else:
        for name in todo:
            one(name)
    publish(args.profile)


if __name__ == "__main__":
    main()
