"""Symbolic ProsQA (one token per node), the word tokenizer, the ProsQA size ladder and `compare` runs."""
import json
import re

import pytest

from latent_jax.data import (RUNGS, generate_prosqa, graph_size, load_dataset, read_records, symbolic_records,
                             symbolic_vocab, to_symbolic, verify_prosqa, verify_symbolic)
from latent_jax.data.prosqa import bfs_distances, graph_adjacency
from latent_jax.word_tokenizer import WordTokenizer


def test_every_real_valid_record_converts_verifies_and_keeps_its_answer(shared_dir):
    real = read_records(shared_dir / "data" / "prosqa" / "valid.json")
    sym = symbolic_records(real, "prosqa/valid.json")
    tok = WordTokenizer(symbolic_vocab())
    assert len(sym) == len(real) == 300
    for r, s in zip(real, sym):
        assert verify_symbolic(s) == [], s["question"]
        # the answer is recoverable: the symbolic answer is the text answer's concept under the record's node map
        node = s["idx_to_symbol"].index(s["answer"])
        assert r["answer"] == f"{r['idx_to_symbol'][r['root']]} is a {r['idx_to_symbol'][node]}."
        assert len(s["steps"]) == len(r["steps"]) and s["steps"][-1] == s["answer"]
        # every word of the CoT sequence is one vocabulary token (no BPE)
        text = s["question"] + "\n" + "".join(x + "\n" for x in s["steps"]) + "### " + s["answer"]
        ids = tok.encode(text)
        assert len(ids) == len(text.split()) + 1 + len(s["steps"]) and tok.decode(ids).split() == text.split()
    assert len({s["question"] for s in sym}) == 300
    assert to_symbolic(real[0]) == sym[0]  # deterministic in the question
    # node numbers carry no creation order: roots are not always n0/n1
    assert len({s["idx_to_symbol"][s["root"]] for s in sym}) > 10


def test_verify_symbolic_catches_broken_records():
    s = to_symbolic(generate_prosqa(1, seed=3, rung="small")[0])
    assert verify_symbolic(s) == []
    words = s["question"].split()
    x, y = words[-4], words[-3]
    wrong = y if s["answer"] == x else x
    assert any("answer" in p for p in verify_symbolic({**s, "answer": wrong}))
    assert any("steps" in p for p in verify_symbolic({**s, "steps": s["steps"][:-1] + [wrong]}))
    assert verify_symbolic({**s, "question": "n1 n2 n3"})  # not a symbolic question
    no_edge = " ".join(words[3:])  # drop the first edge: the graph no longer matches the record
    assert any("edges" in p for p in verify_symbolic({**s, "question": no_edge}))


def test_unrepresentable_records_name_file_index_and_field():
    rec = generate_prosqa(2, seed=0)[1]
    big = {**rec, "idx_to_symbol": rec["idx_to_symbol"] + [f"x{i}" for i in range(30)]}
    with pytest.raises(ValueError, match=r"train\.json record 1: field 'idx_to_symbol' has \d+ nodes, more than"):
        symbolic_records([rec, big], "train.json")
    no_graph = {k: v for k, v in rec.items() if k != "edges"}
    with pytest.raises(ValueError, match=r"f\.json record 0: field 'edges' missing"):
        symbolic_records([no_graph], "f.json")
    bad_step = {**rec, "steps": rec["steps"][:-1] + ["Every x is a unknownpus."]}
    with pytest.raises(ValueError, match=r"record 0: field 'steps'\[\d\]"):
        symbolic_records([bad_step], "f.json")
    with pytest.raises(ValueError, match="'root'"):
        to_symbolic({**rec, "root": 99}, 4, "f.json")


