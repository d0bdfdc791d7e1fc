"""benchmarks/reproduce.py: the configs in configs/repro are current and load; results become the table."""
import importlib.util
import json
import pathlib

import pytest
import yaml

from latent_jax.experiment import load_config
from latent_jax.methods import METHODS

REPO = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_every_experiment_has_a_current_config_that_loads():
    names = sorted(reproduce.experiments())
    assert sorted(p.stem for p in reproduce.CONFIGS.glob("*.yaml")) == names
    assert {n.rsplit("_", 1)[0] for n in names if n.startswith("mult")} >= {"mult4", "mult5"}
    used = set()
    for name in names:
        path = reproduce.CONFIGS / f"{name}.yaml"
        assert yaml.safe_load(path.read_text()) == reproduce.config_for(name, "cpu"), f"stale {path}: --write-configs"
        cfg = load_config(str(path))  # validates the method options too
        used.add(cfg["method"]["name"])
    # the paper's table: every QA method runs on both QA tasks with one budget
    assert used <= set(METHODS) and {"cot", "no_cot", "pause", "coconut", "no_curriculum", "no_thought",
                                     "pause_as_thought", "icot_si", "lt_tuning"} <= used
    for task in ("prosqa", "prontoqa", "mult4", "mult5"):  # one budget (records, epochs, batch, lr) per task
        budgets = {json.dumps([reproduce.config_for(n, "cpu")[k] for k in ("train", "model")]) +
                   str(reproduce.config_for(n, "cpu")["data"]["train_n"]) for n in names if n.startswith(task + "_")}
        assert len(budgets) == 1, task
    assert all(reproduce.config_for(n, p)["data"]["select"] == "generated" for n in names for p in reproduce.PROFILES)
    assert reproduce.config_for("mult4_cot", "cpu")["data"]["train_n"] > reproduce.config_for(
        "prosqa_cot", "cpu")["data"]["train_n"]  # the per-task CPU budget of multiplication applies


def test_gpu_profile_overrides_load():
    cfg = reproduce.config_for("prosqa_coconut", "gpu")
    over = reproduce.overrides({k: cfg[k] for k in ("output_dir", "model", "data", "train")})
    loaded = load_config(str(reproduce.CONFIGS / "prosqa_coconut.yaml"), over)
    assert loaded["train"]["batch_size"] == 128 and loaded["model"]["size"] == "124m"
    assert loaded["data"]["train_n"] is None and loaded["output_dir"].startswith("runs/repro/gpu/")


def test_results_become_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(reproduce, "REPO", tmp_path)
    (tmp_path / "results").mkdir()
    notes = tmp_path / "BUILD_NOTES.md"
    notes.write_text(f"intro\n{reproduce.MARK}\nold\n{reproduce.MARK}\noutro\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# R\n{reproduce.README_MARK}\n{reproduce.README_MARK}\nmore\n")
    for name, acc, select in (("prosqa_cot", 0.25, None), ("prosqa_coconut", 0.5, "generated")):
        (tmp_path / "results" / f"cpu_{name}.json").write_text(json.dumps(
            {"task": "prosqa", "method": name.split("_", 1)[1], "accuracy": acc, "mean_generated_tokens": 12.0,
             "seconds_per_question": 0.01, "model_params": 2.5e6, "epochs": 7, "wall_seconds": 600,
             **({"select": select} if select else {})}))
    reproduce.publish("cpu")
    text = notes.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| prosqa | coconut | 50.0% | 12.0 |" in text and "| prosqa | cot | 25.0% |" in text
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| prosqa")}
    assert "| held-out generated |" in rows["coconut"] and "| the reported file |" in rows["cot"]
    assert (tmp_path / "results" / "README.md").read_text().count("| prosqa |") == 2
    assert readme.read_text().startswith("# R\n") and readme.read_text().count("| prosqa |") == 2


def test_unknown_experiment_is_refused(monkeypatch):
    monkeypatch.setattr("sys.argv", ["reproduce.py", "--only", "prosqa_nonsense"])
    with pytest.raises(SystemExit, match="unknown experiment"):
        reproduce.main()


@pytest.mark.parametrize("fresh", [False, True])
def test_force_starts_from_scratch(tmp_path, monkeypatch, fresh):
    """--force deletes the run folder (its checkpoints would otherwise be resumed: a finished run only re-evaluated
    with its old best weights); without it, the folder (and a resumable checkpoint) stays."""
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(reproduce, "REPO", tmp_path)
    (tmp_path / "configs" / "repro").mkdir(parents=True)
    monkeypatch.setattr(reproduce, "CONFIGS", tmp_path / "configs" / "repro")
    out = tmp_path / reproduce.config_for("mult4_cot", "cpu")["output_dir"]
    (out / "train" / "checkpoints").mkdir(parents=True)
    (out / "train" / "checkpoints" / "old").write_text("stale")
    seen = []

    def fake_run(cmd, check, cwd, **kw):
        seen.append((out / "train" / "checkpoints" / "old").exists())
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({"method": "cot", "task": "mult4", "accuracy": 1.0}))
    monkeypatch.setattr(reproduce.subprocess, "run", fake_run)
    r = reproduce.run_one("mult4_cot", "cpu", fresh=fresh)
    assert seen == [not fresh] and r["accuracy"] == 1.0
    assert json.loads((tmp_path / "results" / "cpu_mult4_cot.json").read_text())["task"] == "mult4"


