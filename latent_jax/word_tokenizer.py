"""A word-level tokenizer over a fixed vocabulary (symbolic tasks: one token per graph node, no BPE).

Text is split into ``\\n`` and runs of non-space characters; every piece must be a vocabulary word or an added
special token (else a ValueError naming it). Decoding joins words with single spaces (``\\n`` stands alone). Same
API as :class:`latent_jax.tokenizer.Tokenizer` (``encode``/``decode``/``add_special_tokens``/``save``/ids), and
:func:`latent_jax.tokenizer.load_tokenizer` reloads a saved one from a model folder.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Iterable, Sequence

META = "latent_jax_word_vocab.json"
_PIECES = re.compile(r"\n|[^\s]+")


class WordTokenizer:
    """Word ``i`` of ``vocab`` has id ``i``; added special tokens follow. ``vocab[0]`` is EOS (also BOS and pad).
    newlines False: ``\\n`` is whitespace like a space (the methods' step separators vanish, so a symbolic path is
    written node after node, as Zhu et al.'s layout; the ``\\n`` word stays in the vocabulary, unused)."""

    def __init__(self, vocab: Sequence[str], name: str = "symbolic", newlines: bool = True):
        if len(set(vocab)) != len(vocab) or not vocab:
            raise ValueError("a word vocabulary needs distinct words (the first is EOS)")
        self.name, self.words, self.newlines = name, list(vocab), bool(newlines)
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.added: dict[str, int] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.words) + len(self.added)

    eos_id = bos_id = pad_id = 0

    def token_to_id(self, tok: str) -> int | None:
        return self.ids.get(tok, self.added.get(tok))

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        for t in tokens:
            if t not in self.ids and t not in self.added:
                self.added[t] = self.vocab_size
        return [self.token_to_id(t) for t in tokens]

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = True) -> list[int]:
        out = [self.bos_id] if add_bos else []
        for w in _PIECES.findall(text):
            if w == "\n" and not self.newlines:
                continue
            i = self.ids.get(w, self.added.get(w) if allow_special else None)
            if i is None:
                raise ValueError(f"word {w!r} of {text[:60]!r} is not in the {self.name} vocabulary"
                                 f" ({len(self.words)} words: {' '.join(self.words[:12])} ...)")
            out.append(i)
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        inv = {v: k for k, v in self.added.items()}
        words = []
        for i in ids:
            i = int(i)
            if i in inv:
                if not skip_special:
                    words.append(inv[i])
            elif 0 <= i < len(self.words) and not (skip_special and i == self.eos_id):
                words.append(self.words[i])
        return " ".join(words).replace(" \n ", "\n").replace(" \n", "\n").replace("\n ", "\n")

    def save(self, directory) -> pathlib.Path:
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / META).write_text(json.dumps({"name": self.name, "words": self.words, "added": self.added,
                                           "newlines": self.newlines}))
        return d

    @classmethod
    def load(cls, directory) -> "WordTokenizer":
        meta = json.loads((pathlib.Path(directory) / META).read_text())
        tok = cls(meta["words"], meta["name"], meta.get("newlines", True))  # older folders: newlines
        tok.add_special_tokens(sorted(meta["added"], key=meta["added"].get))
        return tok

    def __repr__(self) -> str:
        return (f"WordTokenizer({self.name!r}, vocab_size={self.vocab_size}, added_tokens={list(self.added)},"
                f" newlines={self.newlines})")