def test_word_tokenizer_roundtrip_errors_and_save(tmp_path):
    tok = WordTokenizer(symbolic_vocab(8))
    ids = tok.encode("n1 n2 | [Q] n3 n4 [R] n1\nn2\n### n3")
    assert tok.decode(ids) == "n1 n2 | [Q] n3 n4 [R] n1\nn2\n### n3"
    assert tok.encode("### n3")[0] == tok.token_to_id("###") and tok.eos_id == 0
    with pytest.raises(ValueError, match=r"word 'n9' .* not in the symbolic vocabulary"):
        tok.encode("n1 n9")
    new = tok.add_special_tokens(["<|latent|>", "<|start-latent|>"])
    assert new == [tok.vocab_size - 2, tok.vocab_size - 1] and tok.add_special_tokens(["<|latent|>"]) == new[:1]
    assert tok.encode("n1 <|latent|> n2")[1] == new[0]
    assert tok.decode([*tok.encode("n1"), new[0], 0], skip_special=True) == "n1"
    tok.save(tmp_path)
    from latent_jax.compact_vocab import load_any_tokenizer
    back = load_any_tokenizer(tmp_path)
    assert isinstance(back, WordTokenizer) and back.vocab_size == tok.vocab_size
    assert back.encode("n1 <|start-latent|>") == tok.encode("n1 <|start-latent|>")


@pytest.mark.parametrize("rung", sorted(RUNGS))
def test_ladder_rungs_have_their_sizes(rung):
    size = graph_size(rung)
    recs = generate_prosqa(200, seed=1, rung=rung)
    assert recs == generate_prosqa(200, seed=1, rung=rung)  # deterministic
    hops = set()
    for r in recs:
        assert verify_prosqa(r) == []
        assert size.nodes[0] <= len(r["idx_to_symbol"]) <= size.nodes[1]
        children, _ = graph_adjacency(r)
        h = bfs_distances(children, r["root"])[r["target"]]
        assert size.steps[0] <= h == len(r["steps"]) <= size.steps[1]
        hops.add(h)
        assert verify_symbolic(to_symbolic(r)) == []
    if not size.is_real:  # path lengths drawn uniformly: every length of the range occurs
        assert hops == set(range(size.steps[0], size.steps[1] + 1))
    assert (generate_prosqa(5, seed=1) == generate_prosqa(5, seed=1, rung="real")) and size.is_real == (rung == "real")


def test_rung_errors():
    with pytest.raises(ValueError, match="unknown ProsQA rung 'huge'"):
        graph_size("huge")
    with pytest.raises(ValueError, match="nodes high <= 40"):
        graph_size({"nodes": [10, 60], "steps": [2, 3]})
    assert graph_size({"nodes": [9, 10], "steps": [3, 3]}).nodes == (9, 10)
    with pytest.raises(ValueError, match="rung is a ProsQA option"):
        load_dataset("prontoqa", n=3, rung="small")
    with pytest.raises(ValueError, match="has no real file"):
        load_dataset("prosqa", split="valid", rung="small")


def test_data_cli_generates_symbolic_rung_and_shows_the_ladder(tmp_path, capsys):
    from latent_jax.data.cli import main

    out = tmp_path / "s.json"
    assert main(["generate", "prosqa", "--n", "20", "--rung", "tiny", "--encoding", "symbolic", "--out", str(out)]) == 0
    recs = json.loads(out.read_text())
    assert len(recs) == 20 and all(verify_symbolic(r) == [] for r in recs)
    assert main(["stats", "prosqa", "--n", "200", "--rung", "small"]) == 0
    text = capsys.readouterr().out
    for name, (n0, n1, s0, s1) in RUNGS.items():
        assert re.search(rf"\| {name} \| {n0}-{n1} \| {s0}-{s1} \|", text), name


TOY = ["data.train_n=40", "data.valid_n=10", "data.select_n=10", "train.epochs=2", "train.batch_size=8",
       "train.progress=false", "model.overrides.n_layers=1", "model.overrides.d_model=32", "model.overrides.head_dim=8",
       "model.overrides.d_ff=64", "eval.batch_size=10"]


def test_compare_runs_each_method_and_summarises_from_its_numbers(tmp_path, capsys, monkeypatch):
    from latent_jax import experiment
    from latent_jax.cli import main

    out = tmp_path / "cmp"
    assert main(["train", *TOY, "train.epochs=1", f"output_dir={out}"]) == 0  # the default config: a compare run
    printed = capsys.readouterr().out
    res = json.loads((out / "compare.json").read_text())
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["no_cot", "cot", "superposition"]
    assert rows[2]["init_from"] == "cot" and rows[2]["config"]["model"]["pretrained"] == str(out / "cot" / "export")
    for r in rows:
        assert (out / r["method"] / "export").is_dir() and r["valid_records"] == 10
        assert r["config"]["data"]["encoding"] == "symbolic"
        line = next(x for x in printed.splitlines() if x.startswith(r["method"] + " "))
        assert f"{100 * r['accuracy']:.1f}%" in line
    assert res["summary"] in printed
    # the sentence follows the numbers: a latent win and a latent loss read differently
    fake = [{"method": "no_cot", "accuracy": 0.6, "valid_records": 300},
            {"method": "cot", "accuracy": 0.7, "valid_records": 300},
            {"method": "coconut", "accuracy": 0.95, "valid_records": 300}]
    cfg = experiment.load_config("prosqa_symbolic_cpu")
    s = experiment.compare_summary(fake, cfg)
    assert "coconut" in s and "95.0%" in s and "+25.0 points" in s and "60.0%" in s
    fake[2]["accuracy"] = 0.5
    assert "no latent method beats" in experiment.compare_summary(fake, cfg)


