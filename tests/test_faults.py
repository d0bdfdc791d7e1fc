"""Faults and bad input through the real CLI on one tiny run (symbolic ProsQA, tiny rung, 1-layer d=32 Coconut):
run identity on resume, a data path without its switch, exports usable by generate / eval / load_tokenizer, the
run-folder lock (and a kill -9 holder), eval output location, corrupt checkpoints (truncated, overwritten, all
bad), and the smaller items (config validation at load, prompt-length errors, overrides after --model, the table).
The table in BUILD_NOTES.md ("Faults and bad input") points here."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

from latent_jax.cli import main

CONFIG = {
    "name": "fault",
    "model": {"family": "gpt2", "size": "small", "overrides": {
        "n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 2, "head_dim": 16, "d_ff": 64,
        "max_positions": 256}},
    "method": {"name": "coconut", "c_thought": 1, "max_latent_stage": 1},
    "data": {"task": "prosqa", "encoding": "symbolic", "rung": "tiny", "train_n": 32, "valid_n": 8,
             "select": "generated", "select_n": 8},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.001, "bucket": 16, "checkpoint_every_steps": 1,
              "progress": False},
    "eval": {"batch_size": 8, "max_new_tokens": 12},
}


def _cfg_file(folder: pathlib.Path) -> str:
    path = folder / "fault.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return str(path)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One CLI training run (2 optimizer steps, checkpoints at steps 1 and 2), copied by each test that alters it."""
    root = tmp_path_factory.mktemp("faults")
    cfg = _cfg_file(root)
    out = root / "run"
    rc = main(["train", cfg, f"output_dir={out}"])
    assert rc == 0
    return cfg, out


def _copy(base_run, tmp_path) -> tuple[str, pathlib.Path]:
    cfg, out = base_run
    dst = tmp_path / "run"
    shutil.copytree(out, dst, ignore=shutil.ignore_patterns(".lock"))
    return cfg, dst


