"""Methods behind one interface (`methods.base.Method`). `build_method(name, tokenizer, **options)`.

Each method is a class `Cls(tokenizer, cfg)` with a frozen config dataclass whose `__post_init__` rejects impossible
values; the registry below maps a method name to (module, class, config class, fixed config fields). Modules are
imported lazily, so a method's dependencies load only when it is used.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from latent_jax.curriculum import CURRICULUM_KEYS, Curriculum
from latent_jax.layout import IGNORE, Batch, Example, Prompt, collate
from latent_jax.methods.base import Method
from latent_jax.methods.coconut import Coconut, CoconutConfig
from latent_jax.methods.pause import Pause, PauseConfig
from latent_jax.tokenizer import Tokenizer

_COCONUT = ("coconut", "Coconut", "CoconutConfig")
REGISTRY: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    **{v: (*_COCONUT, {"variant": v}) for v in CoconutConfig.VARIANTS},
    "pause": ("pause", "Pause", "PauseConfig", {}),
    "icot_si": ("icot", "ICoTSI", "ICoTSIConfig", {}),
    "lt_tuning": ("lt_tuning", "LTTuning", "LTTuningConfig", {}),
    "token_assorted": ("token_assorted", "TokenAssorted", "TokenAssortedConfig", {}),
    "soft_thinking": ("soft_thinking", "SoftThinking", "SoftThinkingConfig", {}),
    "superposition": ("superposition", "Superposition", "SuperpositionConfig", {}),
    "codi": ("codi", "CODI", "CODIConfig", {}),
    "sim_cot": ("sim_cot", "SimCoT", "SimCoTConfig", {}),
}
# methods whose module is installed (a partial checkout may lack some)
METHODS = tuple(n for n, (mod, *_) in REGISTRY.items() if importlib.util.find_spec(f"latent_jax.methods.{mod}"))


_REGISTERED: dict[str, tuple[type, type, dict[str, Any]]] = {}  # methods added from outside the package


def register_method(name: str, cls: type, config_cls: type, fixed: dict[str, Any] | None = None) -> None:
    """Make `build_method(name, ...)` (and so `method.name: NAME` in a config) build `cls(tokenizer, config)`.
    cls must subclass `Method`; config_cls is its frozen config dataclass; `fixed` are config fields the name
    sets. A built-in name cannot be replaced. See docs/adding_a_method.md."""
    if name in REGISTRY:
        raise ValueError(f"method {name!r} is built in; choose another name")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} does not subclass latent_jax.methods.base.Method")
    _REGISTERED[name] = (cls, config_cls, dict(fixed or {}))


def available_methods() -> tuple[str, ...]:
    """Every name `build_method` accepts: the built-ins installed here, then the registered ones."""
    return METHODS + tuple(_REGISTERED)


def _classes(name: str):
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {available_methods()}")
    module, cls, cfg_cls, fixed = REGISTRY[name]
    mod = importlib.import_module(f"latent_jax.methods.{module}")
    return getattr(mod, cls), getattr(mod, cfg_cls), fixed


def method_options(name: str) -> set[str]:
    """The option names a method section of method `name` accepts: its config's fields (less those its name fixes)
    and the curriculum's keys."""
    _, cfg_cls, fixed = _classes(name)
    return set(cfg_cls.__dataclass_fields__) - set(fixed) | set(CURRICULUM_KEYS)


def method_config(name: str, **options: Any):
    """The validated config dataclass of method `name` (the curriculum keys `CURRICULUM_KEYS` are checked and set
    aside: `Method.curriculum` holds them). Unknown options or impossible values -> ValueError."""
    _, cfg_cls, fixed = _classes(name)
    _, options = Curriculum.split(options)
    fields = set(cfg_cls.__dataclass_fields__) - set(fixed)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid: {sorted(method_options(name))}")
    try:
        return cfg_cls(**fixed, **options)
    except TypeError as e:  # e.g. a list where a number is expected
        raise ValueError(f"bad options for method {name!r}: {e}") from None


def build_method(name: str, tokenizer: Tokenizer, **options: Any):
    """Build a method; its special tokens are added to `tokenizer`; the curriculum keys (epochs_per_stage,
    uniform_prob, reset_optimizer) become its `curriculum`. Unknown names/options -> ValueError."""
    cls, _, _ = _classes(name)
    curriculum, own = Curriculum.split(options)
    method = cls(tokenizer, method_config(name, **own))
    method.curriculum = curriculum
    return method


def prepare_model(method, model_cfg, graphdef, params):
    """Grow the model's vocabulary to the tokenizer's (new special tokens copy `init_token`'s embedding, as the
    Coconut reference does), then `method.adapt_model(..., training=True)` (CODI: its thought projection).
    Returns (model_cfg, graphdef, params), unchanged when nothing was added."""
    from latent_jax.params import resize_vocab

    if method.tok.vocab_size > model_cfg.vocab_size:
        model_cfg, graphdef, params = resize_vocab(model_cfg, params, method.tok.vocab_size,
                                                   init_from=method.init_token_id())
    return method.adapt_model(model_cfg, graphdef, params, training=True)


__all__ = ["CURRICULUM_KEYS", "Curriculum", "IGNORE", "Batch", "Example", "Method", "Prompt", "collate", "Coconut",
           "CoconutConfig", "Pause", "PauseConfig", "METHODS", "REGISTRY", "available_methods", "build_method",
           "method_config", "method_options", "prepare_model", "register_method"]
