"""Methods behind one interface (`methods.base.Method`). `build_method(name, tokenizer, **options)`."""
from __future__ import annotations

from typing import Any

from latent_jax.methods.base import IGNORE, Batch, Example, Method, Prompt, collate
from latent_jax.methods.coconut import Coconut, CoconutConfig
from latent_jax.methods.pause import Pause, PauseConfig
from latent_jax.tokenizer import Tokenizer

METHODS = ("coconut", "cot", "no_cot", "no_curriculum", "no_thought", "pause_as_thought", "pause")


def build_method(name: str, tokenizer: Tokenizer, **options: Any):
    """Build a method; its special tokens are added to `tokenizer`. Unknown names/options -> ValueError."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {METHODS}")
    cls, cfg_cls = (Pause, PauseConfig) if name == "pause" else (Coconut, CoconutConfig)
    fields = set(cfg_cls.__dataclass_fields__) - {"variant"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid: {sorted(fields)}")
    cfg = cfg_cls(**options) if name == "pause" else cfg_cls(variant=name, **options)
    return cls(tokenizer, cfg)


def prepare_model(method, model_cfg, graphdef, params):
    """Grow the model's vocabulary to the tokenizer's (new special tokens copy `init_token`'s embedding, as the
    Coconut reference does). Returns (model_cfg, graphdef, params), unchanged when nothing was added."""
    from latent_jax.params import resize_vocab

    if method.tok.vocab_size <= model_cfg.vocab_size:
        return model_cfg, graphdef, params
    return resize_vocab(model_cfg, params, method.tok.vocab_size, init_from=method.init_token_id())


__all__ = ["IGNORE", "Batch", "Example", "Method", "Prompt", "collate", "Coconut", "CoconutConfig", "Pause",
           "PauseConfig", "METHODS", "build_method", "prepare_model"]
