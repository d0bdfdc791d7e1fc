"""iCoT-SI: stepwise internalization of chain-of-thought (Deng et al. 2024, arXiv 2405.14838).

Explicit CoT training, then CoT tokens are removed from the left while training goes on; at the end the model
answers directly. Layouts (`separator`; loss on everything after the question):

    newline:  question\\n  cot[n:]  ### answer <eos>                      (the `cot` baseline of coconut.py)
    eos:      " question " <eos> " cot "[n:] <eos> " #### answer " <eos>   (the reference text, token for token
                                                                            with the GPT-2 tokenizer)

Schedule (reference `src/train.py`): steps_per_removed_token R = int(round(S / remove_per_epoch)) for S steps
per epoch; at global step g = epoch * S + step the count is remove_start_from + g // R (+ g + 1 when R == 0).
Once the count reaches `remove_all_beyond` every CoT token is removed. Each example removes count + o tokens,
o = min(Geometric(1 - exp(-lambda)), max_smoothing_offset) (reference `compute_lambda_distribution`), drawn
deterministically from (seed, epoch, record index). The trainer's stage is the count, capped where nothing more
changes (remove_all_beyond, or the longest CoT once `prepare_data` has seen the training set), so with
`reset_optimizer: stage` AdamW is reset exactly when the count grows and still removes something.
Evaluation: the prompt is the question plus the answer marker (`###` / the second <eos>), at every stage.

keep_position (reference `--keep_position`): the tokens after the removed CoT keep their original position ids, so
removing a token no longer moves every later token to a new position (with learned absolute positions that move
is a fresh lookup problem at each removal). Training examples skip n removed positions after the question
(`Example.position_shift`); the evaluation prompt skips the record's whole CoT length before the answer marker
(`Prompt.position_shift`), as the reference's evaluation shifts by the gold CoT length. Deviation: the reference
also shifts the separator that ends the question; here the question keeps positions 0..Q-1 and the shift starts
at the first token after it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import numpy as np

from latent_jax.config import check_rules, coerce_numbers
from latent_jax.layout import IGNORE, Example, Prompt
from latent_jax.methods.base import Method, check_record
from latent_jax.tokenizer import Tokenizer

REMOVE_ALL = 1 << 30  # a per-example removal count that removes every CoT token
SEPARATORS = ("newline", "eos")


def _number(name: str, v: Any) -> float:
    if isinstance(v, str) and v.strip().lower() in ("inf", "+inf", ".inf", "infinity"):
        return math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"ICoTSIConfig.{name} must be a number, got {v!r}")
    return float(v)


@dataclasses.dataclass(frozen=True)
class ICoTSIConfig:
    """remove_per_epoch: CoT tokens removed per epoch (reference 8; fractional allowed as in the reference).
    remove_start_from: tokens removed at step 0. remove_all_beyond: once the scheduled count reaches it, remove
    all CoT (None / "inf" = never; reference `remove_all_when_remove_beyond`). pretrain_epochs: epochs of explicit
    CoT (count held at remove_start_from) before the removal starts (reference `--pretrain_epochs`).
    smoothing_lambda: removal smoothing λ (reference 4; "inf" or smoothing=false: no offset).
    max_smoothing_offset: offsets are truncated here (reference: truncate_length 100 -> 99). separator: "newline"
    (project CoT format) or "eos" (reference). keep_position: the tokens after the removed CoT keep their original
    position ids (reference `--keep_position`; default off, as the reference)."""

    remove_per_epoch: float = 8.0
    remove_start_from: int = 0
    remove_all_beyond: int | None = None
    pretrain_epochs: int = 0
    smoothing: bool = True
    smoothing_lambda: float = 4.0
    max_smoothing_offset: int = 99
    separator: str = "newline"
    keep_position: bool = False

    def __post_init__(self):
        """Numbers may be given as YAML strings ("inf" included); remove_all_beyond: inf means never (None)."""
        for name in ("remove_per_epoch", "smoothing_lambda"):
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        if self.remove_all_beyond is not None and _number("remove_all_beyond", self.remove_all_beyond) == math.inf:
            object.__setattr__(self, "remove_all_beyond", None)
        coerce_numbers(self, "ICoTSIConfig")
        rpe, lam = self.remove_per_epoch, self.smoothing_lambda
        check_rules(self, "ICoTSIConfig", [
            ("remove_per_epoch", math.isfinite(rpe) and rpe > 0, "finite and > 0"),
            ("smoothing_lambda", not math.isnan(lam) and lam >= 0, ">= 0 (or inf)"),
            *((k, getattr(self, k) is None or getattr(self, k) >= 0, "an integer >= 0")
              for k in ("remove_start_from", "remove_all_beyond", "pretrain_epochs", "max_smoothing_offset")),
            ("smoothing", isinstance(self.smoothing, bool), "true or false"),
            ("keep_position", isinstance(self.keep_position, bool), "true or false"),
            ("separator", self.separator in SEPARATORS, f"one of {SEPARATORS}")])


def offset_distribution(lam: float, max_offset: int) -> np.ndarray:
    """P(o) for o = 0..max_offset: (1 - q) q^o with q = exp(-λ), the tail mass q^(max+1) added to the last entry
    (reference `compute_lambda_distribution`). λ = inf: always 0; λ = 0: always max_offset (the limit)."""
    p = np.zeros(max_offset + 1)
    if lam == math.inf:
        p[0] = 1.0
        return p
    q = math.exp(-lam)
    p[:] = (1.0 - q) * q ** np.arange(max_offset + 1)
    p[-1] += max(0.0, 1.0 - p.sum())
    return p / p.sum()


class ICoTSI(Method):
    """Stepwise internalization behind the `Method` interface; stage = number of CoT tokens removed."""

    name = "icot_si"
    special_tokens: tuple[str, ...] = ()

    def __init__(self, tokenizer: Tokenizer, cfg: ICoTSIConfig = ICoTSIConfig()):
        self.tok, self.cfg = tokenizer, cfg
        self.eos_id = tokenizer.eos_id
        off = cfg.smoothing and cfg.smoothing_lambda != math.inf
        self.offset_probs = offset_distribution(cfg.smoothing_lambda if off else math.inf, cfg.max_smoothing_offset)
        self._cdf = np.cumsum(self.offset_probs)
        self.max_cot_tokens: int | None = None  # set by prepare_data: the stage stops growing there

    def num_stages(self) -> int:
        """1: evaluation uses stage 0, and the prompt does not depend on the stage anyway."""
        return 1

    # ---- schedule -------------------------------------------------------------------------------------------
    def scheduled_removal(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """The reference count at optimizer step `step` of `epoch` (inf once remove_all_beyond is reached)."""
        per_token = int(round(steps_per_epoch / self.cfg.remove_per_epoch))  # Python round: half to even
        g = epoch * steps_per_epoch + step
        g_removing = max(0, g - self.cfg.pretrain_epochs * steps_per_epoch)  # the reference's counter is idle before
        n = self.cfg.remove_start_from + (g + 1 if per_token == 0 else g_removing // per_token)
        K = self.cfg.remove_all_beyond
        return math.inf if K is not None and n >= K else n

    def _caps(self) -> list[int]:
        """Counts that remove every CoT: remove_all_beyond and the longest training CoT (once prepare_data ran)."""
        return [c for c in (self.cfg.remove_all_beyond, self.max_cot_tokens) if c is not None]

    def schedule(self, epoch: int, step: int, steps_per_epoch: int) -> int:
        """Trainer stage: the count, capped at the first value that removes all CoT of every example."""
        caps = self._caps()
        n = self.scheduled_removal(epoch, step, steps_per_epoch)
        return int(min([n, *caps]))

    def eligible_for_best(self, stage: int) -> bool:
        """The trainer keeps the best model only among those that write no CoT (the count covers every training
        CoT): an early epoch that still writes it is not an iCoT-SI result, however accurate."""
        caps = self._caps()
        return bool(caps) and stage >= min(caps)

    def sample_offset(self, seed: int, epoch: int, index: int) -> int:
        if self._cdf[0] >= 1.0:
            return 0
        u = np.random.default_rng([seed, epoch, index, 0x1C07]).random()
        return int(min(np.searchsorted(self._cdf, u, side="right"), len(self._cdf) - 1))

    def example_stage(self, record: dict[str, Any], index: int, epoch: int, stage: int, seed: int,
                      uniform_prob: float) -> int:
        """Tokens removed from this example: all once the count reached remove_all_beyond, else count + o; during
        the `pretrain_epochs` exactly the count, no offset (the reference fills `to_remove` with
        `remove_start_from` in those epochs)."""
        if uniform_prob > 0:
            raise ValueError("icot_si has no uniform stage mixing: set method.uniform_prob to 0")
        K = self.cfg.remove_all_beyond
        if K is not None and stage >= K:
            return REMOVE_ALL
        if epoch < self.cfg.pretrain_epochs:
            return stage
        return stage + self.sample_offset(seed, epoch, index)

    def prepare_data(self, train_records: Sequence[dict[str, Any]], output_dir=None) -> None:
        """Record the longest CoT (tokens): beyond it the count changes nothing, so the stage (and the optimizer
        resets) stop there, as the reference skips resets once a batch has no CoT left."""
        batch = getattr(self.tok, "encode_batch", None) or (lambda ts: [self.tok.encode(t) for t in ts])
        longest = 0
        for lo in range(0, len(train_records), 4096):  # batched (Rust / tiktoken) and chunked: 808k records
            chunk = train_records[lo:lo + 4096]
            if self.cfg.separator == "eos":
                longest = max([longest, *map(len, batch([f" {' '.join(r['steps'])} " for r in chunk]))])
                continue
            owner = [i for i, r in enumerate(chunk) for _ in r["steps"]]
            lengths = np.bincount(owner, [len(x) for x in batch([s + "\n" for r in chunk for s in r["steps"]])],
                                  minlength=len(chunk)) if owner else [0]
            longest = max(longest, int(max(lengths)))
        self.max_cot_tokens = longest

    # ---- layout ---------------------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=1 << 16)
    def _question(self, question: str) -> tuple[int, ...]:
        bos = self.tok.name == "llama3"
        if self.cfg.separator == "eos":
            return tuple(self.tok.encode(f" {question} ", add_bos=bos)) + (self.eos_id,)
        return tuple(self.tok.encode(question + "\n", add_bos=bos))

    @functools.lru_cache(maxsize=1 << 16)
    def _cot_tokens(self, steps: tuple[str, ...]) -> tuple[int, ...]:
        if self.cfg.separator == "eos":
            return tuple(self.tok.encode(f" {' '.join(steps)} "))
        return tuple(t for s in steps for t in self.tok.encode(s + "\n"))

    @functools.cached_property
    def answer_marker(self) -> tuple[int, ...]:
        """What the evaluation prompt forces after the question: the answer starts here, no CoT."""
        return (self.eos_id,) if self.cfg.separator == "eos" else tuple(self.tok.encode("###"))

    def _answer(self, answer: str) -> list[int]:
        if self.cfg.separator == "eos":
            return [self.eos_id, *self.tok.encode(f" #### {answer} "), self.eos_id]
        return [*self.answer_marker, *self.tok.encode(" " + answer), self.eos_id]

    def encode(self, record: dict[str, Any], stage: int) -> Example:
        """`stage` = CoT tokens removed from the left (>= the CoT length: all)."""
        check_record(record)
        if stage < 0:
            raise ValueError(f"icot_si stage (tokens removed) must be >= 0, got {stage}")
        q = list(self._question(record["question"]))
        cot = self._cot_tokens(tuple(record["steps"]))
        rest = list(cot[stage:]) + self._answer(record["answer"])
        shift = min(stage, len(cot)) if self.cfg.keep_position else 0
        return Example(q + rest, [IGNORE] * len(q) + rest, latent_start=len(q), n_latent=0, position_shift=shift)

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        """The question, then the answer marker (with keep_position: after the record's CoT length of skipped
        positions, where training put it once every CoT token was removed)."""
        check_record(record)
        q = list(self._question(record["question"]))
        if self.cfg.keep_position:
            return Prompt(q, suffix=list(self.answer_marker),
                          position_shift=len(self._cot_tokens(tuple(record["steps"]))))
        return Prompt(q + list(self.answer_marker))

    def init_token_id(self) -> int:
        return self.eos_id