@pytest.mark.parametrize("task", sorted(reproduce.TASKS))
def test_generation_budget_fits_the_longest_validation_cot(task):
    """A CoT answer cut at max_new_tokens scores 0: the budget must hold the longest CoT + answer + EOS of the real
    validation file (ProntoQA's reach 104 tokens; 64 had scored every CoT answer 0)."""
    from latent_jax.data import load_dataset
    from latent_jax.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2")
    try:
        valid = load_dataset(task, split="valid", source="file")
    except FileNotFoundError as e:
        pytest.skip(f"no validation file here: {e}")
    longest = max(len(tok.encode("\n".join(r["steps"]) + "\n### " + r["answer"])) + 1 for r in valid)
    assert reproduce.TASKS[task]["max_new_tokens"] >= longest, (task, longest)


def test_lab_profile_configs_are_current_load_and_share_one_budget_per_task():
    names = sorted(reproduce.experiments("lab"))
    assert sorted(p.stem for p in reproduce.LAB_CONFIGS.glob("*.yaml")) == names
    for name in names:
        path = reproduce.LAB_CONFIGS / f"{name}.yaml"
        assert yaml.safe_load(path.read_text()) == reproduce.config_for(name, "lab"), f"stale {path}: --write-configs"
        cfg = load_config(str(path))
        assert cfg["data"]["select"] == "generated" and cfg["output_dir"] == f"runs/lab/{name}"
    for task in reproduce.LAB_TASKS:
        budgets = {json.dumps([reproduce.config_for(n, "lab")[k] for k in ("train", "model")]) for n in names
                   if reproduce.lab_task_and_label(n)[0] == task}
        assert len(budgets) == 1, task
    width = {t: reproduce.config_for(f"{t}_superposition", "lab")["model"]["overrides"]["d_model"]
             for t in ("sym_tiny", "sym_tiny_wide")}
    assert width == {"sym_tiny": 128, "sym_tiny_wide": 256}  # the wide rung: same data and schedule, 4x the params
    assert reproduce.lab_task_and_label("sym_tiny_wide_no_cot") == ("sym_tiny_wide", "no_cot")
    assert {"sym_small_coconut", "sym_real_coconut", "sym_real_no_thought", "sym_real_pause_as_thought",
            "sym_real_no_curriculum", "mult3_icot_si", "mult4_icot_si", "mult4_no_cot"} <= set(names)
    assert reproduce.config_for("sym_real_cot", "lab")["data"]["encoding"] == "symbolic"
    icot = {t: reproduce.config_for(f"{t}_icot_si", "lab")["method"] for t in ("mult2", "mult3", "mult4")}
    assert [(m["pretrain_epochs"], m["remove_per_epoch"]) for m in icot.values()] == [(10, 1), (3, 2), (4, 4)]
    assert all(m["keep_position"] and m["reset_optimizer"] == "never" for m in icot.values())
    assert "pretrain_epochs" not in reproduce.config_for("mult2_cot", "lab")["method"]  # the schedule is iCoT's


@pytest.mark.parametrize("task", [t for t in reproduce.LAB_TASKS if t.startswith("sym")])
def test_lab_generation_budget_fits_the_longest_symbolic_cot(task):
    from latent_jax.experiment import experiment_records, load_config
    from latent_jax.word_tokenizer import WordTokenizer
    from latent_jax.data import symbolic_vocab

    cfg = load_config(str(reproduce.LAB_CONFIGS / f"{task}_cot.yaml"), ["data.train_n=1", "data.valid_n=300"])
    try:
        _, valid = experiment_records(cfg)
    except FileNotFoundError as e:
        pytest.skip(f"no validation file here: {e}")
    tok = WordTokenizer(symbolic_vocab())
    longest = max(len(tok.encode("\n".join(r["steps"]) + "\n### " + r["answer"])) + 1 for r in valid)
    assert reproduce.LAB_TASKS[task]["max_new_tokens"] >= longest
    prompt = max(len(tok.encode(r["question"] + "\n")) for r in valid)
    assert prompt + longest + 8 <= reproduce.LAB_BUDGETS[task]["max_positions"]


def test_lab_results_become_table_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(reproduce, "REPO", tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "README.md").write_text(f"# R\n{reproduce.LAB_README_MARK}\n{reproduce.LAB_README_MARK}\n")
    for label, method, acc in (("no_cot", "no_cot", 0.6), ("coconut", "coconut", 0.97),
                               ("sim_cot_codi", "sim_cot", 0.5)):  # a row is labelled by its experiment's name
        hist = [{"epoch": e, "accuracy": acc * (e + 1) / 3, "train_seconds": 60.0 * (e + 1)} for e in range(3)]
        (tmp_path / "results" / f"lab_sym_small_{label}.json").write_text(json.dumps(
            {"name": f"sym_small_{label}", "method": method, "accuracy": acc, "model_params": 4e5,
             "train_records": 8000, "epochs": 3, "wall_seconds": 200, "train_seconds": 180.0, "history": hist}))
    reproduce.publish("lab")
    text = (tmp_path / "README.md").read_text()
    assert "| sym_small | coconut | 97.0% | 300 generated held-out (rung small) |" in text
    assert text.index("| sym_small | no_cot |") < text.index("| sym_small | coconut |")  # the table's order
    assert "| sym_small | sim_cot_codi | 50.0% |" in text
    assert "3.0 min" in text
    png = tmp_path / "results" / "lab_sym_small_accuracy_vs_time.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
