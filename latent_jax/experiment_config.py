"""The experiment config: a frozen `ExperimentConfig` (sections `model`, `method`, `data`, `train`, `eval`,
`compare`), loaded from YAML + dotted `key=value` overrides and validated at load, before any data or training.

    cfg = load_config("prosqa_coconut_cpu", ["train.epochs=3", "data.train_n=500"])
    cfg.data.task, cfg.model.overrides["n_layers"], cfg.method["name"]     # attributes ...
    cfg["data"]["task"]                                                   # ... or read-only mapping access
    cfg.replace(output_dir="runs/x", method={"name": "cot"})             # a changed copy (validated again)
    cfg.to_dict()                                                         # plain dicts, for YAML / JSON

`model`, `data` and `eval` are frozen dataclasses whose unknown keys are errors listing the valid ones; `method`
(checked by its method's own config class) and `train` (by `TrainConfig`) are read-only mappings; `compare` a tuple
of method sections or None. Every section is also a read-only `Mapping`, so `dict(cfg.data)` and `{**cfg.train}`
work. Configs written before the curriculum became the method's still load (`_move_curriculum_keys`).
"""
from __future__ import annotations

import dataclasses
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

import yaml

from latent_jax.config import check_rules, coerce_numbers

REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
STEP_SEPARATORS = ("newline", "none")
SELECTS = ("valid", "generated")


class FrozenDict(Mapping):
    """A read-only, hashable mapping; nested dicts are frozen too and lists become tuples (`thaw` undoes both)."""

    def __init__(self, d=()):
        self._d = {k: freeze(v) for k, v in dict(d).items()}

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)

    def __hash__(self):
        return hash(tuple(sorted(self._d.items(), key=lambda kv: str(kv[0]))))

    def __repr__(self):
        return f"FrozenDict({self._d!r})"


def freeze(v):
    if isinstance(v, Mapping) and not isinstance(v, FrozenDict):
        return FrozenDict(v)
    return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def thaw(v):
    """Plain dicts and lists again (YAML never yields a tuple, so every tuple was a list)."""
    if isinstance(v, Mapping):
        return {k: thaw(x) for k, x in v.items()}
    return [thaw(x) for x in v] if isinstance(v, (list, tuple)) else v


class Section(Mapping):
    """A frozen config dataclass that also reads as a mapping of its fields (`section["key"]`, `dict(section)`)."""

    def __getitem__(self, k):
        if k not in self._names():
            raise KeyError(k)
        return getattr(self, k)

    def __iter__(self):
        return iter(self._names())

    def __len__(self):
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping, prefix: str):
        if not isinstance(d, Mapping):
            raise ValueError(f"config section {prefix!r} must be a mapping")
        bad = sorted(set(d) - set(cls._names()))
        if bad:
            raise ValueError(f"unknown config key(s) {[f'{prefix}.{b}' for b in bad]}; valid: {sorted(cls._names())}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists, for YAML / JSON."""
        return {k: v.to_dict() if isinstance(v, Section) else thaw(v) for k, v in self.items()}

    def replace(self, **changes):
        """A changed copy, validated again (an `ExperimentConfig` section may be given as a plain mapping)."""
        return dataclasses.replace(self, **changes)


# ModelConfig fields a pretrained model may take from `model.overrides`: they change how its weights run, not them
RUNTIME_OVERRIDES = ("scan_layers", "loss_chunk", "remat")


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
    """pretrained: a HF folder or hub id (null: random init of `family`/`size` + `overrides`, ModelConfig fields;
    with a pretrained model only `RUNTIME_OVERRIDES` apply: the layer layout, the loss chunk, remat; the others
    describe a random init);
    compact_vocab: a random-init text model keeps only the tokens its records use."""

    pretrained: str | None = None
    family: str = "gpt2"
    size: str = "small"
    overrides: Any = dataclasses.field(default_factory=FrozenDict)
    compact_vocab: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        from latent_jax.config import ModelConfig

        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"model.overrides must be a mapping of ModelConfig fields, got {self.overrides!r}")
        object.__setattr__(self, "overrides", freeze(self.overrides))
        fields = sorted(f.name for f in dataclasses.fields(ModelConfig))
        bad = sorted(set(self.overrides) - set(fields))
        if bad:
            raise ValueError(f"unknown model.overrides key(s) {bad}; valid: {fields}")
        coerce_numbers(self, "model")
        check_rules(self, "model", [("family", self.family in ("gpt2", "llama"), "'gpt2' or 'llama'"),
                                    ("compact_vocab", isinstance(self.compact_vocab, bool), "true or false")])