def test_compare_init_from_starts_an_entry_from_an_earlier_entrys_model(tmp_path, capsys):
    """`init_from: cot` trains that entry from the CoT entry's export (its config says so, its first loss is the
    CoT model's, not a random init's), and the summary says the latent row continued CoT's training."""
    from latent_jax.cli import main
    from latent_jax.experiment import load_config

    out = tmp_path / "cmp"
    cmp = ("compare=[{name: cot}, {name: coconut, c_thought: 1, max_latent_stage: 1, init_from: cot,"
           " train: {lr: 0.004}}]")
    assert main(["train", *TOY, cmp, "train.epochs=2", "train.warmup_steps=0", f"output_dir={out}"]) == 0
    res = json.loads((out / "compare.json").read_text())
    cot, coco = res["rows"]
    assert "init_from" not in cot and coco["init_from"] == "cot"
    assert coco["config"]["model"]["pretrained"] == str(out / "cot" / "export")
    assert cot["config"]["model"]["pretrained"] is None and "init_from" not in coco["config"]["method"]
    assert coco["config"]["train"]["lr"] == 0.004 and cot["config"]["train"]["lr"] == 0.002  # its own train options
    assert coco["config"]["train"]["epochs"] == cot["config"]["train"]["epochs"]
    first = lambda run: next(json.loads(x)["loss"] for x in (out / run / "train" / "metrics.jsonl").read_text()
                             .splitlines() if '"loss"' in x)
    fresh = tmp_path / "fresh"  # the same entry from the random init (the same seed: equal loss if ignored)
    assert main(["train", *TOY, "compare=null", "method={name: coconut, c_thought: 1, max_latent_stage: 1}",
                 "train.epochs=1", f"output_dir={fresh}"]) == 0
    fresh_first = next(json.loads(x)["loss"] for x in (fresh / "train" / "metrics.jsonl").read_text().splitlines()
                       if '"loss"' in x)
    assert first("coconut") < fresh_first - 0.1
    assert "started from cot's trained model" in res["summary"] and res["summary"] in capsys.readouterr().out
    for bad, msg in (("[{name: cot, init_from: coconut}, {name: coconut}]", "must name an entry before it"),
                     ("[{name: cot}, {name: coconut, init_from: pause}]", "must name an entry before it"),
                     ("[{name: cot}, {name: cot}]", "appears twice"),
                     ("[{name: cot}, {name: coconut, train: {epochs: 3}}]", "other than the budget"),
                     ("[{name: cot}, {name: coconut, train: 3}]", "must be a mapping")):
        with pytest.raises(ValueError, match=msg):
            load_config("prosqa_symbolic_cpu", [f"compare={bad}"])


def test_symbolic_export_evaluates_and_refuses_the_other_encoding(tmp_path):
    from latent_jax.cli import main
    from latent_jax.experiment import build, load_config, run_eval

    out = tmp_path / "run"
    ov = [*TOY, "compare=null", "method={name: coconut, c_thought: 1, max_latent_stage: 3}", f"output_dir={out}"]
    assert main(["train", "prosqa_symbolic_cpu", *ov]) == 0
    res = run_eval(load_config("prosqa_symbolic_cpu", [*ov, f"output_dir={tmp_path / 'ev'}"]), str(out / "export"),
                   progress=False)
    assert res["n"] == 10 and res["accuracy"] == json.loads((out / "result.json").read_text())["accuracy"]
    text_cfg = load_config("prosqa_coconut_cpu", [f"model.pretrained={out / 'export'}", "model.compact_vocab=false"])
    with pytest.raises(ValueError, match="trained on the symbolic encoding but this config uses data.encoding=text"):
        build(text_cfg, [], [])
    text_model = tmp_path / "text_model"  # a folder without a word vocabulary: a text-encoding model
    text_model.mkdir()
    sym_cfg = load_config("prosqa_symbolic_cpu", [f"model.pretrained={text_model}"])
    with pytest.raises(ValueError, match="text encoding but this config uses data.encoding=symbolic"):
        build(sym_cfg, [], [])
    with pytest.raises(ValueError, match="--model-dir .* symbolic encoding but this config uses data.encoding=text"):
        run_eval(load_config("prosqa_coconut_cpu"), str(out / "export"), progress=False)


