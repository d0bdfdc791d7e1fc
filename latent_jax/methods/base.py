"""The `Method` base class: what the trainer, evaluation, analysis and the CLI may ask of a latent-reasoning method.

A method is a class `Cls(tokenizer, cfg)` with a frozen config dataclass (`cfg`), registered in
`latent_jax.methods.REGISTRY`. It must implement `encode` (a record at a curriculum stage -> `Example`) and
`prompt` (a record -> the generation `Prompt`); every other hook has a documented default here, and the callers
use only these members (no `getattr` / `hasattr` probing). The shared types (`Example`, `Batch`, `collate`,
`Prompt`, `IGNORE`) live in `latent_jax.layout`, below the methods; they are re-exported here.

    class Mine(Method):
        name = "mine"
        def __init__(self, tokenizer, cfg): self.tok, self.cfg = tokenizer, cfg
        def encode(self, record, stage): ...   # -> Example
        def prompt(self, record, stage): ...   # -> Prompt

See docs/adding_a_method.md for a complete one-file method.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import numpy as np

from latent_jax.curriculum import Curriculum
from latent_jax.data.records import validate_record
from latent_jax.layout import IGNORE, Batch, Example, Prompt, collate, round_up  # noqa: F401 (re-exported)


def first_token_id(tok, text: str, what: str = "init_token") -> int:
    """The first token of `text` (how a method's new special-token rows are initialized: Coconut's "<<")."""
    ids = tok.encode(text)
    if not ids:
        raise ValueError(f"{what} {text!r} encodes to no token")
    return ids[0]


def check_record(record: Any, index: int | None = None, source: str | None = None) -> None:
    """A record a method can encode: question (str), steps (list of str), answer (str); else a `DataFormatError`
    (a ValueError) naming the source and index (`data.records.validate_record`)."""
    validate_record(record, "?" if index is None else index, source)


@dataclasses.dataclass(frozen=True)
class RecordTokens:
    """A record tokenized the way every reference lays it out (shared, cached: do not mutate the lists)."""

    question: list[int]  # question + "\n" (BOS first for Llama 3)
    steps: list[list[int]]  # each reasoning step + "\n"
    answer: list[int]  # "### " + answer, then EOS

    @property
    def cot(self) -> list[int]:
        """Every step's tokens, concatenated."""
        return [t for s in self.steps for t in s]


def uniform_example_stage(record: dict[str, Any], index: int, epoch: int, stage: int, seed: int,
                          uniform_prob: float) -> int:
    """`stage`, or with probability `uniform_prob` a uniform draw from [0, len(record["steps"])] (the reference's
    `uniform_prob` mixing). Deterministic in (seed, epoch, index); index is the record's position in the full
    training set."""
    if uniform_prob <= 0.0:
        return stage
    rng = np.random.default_rng([seed, epoch, index, 0x5EED])
    if rng.random() < uniform_prob:
        return int(rng.integers(0, len(record["steps"]) + 1))
    return stage


