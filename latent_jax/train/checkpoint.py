"""Training checkpoints (Orbax) and model export.

A checkpoint step directory holds four items, written by one `ocp.CheckpointManager` (async, keep-N):

    params     ocp.args.StandardSave(nnx.State)          restored into the abstract params (shapes, dtypes, shardings)
    opt_state  ocp.args.StandardSave(optax state)         restored into the abstract optimizer state
    meta       ocp.args.JsonSave({step, epoch, stage, model_config, train_config, ...})
    data_iter  grain.checkpoint.CheckpointSave(iterator)  one JSON file per process (grain's own Orbax handler)
    aux        ocp.args.StandardSave(tree)                a method's training-only params (SIM-CoT's decoder), if any

A step directory only counts once Orbax has committed it, so a run killed (even `kill -9`) mid-save resumes from
the previous complete checkpoint. `check_compatible` refuses to resume a checkpoint written with another model,
method, data or training configuration, listing every differing key in one message.

Integrity: `save` stores a checksum of every array (`tree_checksums`: a position-weighted sum of the array's bits,
mod 2**32, computed on the devices, so sharded arrays never travel to the host) in the step's `meta`;
`restore_good` verifies them and, when the newest step cannot be read or does not match (a truncated or
overwritten file), falls back to the newest good step with a one-line warning naming the bad one. Steps found bad
are never called good (`latest_good_step`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """No checkpoint of a folder can be restored (every step unreadable or corrupt): bad input, like a bad file."""


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A uint32 checksum of an array's bits: each 32-bit word (16-bit floats widened) is mixed (murmur3's
    finaliser) and weighted by its position, then summed mod 2**32. One changed bit anywhere changes it."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint32)
    bits = x.dtype.itemsize * 8
    if bits == 64:
        x = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    elif bits in (8, 16, 32):
        x = jax.lax.bitcast_convert_type(x, getattr(jnp, f"uint{bits}")).astype(jnp.uint32)
    h = x.reshape(-1)
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    w = jnp.arange(h.shape[0], dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)
    return jnp.sum(h * w, dtype=jnp.uint32)


@jax.jit
def _tree_checksums(tree: Any) -> Any:
    return jax.tree.map(_leaf_checksum, tree)


def tree_checksums(tree: Any) -> dict[str, int]:
    """`{leaf path: checksum}` of a pytree of arrays (see `_leaf_checksum`), computed where the arrays live."""
    sums = jax.tree_util.tree_flatten_with_path(_tree_checksums(tree))[0]
    return {jax.tree_util.keystr(path): int(np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v))
            for path, v in sums}


def verify_checksums(saved: dict[str, int], tree: Any, item: str) -> None:
    """Raise ValueError naming the first leaf of `tree` whose checksum differs from the saved one."""
    now = tree_checksums(tree)
    if set(now) != set(saved):
        raise ValueError(f"{item}: saved checksums cover other leaves than the restored tree")
    bad = [k for k in now if now[k] != saved[k]]
    if bad:
        raise ValueError(f"{item}{bad[0]} does not match its checksum ({len(bad)} leaves differ)")


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target. `shardings` (same structure,
    e.g. `latent_jax.sharding.tree_shardings(mesh, tree)`) restores onto another mesh than the tree's own."""
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """Keep-N, async Orbax checkpoints of (params, opt_state, meta, data iterator) in `directory`."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.bad_steps: set[int] = set()  # steps `restore_good` found unreadable or corrupt

    def latest_step(self) -> int | None:
        """The newest committed step (None when there is none)."""
        return self.manager.latest_step()

    def latest_good_step(self) -> int | None:
        """The newest committed step not found bad (None when there is none)."""
        good = [s for s in self.all_steps() if s not in self.bad_steps]
        return max(good) if good else None

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params: Any, meta: dict[str, Any], opt_state: Any = None,
             data_iter: grain.DatasetIterator | None = None, aux: Any = None) -> None:
        """Start saving `step` (returns once the arrays are copied; the write finishes in the background). aux: a
        method's training-only params (`Method.init_aux_params`), an item of its own."""
        sums = {"params": tree_checksums(params)}
        if opt_state is not None:
            sums["opt_state"] = tree_checksums(opt_state)
        if aux is not None:
            sums["aux"] = tree_checksums(aux)
        meta = {**meta, "checksums": sums}
        items: dict[str, Any] = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if aux is not None:
            items["aux"] = ocp.args.StandardSave(aux)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_meta(self, step: int | None = None, with_checksums: bool = False) -> dict[str, Any]:
        """The JSON metadata of `step` (default: the latest), as saved (the array checksums `save` adds only when
        asked for)."""
        step = self._step(step)
        meta = dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        if not with_checksums:
            meta.pop("checksums", None)
        return meta

    def restore(self, step: int | None, abstract_params: Any, abstract_opt_state: Any = None,
                data_iter: grain.DatasetIterator | None = None, abstract_aux: Any = None) -> tuple[Any, Any]:
        """(params, opt_state) of `step`, restored into the given abstract trees; `data_iter`'s state is set in
        place when given. opt_state is None when not asked for. With `abstract_aux` (the saved `aux` item's
        target) params is the pair (params, aux)."""
        step = self._step(step)
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(abstract_params)}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        if abstract_aux is not None:
            items["aux"] = ocp.args.StandardRestore(abstract_aux)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        params = out["params"] if abstract_aux is None else (out["params"], out["aux"])
        return params, (out["opt_state"] if abstract_opt_state is not None else None)

    def restore_good(self, abstract_params: Any, abstract_opt_state: Any = None, step: int | None = None,
                     check_meta: Callable[[dict[str, Any], int], None] | None = None, abstract_aux: Any = None
                     ) -> tuple[int, dict[str, Any], Any, Any]:
        """(step, meta, params, opt_state) of the newest step that restores and matches its checksums (or of
        `step` only, when given); with `abstract_aux`, params is the pair (params, aux) (`restore`). A bad step is
        logged (one warning line naming it and why), remembered in `bad_steps`, and skipped; none good ->
        CheckpointError. `check_meta(meta, step)` runs on the first readable meta and may raise (e.g. a config
        mismatch is not a corruption: it is never skipped)."""
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no committed checkpoint")
        checked, reasons = False, []
        for s in steps:
            try:
                meta = self.restore_meta(s, with_checksums=True)
            except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many kinds)
                self._bad(s, e, reasons)
                continue
            if check_meta is not None and not checked:
                check_meta(meta, s)
                checked = True
            try:
                params, opt_state = self.restore(s, abstract_params, abstract_opt_state, abstract_aux=abstract_aux)
                sums = meta.pop("checksums", None) or {}  # checkpoints written before checksums: not verified
                if "params" in sums:
                    verify_checksums(sums["params"], params if abstract_aux is None else params[0], "params")
                if abstract_aux is not None:
                    verify_checksums(sums.get("aux", {}), params[1], "aux")
                if opt_state is not None and "opt_state" in sums:
                    verify_checksums(sums["opt_state"], opt_state, "opt_state")
            except Exception as e:  # noqa: BLE001
                self._bad(s, e, reasons)
                continue
            return s, meta, params, opt_state
        raise CheckpointError(f"no good checkpoint in {self.directory}: " + "; ".join(reasons)
                              + ". Start the run again from scratch (latent-jax train ... --fresh) or restore the"
                              " folder from a backup")

    def _bad(self, step: int, err: Exception, reasons: list[str]) -> None:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        reasons.append(f"step {step}: {type(err).__name__}: {why}")
        self.bad_steps.add(step)
        log.warning("checkpoint step %d in %s is unreadable or corrupt (%s: %s); trying an older step", step,
                    self.directory, type(err).__name__, why)

    def delete(self, step: int) -> None:
        self.manager.delete(step)

    def restore_iterator(self, step: int | None, data_iter: grain.DatasetIterator) -> None:
        """Set `data_iter`'s state to the one saved at `step` (in place)."""
        self.manager.restore(self._step(step),
                             args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(data_iter)))

    def wait(self) -> None:
        """Block until every pending async save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no committed checkpoint")
        return step


class MetricsLog:
    """`{output_dir}/metrics.jsonl`, one JSON object a line, written by process 0 only. Opening it for a run
    resumed at step `keep_up_to` drops the lines of later steps (they are re-run); None starts a new file."""

    def __init__(self, output_dir: str | os.PathLike | None, keep_up_to: int | None):
        self.path = pathlib.Path(output_dir) / "metrics.jsonl" if output_dir and jax.process_index() == 0 else None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if self.path.exists() and keep_up_to else []
        kept = [x for x in lines if x.strip() and json.loads(x)["step"] <= keep_up_to]
        self.path.write_text("".join(x + "\n" for x in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences `key: saved -> current` between two JSON-able config dicts."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, '<missing>')!r} (checkpoint) vs {current.get(k, '<missing>')!r} (now)"
            for k in keys if _jsonable(saved.get(k, "<missing>")) != _jsonable(current.get(k, "<missing>"))]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _model_defaults() -> dict[str, Any]:
    from latent_jax.config import ModelConfig

    return {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}


def check_compatible(meta: dict[str, Any], model_config: dict[str, Any], train_config: dict[str, Any],
                     where: str | os.PathLike = "checkpoint") -> None:
    """Raise ValueError when a checkpoint was written for another run: a different model config or trajectory
    (the train keys that change the math, the method and its config, the data). One message lists every
    difference."""
    saved_model = meta.get("model_config", {})
    if saved_model:  # a field added to ModelConfig later (e.g. the dropout rates) holds its default in older runs
        saved_model = {"scan_layers": False, **_model_defaults(), **saved_model}  # (runs before scan_layers: lists)
        check_layer_layout(saved_model, model_config, where)
    diff = [f"model.{d}" for d in config_diff(_no_layout(saved_model), _no_layout(model_config))]
    saved_train, now_train = dict(meta.get("train_config", {})), dict(train_config)
    saved_method, now_method = saved_train.pop("method_config", None), now_train.pop("method_config", None)
    if saved_method is not None and now_method is not None:
        diff += [f"method.{d}" for d in config_diff(saved_method, now_method)]
    diff += [("train." if k not in ("method", "n_records", "data", "process_count") else "") + d
             for k, d in ((d.split(":")[0], d) for d in config_diff(saved_train, now_train))]
    if diff:
        raise ValueError(f"refusing to resume from {where}: this run differs from the one that wrote it in "
                         f"{len(diff)} key(s): " + "; ".join(diff) + ". To start it again from scratch add --fresh"
                         " to `latent-jax train` (deletes the old checkpoints), or set another output_dir.")


def _no_layout(model: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model.items() if k != "scan_layers"}


def layer_layout(cfg) -> str:
    """How a `ModelConfig` lays out its decoder params, in words."""
    if cfg.scanned:
        return f"scanned (scan_layers={cfg.scan_layers}: {cfg.n_layers} blocks stacked, blocks.attn.wq [L, ...])"
    return f"a list (scan_layers={cfg.scan_layers}: {cfg.n_layers} blocks, blocks.0.attn.wq ...)"


def check_layer_layout(saved_model: dict[str, Any], model_config: dict[str, Any], where: Any) -> None:
    """ValueError naming both layouts when a checkpoint's decoder layout differs from this run's (scan_layers on
    one side, off on the other): orbax restores a tree only into its own structure."""
    from latent_jax.config import ModelConfig

    try:
        saved, now = ModelConfig.from_dict(saved_model), ModelConfig.from_dict(model_config)
    except (TypeError, ValueError):  # not a whole model config: the key-by-key diff reports it
        return
    if saved.scanned != now.scanned:
        raise ValueError(f"refusing to resume from {where}: its decoder layers are {layer_layout(saved)} but"
                         f" this run's are {layer_layout(now)}. Set model.overrides.scan_layers:"
                         f" {str(saved.scanned).lower()} to resume it, or export it (`latent-jax export`) and start"
                         " from the export: HF folders load into either layout.")


def export_hf(folder: str | os.PathLike, cfg, params) -> pathlib.Path:
    """Export trained params as a Hugging Face checkpoint folder (config.json + safetensors)."""
    from latent_jax.hf import save_hf

    return save_hf(folder, cfg, params)
