"""Coconut trained on BFS frontiers (`superposition`, Zhu et al. 2025): frontier sets, layouts, prompt, errors."""
import pytest

from latent_jax.data import generate_prosqa, symbolic_records, symbolic_vocab
from latent_jax.layout import IGNORE
from latent_jax.methods import build_method, method_config
from latent_jax.methods.superposition import frontiers
from latent_jax.word_tokenizer import WordTokenizer

# root a -> b, c; b -> d; c -> e; d -> t (target, 3 hops: a b d t); e -> x; y -> z (z: the negative, unreachable)
GRAPH = {"idx_to_symbol": ["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8"],
         "edges": [[0, 1], [0, 2], [1, 3], [2, 4], [3, 5], [4, 6], [7, 8]], "root": 0, "target": 5,
         "neg_target": 8, "question": "n0 n1 | n0 n2 | n1 n3 | n2 n4 | n3 n5 | n4 n6 | n7 n8 | [Q] n5 n8 [R] n0",
         "steps": ["n1", "n3", "n5"], "answer": "n5"}


def method(**kw):
    return build_method("superposition", WordTokenizer(symbolic_vocab(), newlines=False), **kw)


def test_frontiers_are_bfs_levels_and_on_path_keeps_those_reaching_the_target():
    assert frontiers(GRAPH) == [["n1", "n2"], ["n3", "n4"], ["n5", "n6"]]
    assert frontiers(GRAPH, "on_path") == [["n1"], ["n3"], ["n5"]]
    for r in symbolic_records(generate_prosqa(20, seed=3, rung="tiny"), "gen"):
        reach, on_path = frontiers(r), frontiers(r, "on_path")
        for k, (a, b) in enumerate(zip(reach, on_path)):
            assert set(b) <= set(a) and r["steps"][k] in b  # the record's own path is one of the paths
        assert on_path[-1] == [r["answer"]]


def test_layouts_per_stage_and_the_final_prompt():
    m = method(max_latent_stage=3)
    tok = m.tok
    lat = tok.token_to_id("<|latent|>")
    q = tok.encode(GRAPH["question"])
    for stage, allowed in enumerate(frontiers(GRAPH)):
        ex = m.encode(GRAPH, stage)
        assert ex.tokens[:len(q)] == q and ex.tokens[len(q):-1] == [lat] * stage
        assert ex.latent_start == len(q) and ex.n_latent == stage
        assert [x for x in ex.labels if x != IGNORE] == [ex.tokens[-1]]  # one supervised token: a frontier node
        assert tok.decode([ex.tokens[-1]]) in allowed
        assert m.encode(GRAPH, stage).tokens == ex.tokens  # deterministic
    final = m.encode(GRAPH, 3)
    assert final.n_latent == 3 and tok.decode(final.tokens[len(q) + 3:]) == "### n5 <eos>"
    assert final.tokens[len(q):len(q) + 3] == [lat] * 3 and m.encode(GRAPH, 7).tokens == final.tokens
    assert [x for x in final.labels if x != IGNORE] == tok.encode("### n5") + [tok.eos_id]
    p = m.prompt(GRAPH, 0)
    assert (p.prefix, p.n_latent, list(p.suffix)) == (q, 3, [])
    assert not m.eligible_for_best(3) and m.eligible_for_best(4) and m.num_stages() == 4
    capped = method(max_latent_stage=0)  # past max_latent_stage every record is at its final layout
    assert capped.encode(GRAPH, 1).tokens == final.tokens
    # the on_path frontier asks for the path's own nodes here
    assert method(frontier="on_path").tok.decode([method(frontier="on_path").encode(GRAPH, 1).tokens[-1]]) == "n3"


def test_bad_config_and_records_without_graphs():
    with pytest.raises(ValueError, match="frontier='bfs' is invalid"):
        method_config("superposition", frontier="bfs")
    with pytest.raises(ValueError, match="max_latent_stage=-1 is invalid"):
        method_config("superposition", max_latent_stage=-1)
    text = {k: GRAPH[k] for k in ("question", "steps", "answer")}
    with pytest.raises(ValueError, match="data.encoding=symbolic"):
        method().encode(text, 0)


@pytest.mark.parametrize("dense", [False, True])
def test_trains_and_evaluates_end_to_end(tmp_path, dense):
    """Through the experiment runner: the curriculum reaches the final layout (or dense: one stage), the loss falls,
    and evaluation decodes `### node` answers after the thoughts."""
    import json

    from latent_jax.cli import main

    out = tmp_path / "run"
    ov = ["compare=null", f"method={{name: superposition, max_latent_stage: 1, dense: {str(dense).lower()}}}",
          "data.rung=tiny", "data.train_n=48", "data.valid_n=10", "data.select_n=10", "train.epochs=3",
          "train.batch_size=8", "train.progress=false", "model.overrides.d_model=32", "model.overrides.head_dim=8",
          "model.overrides.d_ff=64", "eval.batch_size=10", f"output_dir={out}"]
    assert main(["train", "prosqa_symbolic_cpu", *ov]) == 0
    res = json.loads((out / "result.json").read_text())
    hist = res["history"]
    assert [h["stage"] for h in hist] == ([0, 1, 1] if dense else [0, 1, 2])
    losses = [json.loads(x)["loss"] for x in (out / "train" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert losses[-1] < losses[0]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == 10 and all(not e["correct"] or e["generated"].startswith("###") for e in ev["examples"])
    assert res["eval_stage"] == (0 if dense else 2)  # the final stage (the prompt is the final layout at any)
