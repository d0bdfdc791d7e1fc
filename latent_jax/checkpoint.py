"""Training checkpoints (Orbax) and model export.

A checkpoint step directory holds four items, written by one `ocp.CheckpointManager` (async, keep-N):

    params     ocp.args.StandardSave(nnx.State)          restored into the abstract params (shapes, dtypes, shardings)
    opt_state  ocp.args.StandardSave(optax state)         restored into the abstract optimizer state
    meta       ocp.args.JsonSave({step, epoch, stage, model_config, train_config, ...})
    data_iter  grain.checkpoint.CheckpointSave(iterator)  one JSON file per process (grain's own Orbax handler)

A step directory only counts once Orbax has committed it, so a run killed (even `kill -9`) mid-save resumes from
the previous complete checkpoint. `check_compatible` refuses to resume a checkpoint written with another model
or training configuration.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


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

    def latest_step(self) -> int | None:
        """The newest committed step (None when there is none)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params: Any, meta: dict[str, Any], opt_state: Any = None,
             data_iter: grain.DatasetIterator | None = None) -> None:
        """Start saving `step` (returns once the arrays are copied; the write finishes in the background)."""
        items: dict[str, Any] = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of `step` (default: the latest)."""
        step = self._step(step)
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, step: int | None, abstract_params: Any, abstract_opt_state: Any = None,
                data_iter: grain.DatasetIterator | None = None) -> tuple[Any, Any]:
        """(params, opt_state) of `step`, restored into the given abstract trees; `data_iter`'s state is set in
        place when given. opt_state is None when not asked for."""
        step = self._step(step)
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(abstract_params)}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["params"], (out["opt_state"] if abstract_opt_state is not None else None)

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


def check_compatible(meta: dict[str, Any], model_config: dict[str, Any], train_config: dict[str, Any],
                     where: str | os.PathLike = "checkpoint") -> None:
    """Raise ValueError when a checkpoint was written for another model or (trajectory-relevant) train config."""
    for name, saved, now in (("model", meta.get("model_config", {}), model_config),
                             ("training", meta.get("train_config", {}), train_config)):
        diff = config_diff(saved, now)
        if diff:
            raise ValueError(f"refusing to resume from {where}: it was written with a different {name} config ("
                             + "; ".join(diff) + "). Use another output_dir, or resume=False after removing it.")


def export_hf(folder: str | os.PathLike, cfg, params) -> pathlib.Path:
    """Export trained params as a Hugging Face checkpoint folder (config.json + safetensors)."""
    from latent_jax.hf import save_hf

    return save_hf(folder, cfg, params)
