"""Coconut (continuous thoughts) and the methods that share its layout: CoT, No-CoT, and the ablations
w/o curriculum, w/o thought (c = 0) and pause-as-thought.

Layout at stage k (reference `get_cot_latent_dataset`):
    question\\n <bot> <latent>×(n·c) <eot> step_{n+1}\\n ... step_N\\n ### answer <eos>
with n = min(k, #steps) latent steps; beyond max_latent_stage all steps are removed and min(#steps, max) used
(or max when pad_latent_to_max). Labels cover the remaining steps and the answer. CoT / No-CoT have no markers.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from latent_jax.config import check_rules, coerce_numbers
from latent_jax.layout import IGNORE, Example, Prompt
from latent_jax.methods.base import Method, first_token_id
from latent_jax.tokenizer import Tokenizer

BOT, EOT, LATENT, PAUSE = "<|start-latent|>", "<|end-latent|>", "<|latent|>", "<|pause|>"


@dataclasses.dataclass(frozen=True)
class CoconutConfig:
    """variant: coconut | cot | no_cot | no_curriculum | no_thought | pause_as_thought.

    stage_layout: how many thought slots a stage k <= max_latent_stage gives a record with n steps.
      "reference" (default; the reference code's dataset.py): training removes the first k steps (all of them when
        k > n) and inserts k*c slots *whatever n* (a 3-step record at stage 5: 5 slots, no text steps); the
        evaluation prompt gives min(k, n)*c slots, or k*c with pad_latent_to_max.
      "capped" (latent_jax before this option): k is capped at n in training and evaluation (min(k, n)*c slots).
    Past max_latent_stage both remove every step and give max_latent_stage*c slots with pad_latent_to_max, else
    min(n, max_latent_stage)*c."""

    variant: str = "coconut"
    c_thought: int = 1
    max_latent_stage: int = 6
    pad_latent_to_max: bool = False
    init_token: str = "<<"  # new special tokens start from this token's embedding (reference)
    stage_layout: str = "reference"

    VARIANTS = ("coconut", "cot", "no_cot", "no_curriculum", "no_thought", "pause_as_thought")
    LAYOUTS = ("reference", "capped")

    def __post_init__(self):
        coerce_numbers(self, "CoconutConfig")
        check_rules(self, "CoconutConfig", [
            ("variant", self.variant in self.VARIANTS, f"one of {self.VARIANTS}"),
            ("c_thought", self.c_thought >= 0, ">= 0"), ("max_latent_stage", self.max_latent_stage >= 0, ">= 0"),
            ("stage_layout", self.stage_layout in self.LAYOUTS, f"one of {self.LAYOUTS}")])
        if self.variant == "no_thought" and self.c_thought != 0:
            object.__setattr__(self, "c_thought", 0)


class Coconut(Method):
    """Coconut and its relatives behind the `Method` interface."""

    def __init__(self, tokenizer: Tokenizer, cfg: CoconutConfig = CoconutConfig()):
        self.tok, self.cfg = tokenizer, cfg
        self.name = cfg.variant
        markers = cfg.variant not in ("cot", "no_cot")
        self.special_tokens = ((BOT, EOT, LATENT) + ((PAUSE,) if cfg.variant == "pause_as_thought" else ())
                               if markers else ())
        ids = tokenizer.add_special_tokens(list(self.special_tokens)) if self.special_tokens else []
        self.ids = dict(zip(self.special_tokens, ids))
        self.eos_id = tokenizer.eos_id

    @property
    def uses_hidden_thoughts(self) -> bool:
        return self.cfg.variant in ("coconut", "no_curriculum") and self.cfg.c_thought > 0

    @property
    def thoughts_per_step(self) -> int:
        return self.cfg.c_thought

    @property
    def max_latent_stage(self) -> int:
        return self.cfg.max_latent_stage

    def eligible_for_best(self, stage: int) -> bool:
        """A curriculum variant keeps its best model only from its last latent stage on: the final evaluation
        removes every step, and an epoch of an earlier stage, selected by its accuracy at that stage, is not the
        model the report evaluates (session 14: keep-best at stage 3 then reported 52.7% where the last epoch gave
        60.3%). CoT, No-CoT and w/o curriculum: every epoch."""
        if self.cfg.variant in ("cot", "no_cot", "no_curriculum"):
            return True
        return stage >= self.cfg.max_latent_stage

    def stage_note(self, stage: int) -> str | None:
        """A stage past `max_latent_stage` (every written reasoning step removed) says so."""
        c = self.cfg
        m, k = c.max_latent_stage, c.c_thought
        if c.variant in ("cot", "no_cot") or stage <= m:
            return None
        slots = f"{m * k} thought slots" if c.pad_latent_to_max else \
            f"up to {m * k} thought slots (min(steps, {m}) x c_thought {k})"
        return (f"stage {stage} = past max_latent_stage {m}: every written reasoning step removed, {slots}"
                + (" of <pause>" if c.variant == "pause_as_thought" else ", none" if k == 0 else ""))

    def num_stages(self) -> int:
        return 1 if self.cfg.variant in ("cot", "no_cot", "no_curriculum") else self.cfg.max_latent_stage + 1

    def _stage_layout(self, n_steps: int, stage: int, prompt: bool = False) -> tuple[int, int]:
        """(steps removed, latent slots) at `stage`: of a training example, or of the evaluation prompt."""
        cfg = self.cfg
        if cfg.variant == "cot":
            return 0, 0
        if cfg.variant == "no_cot":
            return n_steps, 0
        if cfg.variant == "no_curriculum":
            stage = cfg.max_latent_stage + 1
        if stage > cfg.max_latent_stage:
            n_lat = cfg.max_latent_stage if cfg.pad_latent_to_max else min(n_steps, cfg.max_latent_stage)
            return n_steps, n_lat * cfg.c_thought
        n_skip = min(stage, n_steps)
        if cfg.stage_layout == "capped" or (prompt and not cfg.pad_latent_to_max):
            return n_skip, n_skip * cfg.c_thought
        return n_skip, stage * cfg.c_thought  # reference: k slots whatever the record's step count

    def steps_replaced(self, n_steps: int, stage: int) -> int:
        """The leading steps the stage's continuous thoughts replace (0 without hidden-state thoughts)."""
        return self._stage_layout(n_steps, stage)[0] if self.uses_hidden_thoughts else 0

    def encode(self, record: dict[str, Any], stage: int) -> Example:
        t = self.record_tokens(record)
        q, steps, a = t.question, t.steps, t.answer
        n_skip, n_lat = self._stage_layout(len(steps), stage)
        rest = [t for s in steps[n_skip:] for t in s] + a
        if not self.special_tokens:
            return Example(q + rest, [IGNORE] * len(q) + rest, latent_start=len(q), n_latent=0)
        slot = self.ids[PAUSE] if self.cfg.variant == "pause_as_thought" else self.ids[LATENT]
        tokens = q + [self.ids[BOT]] + [slot] * n_lat + [self.ids[EOT]] + rest
        labels = [IGNORE] * (len(q) + n_lat + 2) + rest
        hidden = self.uses_hidden_thoughts
        return Example(tokens, labels, latent_start=len(q) + 1, n_latent=n_lat if hidden else 0)

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        t = self.record_tokens(record)
        q, steps = t.question, t.steps
        if not self.special_tokens:
            return Prompt(q)
        _, n_lat = self._stage_layout(len(steps), max(stage, 0), prompt=True)
        if self.uses_hidden_thoughts:
            return Prompt(q + [self.ids[BOT]], n_lat, [self.ids[EOT]])
        slot = self.ids[PAUSE] if self.cfg.variant == "pause_as_thought" else self.ids[LATENT]
        return Prompt(q + [self.ids[BOT]] + [slot] * n_lat + [self.ids[EOT]])

    def init_token_id(self) -> int:
        return first_token_id(self.tok, self.cfg.init_token)
