"""Training input pipeline (grain): records -> per-epoch shuffle -> per-host shard -> Example -> collated Batch.

One `grain.MapDataset` per epoch, a pure function of (records, seed, epoch, process):

    MapDataset.source(records)                      # random access, in memory
      .map_with_index((index, record))              # keep the global record index (for the per-example stage)
      .shuffle(seed=f(seed, epoch))                 # a different, deterministic permutation every epoch
      [:n - n % process_count][pi::process_count]   # per-host slice; every host gets the same number of rows
      .map(encode at example_stage(seed, epoch, index))
      .batch(batch_size, batch_fn=collate(..., batch_size=batch_size))

Partial batches: the last micro-batch of an epoch is *padded* with empty rows (mask all False, labels IGNORE) to
the fixed micro-batch size, so no example is dropped and B never changes (with several hosts only, up to
process_count - 1 examples per epoch are left out so that every host runs the same number of steps).
Padding policy: `collate` left-pads every row so that the latent blocks line up at `prefix_len` (rounded up to
`bucket`) and right-pads to a bucketed length: one compile per (B, prefix_len, T, n_latent) bucket; a batch
without thoughts is only right-padded (prefix_len 0).

`epoch_iterator` returns a grain `DatasetIterator`: `get_state()/set_state()` (or grain's Orbax
`grain.checkpoint.CheckpointSave/CheckpointRestore`) resume it exactly mid-epoch.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Callable, Sequence

import grain
import jax
import numpy as np

from latent_jax.layout import IGNORE, Batch, Example, round_up
from latent_jax.sharding import Placement  # noqa: F401 (re-exported: the trainer's device placement)

if TYPE_CHECKING:  # annotations only: the pipeline calls methods through the base class, never imports them
    from latent_jax.methods.base import Method


def pad_id_of(method: Method) -> int:
    """The pad token of the method's tokenizer (0 when it has none; pads are masked out anyway)."""
    pad = None if method.tok is None else method.tok.pad_id
    return 0 if pad is None else int(pad)