@dataclasses.dataclass(frozen=True)
class DataSection(Section):
    """task / rung / encoding choose the records; train_source (generated | file) and train_n the training set;
    valid_path / valid_n the reported set; select (valid | generated) and select_n the keep-best set; seed the
    generators; symbolic_ids and step_separator the symbolic layout (`latent_jax.data.symbolic`)."""

    task: str = "prosqa"
    train_source: str = "generated"
    train_n: int | None = None
    train_path: str | None = None
    valid_n: int | None = None
    valid_path: str | None = None
    seed: int = 0
    select: str = "valid"
    select_n: int | None = None
    encoding: str = "text"
    rung: Any = None
    symbolic_ids: str = "shuffled"
    step_separator: str | None = None

    def __post_init__(self):
        from latent_jax.data import ENCODINGS

        coerce_numbers(self, "data")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"data.encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.encoding == "symbolic" and self.task != "prosqa":
            raise ValueError(f"data.encoding=symbolic is for ProsQA (its records carry the graph); task is"
                             f" {self.task!r}")
        step_separator(self)
        if self.train_path is not None and self.train_source != "file":
            raise ValueError(f"data.train_path={self.train_path!r} is only read with data.train_source=file"
                             f" (got {self.train_source!r})")
        check_select(self)
        if self.rung is not None:
            from latent_jax.data import graph_size

            graph_size(self.rung)
        object.__setattr__(self, "rung", freeze(self.rung))


@dataclasses.dataclass(frozen=True)
class EvalSection(Section):
    """batch_size and max_new_tokens of greedy generation; stage: the curriculum stage evaluated (null: final)."""

    batch_size: int = 32
    max_new_tokens: int = 64
    stage: int | None = None

    def __post_init__(self):
        coerce_numbers(self, "eval")
        check_rules(self, "eval", [("batch_size", self.batch_size >= 1, "an integer >= 1"),
                                   ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
                                   ("stage", self.stage is None or self.stage >= 0, "null or an integer >= 0")])


def step_separator(d: Mapping) -> str:
    """`data.step_separator`: "newline" (the reference layout: a newline after the question and each step) or
    "none" (symbolic only: the path's nodes follow each other, Zhu et al.'s layout). Default: "none" for the symbolic
    encoding, "newline" for text."""
    sep = d.get("step_separator") or ("none" if d.get("encoding") == "symbolic" else "newline")
    if sep not in STEP_SEPARATORS:
        raise ValueError(f"data.step_separator must be one of {STEP_SEPARATORS}, got {sep!r}")
    if sep == "none" and d.get("encoding", "text") != "symbolic":
        raise ValueError("data.step_separator=none is for data.encoding=symbolic (a BPE text layout needs its"
                         " newlines)")
    return sep


