"""Model configuration: one frozen dataclass for both GPT-2 and Llama families."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

FAMILIES = ("gpt2", "llama")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SCAN_MIN_LAYERS = 8  # scan_layers None (auto): scan the decoder stack from this depth on, ...
SCAN_ON_CPU = False  # ... on accelerators only: XLA:CPU copies each layer's weights out of the stack (see `scanned`)
REMAT = ("none", "full", "dots")  # decoder-layer rematerialisation: off, recompute all, save matmuls
DROPOUT_RATES = ("embd_dropout", "resid_dropout", "attn_dropout")


def check_keys(cls, d: dict, what: str) -> None:
    """ValueError listing the valid fields when `d` has keys that are not fields of dataclass `cls`."""
    valid = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid: {valid}")


def coerce_numbers(obj, prefix: str, strict_types: bool = False) -> None:
    """For a frozen config dataclass: a float field given an int (or a numeric string) becomes a float; an int field
    given anything but an int (a bool included) is an error, as is, with `strict_types`, a str field given a
    non-string. Messages name `{prefix}.{field}`."""
    for f in dataclasses.fields(obj):
        v, t = getattr(obj, f.name), str(f.type)
        if t.startswith("float") and isinstance(v, (int, str)) and not isinstance(v, bool):
            try:
                object.__setattr__(obj, f.name, float(v))
            except ValueError:
                raise ValueError(f"{prefix}.{f.name} must be a number, got {v!r}") from None
        elif t.startswith("int") and v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{prefix}.{f.name} must be an integer, got {v!r}")
        elif strict_types and t == "str" and not isinstance(v, str):
            raise ValueError(f"{prefix}.{f.name} must be a string, got {v!r}")


def check_rules(obj, prefix: str, rules) -> None:
    """`rules`: (field, ok, what it must be) triples; the first failing one raises
    `ValueError("{prefix}.{field}={value!r} is invalid: must be {what}")`."""
    bad = [(name, want) for name, ok, want in rules if not ok]
    if bad:
        raise ValueError(f"{prefix}.{bad[0][0]}={getattr(obj, bad[0][0])!r} is invalid: must be {bad[0][1]}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1/3.2 `llama3` rope scaling (HF `rope_scaling` with rope_type='llama3')."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer config.

    family: "gpt2" (learned positions, LayerNorm, GELU-new, biases, tied head) or
            "llama" (RoPE, RMSNorm, SwiGLU, grouped-query attention).
    dtype: compute dtype ("float32" | "bfloat16"); param_dtype: storage dtype of weights.
    remat: "none" | "full" (recompute each decoder layer in the backward pass) | "dots" (save the weight matmuls,
           recompute the rest: `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`).
    embd_dropout / resid_dropout / attn_dropout: dropout rates of HF GPT-2's `embd_pdrop` (input embeddings +
           positions), `resid_pdrop` (attention and MLP outputs, before the residual add) and `attn_pdrop`
           (attention probabilities; Llama's `attention_dropout`). Applied only when a forward pass gets a
           `dropout_rng` (training); evaluation and generation never do. `load_hf` reads them from config.json.
    smear_keys: smeared-key attention (Olsson et al. 2022, "In-context learning and induction heads"): each key is
           sigmoid(a_h) k_j + (1 - sigmoid(a_h)) k_{j-1} with a learned a_h per kv head (init 0). A one-layer
           induction head ("find the token after the one like mine") then needs no previous-token head: the from-
           scratch CPU lab learns edge lookup in ~10^4 samples instead of > 4*10^5 (BUILD_NOTES, issue 15). Not a
           transformers architecture: an export carries it as `latent_jax_smear_keys` in config.json (our
           `load_hf` reads it back; `transformers` cannot run such a folder).
    thought_proj_dim / thought_proj_norm: CODI's thought projection (0: none): Linear(D, P) -> GELU -> Linear(P, D)
           -> LayerNorm (`thought_proj_norm`), applied to a final hidden state before it is fed back as the next
           thought (`models.project_thought`). Exported as `latent_jax.prj.*` tensors (torch nn.Sequential names)
           with `latent_jax_thought_proj_dim` / `_norm` in config.json; `transformers` ignores them.
    scan_layers: the decoder stack as one `lax.scan` over stacked per-layer params (True), a Python loop over a
           list of blocks (False), or None (auto, the default): scanned from `SCAN_MIN_LAYERS` = 8 layers on, on GPU
           and TPU (`scanned`). Compile time and program size then stay flat with depth (BUILD_NOTES, issue 20);
           shallow models and CPU runs keep the list. Both layouts import / export the same HF names; a checkpoint
           restores only into its own layout (the error names both).
    loss_chunk: tokens per chunk of the training loss's LM head + cross-entropy (`latent_jax.loss`): the
           [B, T, V] logits are never held, forward or backward. 0 (default): the full logits. A chunk that does
           not divide the sequence is padded (the padding is ignored).
    Softmax, norms and the loss are always computed in float32.
    """

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_positions: int
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attn_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    embd_dropout: float = 0.0
    resid_dropout: float = 0.0
    attn_dropout: float = 0.0
    smear_keys: bool = False
    thought_proj_dim: int = 0
    thought_proj_norm: bool = True
    scan_layers: bool | None = None
    loss_chunk: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; valid: {FAMILIES}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "max_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.thought_proj_dim < 0:
            raise ValueError(f"ModelConfig.thought_proj_dim must be >= 0 (0: none), got {self.thought_proj_dim}")
        if self.scan_layers not in (None, True, False):
            raise ValueError(f"ModelConfig.scan_layers={self.scan_layers!r}: true, false or null (auto)")
        if isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            raise ValueError(f"ModelConfig.loss_chunk={self.loss_chunk!r} must be an integer >= 0 (0: unchunked)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; valid: {sorted(_DTYPES)}")
        if isinstance(self.remat, bool):  # older configs: remat=True/False
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; valid: {REMAT}")
        for name in DROPOUT_RATES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: a dropout rate is in [0, 1]")

    @property
    def scanned(self) -> bool:
        """Whether the decoder stack is scanned: `scan_layers`, or (None, auto) n_layers >= SCAN_MIN_LAYERS on a GPU /
        TPU backend. Not on CPU: XLA:CPU copies each layer's weights out of the stacked array before its matmuls, which
        made GPT-2-124M's Coconut step 1.3x slower and its decoding 2.2x slower there (BUILD_NOTES, issue 20); the
        model records the resolved value in its config (`Transformer.cfg`), so checkpoints name their layout."""
        if self.scan_layers is not None:
            return self.scan_layers
        if self.n_layers < SCAN_MIN_LAYERS:
            return False
        import jax

        return SCAN_ON_CPU or jax.default_backend() != "cpu"

    @property
    def has_dropout(self) -> bool:
        return any(getattr(self, name) > 0 for name in DROPOUT_RATES)

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        check_keys(cls, d, "ModelConfig keys")
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def num_params(self) -> int:
        """Parameter count (embeddings included, tied head counted once)."""
        D, F, H = self.d_model, self.d_ff, self.head_dim
        attn = D * H * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = D * F * (2 if self.family == "gpt2" else 3)
        per_layer = attn + mlp + 4 * D
        emb = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        pos = self.max_positions * D if self.family == "gpt2" else 0
        return self.n_layers * per_layer + emb + pos + 2 * D


