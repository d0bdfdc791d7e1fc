"""Checkpoints: Orbax round trip (params, optimizer state, grain iterator), keep-N, exact resume after kill -9,
refusal to resume another model / training config, HF export."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from latent_jax.train.checkpoint import Checkpointer, abstract_like, export_hf
from latent_jax.train.pipeline import epoch_dataset, epoch_iterator
from latent_jax.models import init_model
from latent_jax.testing import ToyMethod, tiny_config, toy_records
from latent_jax.train.trainer import TrainConfig, make_optimizer, train


TESTS = pathlib.Path(__file__).parent

RUN = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # as tests/conftest.py
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", sys.argv[3])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
from test_checkpoint import run_toy
run_toy(sys.argv[1], int(sys.argv[2]))
"""


def run_toy(out: str, kill_at: int = -1) -> None:
    """2 epochs x 3 steps (20 records, micro-batch 8: the last one padded), stage 0 then 1 (latent loop),
    uniform_prob mixing, cosine schedule, dropout at every site (the resumed run draws the same masks),
    checkpoints every 2 steps; `os.kill(SIGKILL)` itself at step kill_at."""
    import signal
    import time

    print("RESUME_FROM", Checkpointer(out + "/checkpoints").latest_step(), flush=True)
    graphdef, params = init_model(tiny_config("gpt2", embd_dropout=0.1, resid_dropout=0.1, attn_dropout=0.1), seed=0)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=3e-3, schedule="cosine", warmup_steps=2, bucket=16,
                      checkpoint_every_steps=2, output_dir=out,
                      progress=False)

    def on_step(rec):
        if rec["step"] == kill_at:
            time.sleep(1.0)  # let the async save of step 4 commit (the test accepts an older one too)
            os.kill(os.getpid(), signal.SIGKILL)

    def eval_fn(g, p, stage):
        return {"accuracy": sum(float(np.abs(np.asarray(x, np.float64)).mean()) for x in jax.tree.leaves(p))}

    method = ToyMethod(max_latent_stage=1, epochs_per_stage=1, uniform_prob=0.3)
    r = train(method, toy_records(10), graphdef, params, cfg, eval_fn=eval_fn, on_step=on_step)
    summary = {"history": r.history, "best": r.best_accuracy, "step": r.step,
               "params": [float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(r.params)],
               "best_params": [float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(r.best_params)]}
    pathlib.Path(out, "result.json").write_text(json.dumps(summary))


def _run(script: pathlib.Path, out: pathlib.Path, kill_at: int, cache: pathlib.Path):
    args = [sys.executable, str(script), str(out), str(kill_at), str(cache)]
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def _metrics(out: pathlib.Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for x in lines:
        x.pop("tok_per_s", None)  # wall-clock
    return lines


@pytest.mark.slow
def test_kill9_and_resume_is_exact(tmp_path):
    """A run killed (-9) at step 5 and resumed (from step 4: mid-epoch, grain iterator state; or an older
    checkpoint) gives exactly the per-step losses, eval lines, history and final params of an uninterrupted run
    (run here, in-process: same XLA programs on CPU)."""
    script = tmp_path / "run.py"
    script.write_text(RUN.format(tests=str(TESTS)))
    full, broken, cache = tmp_path / "full", tmp_path / "broken", tmp_path / "xla_cache"
    killed = _run(script, broken, 5, cache)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (broken / "result.json").exists() and (broken / "metrics.jsonl").exists()
    resumed = _run(script, broken, -1, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert int(resumed.stdout.split("RESUME_FROM")[1].split()[0]) in (2, 3, 4)
    run_toy(str(full))
    a, b = _metrics(full), _metrics(broken)
    assert [x["step"] for x in a if "loss" in x] == list(range(1, 7)) and sum("eval" in x for x in a) == 2
    assert a == b  # exact: same floats
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (full, broken))
    for r in (ra, rb):  # wall-clock, cumulative across the resume: present and growing, not compared
        seconds = [h.pop("train_seconds") for h in r["history"]]
        assert seconds == sorted(seconds) and seconds[0] > 0
    assert ra == rb and ra["step"] == 6 and ra["best"] is not None


def test_refuses_other_config_and_resumes_finished_run(tmp_path):
    graphdef, params = init_model(tiny_config("gpt2"), seed=0)
    recs = toy_records(4)
    cfg = TrainConfig(epochs=1, batch_size=4, bucket=16, output_dir=str(tmp_path), progress=False)
    first = train(ToyMethod(), recs, graphdef, params, cfg)
    assert first.step == 1 and Checkpointer(tmp_path / "checkpoints").latest_step() == 1
    with pytest.raises(ValueError, match=r"1 key\(s\): train\.lr: 0\.0001 \(checkpoint\) vs 0\.001 \(now\)"):
        train(ToyMethod(), recs, graphdef, params, TrainConfig(**{**cfg.to_dict(), "lr": 1e-3}))
    with pytest.raises(ValueError, match=r"key\(s\):.* data: "):
        train(ToyMethod(), toy_records(4, seed=5), graphdef, params, cfg)
    g1, p1 = init_model(tiny_config("gpt2", n_layers=1), seed=0)
    with pytest.raises(ValueError, match=r"model\.n_layers: 2 \(checkpoint\) vs 1 \(now\)"):
        train(ToyMethod(), recs, g1, p1, cfg)
    with pytest.raises(ValueError, match="resume=True"):
        train(ToyMethod(), recs, graphdef, params, cfg, resume=False)
    again = train(ToyMethod(), recs, graphdef, params, TrainConfig(**{**cfg.to_dict(), "log_every": 3}))
    assert again.step == 1 and again.history == first.history
    for x, y in zip(jax.tree.leaves(again.params), jax.tree.leaves(first.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpointer_roundtrip_keep_n_and_iterator(tmp_path):
    graphdef, params = init_model(tiny_config("llama"), seed=1)
    opt_state = make_optimizer(0.01, 1.0).init(params)
    ds = epoch_dataset(ToyMethod(), toy_records(12), epoch=0, stage=1, seed=0, batch_size=2, bucket=16)
    it = epoch_iterator(ds)
    ck = Checkpointer(tmp_path, max_to_keep=2)
    for step in range(1, 5):
        next(it)
        ck.save(step, params, {"step": step, "note": "x"}, opt_state, it)
    ck.wait()
    assert ck.all_steps() == [3, 4] and ck.latest_step() == 4
    expected = next(it)
    ck.close()
    ck = Checkpointer(tmp_path, max_to_keep=2)
    it2 = epoch_iterator(ds)
    p2, o2 = ck.restore(None, abstract_like(params), abstract_like(opt_state), data_iter=it2)
    assert ck.restore_meta() == {"step": 4, "note": "x"}
    np.testing.assert_array_equal(next(it2).tokens, expected.tokens)  # iterator resumed after 4 batches
    assert jax.tree.structure(p2) == jax.tree.structure(params)
    assert jax.tree.structure(o2) == jax.tree.structure(opt_state)
    for x, y in zip(jax.tree.leaves((p2, o2)), jax.tree.leaves((params, opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ck.close()
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        Checkpointer(tmp_path / "empty").restore_meta()


def test_export_hf(tmp_path):
    from latent_jax.hf import load_hf

    cfg = tiny_config("gpt2")
    _, params = init_model(cfg, seed=2)
    export_hf(tmp_path / "hf", cfg, params)
    cfg2, _, p2 = load_hf(tmp_path / "hf")
    assert cfg2.n_layers == cfg.n_layers
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y))
