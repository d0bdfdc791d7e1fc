"""Pause tokens (Goyal et al., ICLR 2024): M learnable <pause> tokens after the question, no loss on them.

    question\\n <pause>×M ### answer <eos>          (no CoT; the pauses buy extra computation)
"""
from __future__ import annotations

import dataclasses
from typing import Any

from latent_jax.methods.base import IGNORE, Example, Prompt
from latent_jax.methods.coconut import PAUSE, check_record
from latent_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PauseConfig:
    n_pause: int = 6
    init_token: str = "<<"

    def __post_init__(self):
        if self.n_pause < 1:
            raise ValueError(f"n_pause must be >= 1, got {self.n_pause}")


class Pause:
    name = "pause"

    def __init__(self, tokenizer: Tokenizer, cfg: PauseConfig = PauseConfig()):
        self.tok, self.cfg = tokenizer, cfg
        self.special_tokens = (PAUSE,)
        self.pause_id = tokenizer.add_special_tokens([PAUSE])[0]
        self.uses_hidden_thoughts = False

    def num_stages(self) -> int:
        return 1

    def _prefix(self, record: dict[str, Any]) -> list[int]:
        check_record(record)
        q = self.tok.encode(record["question"] + "\n", add_bos=self.tok.name == "llama3")
        return q + [self.pause_id] * self.cfg.n_pause

    def encode(self, record: dict[str, Any], stage: int) -> Example:
        prefix = self._prefix(record)
        a = self.tok.encode("### " + record["answer"]) + [self.tok.eos_id]
        return Example(prefix + a, [IGNORE] * len(prefix) + a, latent_start=len(prefix), n_latent=0)

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        return Prompt(self._prefix(record))

    def init_token_id(self) -> int:
        return self.tok.encode(self.cfg.init_token)[0]
