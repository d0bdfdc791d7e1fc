"""GSM8k conversion of the original training set into the GSM8k-Aug record format."""
import json

import pytest

from latent_jax.data import DataFormatError, convert_answer, convert_gsm8k, read_json_records
from latent_jax.data.gsm8k import annotation_ok, evaluate


def test_known_records_convert_to_the_valid_file(shared_dir):
    """gsm8k/valid.json is a subset of the original training set: converting those records must give it back."""
    valid = read_json_records(shared_dir / "data/gsm8k/valid.json")
    original = {}
    for line in (shared_dir / "data/gsm8k/train_original.jsonl").read_text().splitlines():
        raw = json.loads(line)
        original[raw["question"]] = raw["answer"]
    assert all(r["question"] in original for r in valid)
    for r in valid:
        rec, reason = convert_answer(r["question"], original[r["question"]], keep_unannotated=True)
        assert reason == "ok" and rec == r
    # without keep_unannotated the (few) records with no annotation are dropped
    dropped = [r for r in valid if convert_answer(r["question"], original[r["question"]])[0] is None]
    assert dropped and all(r["steps"] == [""] for r in dropped)


def test_full_conversion_report(shared_dir):
    valid = {r["question"] for r in read_json_records(shared_dir / "data/gsm8k/valid.json")}
    path = shared_dir / "data/gsm8k/train_original.jsonl"
    records, report = convert_gsm8k(path, exclude_questions=valid)
    assert report.total == len(path.read_text().splitlines())
    assert report.kept == len(records) == report.total - sum(report.dropped.values())
    assert report.dropped["in_valid"] == len(valid)
    assert not {r["question"] for r in records} & valid
    assert all(s.startswith("<<") and s.endswith(">>") and annotation_ok(s[2:-2]) for r in records for s in r["steps"])
    assert all(r["answer"] and "####" not in r["answer"] for r in records)


def test_bad_annotations_are_dropped_and_counted(tmp_path):
    f = tmp_path / "t.jsonl"
    rows = [{"question": "a", "answer": "x <<48/2=24>>24\ny <<24+48=72>>72\n#### 72"},
            {"question": "b", "answer": "x <<48/2=25>>25\n#### 25"},
            {"question": "c", "answer": "no calculator here\n#### 3"},
            {"question": "d", "answer": "<<10/3=3.33>>3.33 <<560//10=56>>56\n#### 56"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records, report = convert_gsm8k(f)
    assert [r["question"] for r in records] == ["a", "d"]
    assert records[0] == {"question": "a", "steps": ["<<48/2=24>>", "<<24+48=72>>"], "answer": "72"}
    assert report.dropped["bad_annotation"] == 1 and report.dropped["no_annotation"] == 1
    assert report.bad_examples == ["48/2=25"]


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"question": "a", "answer": "<<1+1=2>>\n#### 2"}) + "\n{broken json\n")
    with pytest.raises(DataFormatError) as e:
        convert_gsm8k(f)
    assert str(f) in str(e.value) and "line 2" in str(e.value) and "{broken json" in str(e.value)


@pytest.mark.parametrize("ann,ok", [("48/2=24", True), ("48/2=25", False), ("10/3=3.33", True), ("10/3=3.3", True),
                                    ("10/3=3.4", False), ("10/3=3", False), ("(1+2)*.5=1.5", True),
                                    ("2-5=-3", True), ("1/0=1", False), ("import os=1", False), ("5", False)])
def test_annotation_check(ann, ok):
    assert annotation_ok(ann) is ok


def test_evaluate_is_exact():
    assert evaluate("0.1+0.2") == evaluate("0.3")
    assert evaluate("2*(3+4)/7") == 2
    with pytest.raises(ValueError):
        evaluate("__import__('os')")
