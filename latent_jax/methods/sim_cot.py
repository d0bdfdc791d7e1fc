"""SIM-CoT (Wei et al. 2025, arXiv 2509.20317, "Supervised Implicit Chain-of-Thought"): step-level supervision of
each continuous thought, a plug-in on a method with continuous thoughts (Coconut, Coconut w/o curriculum, CODI).

During training an auxiliary decoder reads the c = thoughts_per_step thoughts that replace a reasoning step and
must write that step's text:

    decoder input    [z_k1 .. z_kc, e(s_k,1), ..., e(s_k,L)]     z: what the thought slots were fed (Coconut: the
    decoder target              [s_k,1, ..., s_k,L, <eos>]       previous final hidden state; CODI: its projection)
    loss = base loss + step_weight * mean token CE of the decoder over every step a group of thoughts replaces

The gradient of the step loss reaches the backbone through z_k. The decoder is a model of the backbone's own
architecture (the paper's best setting: a decoder the size of the backbone), initialized from the backbone at the
start of training (`decoder_init: backbone`, the reference) or at random. Its weights are a **training-only
parameter tree** (`init_aux_params`): the trainer optimises {"model": params, "aux": {"decoder": ...}}, checkpoints
the decoder as an item of its own (resume restores it and its AdamW moments), and export, evaluation and
generation only ever see the backbone's params: generation is the base method's, the same compiled decode.

Thought group k (thoughts k*c .. k*c+c-1) decodes step k of the steps the stage replaced (Coconut at stage s: the
first s steps; CODI: every step); the last group decodes every replaced step left over when there are more steps
than groups (the reference's "step 3 and all the remaining steps"); a group with no step (a record with fewer steps
than groups) has no target.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_jax.config import check_rules, coerce_numbers
from latent_jax.curriculum import CURRICULUM_KEYS, Curriculum
from latent_jax.layout import IGNORE, Batch, Example, Prompt, round_up
from latent_jax.methods.base import Method
from latent_jax.models import embed_tokens, forward, get_config, init_model
from latent_jax.tokenizer import Tokenizer

BASES = ("coconut", "no_curriculum", "codi")  # the methods whose thoughts are continuous (fed hidden states)
DECODER_INITS = ("backbone", "random")


@dataclasses.dataclass(frozen=True)
class SimCoTConfig:
    """base: the method SIM-CoT supervises (one of BASES). base_options: that method's options (a mapping, e.g.
    {c_thought: 1, max_latent_stage: 4} or {n_latent: 6}); the curriculum keys (epochs_per_stage, ...) go on the
    method section itself. step_weight: the step loss's weight (the paper adds it with weight 1). decoder_init:
    "backbone" (a copy of the backbone at the start of training, the reference) | "random". step_bucket: a step's
    target length is padded to a multiple of it (one compile per bucket)."""

    base: str = "coconut"
    base_options: Any = dataclasses.field(default_factory=dict)
    step_weight: float = 1.0
    decoder_init: str = "backbone"
    step_bucket: int = 8

    def __post_init__(self):
        coerce_numbers(self, "SimCoTConfig")
        check_rules(self, "SimCoTConfig", [
            ("base", self.base in BASES, f"a method with continuous thoughts, one of {BASES}: SIM-CoT supervises"
                                         " each continuous thought with the step it replaces"),
            ("base_options", isinstance(self.base_options, Mapping), "a mapping of the base method's options"),
            ("step_weight", self.step_weight >= 0, ">= 0"),
            ("decoder_init", self.decoder_init in DECODER_INITS, f"one of {DECODER_INITS}"),
            ("step_bucket", self.step_bucket >= 1, ">= 1")])
        object.__setattr__(self, "base_options", dict(self.base_options))  # a YAML section arrives frozen
        misplaced = sorted(set(self.base_options) & set(CURRICULUM_KEYS))
        if misplaced:
            raise ValueError(f"SimCoTConfig.base_options: {misplaced} are curriculum keys: set them on the method"
                             " section itself (next to name: sim_cot)")
        cfg = self.base_config  # the base method's own validation (unknown options, impossible values)
        if getattr(cfg, "c_thought", 1) == 0:
            raise ValueError("SimCoTConfig.base_options.c_thought=0 is invalid: SIM-CoT needs continuous thoughts"
                             " (c_thought >= 1)")

    @property
    def base_config(self):
        from latent_jax.methods import method_config

        return method_config(self.base, **self.base_options)


class SimCoT(Method):
    """SIM-CoT around a base method: every hook is the base's, except `encode` (adds each thought's target step),
    `collate` (adds `thought_steps` [B, n, L]), `loss_for_stage` (base loss + step loss) and `init_aux_params`
    (the step decoder)."""

    name = "sim_cot"

    def __init__(self, tokenizer: Tokenizer, cfg: SimCoTConfig = SimCoTConfig()):
        from latent_jax.methods import build_method

        self.cfg = cfg
        self.base = build_method(cfg.base, tokenizer, **cfg.base_options)
        self.tok = self.base.tok
        self._losses: dict[Any, SimCoTLoss] = {}

    # ---- what the base method is ---------------------------------------------------------------------------------
    special_tokens = property(lambda self: self.base.special_tokens)
    uses_hidden_thoughts = property(lambda self: self.base.uses_hidden_thoughts)
    next_input = property(lambda self: self.base.next_input)
    thoughts_per_step = property(lambda self: self.base.thoughts_per_step)
    max_latent_stage = property(lambda self: self.base.max_latent_stage)

    @property
    def curriculum(self) -> Curriculum:
        return self.base.curriculum

    @curriculum.setter
    def curriculum(self, value: Curriculum) -> None:
        self.base.curriculum = value

    def num_stages(self) -> int:
        return self.base.num_stages()

    def schedule(self, epoch: int, step: int, steps_per_epoch: int) -> int | None:
        return self.base.schedule(epoch, step, steps_per_epoch)

    def stage_at(self, epoch: int, step: int, steps_per_epoch: int) -> int:
        return self.base.stage_at(epoch, step, steps_per_epoch)

    def example_stage(self, record, index, epoch, stage, seed, uniform_prob) -> int:
        return self.base.example_stage(record, index, epoch, stage, seed, uniform_prob)

    def eligible_for_best(self, stage: int) -> bool:
        return self.base.eligible_for_best(stage)

    def stage_note(self, stage: int) -> str | None:
        return self.base.stage_note(stage)

    def steps_replaced(self, n_steps: int, stage: int) -> int:
        return self.base.steps_replaced(n_steps, stage)

    def init_token_id(self) -> int | None:
        return self.base.init_token_id()

    def prepare_data(self, train_records, output_dir) -> None:
        self.base.prepare_data(train_records, output_dir)

    def adapt_model(self, model_cfg, graphdef, params, training: bool):
        return self.base.adapt_model(model_cfg, graphdef, params, training)

    def on_stage_start(self, stage, graphdef, params, records) -> None:
        self.base.on_stage_start(stage, graphdef, params, records)

    def get_state(self) -> Any:
        return self.base.get_state()

    def set_state(self, state: Any) -> None:
        self.base.set_state(state)

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        return self.base.prompt(record, stage)

    def generate(self, graphdef, params, prompts, sampling, eos_id, pad_id, batch_size=None):
        """The base method's generation (the decoder is training-only: same compiled decode, same cost)."""
        return self.base.generate(graphdef, params, prompts, sampling, eos_id, pad_id, batch_size=batch_size)

    # ---- SIM-CoT's own part --------------------------------------------------------------------------------------
    def encode(self, record: dict[str, Any], stage: int) -> Example:
        """The base's example, with each thought group's target: the step(s) it replaces, then <eos> (or none)."""
        ex = self.base.encode(record, stage)
        steps = self.base.record_tokens(record).steps
        n_rep, c = self.base.steps_replaced(len(steps), stage), max(self.base.thoughts_per_step, 1)
        groups = ex.n_latent // c
        targets = []
        for g in range(groups):
            rest = steps[g:n_rep] if g == groups - 1 else steps[g:min(g + 1, n_rep)]
            tokens = [t for s in rest for t in s]
            targets.append(tuple(tokens) + (self.tok.eos_id,) if tokens else ())
        return dataclasses.replace(ex, thought_targets=tuple(targets))

    def collate(self, examples: Sequence[Example], pad_id: int, bucket: int = 32, max_len: int | None = None,
                batch_size: int | None = None) -> Batch:
        """The base's batch plus `thought_steps` [B, G, L], G = n_latent / thoughts_per_step thought groups (row
        i < len(examples) is example i, the base's layout for Coconut and CODI's students; IGNORE where a group has
        no target)."""
        b = self.base.collate(examples, pad_id, bucket=bucket, max_len=max_len, batch_size=batch_size)
        R, G = b.tokens.shape[0], b.n_latent // max(self.base.thoughts_per_step, 1)
        L = round_up(max((len(t) for e in examples for t in e.thought_targets[:G]), default=1), self.cfg.step_bucket)
        steps = np.full((R, G, L), IGNORE, np.int32)
        for i, e in enumerate(examples):
            for j, t in enumerate(e.thought_targets[:G]):
                steps[i, j, :len(t)] = t
        return dataclasses.replace(b, extra={**b.extra, "thought_steps": steps})

    def loss_for_stage(self, stage: int):
        base = self.base.loss_for_stage(stage)
        if base not in self._losses:  # the same object per base loss: the jitted step is cached on it
            self._losses[base] = SimCoTLoss(base, self.next_input, float(self.cfg.step_weight),
                                            max(self.base.thoughts_per_step, 1))
        return self._losses[base]

    def init_aux_params(self, graphdef, params, seed: int = 0):
        """{"decoder": params of a model of the backbone's architecture}: a copy of the backbone, or random.
        Single-process training only (any number of local devices): each host would lay out its own step targets."""
        if jax.process_count() > 1:
            raise ValueError("SIM-CoT trains in one process only (any number of local devices): the hosts' step"
                             " targets [B, G, L] are not aligned across processes yet")
        if self.cfg.decoder_init == "backbone":
            return {"decoder": jax.tree.map(jnp.copy, params)}
        return {"decoder": init_model(get_config(graphdef, params), seed=seed + 1)[1]}


