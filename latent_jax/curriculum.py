"""The curriculum: how a method's stage moves during training. It belongs to the method (`method.curriculum`,
built from the curriculum keys of the config's method section), once: the trainer asks the method for the stage
of each step (`Method.stage_at`) and reads the reset policy and the stage mixing from here.

    method:
      name: coconut
      max_latent_stage: 6          # the method's own field: the last latent stage
      epochs_per_stage: 5          # the curriculum's keys (CURRICULUM_KEYS), beside the method's own
      uniform_prob: 0.0
      reset_optimizer: stage

Stage of epoch e (the Coconut schedule): min(e // epochs_per_stage, max_latent_stage + 1); the last value is the
final stage (every written step removed). A method with a schedule of its own (iCoT-SI's removal count,
LT-Tuning's three stages) overrides `Method.schedule` and uses `epochs_per_stage` as it documents.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from latent_jax.config import check_rules, coerce_numbers

RESETS = ("stage", "epoch", "never")


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """epochs_per_stage: epochs each stage lasts; uniform_prob: the chance that an example is encoded at a uniformly
    drawn stage 0..len(steps) instead of the scheduled one (the reference's mixing); reset_optimizer: fresh AdamW
    moments where the stage changes ("stage", only for a method with stages), at every epoch ("epoch", the
    reference's `reset_optimizer: True`), or "never"."""

    epochs_per_stage: int = 1
    uniform_prob: float = 0.0
    reset_optimizer: str = "stage"

    def __post_init__(self):
        coerce_numbers(self, "method", strict_types=True)
        check_rules(self, "method", [
            ("epochs_per_stage", isinstance(self.epochs_per_stage, int) and self.epochs_per_stage >= 1,
             "an integer >= 1"),
            ("uniform_prob", isinstance(self.uniform_prob, float) and 0 <= self.uniform_prob <= 1, "in [0, 1]"),
            ("reset_optimizer", self.reset_optimizer in RESETS, f"one of {RESETS}")])

    @classmethod
    def split(cls, options: dict[str, Any]) -> tuple["Curriculum", dict[str, Any]]:
        """(the curriculum, the method's own options) from a method section's options (without `name`)."""
        cur = {k: v for k, v in options.items() if k in CURRICULUM_KEYS}
        try:
            return cls(**cur), {k: v for k, v in options.items() if k not in CURRICULUM_KEYS}
        except TypeError as e:
            raise ValueError(f"bad curriculum options {cur}: {e}") from None

    def stage(self, epoch: int, max_latent_stage: int | None) -> int:
        """The Coconut schedule: epoch // epochs_per_stage, capped at max_latent_stage + 1 = the final stage (the
        reference treats every stage past max_latent_stage that way); None counts as 0."""
        return min(epoch // self.epochs_per_stage, (max_latent_stage or 0) + 1)


CURRICULUM_KEYS = tuple(f.name for f in dataclasses.fields(Curriculum))  # reserved in every method section
# once TrainConfig fields (`train.epochs_per_stage`, ...), the method's now (`method.*`)
MOVED_TO_METHOD = (*CURRICULUM_KEYS, "max_latent_stage")
