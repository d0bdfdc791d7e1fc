"""One tokenizer API over GPT-2 byte-level BPE (HF ``tokenizers``), Llama-3 (``tiktoken``) and HF ``tokenizer.json``.

``load_tokenizer(path)`` detects the format (``"gpt2"``: the GPT-2 files packaged in ``assets/gpt2``). Tokens added
with :meth:`Tokenizer.add_special_tokens` (e.g. ``<|latent|>``) are single tokens in text and survive save/load.
"""
from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import tiktoken
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

META_FILE = "latent_jax_tokenizer.json"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
GPT2_EOT = "<|endoftext|>"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PathLike = str | os.PathLike


def llama3_special_tokens(n: int = 256) -> list[str]:
    """The Llama-3 special tokens in id order (they follow the base tokens, i.e. start at id 128000)."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(n - len(named))]


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used to show tiktoken byte tokens as strings)."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in bs]
    return {b: chr(c) for b, c in zip(bs + extra, bs + [256 + n for n in range(len(extra))])}


def _check_file(path: PathLike) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Path(path)


def _parse_gpt2(path: PathLike, merges_path: PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read GPT-2 ``vocab.json`` (JSON object token -> id) and ``merges.txt`` (``#version`` line, ``a b`` pairs)."""
    path, merges_path = _check_file(path), _check_file(merges_path)
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()):
        raise ValueError(f"{path}: expected a JSON object mapping token strings to integer ids")
    merges = []
    for n, line in enumerate(merges_path.read_text(encoding="utf-8").split("\n"), 1):
        line = line.rstrip("\r")
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{merges_path}: line {n}: expected a merge pair 'left right', got {line!r}")
        merges.append((parts[0], parts[1]))
    return vocab, merges


def _parse_ranks(path: PathLike) -> dict[bytes, int]:
    """Read a tiktoken rank file (``<base64 token> <rank>`` per line, ranks 0, 1, 2, ...)."""
    path = _check_file(path)
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not (parts := line.split()):
                continue
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1] if len(parts) == 2 else "x")
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}: line {n}: expected '<base64 token> <rank>' (a tiktoken rank file; "
                                 f"SentencePiece models are not supported), got {line[:80]!r}") from None
            if rank != len(ranks) or token in ranks:
                raise ValueError(f"{path}: line {n}: rank {rank} is not consecutive or the token is a duplicate "
                                 f"(expected rank {len(ranks)})")
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken rank file")
    return ranks


def _hf_special_id(tok: tokenizers.Tokenizer, folder: Path, key: str, fallbacks: Sequence[str]) -> int | None:
    """Id of ``key`` (e.g. ``bos_token``) per tokenizer_config.json / special_tokens_map.json, else of a fallback."""
    names = []
    for cfg in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            value = json.loads((folder / cfg).read_text(encoding="utf-8")).get(key)
            names.append(value.get("content") if isinstance(value, dict) else value)
        except (OSError, ValueError, AttributeError):
            pass
    ids = [tok.token_to_id(t) for t in [*names, *fallbacks] if isinstance(t, str)]
    return next((i for i in ids if i is not None), None)


