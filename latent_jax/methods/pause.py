"""Pause tokens (Goyal et al., ICLR 2024): M learnable <pause> tokens after the question, no loss on them.

    question\\n <pause>×M ### answer <eos>          (no CoT; the pauses buy extra computation)

`random_insert = R > 0` adds the paper's pause-pretraining variant to training: R more <pause> tokens at uniformly
random gaps inside the target text (before any target token but the first, with replacement: adjacent pauses
possible). The loss skips every term whose target is a <pause> (label IGNORE at the pause positions); the output
at a pause is still trained to predict the next real token, as in the paper's L_PausePT. Inference is unchanged
(M pauses after the question). The gaps are drawn from a hash of the record's text and the `stage` argument of
`encode`: the `example_stage` hook hands `encode` a fresh draw id per (seed, epoch, record index) when R > 0, so
every epoch sees new positions; `encode(record, s)` called directly is deterministic in (record, s).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from latent_jax.config import check_rules, coerce_numbers
from latent_jax.layout import IGNORE, Example, Prompt
from latent_jax.methods.base import Method, first_token_id
from latent_jax.methods.coconut import PAUSE
from latent_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PauseConfig:
    n_pause: int = 6
    init_token: str = "<<"
    random_insert: int = 0  # extra <pause> tokens at random gaps of the target during training

    def __post_init__(self):
        coerce_numbers(self, "PauseConfig")
        check_rules(self, "PauseConfig", [("n_pause", self.n_pause >= 1, "an integer >= 1"),
                                          ("random_insert", self.random_insert >= 0, "an integer >= 0")])


def _record_key(record: dict[str, Any]) -> int:
    """A stable 64-bit hash of the record's text (Python's hash() is salted per process)."""
    text = "\x1f".join([record["question"], *record["steps"], record["answer"]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


class Pause(Method):
    name = "pause"

    def __init__(self, tokenizer: Tokenizer, cfg: PauseConfig = PauseConfig()):
        self.tok, self.cfg = tokenizer, cfg
        self.special_tokens = (PAUSE,)
        self.pause_id = tokenizer.add_special_tokens([PAUSE])[0]

    def num_stages(self) -> int:
        return 1

    def _prefix(self, record: dict[str, Any]) -> list[int]:
        return self.record_tokens(record).question + [self.pause_id] * self.cfg.n_pause

    def insert_gaps(self, record: dict[str, Any], stage: int, n_target: int) -> np.ndarray:
        """Sorted gaps g in [1, n_target): a <pause> goes right before target token g (one per draw)."""
        rng = np.random.default_rng([_record_key(record), int(stage) & 0xFFFFFFFF, 0x9A05E])
        return np.sort(rng.integers(1, n_target, size=self.cfg.random_insert))

    def encode(self, record: dict[str, Any], stage: int) -> Example:
        prefix = self._prefix(record)
        a = list(self.record_tokens(record).answer)
        labels = list(a)
        if self.cfg.random_insert:
            gaps = self.insert_gaps(record, stage, len(a))
            a2, labels = [], []
            for i, t in enumerate(a):
                n = int(np.sum(gaps == i))
                a2 += [self.pause_id] * n + [t]
                labels += [IGNORE] * n + [t]
            a = a2
        return Example(prefix + a, [IGNORE] * len(prefix) + labels, latent_start=len(prefix), n_latent=0)

    def example_stage(self, record: dict[str, Any], index: int, epoch: int, stage: int, seed: int,
                      uniform_prob: float) -> int:
        """With random_insert: a draw id from (seed, epoch, index) for `encode` (fresh pause positions every
        epoch). Else the pipeline default (Pause ignores the stage)."""
        if not self.cfg.random_insert:
            return super().example_stage(record, index, epoch, stage, seed, uniform_prob)
        return int(np.random.SeedSequence([seed, epoch, index, 0x9A05E]).generate_state(1)[0] >> 1)

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        return Prompt(self._prefix(record))

    def init_token_id(self) -> int:
        return first_token_id(self.tok, self.cfg.init_token)
