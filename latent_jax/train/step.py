"""One optimizer step of latent training, public: `TrainState` + `train_step`, built from the jitted micro-step /
apply-step pair that `latent_jax.train.trainer.train` itself runs (no second copy).

    from latent_jax.train.step import TrainState, train_step
    state = TrainState.create(graphdef, params, lr=1e-4, weight_decay=0.01)
    for batch in batches:                      # `latent_jax.methods.collate` of `method.encode(record, stage)`
        state, metrics = train_step(state, batch)          # or a list of micro-batches (gradient accumulation)

The step is method- and stage-aware through the batch (its thought slots, `prefix_len`, `n_latent`) and the loss
(`loss=method.loss_for_stage(stage)` for a method with its own, e.g. LT-Tuning). Dropout (the model config's
rates, e.g. GPT-2's 0.1 from its config.json) draws from `state.rng` folded with the micro-batch index; the state's
key advances every step (the trainer sets it to fold_in(seed key, step), so a resumed run draws the same masks).
Params and optimizer state are donated: use the returned state.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_jax.latent import loss_fn
from latent_jax.layout import Batch
from latent_jax.models.transformer import with_remat
from latent_jax.sharding import jit_sharded


def make_optimizer(weight_decay: float, grad_clip: float | None) -> optax.GradientTransformation:
    """AdamW at lr 1 (the trainer scales updates by the scheduled lr), after optional global-norm clipping.
    Weight decay applies to every parameter, as torch.optim.AdamW in the reference."""
    adamw = optax.adamw(1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip else adamw


@functools.lru_cache(maxsize=8)
def make_steps(graphdef, weight_decay: float, grad_clip: float | None, loss: Callable = loss_fn,
               mesh: Any = None, remat: str | None = None, normalization: str = "tokens"
               ) -> tuple[Any, Callable, Callable]:
    """(optimizer, micro_step, apply_step), the steps jitted (cached per model graph, optimizer and loss function:
    `loss(params, graphdef, batch, prefix_len, n_latent, rng) -> (loss, aux)`, default the latent loop's; rng is
    the dropout key); graphdef is closed over (static).
    micro_step(params, acc, batch, rng, prefix_len, n_latent) adds d(sum of token losses)/d(params) to acc
    (donated); rng: dropout key, or None for a deterministic pass;
    apply_step(params, opt_state, acc, denom, lr) applies AdamW to acc / denom (params, state donated): denom is
    the step's token count. normalization "micro_batch": micro_step adds d(mean token loss of the micro-batch) and
    denom is the number of micro-batches (`TrainConfig.loss_normalization`).
    mesh (a `jax.sharding.Mesh` of `latent_jax.sharding.make_mesh`): in/out shardings by the logical-axis rules
    (params, opt_state, acc) and the batch over (data, fsdp), traced with the mesh active. remat: overrides the
    model config's `remat` ("none" | "full" | "dots")."""
    tx = make_optimizer(weight_decay, grad_clip)

    def micro(params, acc, batch, rng, prefix_len: int, n_latent: int):
        g = graphdef if remat is None else with_remat(graphdef, model_part(params), remat)

        def summed(p):
            _, aux = loss(p, g, batch, prefix_len, n_latent, rng)
            if normalization == "micro_batch":
                return aux["loss_sum"] / jnp.maximum(aux["n_tokens"], 1), aux
            return aux["loss_sum"], aux

        (_, aux), grads = jax.value_and_grad(summed, has_aux=True)(params)
        acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)
        return acc, {"loss_sum": aux["loss_sum"], "n_tokens": aux["n_tokens"], "n_input": batch["mask"].sum()}

    def apply(params, opt_state, acc, denom, lr):
        grads = jax.tree.map(lambda a, p: (a / jnp.maximum(denom, 1)).astype(p.dtype), acc, params)
        gnorm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
        ok = jnp.isfinite(gnorm)  # never let a non-finite gradient touch the state
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        return keep(new_params, params), keep(new_opt, opt_state), jax.tree.map(jnp.zeros_like, acc), gnorm

    if mesh is not None:
        return (tx, jit_sharded(micro, mesh, ("tree", "tree", "batch", None), (1, "replicated"),
                                static_argnames=("prefix_len", "n_latent"), donate_argnums=(1,)),
                jit_sharded(apply, mesh, ("tree", "tree", "tree", None, None), (0, 1, 2, "replicated"),
                            donate_argnums=(0, 1, 2)))
    return (tx, jax.jit(micro, static_argnames=("prefix_len", "n_latent"), donate_argnames=("acc",)),
            jax.jit(apply, donate_argnames=("params", "opt_state", "acc")))




