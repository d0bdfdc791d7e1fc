"""A tokenizer restricted to the ids a corpus uses, for small from-scratch models on CPU.

The GPT-2 tokenizer has 50,257 tokens; a ProsQA corpus uses a few hundred. A from-scratch model only needs rows for
those, and the LM head over the full vocabulary would dominate a small model's step time (measured 8x on a 2-layer
d=128 model, BUILD_NOTES.md). `CompactTokenizer` wraps a `Tokenizer`: same text in and out, ids remapped to a
dense range [0, n). Pretrained models keep the full tokenizer.
"""
from __future__ import annotations

import json
import pathlib
from typing import Iterable, Sequence

from latent_jax.tokenizer import Tokenizer, load_tokenizer

META = "latent_jax_compact_vocab.json"


class CompactTokenizer:
    """Tokenizer over the base ids in `keep` (plus EOS), then any added special tokens."""

    def __init__(self, base: Tokenizer, keep: Iterable[int]):
        ids = sorted(set(keep) | {base.eos_id})
        self.base, self.name = base, base.name
        self.base_ids: list[int] = ids
        self.to_compact = {b: i for i, b in enumerate(ids)}
        self.added: dict[str, int] = {}

    @classmethod
    def from_texts(cls, base: Tokenizer, texts: Iterable[str]) -> "CompactTokenizer":
        keep: set[int] = set()
        for t in texts:
            keep.update(base.encode(t, allow_special=False))
        return cls(base, keep)

    @property
    def vocab_size(self) -> int:
        return len(self.base_ids) + len(self.added)

    @property
    def eos_id(self) -> int:
        return self.to_compact[self.base.eos_id]

    @property
    def bos_id(self) -> int:
        return self.eos_id

    @property
    def pad_id(self) -> int:
        return self.eos_id

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        for t in tokens:
            if t not in self.added:
                self.added[t] = self.vocab_size
        return [self.added[t] for t in tokens]

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = True) -> list[int]:
        out: list[int] = []
        pieces = [text]
        if allow_special and self.added:  # split on added tokens, longest first
            for tok in sorted(self.added, key=len, reverse=True):
                pieces = [x for p in pieces for x in _split_keep(p, tok)]
        for p in pieces:
            if p in self.added:
                out.append(self.added[p])
                continue
            for b in self.base.encode(p, allow_special=False):
                if b not in self.to_compact:
                    raise ValueError(f"token {self.base.decode([b])!r} (id {b}) of {p[:60]!r} is not in the compact"
                                     f" vocabulary ({len(self.base_ids)} tokens built from the training data)")
                out.append(self.to_compact[b])
        return ([self.bos_id] if add_bos else []) + out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        inv = {v: k for k, v in self.added.items()}
        text, run = [], []
        for i in ids:
            if i in inv:
                text.append(self.base.decode([self.base_ids[j] for j in run]))
                run = []
                if not skip_special:
                    text.append(inv[i])
            elif 0 <= i < len(self.base_ids):
                run.append(i)
        text.append(self.base.decode([self.base_ids[j] for j in run], skip_special=skip_special))
        return "".join(text)

    def save(self, directory) -> pathlib.Path:
        d = pathlib.Path(directory)
        self.base.save(d)
        (d / META).write_text(json.dumps({"base_ids": self.base_ids, "added": self.added}))
        return d


def _split_keep(text: str, sep: str) -> list[str]:
    parts = text.split(sep)
    out: list[str] = []
    for i, p in enumerate(parts):
        if p:
            out.append(p)
        if i < len(parts) - 1:
            out.append(sep)
    return out


def load_compact(p: pathlib.Path) -> CompactTokenizer:
    """The compact tokenizer saved in model folder `p` (`CompactTokenizer.save`)."""
    meta = json.loads((p / META).read_text())
    tok = CompactTokenizer(load_tokenizer(p, plain=True), meta["base_ids"])
    tok.add_special_tokens(sorted(meta["added"], key=meta["added"].get))
    return tok


def load_any_tokenizer(path) -> Tokenizer | CompactTokenizer:
    """Same as `latent_jax.tokenizer.load_tokenizer` (which now restores compact and word vocabularies itself);
    kept for older callers."""
    return load_tokenizer(path)
