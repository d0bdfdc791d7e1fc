"""YAML configs: every shipped config loads and builds its method; overrides; unknown keys are errors."""
import dataclasses
import json

import pytest

from latent_jax.experiment import REPO_CONFIGS, build, format_table, load_config
from latent_jax.methods import METHODS, Method, build_method
from latent_jax.tokenizer import load_tokenizer

CONFIGS = sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml"))


def test_configs_exist_for_every_method():
    assert {load_config(c)["method"]["name"] for c in CONFIGS} >= set(METHODS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_builds_method(name):
    cfg = load_config(name)
    from latent_jax.train.trainer import TrainConfig
    TrainConfig.from_dict({"output_dir": "/tmp/x", **cfg.to_dict()["train"]})
    options = cfg.method_options
    m = build_method(cfg["method"]["name"], load_tokenizer("gpt2"), **options)
    # lists and tuples compare alike; the curriculum keys land in `m.curriculum`, the rest in `m.cfg`
    built = json.loads(json.dumps({**dataclasses.asdict(m.cfg), **dataclasses.asdict(m.curriculum)}))
    assert m.name == cfg["method"]["name"] and isinstance(m, Method)
    assert _given(json.loads(json.dumps(options)), built)  # every YAML option reached the method's config


def _given(want, got) -> bool:
    """Every value the YAML gives is the built config's (nested sections may hold more defaults; "inf": None)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and _given(v, got[k]) for k, v in want.items())
    return got is None if want == "inf" else want == got


def test_overrides_and_errors(tmp_path):
    cfg = load_config("prosqa_coconut_cpu", ["train.epochs=2", "model.overrides.n_layers=1", "data.train_n=10"])
    assert cfg["train"]["epochs"] == 2 and cfg["model"]["overrides"]["n_layers"] == 1
    assert cfg["model"]["overrides"]["d_model"] == 128  # untouched keys kept
    with pytest.raises(ValueError, match=r"unknown config key.*data.trian_n.*valid"):
        load_config("prosqa_coconut_cpu", ["data.trian_n=3"])
    with pytest.raises(ValueError, match="unknown config section"):
        load_config("prosqa_coconut_cpu", ["trainn.epochs=3"])
    with pytest.raises(FileNotFoundError, match="prosqa_coconut_cpu"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: {name: coconut, c_thougth: 2}\n")
    with pytest.raises(ValueError, match="unknown option"):
        build(load_config(str(bad)), [], [])


def test_experiment_config_is_frozen_typed_and_round_trips():
    """`load_config` gives a frozen `ExperimentConfig`: typed sections read by attribute or as mappings, no section
    can be changed in place, `replace` validates again, `to_dict` round-trips, and bad values fail at load."""
    from latent_jax.experiment_config import DataSection, ExperimentConfig

    cfg = load_config("prosqa_coconut_cpu", ["train.epochs=2", "data.rung=small"])
    assert isinstance(cfg.data, DataSection) and cfg.data.task == cfg["data"]["task"] == "prosqa"
    assert cfg.data.rung == "small" and cfg.train["epochs"] == 2 and dict(cfg.eval)["batch_size"] == cfg.eval.batch_size
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.task = "gsm8k"
    with pytest.raises(TypeError):
        cfg.train["epochs"] = 3
    with pytest.raises(TypeError):
        cfg.model.overrides["n_layers"] = 3
    assert ExperimentConfig(**cfg.to_dict()) == cfg and hash(ExperimentConfig(**cfg.to_dict())) == hash(cfg)
    assert json.loads(json.dumps(cfg.to_dict()))["model"]["overrides"]["n_layers"] == 2
    sub = cfg.replace(method={"name": "cot"}, data=cfg.data.replace(train_n=7))
    assert sub.method == {"name": "cot"} and sub.data.train_n == 7 and cfg.data.train_n != 7
    assert sub.method_options == {} and cfg.method_options["max_latent_stage"] == 3
    for bad, msg in (({"data": {"task": "prosqa", "rung": "huge"}}, "unknown ProsQA rung 'huge'"),
                     ({"data": {"select_n": 0, "select": "generated"}}, "select_n must be a positive"),
                     ({"data": {"train_n": "many"}}, "data.train_n must be an integer"),
                     ({"eval": {"batch_size": 0}}, "eval.batch_size=0 is invalid"),
                     ({"model": {"family": "mamba"}}, "model.family='mamba' is invalid"),
                     ({"model": {"overrides": [1]}}, "model.overrides must be a mapping"),
                     ({"train": [1]}, "section 'train' must be a mapping"),
                     ({"compare": []}, "compare must be a non-empty list")):
        with pytest.raises(ValueError, match=msg):
            ExperimentConfig(**bad)
    with pytest.raises(ValueError, match="does not exist|unknown option"):
        cfg.replace(method={"name": "coconut", "c_thougth": 2})
    with pytest.raises(ValueError, match=r"unknown config key.*eval.temperature"):
        cfg.replace(eval={"temperature": 0.5})


def test_build_compact_model_from_records():
    cfg = load_config("prosqa_coconut_cpu")
    recs = [{"question": "Every a is a b. Is Tom a b or c?", "steps": ["Tom is a a."], "answer": "Tom is a b."}]
    tok, method, mcfg, graphdef, params = build(cfg, recs, recs)
    assert mcfg.vocab_size == tok.vocab_size < 40 and method.name == "coconut"
    assert "accuracy" in format_table([{"method": "coconut", "accuracy": 0.5}])


def test_train_export_eval_end_to_end(tmp_path, capsys):
    """The default job's code path at toy size: train -> result table -> export from orbax -> eval."""
    import json

    import numpy as np

    from latent_jax.cli import main
    from latent_jax.hf import load_hf
    from latent_jax.models import forward

    out = tmp_path / "run"
    # max_latent_stage 1: epoch 1 reaches the last latent stage, from which Coconut keeps its best
    ov = ["data.train_n=24", "data.valid_n=6", "train.epochs=2", "train.batch_size=8", "train.progress=false",
          "method.max_latent_stage=1", "model.overrides.n_layers=1", "model.overrides.d_model=32", "model.overrides.head_dim=8",
          "model.overrides.d_ff=64", "eval.batch_size=6", "eval.max_new_tokens=4", f"output_dir={out}"]
    assert main(["train", "prosqa_coconut_cpu", *ov]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "coconut" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["train_records"] == 24 and result["valid_records"] == 6 and 0 <= result["accuracy"] <= 1
    assert result["mean_generated_tokens"] <= 4 and (out / "train" / "metrics.jsonl").exists()
    # export the latest checkpoint and the best one; the best must equal the run's own export
    assert main(["export", "prosqa_coconut_cpu", *ov, "--checkpoint", str(out / "train" / "checkpoints"),
                 "--out", str(tmp_path / "exp")]) == 0
    _, g1, p1 = load_hf(tmp_path / "exp")
    assert main(["export", "prosqa_coconut_cpu", *ov, "--checkpoint", str(out / "train" / "best"),
                 "--out", str(tmp_path / "exp_best")]) == 0
    _, g2, p2 = load_hf(tmp_path / "exp_best")
    _, g0, p0 = load_hf(out / "export")
    toks = np.arange(1, 9, dtype=np.int32)[None]
    np.testing.assert_array_equal(forward(g2, p2, tokens=toks).logits, forward(g0, p0, tokens=toks).logits)
    # continue from the export (compact vocabulary): the folder's tokenizer is used, whatever `tokenizer` says
    ov2 = [o for o in ov if not o.startswith("output_dir")] + [f"output_dir={tmp_path / 'run2'}",
                                                                f"model.pretrained={out / 'export'}",
                                                                "model.compact_vocab=false", "train.epochs=1",
                                                                "model.overrides.scan_layers=true",
                                                                "model.overrides.loss_chunk=8"]
    assert main(["train", "prosqa_coconut_cpu", *ov2]) == 0
    r2 = json.loads((tmp_path / "run2" / "result.json").read_text())
    assert r2["model_params"] == result["model_params"] and r2["train_records"] == 24
    from latent_jax.train.checkpoint import Checkpointer  # the pretrained model ran scanned, with the chunked loss
    ck = Checkpointer(tmp_path / "run2" / "train" / "checkpoints")
    saved = ck.restore_meta()["model_config"]
    ck.close()
    assert saved["scan_layers"] is True and saved["loss_chunk"] == 8
    from latent_jax.compact_vocab import META, load_any_tokenizer
    assert (tmp_path / "run2" / "export" / META).exists()
    assert load_any_tokenizer(tmp_path / "run2" / "export").vocab_size == load_any_tokenizer(out / "export").vocab_size
    assert forward(g1, p1, tokens=toks).logits.shape == forward(g0, p0, tokens=toks).logits.shape
    run_eval_before = (out / "eval.json").read_text()
    assert main(["eval", "prosqa_coconut_cpu", *ov, "--model-dir", str(out / "export")]) == 0
    ev = json.loads((out / "export" / "eval.json").read_text())  # into the model's folder, not over the run's
    assert ev["accuracy"] == result["accuracy"] and ev["n"] == 6 and (out / "eval.json").read_text() == run_eval_before
    # data.select: valid (the default): keep-best evaluated every epoch on the 6 validation records
    assert result["select"] == "valid" and [h["n"] for h in result["history"]] == [6, 6]


def test_selection_records_are_held_out_generated_questions():
    """`data.select: generated` draws new questions: none from the training set or the reported file."""
    from latent_jax.data import load_dataset
    from latent_jax.experiment import _select_records

    train = load_dataset("mult2", split="train", source="generated", n=3000, seed=0)
    valid = load_dataset("mult2", split="valid", source="generated", n=50, seed=7)
    cfg = {"data": {"task": "mult2", "select": "generated", "select_n": 300, "seed": 0}}
    pool = load_dataset("mult2", split="valid", source="generated", n=340, seed=0)
    seen = {r["question"] for r in train + valid}
    assert any(r["question"] in seen for r in pool)  # 2-digit products repeat, so the filter has work to do
    sel = _select_records(cfg, train, valid)
    assert len(sel) == 300 and not {r["question"] for r in sel} & seen
    assert _select_records({"data": {**cfg["data"], "select": "valid"}}, train, valid) == valid
    with pytest.raises(ValueError, match="data.select"):
        _select_records({"data": {**cfg["data"], "select": "test"}}, train, valid)
    with pytest.raises(ValueError, match="select_n must be a positive"):
        _select_records({"data": {**cfg["data"], "select_n": 0}}, train, valid)
    with pytest.raises(ValueError, match="selection records are new"):
        _select_records({"data": {**cfg["data"], "select_n": 5500}}, train, valid)


@pytest.mark.parametrize("select", ["generated"])  # "valid" (the default) is checked by the end-to-end test
def test_keep_best_selects_on_the_configured_records(tmp_path, monkeypatch, select):
    """Per-epoch evals (keep-best) run on the selection records; the final report always on the validation file."""
    import json

    import latent_jax.evaluate as evaluate_mod
    from latent_jax.data import load_dataset
    from latent_jax.experiment import run_export, run_train

    calls, real = [], evaluate_mod.evaluate

    def spy(method, records, *a, **k):
        calls.append([r["question"] for r in records])
        return real(method, records, *a, **k)

    monkeypatch.setattr(evaluate_mod, "evaluate", spy)
    cfg = load_config("prosqa_coconut_cpu", [
        "data.train_n=16", "data.valid_n=4", f"data.select={select}", "data.select_n=3", "train.epochs=2",
        "train.batch_size=8", "train.progress=false", "model.overrides.n_layers=1", "model.overrides.d_model=32",
        "model.overrides.head_dim=8", "model.overrides.d_ff=64", "eval.batch_size=4", "eval.max_new_tokens=2",
        f"output_dir={tmp_path / 'run'}"])
    result = run_train(cfg, progress=False)
    valid_q = [r["question"] for r in load_dataset("prosqa", split="valid", n=4)]
    train_q = {r["question"] for r in load_dataset("prosqa", split="train", source="generated", n=16, seed=0)}
    *per_epoch, final = calls
    assert len(per_epoch) == 2 and final == valid_q
    for qs in per_epoch:
        if select == "valid":
            assert qs == valid_q
        else:
            assert len(qs) == 3 and not set(qs) & (set(valid_q) | train_q)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["select"] == result["select"] == select and saved["valid_records"] == 4
    assert saved["select_records"] == (4 if select == "valid" else 3)
    # export rebuilds the run's vocabulary (selection questions included): same size as the run's own export
    from latent_jax.compact_vocab import load_any_tokenizer
    folder = run_export(cfg, str(tmp_path / "run" / "train" / "checkpoints"), str(tmp_path / "exp"))
    assert load_any_tokenizer(folder).vocab_size == load_any_tokenizer(tmp_path / "run" / "export").vocab_size


def test_curriculum_is_the_methods_and_old_train_keys_still_load(tmp_path):
    """The curriculum lives in the method section (`method.epochs_per_stage`, ...); a config written when it was
    `train.*` loads to the same config, with a DeprecationWarning; a conflicting max_latent_stage is refused."""
    body = ("model: {{family: gpt2, size: small}}\ndata: {{task: prosqa}}\n"
            "method: {{name: coconut, max_latent_stage: 3{m}}}\ntrain: {{epochs: 4{t}}}\n")
    (tmp_path / "new.yaml").write_text(body.format(m=", epochs_per_stage: 2, uniform_prob: 0.1", t=""))
    (tmp_path / "old.yaml").write_text(body.format(m="", t=", epochs_per_stage: 2, uniform_prob: 0.1"))
    new = load_config(str(tmp_path / "new.yaml"))
    with pytest.warns(DeprecationWarning, match=r"train.epochs_per_stage, train.uniform_prob: .*method"):
        old = load_config(str(tmp_path / "old.yaml"))
    assert old.replace(name="new", output_dir="runs/new") == new and new.train == {"epochs": 4}
    m = build_method("coconut", load_tokenizer("gpt2"), **{k: v for k, v in new["method"].items() if k != "name"})
    assert (m.curriculum.epochs_per_stage, m.curriculum.uniform_prob) == (2, 0.1)
    assert [m.stage_at(e, 0, 10) for e in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # max_latent_stage 3
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="train.max_latent_stage=5 differs"):
        load_config(str(tmp_path / "new.yaml"), ["train.max_latent_stage=5"])
    with pytest.raises(ValueError, match="method.reset_optimizer='sometimes' is invalid"):
        load_config(str(tmp_path / "new.yaml"), ["method.reset_optimizer=sometimes"])
    with pytest.raises(ValueError, match="method.epochs_per_stage=None is invalid"):
        load_config(str(tmp_path / "new.yaml"), ["method.epochs_per_stage=null"])
    with pytest.warns(DeprecationWarning):  # every compare entry that does not set it gets the moved key
        cmp = load_config("prosqa_symbolic_cpu", ["train.epochs_per_stage=2"])
    assert [e["epochs_per_stage"] for e in cmp["compare"]] == [2, 2, 1]
