"""Latent-thought analysis (latent_jax.analysis) and plots (latent_jax.plots)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_jax import analysis as an
from latent_jax.methods.base import Prompt
from latent_jax.models import embed_tokens, forward

# 0 -> 1 -> 3 -> 5 (target), 0 -> 2 -> 4 (dead end), 6 -> 3 (another person reaching the target), 7 isolated
TOY = {"idx_to_symbol": ["Tom", "a", "b", "c", "d", "e", "Max", "f"], "root": 0, "target": 5,
       "edges": [[0, 1], [0, 2], [1, 3], [2, 4], [3, 5], [6, 3]]}


class FakeTok:
    """Tokens by text: a shared first token (" x") for two symbols, and one symbol with no encodable form."""

    VOCAB = {" Tom": 0, "Tom": 1, " a": 2, "a": 2, " b": 3, "b": 4, " c": 5, "c": 6, " d": 7, "d": 7, " e": 8,
             "e": 9, " Max": 10, "Max": 11}

    def encode(self, text, allow_special=True):
        if text not in self.VOCAB:
            raise ValueError("not in the compact vocabulary")
        return [self.VOCAB[text], 99]


def test_graph_facts_reachability_and_depth():
    g = an.graph_facts(TOY)
    assert g["depth"].tolist() == [0, 1, 1, 2, 2, 3, -1, -1]
    assert g["value"].tolist() == [1, 1, 0, 1, 0, 1, 1, 0]  # reaches node 5 (itself included)
    with pytest.raises(ValueError, match="graph fields"):
        an.graph_facts({"question": "q", "steps": [], "answer": "a"})


def test_node_scores_and_thought_metrics_by_hand():
    ids = an.node_token_ids(FakeTok(), TOY["idx_to_symbol"])
    assert ids == [[0, 1], [2], [3, 4], [5, 6], [7], [8, 9], [10, 11], []]
    tok_b = an.node_token_ids(FakeTok(), ["b", "c"])  # " b"/"b" are distinct ids: both kept, first tokens only
    assert tok_b == [[3, 4], [5, 6]]
    ids[4] = [7, 2]  # make " a" shared by nodes 1 and 4: its mass is split in two
    p = np.zeros(16)
    p[[0, 1, 2, 3, 5, 7, 8, 10, 12]] = [0.05, 0.05, 0.2, 0.1, 0.3, 0.1, 0.02, 0.08, 0.1]
    s = an.node_scores(p, ids)
    expect = [0.1, 0.1, 0.1, 0.3, 0.1 + 0.1, 0.02, 0.08, 0.0]
    np.testing.assert_allclose(s, expect)
    assert s.sum() <= p.sum() + 1e-12
    g = an.graph_facts(TOY)
    m = an.thought_metrics(s, g["depth"], step=1)  # frontier = depth 2 = nodes 3, 4
    np.testing.assert_allclose([m["top1_mass"], m["top2_mass"], m["top3_mass"]], [0.3, 0.5, 0.6])
    np.testing.assert_allclose(m["node_mass"], sum(expect))
    np.testing.assert_allclose(m["frontier_mass"], 0.5)
    np.testing.assert_allclose(m["frontier_frac"], 0.5 / sum(expect))
    m0 = an.thought_metrics(np.zeros(2), np.array([0, 1]), step=0)
    assert m0["top3_mass"] == 0 and np.isnan(m0["frontier_frac"])


def test_correlations_match_hand_values_and_numpy_fallback(monkeypatch):
    x, y = [0.1, 0.4, 0.2, 0.9], [0, 1, 0, 1]
    r, rho = an.correlations(x, y)
    np.testing.assert_allclose(r, np.corrcoef(x, y)[0, 1])
    ranks = [1, 3, 2, 4], [1.5, 3.5, 1.5, 3.5]  # average ranks for the tied values
    np.testing.assert_allclose(rho, np.corrcoef(*ranks)[0, 1])
    np.testing.assert_allclose(an._rank(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2])
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda n, *a, **k: (_ for _ in ()).throw(ImportError(n))
                        if n == "scipy" else real_import(n, *a, **k))
    np.testing.assert_allclose(an.correlations(x, y), (r, rho))
    assert all(np.isnan(an.correlations([1, 2], [0, 0])))


OVERRIDES = ["model.overrides.n_layers=2", "model.overrides.d_model=32", "model.overrides.n_heads=2",
             "model.overrides.n_kv_heads=2", "model.overrides.head_dim=16", "model.overrides.d_ff=64",
             "method.max_latent_stage=4"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny random Coconut model built like `latent-jax train` does (compact vocab of 5 real valid records),
    exported as {run}/export with a synthetic {run}/train/metrics.jsonl."""
    from latent_jax.data import load_dataset
    from latent_jax.experiment import build, load_config
    from latent_jax.hf import save_hf

    run = tmp_path_factory.mktemp("run")
    records = load_dataset("prosqa", split="valid", source="file", n=5)
    tok, method, mcfg, graphdef, params = build(load_config("prosqa_coconut_cpu", OVERRIDES), records, records)
    export = save_hf(run / "export", mcfg, params)
    tok.save(export)
    _synthetic_metrics(run / "train" / "metrics.jsonl")
    return {"records": records, "export": export, "graphdef": graphdef, "params": params, "cfg": mcfg}


