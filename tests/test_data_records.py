"""Readers/writers of the common record format (JSON and iCoT text)."""
import json

import pytest

from latent_jax.data import (DataFormatError, format_icot_line, read_icot_text, read_json_records, read_records,
                             write_icot_text, write_json_records)


@pytest.mark.parametrize("rel", ["gsm8k/aug_valid.txt", "multiplication/4x4_valid.txt",
                                 "multiplication/9x9_valid.txt"])
def test_icot_roundtrip_is_byte_exact(shared_dir, tmp_path, rel):
    src = shared_dir / "data" / rel
    records = read_icot_text(src)
    assert len(records) == len(src.read_text().splitlines())
    out = tmp_path / "out.txt"
    write_icot_text(records, out)
    assert out.read_bytes() == src.read_bytes()


def test_gsm8k_icot_text_matches_json(shared_dir):
    text = read_icot_text(shared_dir / "data/gsm8k/aug_valid.txt")
    js = read_json_records(shared_dir / "data/gsm8k/valid.json")
    assert text == js  # steps are the space-separated <<...>> tokens ([""] when there are none)


def test_multiplication_steps_are_partial_products(shared_dir):
    rec = read_icot_text(shared_dir / "data/multiplication/5x5_valid.txt")[0]
    assert len(rec["steps"]) == 5
    assert not rec["steps"][0].startswith("+") and all(s.startswith("+ ") for s in rec["steps"][1:])
    assert all("(" in s for s in rec["steps"][1:-1]) and "(" not in rec["steps"][-1]


def test_json_roundtrip_keeps_format(shared_dir, tmp_path):
    src = shared_dir / "data/prosqa/valid.json"
    records = read_json_records(src)
    out = tmp_path / "p.json"
    write_json_records(records, out)
    assert out.read_bytes() == src.read_bytes()
    assert read_records(out) == records


def test_malformed_icot_line_names_file_line_and_text(tmp_path):
    f = tmp_path / "bad.txt"
    good = format_icot_line({"question": "1 2 * 3 4", "steps": ["3 6 0"], "answer": "3 0 5 1"})
    f.write_text(f"{good}\n{good}\nthis line has no separator\n")
    with pytest.raises(DataFormatError) as e:
        read_icot_text(f)
    msg = str(e.value)
    assert str(f) in msg and "line 3" in msg and "this line has no separator" in msg


def test_icot_line_without_answer_is_rejected(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("q||<<1+1=2>> ####   \n")
    with pytest.raises(DataFormatError, match="line 1"):
        read_icot_text(f)


def test_json_record_missing_steps_names_file_and_index(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps([{"question": "q", "steps": [], "answer": "a"}, {"question": "q", "answer": "a"}]))
    with pytest.raises(DataFormatError) as e:
        read_json_records(f)
    assert str(f) in str(e.value) and "record 1" in str(e.value) and "steps" in str(e.value)


def test_invalid_json_names_line(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[{"question": "q",\n "steps": [], "answer": "a"},\n {"question" "q"}]')
    with pytest.raises(DataFormatError) as e:
        read_json_records(f)
    assert "line 3" in str(e.value) and str(f) in str(e.value)


def test_writer_validates(tmp_path):
    with pytest.raises(DataFormatError, match="record 0"):
        write_json_records([{"question": "q", "steps": "not a list", "answer": "a"}], tmp_path / "x.json")