def test_encoding_errors():
    from latent_jax.experiment import experiment_records, load_config

    with pytest.raises(ValueError, match="data.encoding must be one of"):
        experiment_records(load_config("prosqa_symbolic_cpu", ["data.encoding=runes"]))
    with pytest.raises(ValueError, match="symbolic is for ProsQA"):
        experiment_records(load_config("prosqa_symbolic_cpu", ["data.task=prontoqa", "data.rung=null"]))
    with pytest.raises(ValueError, match="only read with data.train_source=file"):
        experiment_records(load_config("prosqa_symbolic_cpu", ["data.train_path=x.json"]))


def test_index_node_ids_keep_the_records_numbering():
    rec = generate_prosqa(1, seed=5, rung="small")[0]
    s = to_symbolic(rec, ids="index")
    assert s["idx_to_symbol"] == [f"n{v}" for v in range(len(rec["idx_to_symbol"]))] and verify_symbolic(s) == []
    assert s["question"].endswith(f"[R] n{rec['root']}") and s["answer"] == f"n{rec['target']}"
    with pytest.raises(ValueError, match="symbolic node ids must be one of"):
        to_symbolic(rec, ids="sorted")


def test_step_separator_none_writes_the_path_node_after_node(tmp_path):
    """data.step_separator (default for the symbolic encoding: none): the methods' newlines vanish, the word
    tokenizer keeps the choice in its saved folder, and a model of one layout is refused by the other."""
    from latent_jax.experiment import build, experiment_records, load_config, step_separator
    from latent_jax.methods import build_method

    flat = WordTokenizer(symbolic_vocab(8), newlines=False)
    assert flat.encode("[R] n1\nn2\n### n3") == flat.encode("[R] n1 n2 ### n3")
    assert WordTokenizer(symbolic_vocab(8)).encode("n1\nn2") != flat.encode("n1\nn2")
    flat.save(tmp_path / "flat")
    assert WordTokenizer.load(tmp_path / "flat").newlines is False
    meta = tmp_path / "flat" / "latent_jax_word_vocab.json"  # a folder saved before the option: newlines
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "newlines"}))
    assert WordTokenizer.load(tmp_path / "flat").newlines is True

    cfg = load_config("prosqa_symbolic_cpu", ["data.train_n=4", "data.valid_n=4"])
    assert step_separator(cfg["data"]) == "none"
    train, valid = experiment_records(cfg)
    tok, method, *_ = build(cfg, train, valid)
    assert tok.newlines is False
    rec = train[0]
    ex = build_method("cot", tok).encode(rec, 0)
    words = tok.decode(ex.tokens).split()
    r = words.index("[R]")
    assert words[r + 2:r + 2 + len(rec["steps"])] == rec["steps"] and "\n" not in tok.decode(ex.tokens)
    lines = load_config("prosqa_symbolic_cpu", ["data.step_separator=newline"])
    assert build(lines, train, valid)[0].newlines is True
    with pytest.raises(ValueError, match="step_separator=none is for data.encoding=symbolic"):
        experiment_records(load_config("prosqa_coconut_cpu", ["data.step_separator=none"]))
    with pytest.raises(ValueError, match="data.step_separator must be one of"):
        experiment_records(load_config("prosqa_symbolic_cpu", ["data.step_separator=comma"]))
    WordTokenizer(symbolic_vocab(), newlines=False).save(tmp_path / "model")
    with pytest.raises(ValueError, match="trained with data.step_separator=none; this config uses the other"):
        build(load_config("prosqa_symbolic_cpu", [f"model.pretrained={tmp_path / 'model'}",
                                                  "data.step_separator=newline"]), train, valid)
