"""CODI (Shen et al. 2025, arXiv 2502.21074, "Compressing Chain-of-Thought into Continuous Space via
Self-Distillation"): one model is both teacher and student, on two layouts of one record in one batch:

    teacher   question\\n step_1\\n ... step_k\\n ### answer <eos>          CE on the steps and the answer
    student   question\\n <bot> [t_1 ... t_n] <eot> ### answer <eos>          CE on the answer

The student's thought t_{k+1} is proj(final hidden state at t_k) (t_1 reads the hidden state at <bot>), with
proj = Linear(D, P) -> GELU -> Linear(P, D) -> LayerNorm: `ModelConfig.thought_proj_dim`, so the projection's
params live with the model's and are checkpointed, exported (`latent_jax.prj.*` tensors) and restored with them.
Distillation: at the token before the answer's content (`distill_token`, default "###": the counterpart of the
paper's ":" in "The answer is:"), every hidden state of the student (the embeddings and each block's output, HF
`hidden_states` order) is pulled toward the teacher's at its own "###" (stop-gradient on the teacher side):
smooth-L1 per layer (the reference code; `distill_loss: l1 | l2` also), divided by the std of the teacher states
(`distill_std_norm`, the GPT-2 script's `distill_loss_div_std`), averaged over layers. The loss is

    student_weight * CE(student answer) + teacher_weight * CE(teacher CoT + answer) + distill_weight * distill

Batch layout (`CODI.collate`): rows [students, fillers, teachers, fillers]; each teacher row is aligned so that its
first CoT token sits at the column of the student's first thought, so both halves run through the one latent loop
(`latent.latent_forward` with the projection as its `next_input`). Generation: question <bot>, n projected thoughts,
<eot>, then decoding (`latent.generate_prompts` with `next_input`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_jax.config import check_rules, coerce_numbers
from latent_jax.layout import IGNORE, Batch, Example, Prompt, collate
from latent_jax.methods.base import Method, first_token_id
from latent_jax.methods.coconut import BOT, EOT, LATENT
from latent_jax.models import add_thought_projection, project_thought
from latent_jax.tokenizer import Tokenizer

DISTILL_LOSSES = ("smooth_l1", "l1", "l2")
STUDENT, TEACHER, FILLER = 0, 1, -1  # the `role` of a batch row


@dataclasses.dataclass(frozen=True)
class CODIConfig:
    """n_latent: continuous thoughts (paper: 6). proj_dim: the projection's hidden width (None: d_model, the
    GPT-2 script's 768; 0: no projection, the hidden state is fed back as Coconut does). proj_norm: its final
    LayerNorm. student_weight / teacher_weight / distill_weight: the three losses' weights (reference 1 / 1 / 1).
    distill_loss: "smooth_l1" (reference code), "l1" (the paper's text) or "l2". distill_std_norm: divide each
    layer's distillation loss by the std of the teacher's states there. distill_token: the text whose (last) token
    is the distillation position, looked up in the answer layout ("### answer"). init_token: the token whose
    embedding initializes <bot> / <eot> / <latent>."""

    n_latent: int = 6
    proj_dim: int | None = None
    proj_norm: bool = True
    student_weight: float = 1.0
    teacher_weight: float = 1.0
    distill_weight: float = 1.0
    distill_loss: str = "smooth_l1"
    distill_std_norm: bool = True
    distill_token: str = "###"
    init_token: str = "<<"

    def __post_init__(self):
        coerce_numbers(self, "CODIConfig", strict_types=True)
        check_rules(self, "CODIConfig", [
            ("n_latent", self.n_latent >= 1, "an integer >= 1"),
            ("proj_dim", self.proj_dim is None or self.proj_dim >= 0, "null or an integer >= 0"),
            ("proj_norm", isinstance(self.proj_norm, bool), "true or false"),
            *((k, getattr(self, k) >= 0, ">= 0") for k in ("student_weight", "teacher_weight", "distill_weight")),
            ("distill_loss", self.distill_loss in DISTILL_LOSSES, f"one of {DISTILL_LOSSES}"),
            ("distill_std_norm", isinstance(self.distill_std_norm, bool), "true or false"),
            ("distill_token", bool(self.distill_token.strip()), "a non-empty text")])


@dataclasses.dataclass(frozen=True)
class CODIExample(Example):
    """The student layout (the `Example` fields) plus the teacher's, and each one's distillation position."""

    teacher_tokens: tuple[int, ...] = ()
    teacher_labels: tuple[int, ...] = ()
    teacher_start: int = 1  # the teacher's first CoT token: aligned with the student's first thought
    student_pos: int = 0  # distillation positions (indices into tokens / teacher_tokens)
    teacher_pos: int = 0


class CODI(Method):
    """CODI behind the `Method` interface: `encode` gives both layouts, `collate` lays them out as one batch,
    `loss_for_stage` the three-part loss, `adapt_model` adds the projection, `next_input` feeds thoughts through it
    (the base class's generation and analysis use it)."""

    name = "codi"
    special_tokens = (BOT, EOT, LATENT)
    uses_hidden_thoughts = True  # fed back through `next_input` (the projection): `latent-jax analyze` applies

    def __init__(self, tokenizer: Tokenizer, cfg: CODIConfig = CODIConfig()):
        self.tok, self.cfg = tokenizer, cfg
        self.ids = dict(zip(self.special_tokens, tokenizer.add_special_tokens(list(self.special_tokens))))
        self._distill_ids = tuple(tokenizer.encode(cfg.distill_token.strip()))
        self.next_input = None if cfg.proj_dim == 0 else project_thought
        self._loss = functools.partial(codi_loss, next_input=self.next_input, weights=(
            cfg.student_weight, cfg.teacher_weight, cfg.distill_weight), kind=cfg.distill_loss,
            std_norm=cfg.distill_std_norm)

    # ---- layouts ------------------------------------------------------------------------------------------------
    def _distill_offset(self, record: dict[str, Any], answer: list[int]) -> int:
        """Index of the distillation token's last id in the answer layout; a ValueError naming the record if absent."""
        d, n = self._distill_ids, len(self._distill_ids)
        for j in range(len(answer) - n + 1):
            if tuple(answer[j:j + n]) == d:
                return j + n - 1
        raise ValueError(f"CODI: distill_token {self.cfg.distill_token!r} is not in the answer layout"
                         f" {self.tok.decode(answer)!r} of record {record['question'][:80]!r} (the distillation"
                         f" position must exist in both the teacher's and the student's layout)")

    def encode(self, record: dict[str, Any], stage: int) -> CODIExample:
        t = self.record_tokens(record)
        q, cot, a, n = t.question, t.cot, t.answer, self.cfg.n_latent
        j = self._distill_offset(record, a)
        tokens = q + [self.ids[BOT]] + [self.ids[LATENT]] * n + [self.ids[EOT]] + a
        labels = [IGNORE] * (len(q) + n + 2) + a
        return CODIExample(tokens, labels, latent_start=len(q) + 1, n_latent=n, teacher_tokens=tuple(q + cot + a),
                           teacher_labels=tuple([IGNORE] * len(q) + cot + a), teacher_start=len(q),
                           student_pos=len(q) + n + 2 + j, teacher_pos=len(q) + len(cot) + j)

    def collate(self, examples: Sequence[CODIExample], pad_id: int, bucket: int = 32, max_len: int | None = None,
                batch_size: int | None = None) -> Batch:
        """Rows [students, fillers, teachers, fillers] (2 x batch_size); extra arrays `role` (STUDENT / TEACHER /
        FILLER) and `distill_col` (a row's distillation column minus prefix_len: unchanged by re-padding)."""
        m, half = len(examples), batch_size or len(examples)
        teachers = [Example(list(e.teacher_tokens), list(e.teacher_labels), latent_start=e.teacher_start)
                    for e in examples]
        b = collate(list(examples) + teachers, pad_id, bucket, max_len)
        P = b.prefix_len
        role = np.array([STUDENT] * m + [TEACHER] * m, np.int32)
        col = np.array([e.student_pos - e.latent_start for e in examples]
                       + [e.teacher_pos - e.teacher_start for e in examples], np.int32)

        def halves(a, fill):
            pad = np.full((half - m,) + a.shape[1:], fill, a.dtype)
            return np.concatenate([a[:m], pad, a[m:], pad])

        tokens, mask, labels, latent = (halves(a, f) for a, f in ((b.tokens, pad_id), (b.mask, False),
                                                                   (b.labels, IGNORE), (b.latent, False)))
        return Batch(tokens, mask, labels, latent, P, b.n_latent,
                     {"role": halves(role, FILLER), "distill_col": halves(col, 0)})

    def steps_replaced(self, n_steps: int, stage: int) -> int:
        """Every step: the student's thoughts stand for the whole CoT."""
        return n_steps

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        q = self.record_tokens(record).question
        return Prompt(q + [self.ids[BOT]], self.cfg.n_latent, [self.ids[EOT]])

    def init_token_id(self) -> int:
        return first_token_id(self.tok, self.cfg.init_token)

    # ---- loss, model, generation --------------------------------------------------------------------------------
    def loss_for_stage(self, stage: int):
        return self._loss

    def adapt_model(self, model_cfg, graphdef, params, training: bool):
        """Training: add the projection (fresh) to a model without one. Evaluation: the model must carry it."""
        want = model_cfg.d_model if self.cfg.proj_dim is None else self.cfg.proj_dim
        have = model_cfg.thought_proj_dim
        if have == want and (not want or model_cfg.thought_proj_norm == self.cfg.proj_norm):
            return model_cfg, graphdef, params
        if training and have == 0:
            return add_thought_projection(model_cfg, params, want, self.cfg.proj_norm)
        raise ValueError(f"CODI needs a model whose thought projection has width {want} (norm {self.cfg.proj_norm});"
                         f" this model has " + (f"width {have} (norm {model_cfg.thought_proj_norm})" if have else
                                                "none: an export without CODI's projection weights (latent_jax.prj.*)"
                                                " cannot run CODI's thoughts"))


def distill_terms(s_LxBxD, t_LxBxD, w_B, kind: str, std_norm: bool):
    """Per-layer distillation losses [L]: the mean over valid rows (w_B) and features of smooth-L1 / L1 / L2 of
    student - teacher, each divided by the (unbiased) std of the teacher's valid states when `std_norm` (twice for
    L2, as the reference does). The teacher side is not differentiated."""
    t = jax.lax.stop_gradient(t_LxBxD.astype(jnp.float32))
    d = s_LxBxD.astype(jnp.float32) - t
    a = jnp.abs(d)
    per = {"smooth_l1": jnp.where(a < 1.0, 0.5 * d * d, a - 0.5), "l1": a, "l2": d * d}[kind]
    wf = w_B.astype(jnp.float32)[None, :, None]
    count = jnp.maximum(jnp.sum(w_B) * t.shape[-1], 1)
    loss_L = jnp.sum(per * wf, axis=(1, 2)) / count
    if std_norm:
        mean = jnp.sum(t * wf, axis=(1, 2), keepdims=True) / count
        var = jnp.sum(jnp.square(t - mean) * wf, axis=(1, 2)) / jnp.maximum(count - 1, 1)
        std = jnp.sqrt(var)
        loss_L = loss_L / (std * std if kind == "l2" else std)
    return loss_L


def codi_loss(params, graphdef, batch: dict, prefix_len: int, n_latent: int, rng=None, *, next_input, weights,
              kind: str, std_norm: bool, with_hidden: bool = False):
    """CODI's loss of a `CODI.collate` batch: (total, aux). aux: loss_sum = total x the student's answer tokens
    (so the trainer's per-token mean is the total), n_tokens / n_correct of the student, and the three parts;
    with_hidden: also "hidden", the final hidden states [2B, T, D] (SIM-CoT reads the thoughts from them)."""
    from latent_jax.latent import latent_forward

    logits, layers_LxBxTxD = latent_forward(graphdef, params, batch["tokens"], batch["mask"], batch["latent"],
                                            prefix_len, n_latent, batch.get("positions"), dropout_rng=rng,
                                            next_input=next_input, return_all_hidden=True)
    lg, lb = logits[:, :-1], batch["labels"][:, 1:]
    valid = lb != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(lg.astype(jnp.float32), jnp.where(valid, lb, 0)) * valid
    correct = (jnp.argmax(lg, axis=-1) == lb) & valid
    role = batch["role"]
    part = lambda x, r: jnp.sum(x * (role == r)[:, None])  # noqa: E731
    s_sum, s_n, s_c = part(ce, STUDENT), part(valid, STUDENT), part(correct, STUDENT)
    t_sum, t_n = part(ce, TEACHER), part(valid, TEACHER)
    B2, T = batch["tokens"].shape
    half = B2 // 2
    col = jnp.clip(prefix_len + batch["distill_col"], 0, T - 1)
    sel_LxBxD = layers_LxBxTxD[:, jnp.arange(B2), col]
    w_B = (role[:half] == STUDENT) & (role[half:] == TEACHER)
    distill = jnp.mean(distill_terms(sel_LxBxD[:, :half], sel_LxBxD[:, half:], w_B, kind, std_norm))
    s_ce, t_ce = s_sum / jnp.maximum(s_n, 1), t_sum / jnp.maximum(t_n, 1)
    ws, wt, wd = weights
    total = ws * s_ce + wt * t_ce + wd * distill
    aux = {"loss_sum": total * s_n, "n_tokens": s_n, "n_correct": s_c, "student_ce": s_ce, "teacher_ce": t_ce,
           "distill": distill}
    return total, ({**aux, "hidden": layers_LxBxTxD[-1]} if with_hidden else aux)