def test_resume_refuses_another_method_config_and_fresh_starts_over(base_run, tmp_path, capsys):
    cfg, out = _copy(base_run, tmp_path)
    capsys.readouterr()
    assert main(["train", cfg, f"output_dir={out}", "method.c_thought=2", "train.lr=0.002"]) == 2
    err = capsys.readouterr().err
    assert "2 key(s)" in err and "method.c_thought: 1 (checkpoint) vs 2 (now)" in err
    assert "train.lr: 0.001 (checkpoint) vs 0.002 (now)" in err and "--fresh" in err
    assert main(["train", cfg, f"output_dir={out}", "method.c_thought=2", "train.lr=0.002", "--fresh"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["method"]["c_thought"] == 2 and result["history"][-1]["step"] == 2


def test_data_path_without_its_switch_is_an_error(base_run, tmp_path, capsys):
    cfg, _ = base_run
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert main(["train", cfg, f"output_dir={tmp_path / 'x'}", f"data.train_path={bad}"]) == 2
    assert "only read with data.train_source=file" in capsys.readouterr().err
    assert main(["train", cfg, f"output_dir={tmp_path / 'y'}", f"data.train_path={bad}",
                 "data.train_source=file"]) == 2  # selected: read, and its error names the file
    assert str(bad) in capsys.readouterr().err


def test_export_works_with_generate_eval_and_load_tokenizer(base_run, tmp_path, capsys):
    from latent_jax.hf import load_hf
    from latent_jax.tokenizer import load_tokenizer
    from latent_jax.word_tokenizer import WordTokenizer

    cfg, out = _copy(base_run, tmp_path)
    export = out / "export"
    tok = load_tokenizer(export)  # the README example's call
    mcfg, _, _ = load_hf(export)
    assert isinstance(tok, WordTokenizer) and tok.vocab_size == mcfg.vocab_size
    prompt = "n1 n2 | n2 n3 | [Q] n3 n4 [R] n1"
    assert tok.decode(tok.encode(prompt)) == prompt
    capsys.readouterr()
    assert main(["generate", "--model", str(export), "--prompt", prompt, "--max-new-tokens", "4"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    words = line["completion"].split()
    assert 1 <= line["tokens"] <= 4 and all(w in tok.words or w in tok.added for w in words)
    # eval writes into the model's folder (or --out), never over the training run's eval.json
    before = (out / "eval.json").read_text()
    assert main(["eval", cfg, f"output_dir={out}", "--model-dir", str(export)]) == 0
    err = capsys.readouterr().err  # the progress bar ends its line: a table printed next never glues onto it
    assert "eval coconut" in err and err.endswith("\n")
    assert (out / "eval.json").read_text() == before
    res = json.loads((export / "eval.json").read_text())
    assert res["n"] == 8 and res["method"] == "coconut"
    target = tmp_path / "mine.json"
    target.write_text("{}")
    assert main(["eval", cfg, "--model-dir", str(export), "--out", str(target)]) == 2
    assert "--overwrite" in capsys.readouterr().err and target.read_text() == "{}"
    assert main(["eval", cfg, "--model-dir", str(export), "--out", str(target), "--overwrite"]) == 0
    assert json.loads(target.read_text())["n"] == 8
    # analyze reads the run's reported set in its encoding (symbolic node tokens)
    capsys.readouterr()
    assert main(["analyze", cfg, "--model-dir", str(export), "--n", "4", "--out", str(tmp_path / "an")]) == 0
    res = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert res["n_records"] == 4 and len(res["per_thought"]) == 1 and res["per_thought"][0]["node_mass"] > 0


def test_compact_vocab_export_and_size_mismatch(tmp_path, capsys):
    from latent_jax.compact_vocab import CompactTokenizer
    from latent_jax.config import gpt2_config
    from latent_jax.hf import save_hf
    from latent_jax.models import init_model
    from latent_jax.testing import make_hf_checkpoint
    from latent_jax.tokenizer import load_tokenizer

    base = load_tokenizer("gpt2")
    tok = CompactTokenizer.from_texts(base, ["Every cat is a wumpus. Is Alex a cat?\n", "### yes"])
    tok.add_special_tokens(["<|latent|>"])
    cfg = gpt2_config("tiny", vocab_size=tok.vocab_size, max_positions=64, eos_token_id=tok.eos_id)
    _, params = init_model(cfg, seed=0)
    folder = save_hf(tmp_path / "compact", cfg, params)
    tok.save(folder)
    back = load_tokenizer(folder)
    assert isinstance(back, CompactTokenizer) and back.vocab_size == cfg.vocab_size
    assert back.encode("Every cat is a wumpus.") == tok.encode("Every cat is a wumpus.")
    assert main(["generate", "--model", str(folder), "--prompt", "Every cat is", "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["tokens"] >= 1
    # a reference-style folder: 50,260 rows (GPT-2 + 3 added tokens) but only GPT-2's files -> both sizes named
    ref = make_hf_checkpoint(tmp_path / "ref", "gpt2", vocab_size=50260, n_embd=16, n_layer=1, n_head=2)
    base.save(ref)
    assert main(["generate", "--model", str(ref), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "50257 tokens" in err and "50260 embedding rows" in err


HOLD = """
import sys, time
from latent_jax.train.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_run_folder_lock_refuses_a_second_run_and_dies_with_its_holder(base_run, tmp_path, capsys):
    from latent_jax.train.runlock import RunLock, RunLockedError, holder

    cfg, _ = base_run
    out = tmp_path / "busy"
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "locked"
        assert holder(out)["pid"] == p.pid
        assert main(["train", cfg, f"output_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert f"pid {p.pid}" in err and "in use" in err
        assert not (out / "train").exists()  # refused before anything was written
        with pytest.raises(RunLockedError):
            RunLock(out).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert holder(out) is None  # a kill -9 holder leaves no stale lock
    with RunLock(out):
        assert holder(out)["pid"] == os.getpid()


@contextlib.contextmanager
def checkpoint_warnings():
    """The warnings `latent_jax.train.checkpoint` logs, caught by a handler on that logger itself: robust to
    whatever an earlier test (or a library's logging.config call) did to the root, its level or `disabled`."""
    lg = logging.getLogger("latent_jax.train.checkpoint")
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: records.append(r.getMessage())
    old = (lg.disabled, lg.level)
    lg.disabled = False
    lg.setLevel(logging.WARNING)
    lg.addHandler(handler)
    try:
        yield records
    finally:
        lg.removeHandler(handler)
        lg.disabled, lg.level = old


def _data_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """Every array-data file of an Orbax (OCDBT) item: the files in its `d/` folders. Which of them holds live
    data varies from run to run (OCDBT leaves per-process files beside the merged ones), so a test that must
    corrupt the arrays damages them all."""
    files = [f for f in folder.rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files, f"no OCDBT data files under {folder}"
    return files


def test_corrupt_checkpoints_fall_back_or_fail_clearly(base_run, tmp_path, capsys):
    from latent_jax.train.checkpoint import Checkpointer

    cfg, out = _copy(base_run, tmp_path)
    ckdir = out / "train" / "checkpoints"
    assert sorted(int(s.name) for s in ckdir.iterdir() if s.name.isdigit()) == [1, 2]
    meta_wall = Checkpointer(ckdir).restore_meta(1)["wall_seconds"]
    for f in _data_files(ckdir / "2" / "params"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    capsys.readouterr()
    with checkpoint_warnings() as warned:
        assert main(["train", cfg, f"output_dir={out}"]) == 0  # falls back to step 1, re-runs step 2
    assert any("checkpoint step 2" in w and "corrupt" in w and "older step" in w for w in warned), warned
    result = json.loads((out / "result.json").read_text())
    assert result["history"][-1]["step"] == 2 and result["wall_seconds"] > meta_wall  # earlier process counted
    # every step bad -> one clear error, no traceback
    for step in ("1", "2"):
        for g in _data_files(ckdir / step / "params"):
            g.write_bytes(b"\0" * 10)
    assert main(["train", cfg, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "no good checkpoint" in err and "step 1" in err and "step 2" in err and "Traceback" not in err


def test_silently_wrong_values_fail_the_checksum_and_are_never_called_good(tmp_path):
    """Corruption that still decodes (step 2's params files replaced by step 1's: valid bytes, wrong values)
    restores without an error from Orbax; the checksums catch it, and `latest_good_step` skips the step."""
    import jax.numpy as jnp

    from latent_jax.train.checkpoint import Checkpointer, abstract_like, tree_checksums, verify_checksums

    tree = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64), "b": jnp.ones((7,), jnp.bfloat16)}
    sums = tree_checksums(tree)
    verify_checksums(sums, tree, "params")
    for changed in ({**tree, "w": tree["w"].at[63, 63].set(4095.5)}, {**tree, "b": tree["b"].at[0].set(2)}):
        with pytest.raises(ValueError, match="does not match its checksum"):
            verify_checksums(sums, changed, "params")
    ck = Checkpointer(tmp_path / "ck", async_save=False)
    ck.save(1, tree, {"step": 1})
    ck.save(2, {**tree, "w": tree["w"] + 1}, {"step": 2})
    ck.close()
    shutil.rmtree(tmp_path / "ck" / "2" / "params")
    shutil.copytree(tmp_path / "ck" / "1" / "params", tmp_path / "ck" / "2" / "params")
    ck = Checkpointer(tmp_path / "ck", async_save=False)
    restored, _ = ck.restore(2, abstract_like(tree))  # Orbax alone: no error, step 1's values
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(tree["w"]))
    with checkpoint_warnings() as warned:
        step, meta, params, _ = ck.restore_good(abstract_like(tree))
    assert step == 1 and meta["step"] == 1 and ck.bad_steps == {2}
    assert ck.latest_step() == 2 and ck.latest_good_step() == 1
    assert any("checkpoint step 2" in w and "checksum" in w for w in warned), warned
    ck.close()


def test_bad_values_fail_at_load_before_training(base_run, tmp_path, capsys):
    cfg, _ = base_run
    for override, msg in (("model.overrides.bogus=1", "unknown model.overrides key(s) ['bogus']"),
                          ("eval.max_new_tokens=-1", "eval.max_new_tokens=-1 is invalid: must be an integer >= 1"),
                          ("eval.stage=-2", "eval.stage=-2 is invalid: must be null or an integer >= 0"),
                          ("data.select=test", "data.select must be 'valid' or 'generated'")):
        out = tmp_path / override.split("=")[0]
        assert main(["train", cfg, f"output_dir={out}", override]) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()


def test_prompt_too_long_names_the_record_and_padding_is_free(base_run, tmp_path, capsys):
    import jax

    from latent_jax.config import gpt2_config
    from latent_jax.generate import SamplingConfig, generate
    from latent_jax.models import init_model

    cfg, out = base_run
    assert main(["eval", cfg, "--model-dir", str(out / "export"), "eval.max_new_tokens=250",
                 "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert "record 0 ('n" in err and "max_positions 256" in err
    g, p = init_model(gpt2_config("tiny", vocab_size=50, max_positions=128, eos_token_id=None), seed=0)
    out3 = generate(g, p, [[1, 2, 3]], SamplingConfig(max_new_tokens=125))  # 3 + 125 = 128 positions, padded to 16
    assert len(out3[0]) == 125
    with pytest.raises(ValueError, match=r"prompt 0 \(3 tokens\) \+ max_new_tokens \(126\)"):
        generate(g, p, [[1, 2, 3]], SamplingConfig(max_new_tokens=126))
    del jax


def test_overrides_after_options_and_the_printed_table(base_run, capsys):
    from latent_jax.cli import parse_args

    args = parse_args(["train", "prosqa_coconut", "--model", "gpt2", "train.mesh.ici_fsdp=-1", "train.remat=dots"])
    assert args.model == "gpt2" and args.overrides == ["train.mesh.ici_fsdp=-1", "train.remat=dots"]
    with pytest.raises(SystemExit):
        parse_args(["train", "prosqa_coconut", "--model", "gpt2", "--bogus"])
    cfg, out = base_run
    result = json.loads((out / "result.json").read_text())
    assert result["eval_stage"] == 2
    assert result["stage_note"].startswith("stage 2 = past max_latent_stage 1: every written reasoning step removed")
    from latent_jax.experiment import format_table

    table = format_table([result])
    assert table.splitlines()[0].startswith("method") and "(coconut: stage 2 = past max_latent_stage 1" in table


def test_eval_on_a_file_keeps_whole_questions(base_run, tmp_path, shared_dir):
    """`data.valid_path` is read; the examples carry whole questions (they were cut to their last 120 characters)."""
    from latent_jax.data import load_dataset, symbolic_records

    cfg, out = base_run
    path = shared_dir / "data" / "prosqa" / "valid.json"
    assert main(["eval", cfg, "--model-dir", str(out / "export"), f"data.valid_path={path}", "data.valid_n=3",
                 "--out", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    want = symbolic_records(load_dataset("prosqa", split="valid", source="file", path=str(path), n=3), "x")
    assert res["n"] == 3 and [e["question"] for e in res["examples"]] == [r["question"] for r in want]
    assert max(len(r["question"]) for r in want) > 120
