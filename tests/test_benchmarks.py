"""benchmarks/throughput.py on a tiny model (its JSON, FLOP count and MFU arithmetic);
benchmarks/prontoqa_cot_check.py (its scores of gold and broken CoTs, and a run on an export)."""
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput  # noqa: E402

from latent_jax.config import gpt2_config, llama_config  # noqa: E402


def test_train_flops_per_token_by_hand():
    # GPT-2 124M: 124.44M params incl. 1024x768 position embeddings (not matmuls), tied head; 12 layers x 768
    cfg = gpt2_config("124m")
    n = cfg.num_params() - 1024 * 768
    assert throughput.train_flops_per_token(cfg, 512) == 6 * n + 12 * 12 * 768 * 512
    assert 6 * n / 1e6 == pytest.approx(6 * 123.65, rel=1e-3)
    llama = llama_config("3.2-1b")  # tied embeddings: the one [V, D] matrix is the head's matmul
    assert throughput.train_flops_per_token(llama, 64) == 6 * llama.num_params() + 12 * 16 * 32 * 64 * 64


@pytest.mark.parametrize("optimizer", ["sgd"])  # adamw (the default) is the trainer's optimizer, tested there
def test_throughput_runs_and_reports(optimizer):
    out = throughput.main(["--size", "tiny", "--batch", "2", "--length", "32", "--n-latent", "2", "--steps", "1",
                           "--decode-new", "4", "--decode-batches", "1,2", "--peak-tflops", "0.5",
                           "--optimizer", optimizer])
    assert out["optimizer"] == optimizer and out["n_latent"] == 2
    for part in ("train_plain", "train_coconut"):
        r = out[part]
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s"], rel=1e-2)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * out["train_flops_per_token"] / 0.5e12, rel=1e-2)
    assert out["coconut_vs_plain_step_time"] > 0
    assert set(out) >= {"decode_b1", "decode_b2"} and out["decode_b2"]["new_tokens_per_s"] > 0


def test_prontoqa_rule_parser_normalises_both_forms():
    from latent_jax.data import parse_prontoqa_rule
    assert parse_prontoqa_rule("Tumpuses are gorpuses.") == parse_prontoqa_rule("Every tumpus is a gorpus") \
        == parse_prontoqa_rule("Each tumpus is a gorpus.") == ("tumpus", "gorpus", False)
    assert parse_prontoqa_rule("Wumpuses are not sour.") == ("wumpus", "sour", True)
    assert parse_prontoqa_rule("Alex is a tumpus.") is None and parse_prontoqa_rule("Alex is not happy.") is None


def test_prontoqa_cot_check_scores_gold_and_broken_cots():
    import prontoqa_cot_check as pc

    from latent_jax.data import generate_prontoqa
    recs = generate_prontoqa(40, seed=3)
    gold = ["\n".join(r["steps"]) + "\n### " + r["answer"] for r in recs]
    r = pc.check(recs, gold)
    assert r["whole_cot_exact"] == r["first_step_exact"] == r["steps_exact_in_place"] == 1.0
    assert r["rules_stated_in_question"] == 1.0 and r["answer_consistent_with_own_last_step"] == 1.0
    assert r["rules_written"] == sum(len(x["steps"]) - 1 for x in recs)
    # the right CoT with the other answer: the answer no longer follows the CoT
    flip = {"True": "False", "False": "True"}
    r = pc.check(recs, ["\n".join(x["steps"]) + "\n### " + flip[x["answer"]] for x in recs])
    assert r["answer_consistent_with_own_last_step"] == 0.0 and r["whole_cot_exact"] == 1.0
    # rules the questions do not state (a made-up concept), in the right format; answers follow the last line
    fake = ["\n".join(s.split(". ")[0] + ". Blorpuses are zumpuses." for s in x["steps"][:-1]) + "\n"
            + x["steps"][-1] + "\n### " + x["answer"] for x in recs]
    r = pc.check(recs, fake)
    assert r["rules_stated_in_question"] == 0.0 and r["first_step_exact"] == 0.0
    assert r["steps_exact_in_place"] == pytest.approx(len(recs) / sum(len(x["steps"]) for x in recs))  # last lines
    assert r["answer_consistent_with_own_last_step"] == 1.0
    with pytest.raises(ValueError, match="one generated text per record"):
        pc.check(recs, gold[:-1])


def test_prontoqa_cot_check_runs_on_an_export(tmp_path):
    import prontoqa_cot_check as pc

    from latent_jax.cli import main
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "configs/repro/prontoqa_cot.yaml"), "data.train_n=16", "data.select=valid",
                 "data.valid_n=4", "train.epochs=1", "train.batch_size=8", "train.progress=false",
                 "model.overrides.n_layers=1", "model.overrides.d_model=32", "model.overrides.head_dim=8",
                 "model.overrides.d_ff=64", "eval.batch_size=4", "eval.max_new_tokens=4", f"output_dir={out}"]) == 0
    report = pc.main([str(out / "export"), "--n", "5", "--max-new-tokens", "6", "--out", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == report and report["n"] == 5 and 0 <= report["accuracy"] <= 1
    assert 0 <= report["answer_consistent_with_own_last_step"] <= 1 and "prontoqa_cot_check.py" in report["command"]


COCONUT = "{name: coconut, c_thought: 1, max_latent_stage: 3, pad_latent_to_max: true}"


def test_lab_throughput_reports_peak_step_padding_and_loop(tmp_path):
    import lab_throughput  # noqa: E402  (benchmarks/)

    out = lab_throughput.main(["--batches", "4", "--buckets", "16", "--length-groups", "0,8", "--steps", "1",
                               "--loop-records", "96", "--peak-n", "256", "--out", str(tmp_path / "t.json"),
                               "model.overrides.d_model=32", "model.overrides.head_dim=8", "model.overrides.d_ff=64",
                               "compare=null", f"method={COCONUT}"])
    assert json.loads((tmp_path / "t.json").read_text())["method"] == "coconut"
    peak = out["peak_gflops"]["square"]
    assert peak > 0 and {r["layout"] for r in out["compiled_step"]} == {"cot_stage0", "final"}
    for r in out["compiled_step"]:
        assert r["share_of_peak"] == pytest.approx(r["gflops"] / peak, abs=2e-3)
        assert r["real_tok_s"] <= r["padded_tok_s"]
    from latent_jax.experiment import load_config

    job = load_config("prosqa_symbolic_cpu")
    final = next(r for r in out["compiled_step"] if r["layout"] == "final")
    assert final["thoughts"] == 3  # Coconut's final layout: max_latent_stage thoughts
    pads = {r["length_groups"]: r["padding_share"] for r in out["bucketing"]}
    assert 0 < pads[8] < pads[0] < 1
    assert out["trainer_loop"]["steps"] == -(-96 // job["train"]["batch_size"]) and out["trainer_loop"]["steady_real_tok_s"] > 0
