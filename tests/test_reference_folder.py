"""A folder exactly as the reference Coconut code writes it — `transformers`' `save_pretrained` of a GPT-2 model whose
tokenizer got `<|start-latent|>`, `<|end-latent|>`, `<|latent|>` (embedding resized to 50,260 rows) — loads with
all 50,260 tokens at the reference's ids, and `latent-jax eval` of it with a Coconut config generates exactly what
our own export of the same weights does."""
from __future__ import annotations

import json
import shutil

import pytest

from latent_jax.tokenizer import ASSETS_DIR, folder_added_tokens, load_tokenizer

LATENT_TOKENS = ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]


def _hf_gpt2_tokenizer():
    transformers = pytest.importorskip("transformers")
    vocab = json.loads((ASSETS_DIR / "gpt2" / "vocab.json").read_text())
    lines = (ASSETS_DIR / "gpt2" / "merges.txt").read_text().splitlines()[1:]
    tok = transformers.GPT2Tokenizer(vocab=vocab, merges=[tuple(x.split()) for x in lines if x])
    tok.add_tokens(LATENT_TOKENS)
    return tok


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """Model + tokenizer saved by transformers, plus GPT-2's vocab.json / merges.txt (what transformers 4.x, the
    reference's version, writes beside tokenizer.json)."""
    from latent_jax.testing import make_hf_checkpoint

    folder = make_hf_checkpoint(tmp_path_factory.mktemp("ref") / "coconut", "gpt2", vocab_size=50260, n_embd=32,
                                n_layer=2, n_head=2, n_positions=512, bos_token_id=50256, eos_token_id=50256,
                                initializer_range=0.5)
    _hf_gpt2_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("with_base_files", [False, True])
def test_reference_folder_tokenizer_has_the_added_tokens(reference_folder, tmp_path, with_base_files):
    folder = tmp_path / "f"
    shutil.copytree(reference_folder, folder)
    if with_base_files:  # then vocab.json + merges.txt are read first, completed with the declared added tokens
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(ASSETS_DIR / "gpt2" / name, folder)
    tok = load_tokenizer(folder)
    assert tok.vocab_size == 50260
    hf = _hf_gpt2_tokenizer()
    text = "Alex is a wumpus.\n<|start-latent|><|latent|><|latent|><|end-latent|>### yes"
    assert tok.encode(text) == hf.encode(text)
    assert [tok.token_to_id(t) for t in LATENT_TOKENS] == [50257, 50258, 50259]


def test_added_tokens_with_a_gap_or_a_conflict_are_errors(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS_DIR / "gpt2" / name, tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|latent|>": 50300}))
    with pytest.raises(ValueError, match="has id 50300 but the next free id is 50257"):
        load_tokenizer(tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|latent|>": 50257}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"50258": {"content": "<|latent|>"}}}))
    with pytest.raises(ValueError, match="has id 50257 in added_tokens.json but 50258 in tokenizer_config.json"):
        folder_added_tokens(tmp_path)


def test_eval_of_the_reference_folder_equals_our_export(reference_folder, tmp_path, shared_dir):
    from latent_jax.experiment import load_config, run_eval
    from latent_jax.hf import load_hf, save_hf

    cfg, _, params = load_hf(reference_folder)
    ours = save_hf(tmp_path / "ours", cfg, params)
    load_tokenizer(reference_folder).save(ours)
    config = load_config("prosqa_coconut", ["data.valid_n=3", "eval.batch_size=3", "eval.max_new_tokens=6",
                                            "method.max_latent_stage=2", f"output_dir={tmp_path / 'run'}"])
    a = run_eval(config, str(reference_folder), progress=False, out=str(tmp_path / "a.json"))
    b = run_eval(config, str(ours), progress=False, out=str(tmp_path / "b.json"))
    assert a["n"] == b["n"] == 3 and a["stage"] == 3
    assert [e["generated"] for e in a["examples"]] == [e["generated"] for e in b["examples"]]
    assert any(e["generated"] for e in a["examples"])
