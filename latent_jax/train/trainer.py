"""Curriculum trainer (Coconut schedule) with AdamW, token-weighted gradient accumulation and exact resume.

Per step: the method's stage (`Method.stage_at`: its own schedule, else its curriculum's
min(e // epochs_per_stage, max_latent_stage + 1) at epoch e, `latent_jax.curriculum`); each example uses that stage,
or with probability `method.curriculum.uniform_prob` a random one. One optimizer step = grad_accum
micro-batches; gradients are sums of per-token losses, divided by the step's total token count: identical to one
big batch's mean token loss. Optimizer state is reset (fresh AdamW moments and count) when the stage changes
(`method.curriculum.reset_optimizer`; only for a method with a curriculum or a schedule), the learning-rate
schedule follows the global step. Keep-best: the best evaluated epoch (ties: the later; only epochs the method's
`eligible_for_best(stage)` accepts). Checkpoints: `latent_jax.train.checkpoint`. `train` runs three phases of a `_Loop`:
`restore` (newest good checkpoint, kept-best params), then per epoch `epoch` (its optimizer steps through
`train_step`, checkpoints) and `evaluate` (history entry, keep-best); a `_Progress` is what a checkpoint's metadata
restores.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from latent_jax.config import REMAT, check_keys, check_rules, coerce_numbers
from latent_jax.curriculum import MOVED_TO_METHOD, Curriculum
from latent_jax.models import get_config
from latent_jax.sharding import MeshConfig, Placement
from latent_jax.train.checkpoint import Checkpointer, CheckpointError, MetricsLog, abstract_like, check_compatible
from latent_jax.train.pipeline import (epoch_dataset, epoch_iterator, fingerprint, micro_batches_per_epoch,
                                       same_layout_across_hosts)
from latent_jax.train.runlock import RunLock
from latent_jax.train.step import (TrainState, join_aux, make_optimizer, make_steps,  # noqa: F401 (re-exported)
                                   train_step)

log = logging.getLogger(__name__)
SCHEDULES = ("constant", "cosine", "linear")
# their values in a run's identity when the method has no curriculum of its own (what older checkpoints hold)
CURRICULUM_DEFAULTS = {**dataclasses.asdict(Curriculum()), "max_latent_stage": 0}
NORMALIZATIONS = ("tokens", "micro_batch")
# Fields that may change when a run is resumed (they do not change the training trajectory).
RESUMABLE = ("log_every", "checkpoint_every_steps", "keep_checkpoints", "output_dir", "eval_every_epoch", "progress",
             "mesh", "remat", "fixed_shapes")  # fixed_shapes: padding only (`pad_batch` keeps the loss)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters. Effective batch = batch_size (micro-batch per process) * grad_accum *
    process_count. output_dir None: no checkpoints / metrics file. max_len None: the model's max_positions."""

    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float | None = None
    seed: int = 0
    bucket: int = 32
    length_groups: int = 0  # > 0: sort each window of this many micro-batches by length (less padding); 0: off
    fixed_shapes: bool = False  # pad every batch of an epoch to one shape (one compile per stage; short runs)
    max_len: int | None = None
    log_every: int = 10
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int = 3
    output_dir: str | None = None
    eval_every_epoch: bool = True
    progress: bool = True
    mesh: dict | None = None  # MeshConfig keys (latent_jax.sharding), e.g. {ici_fsdp: -1}; None: data parallel
    remat: str | None = None  # "none" | "full" | "dots": overrides the model config's remat; None keeps it
    # "tokens": the step's gradient is that of (sum of token losses) / (tokens of all its micro-batches), as one big
    # batch; "micro_batch": the mean of each micro-batch's mean token loss (the reference's accumulation: loss /
    # gradient_accumulation_steps per micro-batch; its DDP average of per-GPU means is this with micro-batch = the
    # per-GPU batch and grad_accum = GPUs x accumulation steps)
    loss_normalization: str = "tokens"

    def __post_init__(self):
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", str(self.output_dir))
        if self.mesh is not None:
            MeshConfig.from_dict(dict(self.mesh))  # unknown keys / bad sizes fail here
        if self.remat is not None and self.remat not in REMAT:
            raise ValueError(f"TrainConfig.remat={self.remat!r} is invalid: must be None or one of {REMAT}")
        coerce_numbers(self, "TrainConfig")
        check_rules(self, "TrainConfig", [
            *((n, getattr(self, n) >= 1, ">= 1") for n in ("epochs", "batch_size", "grad_accum", "bucket",
                                                           "log_every", "keep_checkpoints")),
            *((n, getattr(self, n) >= 0, ">= 0") for n in ("weight_decay", "warmup_steps", "length_groups")),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "finite and > 0"),
            ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
            ("loss_normalization", self.loss_normalization in NORMALIZATIONS, f"one of {NORMALIZATIONS}"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "None or > 0"),
            ("max_len", self.max_len is None or self.max_len >= 2, "None or >= 2"),
            ("checkpoint_every_steps", self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
             "None or >= 1")])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict; unknown keys are an error that lists the valid ones (a curriculum key names its new
        place, the method section)."""
        moved = sorted(set(d) & set(MOVED_TO_METHOD))
        if moved:
            raise ValueError(f"train.{moved[0]} is the method's now: set method.{moved[0]} (the curriculum belongs to"
                             " the method, latent_jax.curriculum)")
        check_keys(cls, d, "train config key(s)")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warmup, then constant / cosine / linear to 0."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        frac = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        return self.lr * (0.5 * (1 + math.cos(math.pi * frac)) if self.schedule == "cosine" else 1 - frac)


@dataclasses.dataclass
class TrainResult:
    """What `train` returns; params / opt_state are the final state (as placed on the devices)."""
    params: Any
    best_params: Any | None  # params of the epoch with the best eval accuracy (None without eval_fn)
    best_accuracy: float | None
    history: list[dict[str, Any]]  # one dict per epoch: epoch, stage, step, train_loss, scalar eval metrics
    step: int = 0  # optimizer steps done
    opt_state: Any = None
    wall_before: float = 0.0  # wall seconds of earlier processes of a resumed run (up to their last checkpoint)


@dataclasses.dataclass
class _Progress:
    """Where a run stands, and its bookkeeping: what a checkpoint's metadata restores besides the arrays."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro: int = 0  # micro-batches of `epoch` done
    history: list = dataclasses.field(default_factory=list)
    best_acc: float | None = None
    epoch_loss: float = 0.0
    epoch_tokens: int = 0
    last_stage: int | None = None
    elapsed: float = 0.0  # train seconds of earlier processes of a resumed run
    wall_before: float = 0.0  # their wall seconds

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "_Progress":
        elapsed = meta.get("train_seconds", 0.0)
        return cls(meta["step"], meta["epoch"], meta["micro"], meta["history"], meta["best_accuracy"],
                   meta["epoch_loss"], meta["epoch_tokens"], meta.get("last_stage"), elapsed,
                   meta.get("wall_seconds", elapsed))