def gpt2_config(size: str = "124m", **kw: Any) -> ModelConfig:
    """GPT-2 shapes: tiny (tests), small (CPU default job), 124m, 355m, 774m, 1.5b."""
    shapes = {
        "tiny": (2, 64, 4, 128), "small": (4, 256, 4, 512), "124m": (12, 768, 12, 1024),
        "355m": (24, 1024, 16, 1024), "774m": (36, 1280, 20, 1024), "1.5b": (48, 1600, 25, 1024),
    }
    if size not in shapes:
        raise ValueError(f"unknown GPT-2 size {size!r}; valid: {sorted(shapes)}")
    L, D, N, P = shapes[size]
    base = dict(family="gpt2", vocab_size=50257, d_model=D, n_layers=L, n_heads=N, n_kv_heads=N,
                head_dim=D // N, d_ff=4 * D, max_positions=P, norm_eps=1e-5, tie_embeddings=True,
                attn_bias=True, mlp_bias=True, bos_token_id=50256, eos_token_id=50256)
    base.update(kw)
    return ModelConfig(**base)


def llama_config(size: str = "3.2-1b", **kw: Any) -> ModelConfig:
    """Llama-3 shapes: tiny (tests), 3.2-1b, 3.2-3b, 3.1-8b."""
    shapes = {  # L, D, N, K, F, tied
        "tiny": (2, 64, 4, 2, 128, True), "3.2-1b": (16, 2048, 32, 8, 8192, True),
        "3.2-3b": (28, 3072, 24, 8, 8192, True), "3.1-8b": (32, 4096, 32, 8, 14336, False),
    }
    if size not in shapes:
        raise ValueError(f"unknown Llama size {size!r}; valid: {sorted(shapes)}")
    L, D, N, K, F, tied = shapes[size]
    base = dict(family="llama", vocab_size=128256, d_model=D, n_layers=L, n_heads=N, n_kv_heads=K,
                head_dim=D // N, d_ff=F, max_positions=131072, norm_eps=1e-5, tie_embeddings=tied,
                rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0 if size != "3.1-8b" else 8.0),
                bos_token_id=128000, eos_token_id=128001)
    base.update(kw)
    return ModelConfig(**base)
