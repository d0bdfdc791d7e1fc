"""The Method interface and the batch layout shared by every method.

An `Example` is one tokenized record at one curriculum stage: tokens, labels (HF convention: aligned with tokens,
-100 = ignored; the loss shifts), and a block of `n_latent` latent slots starting at `latent_start`.

`collate` lays a batch out for the compiled latent loop: rows are left-padded so that every row's first latent
slot sits at the same column `prefix_len` (rounded up to `bucket`), and right-padded to a bucketed total length.
`prefix_len` and `n_latent` (the batch max) are static: one compile per (B, prefix_len, T, n_latent). A batch
without thoughts (CoT, No-CoT, iCoT, stage 0 of the curriculum) needs no alignment: it is only right-padded, with
prefix_len 0, which saves the alignment padding and keeps one compile per bucketed length.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: list[int]
    labels: list[int]
    latent_start: int  # index of the first latent slot (== len(prefix) when n_latent == 0)
    n_latent: int = 0

    def __post_init__(self):
        if len(self.tokens) != len(self.labels):
            raise ValueError(f"tokens ({len(self.tokens)}) and labels ({len(self.labels)}) differ in length")
        if not 0 < self.latent_start <= len(self.tokens) - self.n_latent:
            raise ValueError(f"latent block [{self.latent_start}, +{self.n_latent}) does not fit in"
                             f" {len(self.tokens)} tokens after a non-empty prefix")


@dataclasses.dataclass(frozen=True)
class Batch:
    """Arrays [B, T] (numpy) + the static split. `latent_BxT` marks slots fed with the previous hidden state."""

    tokens: np.ndarray  # int32
    mask: np.ndarray  # bool, real tokens
    labels: np.ndarray  # int32, IGNORE where no loss
    latent: np.ndarray  # bool
    prefix_len: int
    n_latent: int
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # method-specific arrays [B, ...]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "mask": self.mask, "labels": self.labels, "latent": self.latent, **self.extra}

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def round_up(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def collate(examples: Sequence[Example], pad_id: int, bucket: int = 32, max_len: int | None = None,
            batch_size: int | None = None, align: bool = False) -> Batch:
    """Align latent starts, pad to buckets. `batch_size` pads with empty rows (mask all False) for a fixed B.
    A batch without thoughts is only right-padded (prefix_len 0: no alignment padding, one compile per length)
    unless `align` (a method that places its own thoughts after the aligned prefix, e.g. LT-Tuning)."""
    if not examples:
        raise ValueError("empty batch")
    n_lat = max(e.n_latent for e in examples)
    starts = [e.latent_start if n_lat or align else 0 for e in examples]
    P = round_up(max(starts), bucket)
    rest = max(len(e.tokens) - s - n_lat for e, s in zip(examples, starts))
    T = round_up(P + n_lat + max(rest, 1), bucket)
    if max_len is not None and max(len(e.tokens) for e in examples) > max_len:
        raise ValueError(f"an example has {max(len(e.tokens) for e in examples)} tokens, more than the model's"
                         f" {max_len} positions (shorten the data or use a longer-context model)")
    if max_len is not None and T > max_len:  # padding alone overflows: shrink the buckets to exact sizes
        P = max(starts)
        T = P + n_lat + max(rest, 1)
        if T > max_len:
            raise ValueError(f"aligned batch needs {T} positions > max_positions {max_len}; use smaller batches")
    B = batch_size or len(examples)
    if B < len(examples):
        raise ValueError(f"batch_size {B} < {len(examples)} examples")
    tokens = np.full((B, T), pad_id, np.int32)
    labels = np.full((B, T), IGNORE, np.int32)
    mask = np.zeros((B, T), bool)
    latent = np.zeros((B, T), bool)
    for i, (e, start) in enumerate(zip(examples, starts)):
        off = P - start
        n = len(e.tokens)
        tokens[i, off:off + n] = e.tokens
        labels[i, off:off + n] = e.labels
        mask[i, off:off + n] = True
        latent[i, P:P + e.n_latent] = True
    return Batch(tokens, mask, labels, latent, P, n_lat)


def first_token_id(tok, text: str, what: str = "init_token") -> int:
    """The first token of `text` (how a method's new special-token rows are initialized: Coconut's "<<")."""
    ids = tok.encode(text)
    if not ids:
        raise ValueError(f"{what} {text!r} encodes to no token")
    return ids[0]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Generation input: prefix tokens, then n_latent thoughts, then suffix tokens, then free decoding."""

    prefix: list[int]
    n_latent: int = 0
    suffix: list[int] = dataclasses.field(default_factory=list)


class Method(Protocol):
    """A latent-reasoning method: data layout per curriculum stage + generation prompt.

    Required: `name`, `tok` (its Tokenizer), `special_tokens`, `num_stages`, `encode`, `prompt`, `init_token_id`.
    Optional hooks (looked up with getattr; the default in brackets):

      schedule(epoch, step, steps_per_epoch) -> int      stage of optimizer step `step` (0-based, within the
                                                          epoch) [TrainConfig.stage(epoch): the Coconut curriculum]
      example_stage(record, index, epoch, stage, seed, uniform_prob) -> int
                                                          per-example stage, deterministic in its arguments
                                                          [data.pipeline.example_stage: uniform_prob mixing]
      collate(examples, pad_id, bucket, max_len, batch_size) -> Batch            [methods.base.collate]
      loss_for_stage(stage) -> loss_fn(params, graphdef, batch, prefix_len, n_latent) -> (loss, aux)
                                                          pure; aux has loss_sum, n_tokens, n_correct; the same
                                                          (hashable) object for the same stage: the jitted train
                                                          step is cached on it             [latent.loss_fn]
      on_stage_start(stage, graphdef, params, records)    before an epoch whose first stage differs from the
                                                          previous step's (rebuild data from the current model)
      get_state() -> JSON / set_state(state)              method state saved in / restored from checkpoints
      prepare_data(train_records, output_dir)             once before training (fit a tokenizer of latents, ...)
      generate(graphdef, params, prompts, sampling, eos_id, pad_id, batch_size) -> list[list[int]]
                                                          evaluation decoding          [evaluate.generate_prompts]
    """

    name: str
    special_tokens: tuple[str, ...]

    def num_stages(self) -> int:
        """Number of distinct curriculum stages (1 for methods without a curriculum)."""

    def encode(self, record: dict[str, Any], stage: int) -> Example:
        """Tokenize a record for training at `stage` (token ids from the method's tokenizer)."""

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        """The generation prompt for evaluation at `stage`."""
