"""Tests for latent_jax.tokenizer: exact ids against independent references, special/added tokens, save/load, errors."""
import base64
import filecmp
import functools
import json
import shutil
from importlib import resources

import pytest
import regex

from latent_jax.tokenizer import Tokenizer, llama3_special_tokens, load_tokenizer

GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
HAND_TEXTS = [
    "", " ", "Hello world", " Hello world!", "It's, I'm, we'll, they'd, you've, she's, DON'T, We'RE, y'all",
    "Numbers: 0 7 42 1234567 3.14159 -2.5e10 1,000,000 $100.50 50% 2024-11-23",
    "multiple    spaces   and\ttabs\t\tand trailing   ", "lines\nand\n\nblank\n\n\nlines\r\nwindows\r\n",
    "naïve café résumé Ünïcödé — “quotes” ‘single’ … ½ ©®", "Привет мир, Γειά σου κόσμε, שלום, مرحبا",
    "你好，世界。日本語のテキスト", "emoji 🚀🔥👍🏽 👨‍👩‍👧 and ZWJ", "e\u0301 combining and \u00a0nbsp\u2009thin",
    "<<4-2=2>> <<2/.5=4>> <<100*3=300>>", "def f(x):\n    return x ** 2  # comment\n", "<|endoftext|> in text",
    "<|begin_of_text|> in text", "    leading spaces", "\n\nleading newlines", "a" * 48, "A" * 300 + " " * 50 + "!",
]


def _data_texts(shared_dir, name, n):
    rows = json.loads((shared_dir / "data" / name / "valid.json").read_text())[:n]
    return [t for r in rows for t in (r["question"], " ".join(r["steps"]), "### " + r["answer"])]


@pytest.fixture(scope="module")
def texts(shared_dir):
    return HAND_TEXTS + _data_texts(shared_dir, "prosqa", 15) + _data_texts(shared_dir, "gsm8k", 25)


@pytest.fixture(scope="module")
def gpt2_dir(shared_dir):
    return shared_dir / "tokenizers" / "gpt2"


@pytest.fixture(scope="module")
def llama3_file(shared_dir):
    return shared_dir / "tokenizers" / "llama3" / "tokenizer.model"


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return Tokenizer.from_gpt2_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt")


@pytest.fixture(scope="module")
def llama3(llama3_file):
    return Tokenizer.from_llama3_file(llama3_file)