def test_decode_thoughts_matches_naive_loop(tiny_run):
    graphdef, params, V, D = tiny_run["graphdef"], tiny_run["params"], tiny_run["cfg"].vocab_size, 32
    rng = np.random.default_rng(0)
    prompts = [Prompt(rng.integers(1, V, 7).tolist(), 3, [5]), Prompt(rng.integers(1, V, 12).tolist(), 2, [5])]
    hidden, probs = an.decode_thoughts(graphdef, params, prompts, pad_id=0, batch_size=4, bucket=8)
    assert hidden.shape == (2, 3, D) and probs.shape == (2, 3, V)
    assert tiny_run["cfg"].tie_embeddings
    head = np.asarray(params["embed"][...])  # tied embeddings: the LM head
    naive = jax.jit(lambda p, x: forward(graphdef, p, embeds=x).hidden[0, -1])
    for i, p in enumerate(prompts):
        x = embed_tokens(graphdef, params, jnp.asarray([p.prefix]))
        for k in range(p.n_latent):  # full re-forward each step, no cache, the hidden state appended as input
            h = naive(params, x)
            logits = np.asarray(h) @ head.T
            want = np.exp(logits - logits.max())
            np.testing.assert_allclose(hidden[i, k], np.asarray(h), atol=2e-5)
            np.testing.assert_allclose(probs[i, k], want / want.sum(), atol=2e-5)
            x = jnp.concatenate([x, h[None, None]], axis=1)


def _synthetic_metrics(path):
    lines = []
    for step in range(1, 13):
        lines.append({"step": step, "epoch": (step - 1) // 4, "stage": (step - 1) // 4, "loss": 3.0 / step,
                      "tokens": 100, "lr": 1e-3})
        if step % 4 == 0:
            lines.append({"step": step, "epoch": step // 4 - 1, "stage": step // 4 - 1,
                          "eval": {"accuracy": 0.1 * step / 4, "n": 5}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_plot_training_curves(tmp_path):
    from latent_jax import plots

    path = _synthetic_metrics(tmp_path / "train" / "metrics.jsonl")
    steps, evals = plots.read_metrics(path)
    assert len(steps) == 12 and [e["eval"]["accuracy"] for e in evals] == pytest.approx([0.1, 0.2, 0.3])
    out = plots.plot_training_curves(path, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no step or eval"):
        plots.plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_analyze_cli_end_to_end(tiny_run, tmp_path, capsys):
    from latent_jax.cli import main

    records, export = tiny_run["records"], tiny_run["export"]
    out = tmp_path / "analysis"
    rc = main(["analyze", "prosqa_coconut_cpu", *OVERRIDES, "--model-dir", str(export), "--n", "5", "--top-k", "4",
               "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    res = json.loads((out / "analysis.json").read_text())
    assert res["n_records"] == 5 and res["stage"] == 5 and res["top_k"] == 4
    n_thoughts = [min(len(r["steps"]), 4) for r in records]
    assert [len(r["thoughts"]) for r in res["records"]] == n_thoughts
    per = res["per_thought"]
    assert [p["thought"] for p in per] == list(range(max(n_thoughts)))
    assert [p["n_records"] for p in per] == [sum(n > k for n in n_thoughts) for k in range(max(n_thoughts))]
    assert printed["per_thought"] == per
    for p in per:
        assert 0 <= p["top1_mass"] <= p["top2_mass"] <= p["top3_mass"] <= p["node_mass"] + 1e-9 <= 1 + 1e-6
        assert p["frontier_mass"] <= p["node_mass"] + 1e-9
        for key in ("pearson", "spearman", "frontier_pearson", "n_nodes"):
            assert key in p
    rec0, t0 = res["records"][0], res["records"][0]["thoughts"][0]
    assert len(t0["top_tokens"]) == 4 and len(t0["node_scores"]) == len(records[0]["idx_to_symbol"])
    probs = [p for _, p in t0["top_tokens"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert rec0["value"][records[0]["target"]] == 1 and rec0["depth"][records[0]["root"]] == 0
    # the summary is the mean of the per-record numbers
    np.testing.assert_allclose(per[0]["top1_mass"], np.mean([r["thoughts"][0]["top1_mass"] for r in res["records"]]))
    for name in ("thought_mass.png", "value_vs_score.png", "training_curves.png", "latent_tokens.md"):
        assert (out / name).stat().st_size > 500, name
    assert "| thought | top tokens" in (out / "latent_tokens.md").read_text()


def test_analyze_rejects_methods_without_continuous_thoughts(tiny_run, tmp_path, capsys):
    from latent_jax.cli import main

    argv = ["analyze", "prosqa_coconut_cpu", *OVERRIDES, "--model-dir", str(tiny_run["export"]), "--n", "2",
            "--out", str(tmp_path)]
    assert main(argv[:2] + ["method.name=pause_as_thought"] + argv[2:]) == 2
    assert "no continuous thoughts" in capsys.readouterr().err
    assert main(argv[:2] + ["eval.stage=0"] + argv[2:]) == 2  # stage 0: the prompt has no thoughts
    assert "no continuous thoughts" in capsys.readouterr().err
    assert not (tmp_path / "analysis.json").exists()