def micro_batches_per_epoch(n_records: int, batch_size: int, process_count: int | None = None) -> int:
    """Micro-batches per epoch on each host (the last one padded)."""
    pc = jax.process_count() if process_count is None else process_count
    return -(-(n_records // pc) // batch_size)


def epoch_dataset(method: Method, records: Sequence[dict[str, Any]], *, epoch: int, stage: int, seed: int,
                  batch_size: int, uniform_prob: float = 0.0, bucket: int = 32, max_len: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  stage_fn: Callable[[int], int] | None = None, length_groups: int = 0,
                  fixed_shapes: bool = False) -> grain.MapDataset:
    """The micro-batches (`Batch`) of one epoch for this host, as a random-access grain `MapDataset`.
    `stage_fn(micro)` gives the stage of the epoch's micro-batch `micro` (default: `stage` for all). The method's
    `example_stage` / `collate` hooks (`methods.base.Method`) choose each example's stage and lay out batches.
    `length_groups` G > 0: after the shuffle, each window of G micro-batches is sorted by record length, cut into
    micro-batches, and their order shuffled (`group_by_length`): rows of similar length share a batch, so the
    bucketed padding shrinks (40% -> 29% at the small symbolic rung, BUILD_NOTES.md), still a pure function of
    (seed, epoch). `fixed_shapes`: every batch with thoughts is re-padded (`pad_batch`) to the epoch's largest
    prefix and remainder at `stage` (bucketed): one compile of the latent loop per (stage, thoughts) instead of one
    per length bucket, which pays in a short run (such a compile costs ~10 s on 2 cores, a thoughtless one ~2 s, so
    thoughtless batches keep their buckets)."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    usable = len(records) - len(records) % pc
    if usable == 0:
        raise ValueError(f"{len(records)} training records cannot be split over {pc} processes")
    pad = pad_id_of(method)

    def encode(item: tuple[int, tuple[int, dict[str, Any]]]) -> Example:
        position, (index, record) = item
        base = stage if stage_fn is None else stage_fn(position // batch_size)
        return method.encode(record, method.example_stage(record, index, epoch, base, seed, uniform_prob))

    target = _epoch_shape(method, records, stage, bucket) if fixed_shapes else None

    def collate_fn(examples: Sequence[Example]) -> Batch:
        b = method.collate(examples, pad, bucket=bucket, max_len=max_len, batch_size=batch_size)
        if target is None or not b.n_latent:  # thoughtless batches keep their buckets (their compiles are cheap)
            return b
        P = max(b.prefix_len, target[0])
        rest = max(b.tokens.shape[1] - b.prefix_len - b.n_latent, target[1])
        if max_len is not None and P + b.n_latent + rest > max_len:
            return b
        return pad_batch(b, P, b.n_latent, P + b.n_latent + rest)

    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    ds = grain.MapDataset.source(list(records)).map_with_index(lambda i, r: (i, r))
    ds = ds.shuffle(seed=epoch_seed)
    if length_groups > 0:
        order = group_by_length([record_length(r) for _, r in ds], batch_size * pc, length_groups, epoch_seed)
        ds = grain.MapDataset.source([ds[i] for i in order])
    ds = ds[:usable][pi::pc].map_with_index(lambda p, item: (p, item))
    return ds.map(encode).batch(batch_size, drop_remainder=False, batch_fn=collate_fn)


def _epoch_shape(method: Method, records: Sequence[dict[str, Any]], stage: int, bucket: int) -> tuple[int, int]:
    """(prefix, remainder after the thoughts) that hold every record at `stage`, bucketed."""
    exs = [method.encode(r, stage) for r in records]
    return (round_up(max(e.latent_start for e in exs), bucket),
            round_up(max(len(e.tokens) - e.latent_start - e.n_latent for e in exs), bucket))


def record_length(record: dict[str, Any]) -> tuple[int, int]:
    """A cheap length proxy of a record for `group_by_length`: (words of the question, words of steps + answer).
    The question first: thought batches left-pad every row to the longest question (latent alignment)."""
    return len(record["question"].split()), sum(len(t.split()) for t in (*record.get("steps", ()),
                                                                         record.get("answer", "")))


def group_by_length(lengths: Sequence[Any], batch: int, groups: int, seed: int) -> list[int]:
    """A permutation of range(len(lengths)): windows of `groups * batch` consecutive items, each sorted by length
    and cut into batches of `batch`, the batches of a window in a random order (deterministic in `seed`). The last
    (partial) batch of the whole epoch stays last, so every batch but that one is full."""
    rng = np.random.default_rng([seed, 0x6E0])
    n, out = len(lengths), []
    window = max(groups, 1) * batch
    for lo in range(0, n, window):
        idx = sorted(range(lo, min(lo + window, n)), key=lambda i: lengths[i])
        chunks = [idx[j:j + batch] for j in range(0, len(idx), batch)]
        full = [c for c in chunks if len(c) == batch]
        rng.shuffle(full)
        out += [i for c in full for i in c] + [i for c in chunks if len(c) < batch for i in c]
    return out


def epoch_iterator(dataset: grain.MapDataset, prefetch: int = 4) -> grain.DatasetIterator:
    """A checkpointable iterator over an epoch's batches; one background thread encodes/collates ahead."""
    opts = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=max(prefetch, 1))
    return iter(dataset.to_iter_dataset(read_options=opts))


def pad_batch(batch: Batch, prefix_len: int, n_latent: int, length: int) -> Batch:
    """Re-pad a batch to a larger layout (prefix_len, n_latent, length); the loss is unchanged (extra thought
    columns of rows without latents hold their own tokens). Gives every host the same static shapes. A method's
    extra array laid out by position ([B, T, ...]) is padded with IGNORE (no target), `positions` with 0."""
    P, n, T = batch.prefix_len, batch.n_latent, batch.tokens.shape[1]
    if prefix_len < P or n_latent < n or length - prefix_len < T - P or length < prefix_len + n_latent + 1:
        raise ValueError(f"cannot shrink batch layout (P={P}, n={n}, T={T}) to ({prefix_len}, {n_latent}, {length})")
    widths = ((0, 0), (prefix_len - P, length - prefix_len - (T - P)))
    pad_tok = int(batch.tokens[~batch.mask][0]) if (~batch.mask).any() else 0
    return Batch(np.pad(batch.tokens, widths, constant_values=pad_tok), np.pad(batch.mask, widths),
                 np.pad(batch.labels, widths, constant_values=IGNORE), np.pad(batch.latent, widths),
                 prefix_len, n_latent, {k: np.pad(a, widths + ((0, 0),) * (a.ndim - 2),
                                               constant_values=0 if k == "positions" else IGNORE)
                                        if a.ndim >= 2 and a.shape[1] == T else a for k, a in batch.extra.items()})


def same_layout_across_hosts(batch: Batch) -> Batch:
    """Multi-process: pad every host's micro-batch to the common (prefix_len, n_latent, length). No-op on one."""
    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils

    local = np.array([batch.prefix_len, batch.n_latent, batch.tokens.shape[1] - batch.prefix_len])
    P, n, rest = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 3).max(0)
    return pad_batch(batch, int(P), int(n), int(P + rest))


def fingerprint(records: Sequence[dict[str, Any]]) -> str:
    """A short hash of the training records (a resumed run must see the same data)."""
    h = hashlib.sha1()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