class Method:
    """A latent-reasoning method: the data layout per curriculum stage, the generation prompt, and hooks.

    Members every method has:
      name                 its `method.name` (the registry key)
      tok                  its tokenizer (special tokens already added); cfg: its frozen config dataclass
      special_tokens       tokens it adds to the tokenizer (default none)
      uses_hidden_thoughts thoughts are final hidden states fed back (Coconut): `latent-jax analyze` applies
      next_input           what a thought slot is fed, from the previous final hidden state: None (default) the
                           hidden state itself (Coconut); else `f(graphdef, params, h_BxD) -> x_BxD` (CODI: its
                           projection). The default `generate` and analysis feed thoughts with it
      thoughts_per_step    continuous thoughts per replaced reasoning step (Coconut's c_thought; default 1)
      max_latent_stage     the last latent stage of a Coconut-style curriculum; None (default): the method has
                           no such curriculum (its scheduled stage then goes 0, 1 and stays there)
      curriculum           `latent_jax.curriculum.Curriculum` (epochs_per_stage, uniform_prob, reset_optimizer):
                           set by `build_method` from the method section's curriculum keys; default Curriculum()
    Required: `encode`, `prompt`. Hooks with defaults (override what the method needs):
      num_stages, init_token_id, schedule (-> stage_at), example_stage, collate, loss_for_stage, adapt_model,
      on_stage_start, get_state / set_state, prepare_data, generate, eligible_for_best, stage_note, steps_replaced,
      init_aux_params. Shared helper:
      `record_tokens(record)` (question / steps / answer token ids, the layout every reference uses).
    """

    name: str = "method"
    special_tokens: tuple[str, ...] = ()
    uses_hidden_thoughts: bool = False
    next_input: Callable | None = None
    thoughts_per_step: int = 1
    max_latent_stage: int | None = None
    curriculum: Curriculum = Curriculum()
    tok: Any = None
    cfg: Any = None

    # ---- data layout (required) ---------------------------------------------------------------------------------
    def encode(self, record: dict[str, Any], stage: int) -> Example:
        """Tokenize a record for training at `stage` (token ids from the method's tokenizer)."""
        raise NotImplementedError(f"{type(self).__name__}.encode")

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        """The generation prompt of a record for evaluation at `stage`."""
        raise NotImplementedError(f"{type(self).__name__}.prompt")

    def record_tokens(self, record: dict[str, Any]) -> RecordTokens:
        """The record's question, steps and answer as token ids (checked, then cached per text): the encoding
        Coconut, LT-Tuning, Token Assorted and Pause share."""
        check_record(record)
        return _record_tokens(self.tok, record["question"], tuple(record["steps"]), record["answer"])

    # ---- curriculum ---------------------------------------------------------------------------------------------
    def num_stages(self) -> int:
        """Distinct curriculum stages; evaluation after training uses the last one. Default 1 (no curriculum)."""
        return 1

    def schedule(self, epoch: int, step: int, steps_per_epoch: int) -> int | None:
        """The stage of optimizer step `step` (0-based within `epoch`) for a method with a schedule of its own
        (iCoT-SI's removal count, LT-Tuning's stages): an int for every step. None (the default): the curriculum's
        Coconut schedule (`stage_at`)."""
        return None

    def stage_at(self, epoch: int, step: int, steps_per_epoch: int) -> int:
        """The stage the trainer trains optimizer step `step` of `epoch` at: `schedule`, else
        `curriculum.stage(epoch, max_latent_stage)` (epoch // epochs_per_stage, capped at max_latent_stage + 1). The
        trainer resets the optimizer where it changes (`reset_optimizer: stage`), for a method that has stages."""
        s = self.schedule(epoch, step, steps_per_epoch)
        return self.curriculum.stage(epoch, self.max_latent_stage) if s is None else s

    def example_stage(self, record: dict[str, Any], index: int, epoch: int, stage: int, seed: int,
                      uniform_prob: float) -> int:
        """The stage one training example is encoded at, deterministic in its arguments (the pipeline passes
        `curriculum.uniform_prob`). Default: `stage`, or with probability `uniform_prob` a uniform draw over
        0..len(steps) (`uniform_example_stage`)."""
        return uniform_example_stage(record, index, epoch, stage, seed, uniform_prob)

    def eligible_for_best(self, stage: int) -> bool:
        """Whether a model evaluated at `stage` may be kept as the best (iCoT-SI: only once no CoT is written).
        Default True."""
        return True

    def stage_note(self, stage: int) -> str | None:
        """A sentence for the results table when the stage number alone does not say what was evaluated (Coconut:
        a stage past max_latent_stage). Default None."""
        return None

    # ---- batches and loss ---------------------------------------------------------------------------------------
    def collate(self, examples: Sequence[Example], pad_id: int, bucket: int = 32, max_len: int | None = None,
                batch_size: int | None = None) -> Batch:
        """Lay out a micro-batch. Default `latent_jax.layout.collate` (thoughts aligned at one column)."""
        return collate(examples, pad_id, bucket, max_len, batch_size)

    def loss_for_stage(self, stage: int) -> Callable:
        """The loss of a stage, `loss(params, graphdef, batch, prefix_len, n_latent, rng) -> (loss, aux)` (pure;
        aux has loss_sum, n_tokens, n_correct; rng is the dropout key). Return the same (hashable) object for the
        same stage: the jitted train step is cached on it. Default: the latent loop's `latent.loss_fn`."""
        from latent_jax.latent import loss_fn

        return loss_fn

    # ---- state and data preparation -----------------------------------------------------------------------------
    def steps_replaced(self, n_steps: int, stage: int) -> int:
        """How many leading reasoning steps of a record with `n_steps` steps the stage's continuous thoughts replace
        (SIM-CoT supervises thought k with step k // thoughts_per_step among them). Default 0: no thoughts replace
        steps."""
        return 0

    def init_aux_params(self, graphdef, params, seed: int = 0) -> Any:
        """Training-only parameters the method's loss trains beside the model's (SIM-CoT's step decoder), or None
        (the default). When not None the trainer optimises {"model": params, "aux": this} with one optimizer, its
        loss receives that tree, and checkpoints keep it as an item of its own (`aux`); export, evaluation and
        generation only ever see the model's params."""
        return None

    def init_token_id(self) -> int | None:
        """The token whose embedding initializes the rows of the method's new special tokens (Coconut: "<<"), or
        None (the default): new rows keep `resize_vocab`'s own initialization."""
        return None

    def prepare_data(self, train_records: Sequence[dict[str, Any]], output_dir) -> None:
        """Called once before training (fit a tokenizer of latents, measure the longest CoT, ...). Default: nothing."""

    def fit_auxiliary(self, train_records: Sequence[dict[str, Any]], folder) -> dict[str, Any]:
        """Train the method's auxiliary model ahead of training, save it to `folder` and return its metrics
        (`latent-jax vqvae`: Token Assorted's VQ-VAE, which `prepare_data` then finds). Default: the method has none,
        a ValueError."""
        raise ValueError(f"method {self.name!r} has no auxiliary model to fit (token_assorted's VQ-VAE is one)")

    def adapt_model(self, model_cfg, graphdef, params, training: bool):
        """The model the method runs on, after its vocabulary grew (`methods.prepare_model`, training: True) or as
        loaded for evaluation / analysis (training: False): CODI adds its thought projection for training and
        refuses a model without one for evaluation. Returns (model_cfg, graphdef, params); default unchanged."""
        return model_cfg, graphdef, params

    def on_stage_start(self, stage: int, graphdef, params, records: Sequence[dict[str, Any]]) -> None:
        """Called before an epoch whose first stage differs from the previous step's (LT-Tuning rebuilds its data
        from the current model here). Default: nothing."""

    def get_state(self) -> Any:
        """JSON-able method state saved in every checkpoint (None: stateless, the default)."""
        return None

    def set_state(self, state: Any) -> None:
        """Restore what `get_state` returned (on resume). Default: a stateless method accepts only None."""
        if state is not None:
            raise ValueError(f"method {self.name!r} keeps no state, but the checkpoint holds some: {str(state)[:80]}")

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate(self, graphdef, params, prompts: Sequence[Prompt], sampling, eos_id: int, pad_id: int,
                 batch_size: int | None = None) -> list[list[int]]:
        """Decode a batch of prompts for evaluation (token lists, EOS included). Default: the shared latent
        generation (`latent.generate_prompts`: prefix, thoughts fed back as hidden states (`next_input` of them),
        suffix, decode)."""
        from latent_jax.latent import generate_prompts

        return generate_prompts(graphdef, params, prompts, sampling, eos_id, pad_id, batch_size=batch_size,
                                next_input=self.next_input)


@functools.lru_cache(maxsize=100_000)
def _record_tokens(tok, question: str, steps: tuple[str, ...], answer: str) -> RecordTokens:
    q = tok.encode(question + "\n", add_bos=tok.name == "llama3")
    return RecordTokens(q, [tok.encode(s + "\n") for s in steps], tok.encode("### " + answer) + [tok.eos_id])