class _Loop:
    """One `train` call: the run's fixed context, its arrays and its `_Progress`, and the three phases `train`
    runs: `restore` (newest good checkpoint, kept-best params), `epoch` (its optimizer steps, with checkpoints),
    `evaluate` (the epoch's eval, keep-best)."""

    def __init__(self, method, records, graphdef, params, cfg: TrainConfig, eval_fn, on_step, wall_start):
        self.method, self.records, self.graphdef, self.cfg = method, records, graphdef, cfg
        self.eval_fn, self.on_step, self.wall_start = eval_fn, on_step, wall_start
        self.model_cfg = get_config(graphdef, params)
        self.max_len = cfg.max_len or self.model_cfg.max_positions
        if self.max_len > self.model_cfg.max_positions:
            raise ValueError(f"max_len {self.max_len} > the model's max_positions {self.model_cfg.max_positions}")
        pc, self.main = jax.process_count(), jax.process_index() == 0
        self.n_micro = micro_batches_per_epoch(len(records), cfg.batch_size)
        self.steps_per_epoch = -(-self.n_micro // cfg.grad_accum)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.place = Placement(cfg.batch_size * pc, cfg.mesh)
        self.tx, self.rng0 = make_optimizer(cfg.weight_decay, cfg.grad_clip), jax.random.PRNGKey(cfg.seed)
        # "stage" resets only where the stage means something: a curriculum (num_stages > 1) or the method's own
        # schedule (iCoT-SI removal counts); CoT / No-CoT / Pause keep their AdamW moments across epochs
        self.staged = method.schedule(0, 0, self.steps_per_epoch) is not None or method.num_stages() > 1
        self.params = self.place.tree(params)
        aux = method.init_aux_params(graphdef, params, cfg.seed)  # training-only params (SIM-CoT's decoder)
        self.aux = None if aux is None else self.place.tree(aux)
        self.opt_state = self.place.tree(self.tx.init(self.trained))
        self.acc = self.place.tree(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), self.trained))
        self.trajectory = {k: v for k, v in cfg.to_dict().items()
                           if k not in RESUMABLE and not (k == "epochs" and cfg.schedule == "constant")}
        self.trajectory.update(method=method.name, n_records=len(records), data=fingerprint(records),
                               process_count=pc, max_latent_stage=method.max_latent_stage or 0,
                               **dataclasses.asdict(method.curriculum))  # flat, as when they were TrainConfig's
        if dataclasses.is_dataclass(method.cfg):  # c_thought, max_latent_stage, ...: the run's identity
            self.trajectory["method_config"] = dataclasses.asdict(method.cfg)
        self.progress, self.best_params, self.restored = _Progress(), None, None
        self.ckpt = self.best_ckpt = None
        self.t_start = time.perf_counter()

    @property
    def trained(self) -> Any:
        """What the optimizer trains: the params, with the method's training-only params (`join_aux`)."""
        return join_aux(self.params, self.aux)

    def stage_at(self, epoch: int, micro: int) -> int:
        """The stage of micro-batch `micro` of `epoch` (`Method.stage_at`: its schedule, else its curriculum)."""
        return self.method.stage_at(epoch, micro // self.cfg.grad_accum, self.steps_per_epoch)

    # ---- restore ------------------------------------------------------------------------------------------------
    def restore(self, resume: bool) -> None:
        """Continue from the newest good checkpoint (a different run is refused), then the kept-best params."""
        ckpt, best_ckpt = self.ckpt, self.best_ckpt
        self.restored = ckpt.latest_step() if ckpt else None
        if self.restored is not None:
            if not resume:
                raise ValueError(f"{ckpt.directory} holds checkpoints (latest step {self.restored}); pass"
                                 " resume=True to continue that run or use another output_dir")

            def check(meta, s):  # a different run is refused, never skipped as "corrupt"
                check_compatible(meta, self.model_cfg.to_dict(),
                                 comparable_trajectory(self.trajectory, meta.get("train_config", {})),
                                 ckpt.directory / str(s))

            self.restored, meta, restored, self.opt_state = ckpt.restore_good(
                abstract_like(self.params), abstract_like(self.opt_state), check_meta=check,
                abstract_aux=None if self.aux is None else abstract_like(self.aux))
            self.params, self.aux = (restored, None) if self.aux is None else restored
            for s in ckpt.all_steps():  # corrupt steps newer than the one resumed are re-run (and re-saved)
                if s > self.restored:
                    ckpt.delete(s)
            self.progress = _Progress.from_meta(meta)
            if meta.get("method_state") is not None:
                self.method.set_state(meta["method_state"])
        if best_ckpt is not None:
            for s in best_ckpt.all_steps():  # a "best" newer than the resumed step will be recomputed
                if s > self.progress.step or self.restored is None:
                    best_ckpt.delete(s)
            if self.progress.best_acc is not None:
                try:
                    self.best_params = best_ckpt.restore_good(abstract_like(self.params))[2]
                except (CheckpointError, FileNotFoundError) as e:  # keep-best restarts from the next evaluation
                    log.warning("the kept-best params cannot be restored (%s); keep-best starts again", e)
                    self.progress.best_acc = None

    def save(self, data_iter) -> None:
        p, now = self.progress, time.perf_counter()
        meta = dict(step=p.step, epoch=p.epoch, micro=p.micro, stage=self.stage_at(p.epoch, p.micro),
                    last_stage=p.last_stage, method_state=self.method.get_state(), history=p.history,
                    best_accuracy=p.best_acc, epoch_loss=p.epoch_loss, epoch_tokens=p.epoch_tokens,
                    seed=self.cfg.seed, train_seconds=p.elapsed + now - self.t_start,
                    wall_seconds=p.wall_before + now - self.wall_start, model_config=self.model_cfg.to_dict(),
                    train_config=self.trajectory, train_config_full=self.cfg.to_dict())
        self.ckpt.save(p.step, self.params, meta, self.opt_state, data_iter, aux=self.aux)

    # ---- one epoch ----------------------------------------------------------------------------------------------
    def epoch(self, metrics: MetricsLog, bar) -> int:
        """The rest of the current epoch's optimizer steps (from mid-epoch after a resume). Returns its last stage."""
        cfg, p, method, place = self.cfg, self.progress, self.method, self.place
        cur = method.curriculum
        if p.micro == 0 and self.stage_at(p.epoch, 0) != p.last_stage:  # e.g. LT-Tuning rebuilds its data
            method.on_stage_start(self.stage_at(p.epoch, 0), self.graphdef, self.params, self.records)
        it = epoch_iterator(epoch_dataset(method, self.records, epoch=p.epoch,
                                          stage=cur.stage(p.epoch, method.max_latent_stage), seed=cfg.seed,
                                          batch_size=cfg.batch_size, uniform_prob=cur.uniform_prob,
                                          bucket=cfg.bucket, max_len=self.max_len,
                                          stage_fn=lambda m, e=p.epoch: self.stage_at(e, m),
                                          length_groups=cfg.length_groups, fixed_shapes=cfg.fixed_shapes))
        if self.restored is not None:  # first epoch after a resume: the iterator continues mid-epoch
            if p.micro:
                self.ckpt.restore_iterator(self.restored, it)
            self.restored = None
        if p.micro == 0 and p.epoch > 0 and cur.reset_optimizer == "epoch":
            self.opt_state = place.tree(self.tx.init(self.trained))
        stage = p.last_stage
        while p.micro < self.n_micro:
            t0, stage = time.perf_counter(), self.stage_at(p.epoch, p.micro)
            if self.staged and p.last_stage is not None and stage != p.last_stage and cur.reset_optimizer == "stage":
                self.opt_state = place.tree(self.tx.init(self.trained))  # the stage (curriculum / count) changed
            p.last_stage = stage
            state = TrainState(self.trained, self.opt_state, self.acc, jnp.int32(p.step),
                               jax.random.fold_in(self.rng0, p.step), self.graphdef, cfg.lr, cfg.weight_decay,
                               cfg.grad_clip)
            k = min(cfg.grad_accum, self.n_micro - p.micro)  # micro-batches collated lazily (overlaps dispatch)
            lr = cfg.lr_at(p.step, self.total_steps)
            state, m = train_step(state, (same_layout_across_hosts(next(it)) for _ in range(k)), lr=lr,
                                  loss=method.loss_for_stage(stage), normalization=cfg.loss_normalization,
                                  mesh=place.mesh, remat=cfg.remat, place=place.batch)
            self.opt_state, self.acc, p.micro = state.opt_state, state.grad_acc, p.micro + k
            self.params, self.aux = (state.params, None) if self.aux is None else \
                (state.params["model"], state.params["aux"])
            loss_sum, n_tok, loss = m["loss_sum"], m["n_tokens"], m["loss"]
            if not math.isfinite(loss):  # a non-finite gradient left params and optimizer state unchanged
                _fail(self.ckpt, f"loss is {loss}", p.step, p.epoch, stage)
            if not math.isfinite(m["grad_norm"]):
                _fail(self.ckpt, f"gradient norm is {m['grad_norm']}", p.step, p.epoch, stage)
            p.step, p.epoch_loss, p.epoch_tokens = p.step + 1, p.epoch_loss + loss_sum, p.epoch_tokens + n_tok
            dt = time.perf_counter() - t0
            rec = dict(step=p.step, epoch=p.epoch, stage=stage, loss=loss, tokens=n_tok,
                       tok_per_s=m["n_input"] / dt, lr=lr, grad_norm=m["grad_norm"])
            metrics.write(rec)
            bar.update(1)
            if p.step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tok_per_s']:.0f}", stage=stage)
                if self.main and not cfg.progress:
                    log.info("step %d epoch %d stage %d loss %.4f tok/s %.0f", *list(rec.values())[:4],
                             rec["tok_per_s"])
            if (self.ckpt and p.micro < self.n_micro and cfg.checkpoint_every_steps
                    and p.step % cfg.checkpoint_every_steps == 0):
                self.save(it)
            if self.on_step is not None:
                self.on_step(rec)
        it.close()
        return stage

    # ---- evaluate and keep the best -----------------------------------------------------------------------------
    def evaluate(self, stage: int, metrics: MetricsLog) -> dict[str, Any]:
        """The epoch's history entry, with the eval's scalars when it evaluates; keeps the best params."""
        cfg, p = self.cfg, self.progress
        entry = dict(epoch=p.epoch, stage=stage, step=p.step, train_loss=p.epoch_loss / max(p.epoch_tokens, 1),
                     train_seconds=p.elapsed + time.perf_counter() - self.t_start)  # cumulative, across resumes
        if self.eval_fn is None or not (cfg.eval_every_epoch or p.epoch == cfg.epochs - 1):
            return entry
        result = self.eval_fn(self.graphdef, self.params, stage)
        if "accuracy" not in result:
            raise ValueError(f"eval_fn must return a dict with 'accuracy', got keys {sorted(result)}")
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        entry.update(scalars)
        metrics.write(dict(step=p.step, epoch=p.epoch, stage=stage, eval=scalars))
        # ties go to the later epoch: more training, and for a schedule such as iCoT-SI's the model that has
        # internalized more (an all-zero run must not report its epoch-0, CoT-writing model)
        if self.method.eligible_for_best(stage) and (p.best_acc is None or result["accuracy"] >= p.best_acc):
            p.best_acc, self.best_params = float(result["accuracy"]), jax.tree.map(jnp.copy, self.params)
            if self.best_ckpt is not None:
                self.best_ckpt.save(p.step, self.best_params, dict(step=p.step, epoch=p.epoch, accuracy=p.best_acc))
        return entry


def train(method, train_records: Sequence[dict[str, Any]], graphdef, params, cfg: TrainConfig,
          eval_fn: Callable[[Any, Any, int], dict[str, Any]] | None = None, resume: bool = True,
          on_step: Callable[[dict[str, Any]], None] | None = None, wall_start: float | None = None) -> TrainResult:
    """Train `params` on `train_records` with `method`'s curriculum. Resumes from `cfg.output_dir` when it holds
    checkpoints (resume=False then raises). `eval_fn(graphdef, params, stage) -> {"accuracy": ...}` runs after
    each epoch; `on_step(metrics)` after each optimizer step. Non-finite loss/gradient -> FloatingPointError.
    `cfg.output_dir` is locked for the call (`latent_jax.train.runlock`: a second process training into it is refused).
    A corrupt newest checkpoint falls back to the newest good one (`Checkpointer.restore_good`). `wall_start`
    (a `time.perf_counter()` value, default: now) starts this process's share of the run's cumulative
    `wall_seconds` (kept in the checkpoints, so a resumed run counts its earlier processes too)."""
    wall_start = time.perf_counter() if wall_start is None else wall_start
    loop = _Loop(method, train_records, graphdef, params, cfg, eval_fn, on_step, wall_start)
    out = cfg.output_dir
    lock = RunLock(out, "training run").acquire() if out and loop.main else None  # before anything is written
    try:
        loop.ckpt = Checkpointer(f"{out}/checkpoints", cfg.keep_checkpoints) if out else None
        loop.best_ckpt = Checkpointer(f"{out}/best", 1) if out and eval_fn is not None else None
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    bar = tqdm(total=loop.total_steps, disable=not (loop.main and cfg.progress), desc="train", dynamic_ncols=True)
    try:  # from here on, pending checkpoints are committed and closed whatever happens
        loop.restore(resume)
        p = loop.progress
        metrics = MetricsLog(cfg.output_dir, p.step)
        bar.update(p.step)
        while p.epoch < cfg.epochs:
            stage = loop.epoch(metrics, bar)
            p.history.append(loop.evaluate(stage, metrics))
            p.epoch, p.micro, p.epoch_loss, p.epoch_tokens = p.epoch + 1, 0, 0.0, 0
            if loop.ckpt:
                loop.save(None)
    finally:
        bar.close()
        for c in (loop.ckpt, loop.best_ckpt):
            if c is not None:
                c.close()
        if lock is not None:
            lock.release()
    return TrainResult(loop.params, loop.best_params, p.best_acc, p.history, p.step, loop.opt_state,
                       p.wall_before)


def comparable_trajectory(trajectory: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """`trajectory` without the keys a checkpoint written before they existed lacks, where they hold their
    default (a TrainConfig field added later, e.g. `length_groups: 0`, changes nothing in an older run)."""
    defaults = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **CURRICULUM_DEFAULTS}
    return {k: v for k, v in trajectory.items()
            if k in saved or (k not in defaults and k not in ADDED_LATER) or (k in defaults and v != defaults[k])}


ADDED_LATER = ("method_config",)  # identity keys that checkpoints of older versions do not carry (not checked then)


def _fail(ckpt: Checkpointer | None, what: str, step: int, epoch: int, stage: int):
    """Stop on a non-finite loss: keep the last good checkpoint (pending saves are committed, nothing new)."""
    last = (ckpt.wait(), ckpt.latest_good_step())[1] if ckpt is not None else None
    where = (f"last good checkpoint: step {last} in {ckpt.directory}" if last is not None else
             "no checkpoint yet" if ckpt is not None else "no checkpointing (output_dir is None)")
    raise FloatingPointError(f"{what} at optimizer step {step + 1} (epoch {epoch}, stage {stage}); training"
                             f" stopped before updating the parameters; {where}")