class Tokenizer:
    """A HF ``tokenizers.Tokenizer`` or ``tiktoken.Encoding`` behind one API. Token strings use the GPT-2
    byte-level form for both (``"Ġthe"`` is ``b" the"``), like HF's own GPT-2 and Llama-3 tokenizers."""

    def __init__(self, backend: tokenizers.Tokenizer | tiktoken.Encoding, name: str, files: dict[str, Path],
                 bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 ranks: dict[bytes, int] | None = None, specials: dict[str, int] | None = None) -> None:
        self._backend, self.name, self._files = backend, name, dict(files)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, (eos_id if pad_id is None else pad_id)
        self._tt, self._ranks, self._specials = ranks is not None, ranks, specials  # tiktoken backend only
        self.added_tokens: list[str] = []  # tokens added by add_special_tokens (restored by load_tokenizer)

    @classmethod
    def from_gpt2_files(cls, vocab_json: PathLike, merges_txt: PathLike) -> Tokenizer:
        """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; ``<|endoftext|>`` is bos = eos = pad."""
        vocab, merges = _parse_gpt2(vocab_json, merges_txt)
        try:
            tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        except Exception as e:
            raise ValueError(f"invalid BPE files {vocab_json}, {merges_txt}: {e}") from e
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if GPT2_EOT in vocab:
            tok.add_special_tokens([AddedToken(GPT2_EOT, special=True, normalized=False)])
        files = {"vocab.json": Path(vocab_json), "merges.txt": Path(merges_txt)}
        if (lic := Path(vocab_json).parent / "LICENSE").is_file():
            files["LICENSE"] = lic
        return cls(tok, "gpt2", files, vocab.get(GPT2_EOT), vocab.get(GPT2_EOT))

    @classmethod
    def from_llama3_file(cls, tokenizer_model: PathLike) -> Tokenizer:
        """Llama-3 from its tiktoken rank file; bos 128000, eos 128001 ``<|end_of_text|>``, pad 128004."""
        ranks = _parse_ranks(tokenizer_model)
        sp = {t: len(ranks) + i for i, t in enumerate(llama3_special_tokens())}
        return cls(cls._make_encoding(ranks, sp), "llama3", {"tokenizer.model": Path(tokenizer_model)},
                   sp["<|begin_of_text|>"], sp["<|end_of_text|>"], sp["<|finetune_right_pad_id|>"], ranks, sp)

    @classmethod
    def from_hf_json(cls, tokenizer_json: PathLike) -> Tokenizer:
        """A HF fast-tokenizer ``tokenizer.json``; bos/eos/pad from a sibling tokenizer_config.json if present."""
        path = _check_file(tokenizer_json)
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a valid HF tokenizer.json ({e})") from e
        bos = _hf_special_id(tok, path.parent, "bos_token", ["<|begin_of_text|>", "<s>", "<bos>", GPT2_EOT])
        eos = _hf_special_id(tok, path.parent, "eos_token", ["<|end_of_text|>", "</s>", "<eos>", GPT2_EOT])
        return cls(tok, "hf", {"tokenizer.json": path}, bos, eos, _hf_special_id(tok, path.parent, "pad_token", []))

    @staticmethod
    def _make_encoding(ranks: dict[bytes, int], specials: dict[str, int]) -> tiktoken.Encoding:
        return tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens in the text become single ids unless ``allow_special=False``."""
        return self.encode_batch([text], add_bos, allow_special)[0]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, allow_special: bool = True) -> list[list[int]]:
        """:meth:`encode` for a list of texts (uses the backend's batched encoder)."""
        if self._tt:
            out = self._backend.encode_batch(list(texts), allowed_special="all" if allow_special else set(),
                                             disallowed_special=())
        else:
            self._backend.encode_special_tokens = not allow_special
            try:
                out = [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
            finally:
                self._backend.encode_special_tokens = False
        if add_bos and self.bos_id is None:
            raise ValueError(f"tokenizer {self.name!r} has no bos token")
        return [[self.bos_id] * add_bos + list(ids) for ids in out]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 is replaced); ``skip_special`` drops special/added tokens."""
        ids = [int(i) for i in ids]
        if not self._tt:
            return self._backend.decode(ids, skip_special_tokens=skip_special)
        return self._backend.decode([i for i in ids if not skip_special or i < len(self._ranks)], errors="replace")

    @property
    def vocab_size(self) -> int:
        """Number of ids, including special and added tokens."""
        return max(self._specials.values()) + 1 if self._tt else self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, tok: str) -> int | None:
        """Id of a token string (byte-level form, e.g. ``"Ġthe"``, or a special token), or None if unknown."""
        if not self._tt:
            return self._backend.token_to_id(tok)
        inverse = {c: b for b, c in _byte_to_unicode().items()}
        if tok in self._specials or not tok or any(c not in inverse for c in tok):
            return self._specials.get(tok)
        return self._ranks.get(bytes(inverse[c] for c in tok))

    def id_to_token(self, i: int) -> str | None:
        """Token string of id ``i`` (byte-level form), or None if out of range."""
        if i < 0 or not self._tt:
            return self._backend.id_to_token(int(i)) if i >= 0 else None
        if i >= len(self._ranks):
            return next((t for t, j in self._specials.items() if j == i), None)
        return "".join(_byte_to_unicode()[b] for b in self._backend.decode_single_token_bytes(int(i)))

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add special tokens (ids ``vocab_size``, ``vocab_size + 1``, ...); existing tokens keep their id."""
        ids, rebuild = [], False
        for tok in tokens:
            if not isinstance(tok, str) or not tok:
                raise ValueError(f"special tokens must be non-empty strings, got {tok!r}")
            tid = self.token_to_id(tok)
            if tid is None:
                tid = self.vocab_size
                if self._tt:
                    self._specials[tok], rebuild = tid, True
                else:
                    self._backend.add_special_tokens([AddedToken(tok, special=True, normalized=False)])
                    tid = self._backend.token_to_id(tok)
                self.added_tokens.append(tok)
            ids.append(tid)
        if rebuild:
            self._backend = self._make_encoding(self._ranks, self._specials)
        return ids

    def save(self, directory: PathLike) -> Path:
        """Copy the base files to ``directory`` and write ``latent_jax_tokenizer.json`` (kind, ids, added tokens)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name, src in self._files.items():
            if Path(src).resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
        meta = {"kind": self.name, "files": sorted(self._files), "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "added_tokens": [[t, self.token_to_id(t)] for t in self.added_tokens]}
        (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return out

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, added_tokens={self.added_tokens})"


_LOADERS = {"gpt2": lambda d: Tokenizer.from_gpt2_files(d / "vocab.json", d / "merges.txt"),
            "llama3": lambda d: Tokenizer.from_llama3_file(d / "tokenizer.model"),
            "hf": lambda d: Tokenizer.from_hf_json(d / "tokenizer.json")}


def _load_saved(folder: Path) -> Tokenizer:
    """Restore a tokenizer written by :meth:`Tokenizer.save`."""
    meta_path = folder / META_FILE
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        kind, added = meta["kind"], [(str(t), int(i)) for t, i in meta.get("added_tokens", [])]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: invalid latent_jax tokenizer metadata ({e})") from e
    if kind not in _LOADERS:
        raise ValueError(f"{meta_path}: unknown tokenizer kind {kind!r} (expected one of {sorted(_LOADERS)})")
    tok = _LOADERS[kind](folder)
    got = tok.add_special_tokens([t for t, _ in added])
    if got != [i for _, i in added]:
        raise ValueError(f"{meta_path}: added tokens got ids {got}, expected {[i for _, i in added]}")
    tok.bos_id, tok.eos_id, tok.pad_id = (meta.get(k, getattr(tok, k)) for k in ("bos_id", "eos_id", "pad_id"))
    return tok


def folder_added_tokens(folder: Path) -> list[tuple[str, int]]:
    """(token, id) pairs a Hugging Face folder declares beside its base files, sorted by id: ``added_tokens.json``
    (``{token: id}``), ``tokenizer_config.json``'s ``added_tokens_decoder`` and ``tokenizer.json``'s
    ``added_tokens`` (what ``save_pretrained`` writes after ``add_tokens``, e.g. Coconut's three latent tokens)."""
    found: dict[str, tuple[int, str]] = {}

    def put(token, i, source):
        if not isinstance(token, str) or isinstance(i, bool):
            raise ValueError(f"{folder / source}: invalid added token entry {token!r}: {i!r}")
        i = int(i)
        if token in found and found[token][0] != i:
            raise ValueError(f"{folder}: added token {token!r} has id {found[token][0]} in {found[token][1]} but"
                             f" {i} in {source}")
        found[token] = (i, source)

    for name in ("added_tokens.json", "tokenizer_config.json", "tokenizer.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from e
        if name == "added_tokens.json":
            for t, i in data.items():
                put(t, i, name)
        elif name == "tokenizer_config.json":
            for i, entry in (data.get("added_tokens_decoder") or {}).items():
                put(entry.get("content") if isinstance(entry, dict) else None, i, name)
        else:
            for entry in data.get("added_tokens") or []:
                put(entry.get("content"), entry.get("id"), name)
    return sorted(((t, i) for t, (i, _) in found.items()), key=lambda x: x[1])


def _with_folder_added(tok: Tokenizer, folder: Path) -> Tokenizer:
    """Add the folder's declared added tokens (ids past the base vocabulary, in id order) to a tokenizer loaded
    from its base files; a token whose id the base already gives differently is an error naming both."""
    for t, i in folder_added_tokens(folder):
        have = tok.token_to_id(t)
        if have is None:
            if i != tok.vocab_size:
                raise ValueError(f"{folder}: added token {t!r} has id {i} but the next free id is {tok.vocab_size}"
                                 " (ids must follow the base vocabulary without gaps)")
            tok.add_special_tokens([t])
        elif have != i:
            raise ValueError(f"{folder}: added token {t!r} has id {i} but the base vocabulary gives it {have}")
    return tok


def load_tokenizer(path: PathLike, plain: bool = False) -> Tokenizer:
    """Load a tokenizer from ``"gpt2"`` (packaged files), a folder, or a file, detecting the format.

    Folders are checked for, in order: a word vocabulary (``latent_jax_word_vocab.json``, a symbolic-encoding
    export: :class:`latent_jax.word_tokenizer.WordTokenizer`), a compact vocabulary
    (``latent_jax_compact_vocab.json``: :class:`latent_jax.compact_vocab.CompactTokenizer`), so that every folder
    latent_jax exports loads with the ids its model was trained on; then ``latent_jax_tokenizer.json`` (from
    :meth:`Tokenizer.save`), ``vocab.json`` + ``merges.txt`` (GPT-2), ``tokenizer.model`` (tiktoken/Llama-3),
    ``tokenizer.json`` (HF). ``plain=True`` skips the first two (the base tokenizer of a compact one). Base files
    are completed with the tokens the folder declares as added (`folder_added_tokens`), so a folder written by
    ``save_pretrained`` after ``add_tokens`` (a reference Coconut checkpoint: GPT-2 + 3 latent tokens, 50,260
    rows) loads with all of them.
    """
    if str(path) == "gpt2" and not Path(path).exists():
        return _LOADERS["gpt2"](ASSETS_DIR / "gpt2")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path not found: {p}")
    if p.is_dir() and not plain:
        from latent_jax import compact_vocab, word_tokenizer  # they build on this module

        if (p / word_tokenizer.META).is_file():
            return word_tokenizer.WordTokenizer.load(p)
        if (p / compact_vocab.META).is_file():
            return compact_vocab.load_compact(p)
    if p.is_file():
        if p.name == META_FILE:
            return _load_saved(p.parent)
        if p.name in ("vocab.json", "merges.txt"):
            return _LOADERS["gpt2"](p.parent)
        if p.suffix == ".json":
            return Tokenizer.from_hf_json(p)
        return Tokenizer.from_llama3_file(p)
    if (p / META_FILE).is_file():
        return _load_saved(p)
    if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        return _with_folder_added(_LOADERS["gpt2"](p), p)
    if (p / "tokenizer.model").is_file():  # prefer tokenizer.json over a SentencePiece tokenizer.model
        with open(p / "tokenizer.model", "rb") as f:
            if not (p / "tokenizer.json").is_file() or re.fullmatch(rb"[A-Za-z0-9+/=]+ 0\s*", f.readline()):
                return _with_folder_added(_LOADERS["llama3"](p), p)
    if (p / "tokenizer.json").is_file():
        return _LOADERS["hf"](p)
    raise FileNotFoundError(f"no tokenizer files in {p}: looked for {META_FILE}, vocab.json + merges.txt, "
                            f"tokenizer.model (tiktoken ranks), tokenizer.json")


def check_vocab_fits(tokenizer_size: int, model_rows: int, what: str = "tokenizer", model: str = "the model") -> None:
    """Raise ValueError naming both sizes when a tokenizer cannot be the one of a model with `model_rows` embedding
    rows: more tokens than rows, or fewer where the rows are not a padded size (a multiple of 64), e.g. GPT-2's
    50,257-token tokenizer on a 50,260-row Coconut checkpoint whose three added tokens were not loaded."""
    if tokenizer_size > model_rows or (tokenizer_size < model_rows and model_rows % 64):
        raise ValueError(f"{what} has {tokenizer_size} tokens but {model} has {model_rows} embedding rows: wrong"
                         " tokenizer for this model (a folder latent_jax exported carries its own; pass that one)")
