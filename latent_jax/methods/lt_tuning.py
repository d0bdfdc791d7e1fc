"""LT-Tuning — Latent Thoughts Tuning (arXiv 2602.10229): a `<thinking>` token the model learns to emit; at a
`<thinking>` position the input is a continuous vector (Context-Prediction Fusion, `lt_fusion.fuse`).

Stages (`schedule`: stage = min(epoch // epochs_per_stage, 2); epochs_per_stage is the curriculum's,
`method.epochs_per_stage`):
  0  explicit CoT SFT:            question\\n step_1\\n ... ### answer <eos>
  1  thoughts = raw hidden state:  the same text with `<thinking>` (x1 or x2) inserted before low-confidence tokens
  2  thoughts = fusion vectors:    alpha[2] * h + (1 - alpha[2]) * p @ E_in, new insertion plan
At each stage change `on_stage_start` rebuilds the data with the current model (confidence-driven insertion): gold
next-token probabilities of question + CoT + answer, teacher forced; CoT/answer tokens with probability below
threshold[s] are candidates; tokens_per_stage * s of them are sampled; `<thinking>` goes before each with
probability p_insert[s], a second one with probability p_double[s] (given the first). Labels include `<thinking>`.
The plan (record hash -> [[token index, count], ...]) is the method state (`get_state` / `set_state`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any, Sequence

import jax
import numpy as np

from latent_jax.config import check_rules
from latent_jax.layout import IGNORE, Batch, Example, Prompt, collate, layout_prompts, round_up
from latent_jax.methods.base import Method, first_token_id
from latent_jax.methods.lt_fusion import gold_probs, lt_generate_padded, lt_loss
from latent_jax.models import get_config
from latent_jax.tokenizer import Tokenizer

THINKING = "<thinking>"
N_STAGES = 3


def _triple(name: str, value, lo: float, hi: float, lo_open: bool = False) -> tuple[float, ...]:
    try:
        if isinstance(value, str):
            raise TypeError
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"LTTuningConfig.{name} must be a list of {N_STAGES} numbers (one per stage), got"
                         f" {value!r}") from None
    if len(vals) != N_STAGES or not all((lo < v if lo_open else lo <= v) and v <= hi for v in vals):
        raise ValueError(f"LTTuningConfig.{name}={list(vals)} is invalid: need {N_STAGES} values (stages 0, 1, 2)"
                         f" in {'(' if lo_open else '['}{lo}, {hi}]")
    return vals


@dataclasses.dataclass(frozen=True)
class LTTuningConfig:
    """alpha[s]: fusion weight of h at stage s (reference 0.5, 0.5, 0.6; stage 0 has no thoughts). Stage 1 feeds the
    raw hidden state (alpha = 1) unless `stage1_raw_hidden` is False. Generation always uses alpha[2]."""

    alpha: tuple = (0.5, 0.5, 0.6)
    stage1_raw_hidden: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    thresholds: tuple = (0.0, 0.3, 0.2)
    p_insert: tuple = (0.0, 0.85, 0.95)
    p_double: tuple = (0.0, 0.15, 0.2)
    tokens_per_stage: int = 2
    max_consecutive: int = 32  # inference: after this many thoughts in a row the `<thinking>` logit is masked
    think_bucket: int = 2  # training passes = max thoughts per row rounded up to a multiple (fewer compiles)
    remat_passes: bool = True  # recompute the fill passes in the backward pass (memory of 1 pass, not K)
    score_batch_size: int = 32  # rows per teacher-forced pass when scoring confidences
    seed: int = 0
    init_token: str = "<<"  # `<thinking>` starts from this token's embedding (pretrained models)

    def __post_init__(self):
        for name, lo, hi, lo_open in (("alpha", 0.0, 1.0, False), ("thresholds", 0.0, 1.0, False),
                                      ("p_insert", 0.0, 1.0, False), ("p_double", 0.0, 1.0, False)):
            object.__setattr__(self, name, _triple(name, getattr(self, name), lo, hi, lo_open))
        check_rules(self, "LTTuningConfig", [
            ("temperature", isinstance(self.temperature, (int, float)) and self.temperature > 0, "> 0"),
            ("top_p", isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("tokens_per_stage", _int(self.tokens_per_stage) and self.tokens_per_stage >= 0, "an integer >= 0"),
            ("max_consecutive", _int(self.max_consecutive) and self.max_consecutive >= 1, "an integer >= 1"),
            ("think_bucket", _int(self.think_bucket) and self.think_bucket >= 1, "an integer >= 1"),
            ("score_batch_size", _int(self.score_batch_size) and self.score_batch_size >= 1, "an integer >= 1"),
            ("seed", _int(self.seed), "an integer")])

    def alpha_at(self, stage: int) -> float:
        stage = min(stage, N_STAGES - 1)
        return 1.0 if stage == 1 and self.stage1_raw_hidden else self.alpha[stage]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def record_key(record: dict[str, Any]) -> str:
    """A stable hash of a record's text (the insertion plan's key)."""
    text = json.dumps([record["question"], list(record["steps"]), record["answer"]], ensure_ascii=False)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def plan_record(probs: np.ndarray, stage: int, cfg: LTTuningConfig, key: str) -> list[list[int]]:
    """Confidence-driven insertion for one record. probs[j] = p(gold CoT/answer token j); returns sorted
    [[j, count], ...]: `count` (1 or 2) `<thinking>` tokens go before token j. Deterministic in (seed, stage, key)."""
    stage = min(stage, N_STAGES - 1)
    cand = np.flatnonzero(np.asarray(probs) < cfg.thresholds[stage])
    n = min(cfg.tokens_per_stage * stage, len(cand))
    if n == 0:
        return []
    rng = np.random.default_rng([cfg.seed, stage, int(key, 16)])
    plan = []
    for j in np.sort(rng.choice(cand, size=n, replace=False)):
        if rng.random() < cfg.p_insert[stage]:
            plan.append([int(j), 2 if rng.random() < cfg.p_double[stage] else 1])
    return plan


class LTTuning(Method):
    name = "lt_tuning"

    def __init__(self, tokenizer: Tokenizer, cfg: LTTuningConfig = LTTuningConfig()):
        self.tok, self.cfg = tokenizer, cfg
        self.special_tokens = (THINKING,)
        self.think_id = tokenizer.add_special_tokens([THINKING])[0]
        self.plan_stage, self.plan = 0, {}  # the insertion plan of stage `plan_stage` (record key -> [[j, n]])
        self._losses: dict[int, Any] = {}

    def num_stages(self) -> int:
        return N_STAGES

    def schedule(self, epoch: int, step: int, steps_per_epoch: int) -> int:
        return min(epoch // self.curriculum.epochs_per_stage, N_STAGES - 1)

    def example_stage(self, record, index, epoch, stage, seed, uniform_prob) -> int:
        return stage  # no per-example stage mixing: the plan exists for the current stage only

    def _parts(self, record) -> tuple[list[int], list[int]]:
        """(question, CoT + answer) token lists (`Method.record_tokens`)."""
        t = self.record_tokens(record)
        return t.question, t.cot + t.answer

    def encode(self, record: dict[str, Any], stage: int) -> Example:
        q, rest = self._parts(record)
        plan = dict(map(tuple, self._plan_for(record, stage)))
        body = [t for j, t in enumerate(rest) for t in [self.think_id] * plan.get(j, 0) + [t]]
        return Example(q + body, [IGNORE] * len(q) + body, latent_start=len(q), n_latent=0)

    def _plan_for(self, record, stage: int) -> list[list[int]]:
        stage = min(stage, N_STAGES - 1)
        if stage == 0:
            return []
        if stage != self.plan_stage:
            raise ValueError(f"no insertion plan for stage {stage} (the plan is for stage {self.plan_stage}): call"
                             " on_stage_start(stage, graphdef, params, records) or set_state first")
        key = record_key(record)
        if key not in self.plan:
            raise ValueError(f"record {key} ({record['question'][:60]!r}...) is not in the stage-{stage} insertion"
                             " plan (built by on_stage_start from the training records)")
        return self.plan[key]

    def collate(self, examples: Sequence[Example], pad_id: int, bucket: int = 32, max_len: int | None = None,
                batch_size: int | None = None) -> Batch:
        """`base.collate`, then `latent` marks the `<thinking>` positions and n_latent = the number of fill passes
        (max thoughts per row, rounded up to `think_bucket`)."""
        b = collate(examples, pad_id, bucket, max_len, batch_size, align=True)
        latent = (b.tokens == self.think_id) & b.mask
        if latent[:, :b.prefix_len].any():  # the loss runs the question prefix once, without thoughts
            raise ValueError("a `<thinking>` token inside a question: thoughts go in the CoT/answer only")
        k = int(latent.sum(1).max())
        return dataclasses.replace(b, latent=latent, n_latent=round_up(k, self.cfg.think_bucket) if k else 0)

    def fusion(self, stage: int) -> tuple:
        c = self.cfg
        return (("alpha", c.alpha_at(stage)), ("think_id", self.think_id), ("temperature", float(c.temperature)),
                ("top_p", float(c.top_p)))

    def loss_for_stage(self, stage: int):
        stage = min(stage, N_STAGES - 1)
        if stage not in self._losses:
            self._losses[stage] = functools.partial(lt_loss, fusion=self.fusion(stage), remat=self.cfg.remat_passes)
        return self._losses[stage]

    def confidences(self, graphdef, params, records: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        """Per record: the model's probability of each gold CoT/answer token (teacher forced, batched, jitted)."""
        parts = [self._parts(r) for r in records]
        seqs = [q + rest for q, rest in parts]
        order = np.argsort([len(s) for s in seqs], kind="stable")
        B, out = self.cfg.score_batch_size, [None] * len(seqs)
        for lo in range(0, len(seqs), B):
            idx = order[lo:lo + B]
            T = round_up(max(len(seqs[i]) for i in idx), 32)
            tokens, mask = np.zeros((B, T), np.int32), np.zeros((B, T), bool)
            for r, i in enumerate(idx):
                tokens[r, :len(seqs[i])], mask[r, :len(seqs[i])] = seqs[i], True
            probs = np.asarray(gold_probs(graphdef, params, tokens, mask))
            for r, i in enumerate(idx):  # token j of rest (column len(q) + j) is predicted at column len(q) + j - 1
                n_q = len(parts[i][0])
                out[i] = probs[r, n_q - 1:len(seqs[i]) - 1]
        return out

    def on_stage_start(self, stage: int, graphdef, params, records: Sequence[dict[str, Any]]) -> None:
        """Rebuild the insertion plan for `stage` with the current model (nothing to do at stage 0)."""
        stage = min(stage, N_STAGES - 1)
        plan = {}
        if stage > 0:
            keys = [record_key(r) for r in records]
            for key, probs in zip(keys, self.confidences(graphdef, params, records)):
                plan[key] = plan_record(probs, stage, self.cfg, key)
        self.plan_stage, self.plan = stage, plan

    def get_state(self) -> dict[str, Any]:
        return {"stage": self.plan_stage, "plan": self.plan}

    def set_state(self, state: dict[str, Any]) -> None:
        self.plan_stage = int(state["stage"])
        self.plan = {k: [[int(j), int(n)] for j, n in v] for k, v in state["plan"].items()}

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        return Prompt(self._parts(record)[0])

    def generate(self, graphdef, params, prompts: Sequence[Prompt], sampling, eos_id: int, pad_id: int,
                 batch_size: int | None = None, seed: int = 0, bucket: int = 16,
                 keep_thinking: bool = False) -> list[list[int]]:
        """Batched decoding where each emitted `<thinking>` is fed back as a fusion vector (alpha[2]). Returned
        token lists drop the `<thinking>` ids unless keep_thinking (so the answer text is clean); EOS included."""
        if any(p.n_latent or p.suffix for p in prompts):
            raise ValueError("LT-Tuning prompts are plain token prefixes (the model emits its own thoughts)")
        prefix, mask, _, _ = layout_prompts(prompts, pad_id, bucket, batch_size)
        max_pos = get_config(graphdef, params).max_positions
        longest = max(len(p.prefix) for p in prompts)  # left padding takes cache slots, not positions
        if longest + sampling.max_new_tokens > max_pos:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({sampling.max_new_tokens})"
                             f" exceeds the model's max_positions {max_pos}")
        out, lengths = lt_generate_padded(graphdef, params, prefix, mask, jax.random.PRNGKey(seed),
                                          sampling=sampling, eos_ids=(eos_id,), pad_id=pad_id,
                                          max_consecutive=self.cfg.max_consecutive, fusion=self.fusion(N_STAGES - 1))
        out, lengths = np.asarray(out), np.asarray(lengths)
        return [[t for t in out[i, :lengths[i]].tolist() if keep_thinking or t != self.think_id]
                for i in range(len(prompts))]

    def init_token_id(self) -> int:
        return first_token_id(self.tok, self.cfg.init_token)