@pytest.fixture(scope="module")
def llama3_hf_reference(llama3_file):
    """The Llama-3 rank file converted to a HF `tokenizers` BPE (an implementation independent of tiktoken)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    return TikTokenConverter(str(llama3_file), extra_special_tokens=llama3_special_tokens()).converted()


def _bytes_to_unicode():
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in bs]
    return dict(zip(bs + extra, map(chr, bs + [256 + n for n in range(len(extra))])))


def _pure_python_bpe(symbols, pair_rank):
    """Textbook BPE: repeatedly merge the adjacent pair with the lowest rank (leftmost on ties)."""
    symbols = list(symbols)
    while len(symbols) > 1:
        ranks = [pair_rank(a, b) for a, b in zip(symbols, symbols[1:])]
        best = min((r, i) for i, r in enumerate(ranks) if r is not None) if any(r is not None for r in ranks) else None
        if best is None:
            return symbols
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


@functools.lru_cache(maxsize=1)
def _gpt2_tables(gpt2_dir):
    vocab = json.loads((gpt2_dir / "vocab.json").read_text())
    lines = (gpt2_dir / "merges.txt").read_text().split("\n")[1:]
    return vocab, {tuple(line.split(" ")): i for i, line in enumerate(lines) if line}


def _reference_gpt2(gpt2_dir, text):
    (vocab, merge_rank), b2u, ids = _gpt2_tables(gpt2_dir), _bytes_to_unicode(), []
    for piece in regex.findall(GPT2_PAT, text):
        merged = _pure_python_bpe([b2u[b] for b in piece.encode()], lambda a, b: merge_rank.get((a, b)))
        ids += [vocab[s] for s in merged]
    return ids


def _save_gpt2_hf_json(gpt2_dir, path):
    """Write GPT-2 as a HF tokenizer.json, built by transformers (not by latent_jax)."""
    from transformers import GPT2Tokenizer
    path.parent.mkdir(parents=True, exist_ok=True)
    GPT2Tokenizer(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt")).backend_tokenizer.save(str(path))
    return path


def _reference_llama3(ranks, text):
    ids = []
    for piece in regex.findall(LLAMA3_PAT, text):
        ids += [ranks[s] for s in _pure_python_bpe([bytes([b]) for b in piece.encode()], lambda a, b: ranks.get(a + b))]
    return ids


# ------------------------------------------------------------------------------------------------------- GPT-2
def test_gpt2_matches_transformers_and_pure_python_bpe(gpt2, gpt2_dir, texts):
    from transformers import GPT2Tokenizer
    ref = GPT2Tokenizer(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt"))
    assert len(texts) > 100
    for text in texts:
        ids = gpt2.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        if "<|" not in text:
            assert ids == _reference_gpt2(gpt2_dir, text), text
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]
    assert gpt2.encode("Hello world") == [15496, 995] and gpt2.encode(" Hello world") == [18435, 995]


def test_gpt2_roundtrip_and_special(gpt2, texts):
    for text in texts:
        assert gpt2.decode(gpt2.encode(text)) == text
    assert (gpt2.name, gpt2.vocab_size, gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == ("gpt2", 50257, 50256, 50256, 50256)
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert 50256 not in gpt2.encode("a<|endoftext|>b", allow_special=False)
    assert gpt2.encode("hi", add_bos=True) == [50256, 5303]
    assert gpt2.decode([64, 50256, 65], skip_special=True) == "ab"
    assert gpt2.token_to_id("Ġthe") == 262 and gpt2.id_to_token(262) == "Ġthe"
    assert gpt2.token_to_id("<|endoftext|>") == 50256 and gpt2.token_to_id("not-a-token-xyz") is None
    assert gpt2.id_to_token(10**6) is None and gpt2.id_to_token(-1) is None


def test_packaged_gpt2_matches_shared_files(gpt2, gpt2_dir, texts):
    assets = resources.files("latent_jax") / "assets" / "gpt2"
    for name in ("vocab.json", "merges.txt", "LICENSE"):
        assert filecmp.cmp(str(assets / name), gpt2_dir / name, shallow=False), name
    packaged = load_tokenizer("gpt2")
    assert packaged.name == "gpt2" and packaged.vocab_size == 50257
    assert packaged.encode_batch(texts) == gpt2.encode_batch(texts)


# ----------------------------------------------------------------------------------------------------- Llama-3
def test_llama3_matches_independent_references(llama3, llama3_file, llama3_hf_reference, texts):
    lines = llama3_file.read_text().splitlines()
    ranks = {base64.b64decode(tok): int(r) for tok, r in (line.split() for line in lines)}
    for text in texts:
        ids = llama3.encode(text)
        assert ids == llama3_hf_reference.encode(text, add_special_tokens=False).ids, text
        if "<|" not in text and len(text) < 400:
            assert ids == _reference_llama3(ranks, text), text
    # Well-known ids ("Hello world!" -> <|begin_of_text|> 9906 1917 0 in Meta's reference).
    assert llama3.encode("Hello world!", add_bos=True) == [128000, 9906, 1917, 0]
    for word in ["the", " the", "Hello", " world", " question", "123"]:
        (tid,) = llama3.encode(word)
        assert llama3.decode([tid]) == word


def test_llama3_roundtrip_and_special_tokens(llama3, texts):
    for text in texts:
        assert llama3.decode(llama3.encode(text)) == text
    assert (llama3.name, llama3.vocab_size, llama3.bos_id, llama3.eos_id, llama3.pad_id) == (
        "llama3", 128256, 128000, 128001, 128004)
    expected = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128002: "<|reserved_special_token_0|>",
                128003: "<|reserved_special_token_1|>", 128004: "<|finetune_right_pad_id|>", 128005: "<|step_id|>",
                128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>",
                128009: "<|eot_id|>", 128010: "<|python_tag|>", 128011: "<|image|>",
                128012: "<|reserved_special_token_2|>", 128255: "<|reserved_special_token_245|>"}
    for i, tok in expected.items():
        assert llama3.token_to_id(tok) == i and llama3.id_to_token(i) == tok
    assert llama3.id_to_token(128256) is None and llama3.token_to_id("<|reserved_special_token_246|>") is None
    assert llama3.encode("<|begin_of_text|>Hi<|eot_id|>") == [128000, 13347, 128009]
    plain = llama3.encode("<|begin_of_text|>Hi", allow_special=False)
    assert 128000 not in plain and llama3.decode(plain) == "<|begin_of_text|>Hi"
    assert llama3.decode([128000, 13347, 128009], skip_special=True) == "Hi"
    assert llama3.token_to_id("Ġthe") == 279 and llama3.id_to_token(279) == "Ġthe"


def test_hf_json_llama3_with_config(tmp_path, llama3, llama3_hf_reference, texts):
    llama3_hf_reference.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}}))
    hf = load_tokenizer(tmp_path)
    assert (hf.name, hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id) == ("hf", 128256, 128000, 128009, 128009)
    assert hf.encode_batch(texts, add_bos=True) == llama3.encode_batch(texts, add_bos=True)
    assert hf.decode(hf.encode("<|begin_of_text|>x y"), skip_special=True) == "x y"
    assert 128000 not in hf.encode("<|begin_of_text|>", allow_special=False)


# ------------------------------------------------------------------------------------------- added tokens / save
@pytest.fixture(params=["gpt2", "llama3", "hf"])
def fresh_tokenizer(request, gpt2_dir, llama3_file, tmp_path):
    if request.param == "gpt2":
        return Tokenizer.from_gpt2_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt")
    if request.param == "llama3":
        return Tokenizer.from_llama3_file(llama3_file)
    return Tokenizer.from_hf_json(_save_gpt2_hf_json(gpt2_dir, tmp_path / "hf_src" / "tokenizer.json"))


def test_add_special_tokens_encode_decode_save_load(fresh_tokenizer, tmp_path):
    tok = fresh_tokenizer
    n, eos = tok.vocab_size, tok.eos_id
    text = "question <|latent|><|latent|> x <|start-latent|>"
    before = tok.encode(text)
    ids = tok.add_special_tokens(["<|latent|>", "<|start-latent|>"])
    assert ids == [n, n + 1] and tok.vocab_size == n + 2
    assert tok.add_special_tokens(["<|latent|>", tok.id_to_token(eos)]) == [n, eos] and tok.vocab_size == n + 2
    assert tok.token_to_id("<|latent|>") == n and tok.id_to_token(n + 1) == "<|start-latent|>"
    enc = tok.encode(text)
    assert enc.count(n) == 2 and enc.count(n + 1) == 1 and enc[-1] == n + 1
    assert enc[:2] == tok.encode("question ") and enc[4:-1] == tok.encode(" x ")
    assert tok.decode(enc) == text and tok.decode(enc, skip_special=True) == "question  x "
    assert tok.encode(text, allow_special=False) == before
    tok.pad_id = n
    saved = tok.save(tmp_path / "saved")
    assert (saved / "latent_jax_tokenizer.json").is_file()
    back = load_tokenizer(saved)
    assert (back.name, back.vocab_size, back.bos_id, back.eos_id, back.pad_id) == (
        tok.name, n + 2, tok.bos_id, tok.eos_id, n)
    assert back.encode(text) == enc and back.decode(enc) == text and back.added_tokens == tok.added_tokens
    assert back.add_special_tokens(["<|new|>"]) == [n + 2]


# ------------------------------------------------------------------------------------------------ detection
def test_load_tokenizer_detects_formats(tmp_path, gpt2_dir, llama3_file):
    assert load_tokenizer(gpt2_dir).name == "gpt2"
    assert load_tokenizer(gpt2_dir / "vocab.json").name == "gpt2"
    assert load_tokenizer(llama3_file).name == "llama3"
    assert load_tokenizer(llama3_file.parent).vocab_size == 128256
    hf_dir = _save_gpt2_hf_json(gpt2_dir, tmp_path / "hf" / "tokenizer.json").parent
    (hf_dir / "tokenizer.model").write_bytes(b"\n\x0esentencepiece\x12")  # a SentencePiece model is skipped
    hf = load_tokenizer(hf_dir)
    assert hf.name == "hf" and hf.eos_id == 50256 and hf.encode("Hello world") == [15496, 995]
    assert load_tokenizer(hf_dir / "tokenizer.json").name == "hf"


# --------------------------------------------------------------------------------------------------- errors
def _gpt2_copy(tmp_path, gpt2_dir):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_dir / name, tmp_path / name)
    return tmp_path / "vocab.json", tmp_path / "merges.txt"


def test_missing_files(tmp_path, gpt2_dir):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_gpt2_files(tmp_path / "nope.json", gpt2_dir / "merges.txt")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.from_llama3_file(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_tokenizer(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*vocab\.json.*merges\.txt.*tokenizer\.model.*tokenizer\.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="looked for"):
        load_tokenizer(tmp_path / "half")


@pytest.mark.parametrize("content, match", [
    ("[1, 2, 3]", "JSON object"), ('{"a": "1"}', "JSON object"), ('{"a": true}', "JSON object"),
    ('{"a": 1,', "not valid JSON")])
def test_bad_vocab_json(tmp_path, gpt2_dir, content, match):
    vocab, merges = _gpt2_copy(tmp_path, gpt2_dir)
    vocab.write_text(content)
    with pytest.raises(ValueError, match=rf"vocab\.json.*{match}"):
        load_tokenizer(tmp_path)


def test_bad_merges_txt(tmp_path, gpt2_dir):
    vocab, merges = _gpt2_copy(tmp_path, gpt2_dir)
    merges.write_text("#version: 0.2\nĠ t\nĠ a b\n")
    with pytest.raises(ValueError, match=r"merges\.txt: line 3.*pair"):
        load_tokenizer(tmp_path)
    merges.write_text("#version: 0.2\nĠ t\nnothere\n")
    with pytest.raises(ValueError, match=r"merges\.txt: line 3"):
        Tokenizer.from_gpt2_files(vocab, merges)


@pytest.mark.parametrize("lines, match", [
    ([b"IQ== 0", b"Ig== 1", b"not base64! 2"], "line 3: expected '<base64 token> <rank>'"),
    ([b"IQ== 0", b"Ig==", b"Iw== 2"], "line 2: expected"),
    ([b"IQ== 0", b"Ig== 1", b"Iw== 5"], "line 3: rank 5 is not consecutive"),
    ([b"IQ== 0", b"IQ== 1"], "line 2: .*duplicate"),
    ([b"IQ== one"], "line 1: expected"),
    ([b""], "empty")])
def test_bad_tiktoken_file(tmp_path, lines, match):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=rf"tokenizer\.model.*{match}"):
        load_tokenizer(path)


def test_bad_saved_metadata(tmp_path, gpt2):
    gpt2.save(tmp_path)
    (tmp_path / "latent_jax_tokenizer.json").write_text('{"kind": "bert"}')
    with pytest.raises(ValueError, match="latent_jax_tokenizer.json.*unknown tokenizer kind 'bert'"):
        load_tokenizer(tmp_path)