@dataclasses.dataclass(frozen=True)
class SimCoTLoss:
    """`loss(trained, graphdef, batch, prefix_len, n_latent, rng)` of SIM-CoT, trained = {"model", "aux"}: the base
    loss (its `with_hidden` final hidden states give the thoughts) + weight x the step decoder's mean token CE.
    aux: the base's entries (loss_sum rescaled so that loss_sum / n_tokens is the total), base_loss, step_loss,
    step_tokens, step_correct."""

    base_loss: Any
    next_input: Any
    weight: float
    per_step: int = 1  # thoughts per decoded step (Coconut's c_thought)

    def __call__(self, trained, graphdef, batch: dict, prefix_len: int, n_latent: int, rng=None):
        params, decoder = trained["model"], trained["aux"]["decoder"]
        base, out = self.base_loss(params, graphdef, batch, prefix_len, n_latent, rng, with_hidden=True)
        hidden_BxTxD = out.pop("hidden")
        if n_latent:
            h_BxnxD = hidden_BxTxD[:, prefix_len - 1:prefix_len - 1 + n_latent]
            B, n, D = h_BxnxD.shape
            z_BxnxD = h_BxnxD if self.next_input is None else \
                self.next_input(graphdef, params, h_BxnxD.reshape(B * n, D)).reshape(B, n, D)
            key = None if rng is None else jax.random.fold_in(rng, 0x51C07)
            z_BxGxcxD = z_BxnxD.reshape(B, n // self.per_step, self.per_step, D)
            s_sum, s_n, s_c = step_loss(graphdef, decoder, z_BxGxcxD, batch["thought_steps"], key)
        else:  # no thoughts at this stage: the decoder has nothing to read
            s_sum, s_n, s_c = jnp.float32(0), jnp.int32(0), jnp.int32(0)
        step = s_sum / jnp.maximum(s_n, 1)
        total = base + self.weight * step
        return total, {**out, "loss_sum": total * out["n_tokens"], "base_loss": base, "step_loss": step,
                       "step_tokens": s_n, "step_correct": s_c}


def step_loss(graphdef, decoder, z_BxGxcxD, steps_BxGxL, rng=None):
    """The step decoder on every group of thoughts: (sum of token CE, #target tokens, #argmax-correct). A group's c
    thoughts are the decoder's first input embeddings, the step's tokens (teacher-forced) the rest; the output at
    position c-1+t predicts target token t. Letters: B rows, G thought groups, c thoughts per group, L target tokens,
    N = B*G decoder sequences, D model width, V vocabulary."""
    B, G, L = steps_BxGxL.shape
    c = z_BxGxcxD.shape[2]
    y_NxL = steps_BxGxL.reshape(B * G, L)
    valid_NxL = y_NxL != IGNORE
    safe_NxL = jnp.where(valid_NxL, y_NxL, 0)
    e_NxLxD = embed_tokens(graphdef, decoder, safe_NxL)
    z_NxcxD = z_BxGxcxD.reshape(B * G, c, -1).astype(e_NxLxD.dtype)
    x_Nx_xD = jnp.concatenate([z_NxcxD, e_NxLxD[:, :-1]], axis=1)  # c + L - 1 positions
    mask_Nx_ = jnp.concatenate([jnp.ones((B * G, c), bool), valid_NxL[:, :-1]], axis=1)
    logits_NxLxV = forward(graphdef, decoder, embeds=x_Nx_xD, mask=mask_Nx_, dropout_rng=rng).logits[:, c - 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_NxLxV.astype(jnp.float32), safe_NxL)
    correct = (jnp.argmax(logits_NxLxV, axis=-1) == safe_NxL) & valid_NxL
    return jnp.sum(ce * valid_NxL), jnp.sum(valid_NxL), jnp.sum(correct)
