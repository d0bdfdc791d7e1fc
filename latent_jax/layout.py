"""The shared types of every method: the batch layout, the generation prompt and the token loss.

Below the methods, the latent loop, evaluation and the data pipeline; imports nothing of theirs (only numpy, jax,
optax), so no import runs back up the layering.

An `Example` is one tokenized record at one curriculum stage: tokens, labels (HF convention: aligned with tokens,
-100 = ignored; the loss shifts), and a block of `n_latent` latent slots starting at `latent_start`. A non-zero
`position_shift` skips that many positions after the latent block (iCoT-SI's `keep_position`: the tokens after the
removed CoT keep their original position ids); `collate` then writes explicit `positions` [B, T] into the batch.

`collate` lays a batch out for the compiled latent loop: rows are left-padded so that every row's first latent
slot sits at the same column `prefix_len` (rounded up to `bucket`), and right-padded to a bucketed total length.
`prefix_len` and `n_latent` (the batch max) are static: one compile per (B, prefix_len, T, n_latent). A batch
without thoughts (CoT, No-CoT, iCoT, stage 0 of the curriculum) needs no alignment: it is only right-padded, with
prefix_len 0, which saves the alignment padding and keeps one compile per bucketed length.

A `Prompt` is a generation input (prefix, n thoughts, suffix); `layout_prompts` left-pads a batch of them for the
compiled latent generation. `token_loss` is the shifted cross-entropy every loss reduces with.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np
import optax

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: list[int]
    labels: list[int]
    latent_start: int  # index of the first latent slot (== len(prefix) when n_latent == 0)
    n_latent: int = 0
    # per group of thoughts_per_step thought slots, the token ids it must decode to (SIM-CoT's step decoder; () =
    # no target; unused by other methods)
    thought_targets: tuple[tuple[int, ...], ...] = ()
    # positions skipped after the latent block: token t >= latent_start + n_latent sits at position t + shift
    position_shift: int = 0

    def positions(self) -> np.ndarray:
        """Position ids of the tokens: 0, 1, ..., with `position_shift` added from the end of the latent block."""
        t = np.arange(len(self.tokens), dtype=np.int32)
        return t + self.position_shift * (t >= self.latent_start + self.n_latent)

    def __post_init__(self):
        if len(self.tokens) != len(self.labels):
            raise ValueError(f"tokens ({len(self.tokens)}) and labels ({len(self.labels)}) differ in length")
        if not 0 < self.latent_start <= len(self.tokens) - self.n_latent:
            raise ValueError(f"latent block [{self.latent_start}, +{self.n_latent}) does not fit in"
                             f" {len(self.tokens)} tokens after a non-empty prefix")
        if self.position_shift < 0:
            raise ValueError(f"position_shift must be >= 0, got {self.position_shift}")


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
    unless `align` (a method that places its own thoughts after the aligned prefix, e.g. LT-Tuning). When an
    example has a `position_shift`, the batch carries explicit `positions` [B, T] (int32; 0 on padding)."""
    if not examples:
        raise ValueError("empty batch")
    n_lat = max(e.n_latent for e in examples)
    starts = [e.latent_start if n_lat or align else 0 for e in examples]
    P = round_up(max(starts), bucket)
    rest = max(len(e.tokens) - s - n_lat for e, s in zip(examples, starts))
    T = round_up(P + n_lat + max(rest, 1), bucket)
    if max_len is not None and max(len(e.tokens) + e.position_shift for e in examples) > max_len:
        raise ValueError(f"an example has {max(len(e.tokens) + e.position_shift for e in examples)} positions"
                         f" (tokens + position_shift), more than the model's {max_len} (shorten the data or use a"
                         f" longer-context model)")
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
    shifted = any(e.position_shift for e in examples)
    positions = np.zeros((B, T), np.int32) if shifted else None
    for i, (e, start) in enumerate(zip(examples, starts)):
        off = P - start
        n = len(e.tokens)
        tokens[i, off:off + n] = e.tokens
        labels[i, off:off + n] = e.labels
        mask[i, off:off + n] = True
        latent[i, P:P + e.n_latent] = True
        if shifted:
            positions[i, off:off + n] = e.positions()
    return Batch(tokens, mask, labels, latent, P, n_lat, {"positions": positions} if shifted else {})


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
    position_shift: int = 0  # positions skipped before the suffix (as `Example.position_shift`)


def layout_prompts(prompts: Sequence[Prompt], pad_id: int, bucket: int = 16, batch_size: int | None = None):
    """Arrays for `latent_generate_padded`: left-padded prefixes, right-aligned thought masks, suffixes."""
    suffix_lens = {len(p.suffix) for p in prompts}
    if len(suffix_lens) != 1:
        raise ValueError(f"prompts in one batch need equal suffix lengths, got {sorted(suffix_lens)}")
    B = batch_size or len(prompts)
    P = round_up(max(len(p.prefix) for p in prompts), bucket)
    n = max(p.n_latent for p in prompts)
    S = suffix_lens.pop()
    prefix = np.full((B, P), pad_id, np.int32)
    mask = np.zeros((B, P), bool)
    think = np.zeros((B, n), bool)
    suffix = np.full((B, S), pad_id, np.int32)
    for i, p in enumerate(prompts):
        prefix[i, P - len(p.prefix):] = p.prefix
        mask[i, P - len(p.prefix):] = True
        think[i, n - p.n_latent:] = True
        suffix[i] = p.suffix
    mask[len(prompts):, -1] = True  # filler rows: one valid token so nothing is fully masked
    return prefix, mask, think, suffix


def token_loss(logits_BxTxV, labels_BxT):
    """Shifted cross-entropy: logits at t predict labels at t+1. Returns (sum of losses, #tokens, #correct)."""
    logits, labels = logits_BxTxV[:, :-1], labels_BxT[:, 1:]
    valid = labels != IGNORE
    safe = jnp.where(valid, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    correct = (jnp.argmax(logits, axis=-1) == safe) & valid
    return jnp.sum(ce * valid), jnp.sum(valid), jnp.sum(correct)