def check_select(d: Mapping) -> None:
    if d["select"] not in SELECTS:
        raise ValueError(f"data.select must be 'valid' or 'generated', got {d['select']!r}")
    n = d.get("select_n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise ValueError(f"data.select_n must be a positive integer (null: the validation size), got {n!r}")


_SECTIONS = {"model": ModelSection, "data": DataSection, "eval": EvalSection}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(Section):
    """One experiment: `name` (default: the YAML's stem), `output_dir` (default runs/{name}), `tokenizer` (a HF
    folder or hub id; null: the model's or GPT-2's), and the sections. `compare`: method sections trained one
    after another at this one budget (`run_compare`); an entry's `init_from: NAME` starts it from the trained model
    of the entry NAME before it (Coconut's recipe: the latent stages continue from the CoT model) instead of
    `model`'s initialisation, and its `train: {...}` changes train options other than the budget for it alone
    (e.g. the learning rate of a run that continues another's)."""

    name: str = "run"
    output_dir: str | None = None
    tokenizer: str | None = None
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    method: Any = dataclasses.field(default_factory=lambda: FrozenDict({"name": "coconut"}))
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: Any = dataclasses.field(default_factory=FrozenDict)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    compare: Any = None

    def __post_init__(self):
        from latent_jax.methods import method_config

        for key, cls in _SECTIONS.items():
            v = getattr(self, key)
            if not isinstance(v, cls):
                object.__setattr__(self, key, cls.from_dict(v, key))
        for key in ("method", "train"):
            if not isinstance(getattr(self, key), Mapping):
                raise ValueError(f"config section {key!r} must be a mapping")
        compare = self.compare
        if compare is not None:
            if not (isinstance(compare, (list, tuple)) and compare):
                raise ValueError("compare must be a non-empty list of method sections, e.g. [{name: no_cot}, "
                                 "{name: cot}]")
            compare = [{"name": e} if isinstance(e, str) else e for e in compare]
            names = [e.get("name") if isinstance(e, Mapping) else e for e in compare]
            for i, entry in enumerate(compare):
                if not isinstance(entry, Mapping) or "name" not in entry:
                    raise ValueError(f"compare[{i}] must be a method name or a mapping with a 'name', got {entry!r}")
                if names.count(entry["name"]) > 1:
                    raise ValueError(f"compare[{i}]: method {entry['name']!r} appears twice (each writes to"
                                     f" {{output_dir}}/{{name}})")
                src = entry.get("init_from")
                if src is not None and src not in names[:i]:
                    raise ValueError(f"compare[{i}].init_from={src!r} must name an entry before it, one of"
                                     f" {names[:i]} (it starts from that entry's trained model)")
                own = entry.get("train", {})
                budget = sorted(set(own) & {"epochs", "batch_size", "grad_accum"}) if isinstance(own, Mapping) else []
                if not isinstance(own, Mapping) or budget:
                    raise ValueError(f"compare[{i}].train must be a mapping of train options other than the budget"
                                     f" (every entry trains at the config's one budget), got {own!r}")
        method, train = thaw(self.method), thaw(self.train)
        compare = None if compare is None else [thaw(e) for e in compare]
        _move_curriculum_keys(method, train, compare)
        for section in [method, *(compare or [])]:
            skip = ("name", "init_from", "train") if section is not method else ("name",)
            method_config(section.get("name", "coconut"), **{k: v for k, v in section.items() if k not in skip})
        object.__setattr__(self, "method", freeze(method))
        object.__setattr__(self, "train", freeze(train))
        object.__setattr__(self, "compare", None if compare is None else freeze(compare))
        if self.output_dir is None:
            object.__setattr__(self, "output_dir", f"runs/{self.name}")

    @property
    def method_options(self) -> dict[str, Any]:
        """The method section without its `name`, as plain values: `build_method(cfg.method["name"], tok,
        **cfg.method_options)`."""
        return {k: v for k, v in thaw(self.method).items() if k != "name"}


def resolve_config_path(name: str) -> pathlib.Path:
    p = pathlib.Path(name)
    for cand in (p, REPO_CONFIGS / name, REPO_CONFIGS / f"{name}.yaml"):
        if cand.is_file():
            return cand
    have = sorted(x.stem for x in REPO_CONFIGS.glob("*.yaml")) if REPO_CONFIGS.is_dir() else []
    raise FileNotFoundError(f"config {name!r} not found (a YAML path, or one of {have})")


def load_config(path_or_name: str | None, overrides: list[str] = ()) -> ExperimentConfig:
    """YAML file (or a name in configs/) + dotted `key=value` overrides (values parsed as YAML)."""
    raw = {}
    if path_or_name is not None:
        raw = yaml.safe_load(resolve_config_path(path_or_name).read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    valid = ExperimentConfig._names()
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid: {sorted(valid)}")
    if raw.get("name") is None:
        raw["name"] = pathlib.Path(path_or_name).stem if path_or_name else "run"
    if "method" in raw and isinstance(raw["method"], Mapping):
        raw["method"] = {"name": "coconut", **raw["method"]}
    return ExperimentConfig(**raw)


def _move_curriculum_keys(method: dict, train: dict, compare: list | None) -> None:
    """Configs written before the curriculum became the method's (`train.epochs_per_stage`, `train.uniform_prob`,
    `train.reset_optimizer`, `train.max_latent_stage`) still load: each key moves to the method section (and every
    `compare` entry) that does not set it, with a DeprecationWarning. `max_latent_stage` goes only to a method that
    has one and must agree with it."""
    from latent_jax.curriculum import MOVED_TO_METHOD
    from latent_jax.methods import method_options

    moved = {k: train.pop(k) for k in MOVED_TO_METHOD if k in train}
    if not moved:
        return
    warnings.warn(f"train.{', train.'.join(moved)}: the curriculum is the method's now; write "
                  f"method.{', method.'.join(moved)} (moved for this run)", DeprecationWarning, stacklevel=5)
    for section in [method, *(compare or [])]:
        name = section.get("name", "coconut")
        for k, v in moved.items():
            if k != "max_latent_stage":
                section.setdefault(k, v)
            elif k in method_options(name):
                if section.setdefault(k, v) != v:
                    raise ValueError(f"train.max_latent_stage={v} differs from method.max_latent_stage={section[k]}"
                                     f" ({name})")