def join_aux(params: Any, aux: Any) -> Any:
    """The tree the optimizer trains: `params`, or {"model": params, "aux": aux} for a method with training-only
    parameters (`Method.init_aux_params`, SIM-CoT's step decoder); its loss then receives that tree."""
    return params if aux is None else {"model": params, "aux": aux}


def model_part(trained: Any) -> Any:
    """The model's params of a trained tree (`join_aux`'s inverse for the model part)."""
    return trained["model"] if type(trained) is dict and set(trained) == {"model", "aux"} else trained


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Params, AdamW state, the gradient accumulator, the step count and an rng; the optimizer settings ride along
    as static fields. Create with `TrainState.create`. For a method with training-only parameters, params is
    `join_aux(params, method.init_aux_params(graphdef, params))`."""

    params: Any
    opt_state: Any
    grad_acc: Any
    step: jax.Array
    rng: jax.Array
    graphdef: Any = dataclasses.field(metadata=dict(static=True))
    lr: float = dataclasses.field(default=1e-4, metadata=dict(static=True))
    weight_decay: float = dataclasses.field(default=0.01, metadata=dict(static=True))
    grad_clip: float | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def create(cls, graphdef, params, lr: float = 1e-4, weight_decay: float = 0.01, grad_clip: float | None = None,
               seed: int = 0) -> "TrainState":
        tx = make_optimizer(weight_decay, grad_clip)
        acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32, device=_sharding(p)), params)
        return cls(params, tx.init(params), acc, jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed), graphdef, lr,
                   weight_decay, grad_clip)

    def replace(self, **kw) -> "TrainState":
        return dataclasses.replace(self, **kw)

    def reset_optimizer(self) -> "TrainState":
        """Fresh AdamW moments and count (the curriculum does this at a new stage)."""
        return self.replace(opt_state=make_optimizer(self.weight_decay, self.grad_clip).init(self.params))


def _sharding(x):
    return x.sharding if isinstance(x, jax.Array) else None


def train_step(state: TrainState, batch: Batch | Sequence[Batch], lr: float | None = None,
               loss: Callable = loss_fn, normalization: str = "tokens", mesh: Any = None, remat: str | None = None,
               place: Callable[[dict], Any] | None = None) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step on `batch` (a `Batch`, or a list of micro-batches accumulated into one step).
    lr: this step's learning rate (default `state.lr`). loss / normalization / mesh / remat: as `make_steps`.
    place(arrays) puts a batch's arrays where the step wants them (default: as they are).
    Returns (new state, metrics: loss (mean token loss), loss_sum, n_tokens, n_input, grad_norm, denom) with
    metrics as device scalars (loss as a Python float when finite math allows: `float(metrics["loss"])`).
    A non-finite gradient leaves params and optimizer state unchanged (check `metrics["grad_norm"]`)."""
    batches = [batch] if isinstance(batch, Batch) else list(batch)
    if not batches:
        raise ValueError("train_step needs at least one micro-batch")
    _, micro, apply = make_steps(state.graphdef, state.weight_decay, state.grad_clip, loss, mesh=mesh, remat=remat,
                                 normalization=normalization)
    acc, stats = state.grad_acc, []
    for i, b in enumerate(batches):
        arrays = place(b) if place is not None else b.arrays()
        acc, s = micro(state.params, acc, arrays, jax.random.fold_in(state.rng, i), b.prefix_len, b.n_latent)
        stats.append(s)
    loss_sum = sum(_host(s["loss_sum"]) for s in stats)
    n_tok = sum(int(_host(s["n_tokens"])) for s in stats)
    denom = n_tok if normalization == "tokens" else len(stats)
    step_lr = state.lr if lr is None else lr
    params, opt_state, acc, gnorm = apply(state.params, state.opt_state, acc, jnp.float32(denom),
                                          jnp.float32(step_lr))
    rng, _ = jax.random.split(state.rng)
    new = state.replace(params=params, opt_state=opt_state, grad_acc=acc, step=state.step + 1, rng=rng)
    metrics = {"loss": loss_sum / max(n_tok, 1), "loss_sum": loss_sum, "n_tokens": n_tok,
               "n_input": sum(_host(s["n_input"]) for s in stats), "grad_norm": _host(gnorm), "lr": step_lr,
               "micro_batches": len(stats)}
    return new, metrics


def _host(x) -> float:
    return float(np.asarray(x.addressable_data(0))) if isinstance(x, jax.Array) else float(x)
