"""Hugging Face checkpoint import/export (config.json + safetensors) for GPT-2 and Llama 3.

No torch at run time: tensors are read and written with safetensors' numpy backend.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Callable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from latent_jax.config import ModelConfig, RopeScaling
from latent_jax.params import flatten_params, params_from_flat

SUPPORTED_MODEL_TYPES = ("gpt2", "llama")
SUPPORTED_DTYPES = {"F32", "F16", "BF16"}  # BF16 arrives as ml_dtypes.bfloat16
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")

# One entry per group: (hf names, our names, hf arrays -> ours, ours -> hf arrays).
Group = tuple[list[str], list[str], Callable, Callable]


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: unknown model_type {mt!r}; supported: {SUPPORTED_MODEL_TYPES}")
    if mt == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError(f"{source}: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn unsupported")
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: activation_function {hf['activation_function']!r} unsupported")
        D, N = hf["n_embd"], hf["n_head"]
        return ModelConfig(family="gpt2", vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["n_layer"],
                           n_heads=N, n_kv_heads=N, head_dim=D // N, d_ff=hf.get("n_inner") or 4 * D,
                           max_positions=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=True, attn_bias=True, mlp_bias=True,
                           embd_dropout=float(hf.get("embd_pdrop", 0.1)),
                           resid_dropout=float(hf.get("resid_pdrop", 0.1)),
                           attn_dropout=float(hf.get("attn_pdrop", 0.1)), **_extras(hf),
                           bos_token_id=hf.get("bos_token_id"),
                           eos_token_id=_first(hf.get("eos_token_id")))
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} unsupported (need silu)")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rtype = rope.pop("rope_type", rope.pop("type", "default"))
    if rtype not in ("default", "llama3"):
        raise ValueError(f"{source}: rope type {rtype!r} unsupported; supported: default, llama3")
    scaling = None if rtype == "default" else RopeScaling(
        **{k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")})
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    return ModelConfig(family="llama", vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["num_hidden_layers"],
                       n_heads=N, n_kv_heads=hf.get("num_key_value_heads") or N,
                       head_dim=hf.get("head_dim") or D // N, d_ff=hf["intermediate_size"],
                       max_positions=hf["max_position_embeddings"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=float(theta),
                       rope_scaling=scaling, attn_bias=bool(hf.get("attention_bias", False)),
                       mlp_bias=bool(hf.get("mlp_bias", False)), attn_dropout=float(hf.get("attention_dropout", 0.0)),
                       **_extras(hf), bos_token_id=hf.get("bos_token_id"),
                       eos_token_id=_first(hf.get("eos_token_id")))


SMEAR_KEY = "latent_jax_smear_keys"  # config.json flag of our smeared-keys attention (not a transformers option)


PROJ_DIM_KEY, PROJ_NORM_KEY = "latent_jax_thought_proj_dim", "latent_jax_thought_proj_norm"  # CODI's projection
PRJ = "latent_jax.prj."  # its tensors, named as the reference's torch nn.Sequential (1: Linear, 3: Linear, ln)


def _extras(hf: dict) -> dict:
    """Our ModelConfig fields that transformers has no option for, from config.json."""
    return dict(smear_keys=bool(hf.get(SMEAR_KEY, False)), thought_proj_dim=int(hf.get(PROJ_DIM_KEY, 0)),
                thought_proj_norm=bool(hf.get(PROJ_NORM_KEY, True)))


def _first(x):
    return x[0] if isinstance(x, list) else x


def config_to_hf(cfg: ModelConfig) -> dict:
    common = dict(vocab_size=cfg.vocab_size, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                  tie_word_embeddings=cfg.tie_embeddings, torch_dtype=cfg.param_dtype,
                  **({SMEAR_KEY: True} if cfg.smear_keys else {}),
                  **({PROJ_DIM_KEY: cfg.thought_proj_dim, PROJ_NORM_KEY: cfg.thought_proj_norm}
                     if cfg.thought_proj_dim else {}))
    if cfg.family == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=cfg.d_model,
                    n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=cfg.max_positions,
                    layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new", embd_pdrop=cfg.embd_dropout,
                    resid_pdrop=cfg.resid_dropout, attn_pdrop=cfg.attn_dropout, **common)
    rs = None if cfg.rope_scaling is None else dict(rope_type="llama3", **vars(cfg.rope_scaling))
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=cfg.d_model,
                intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                rope_scaling=rs, attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias, hidden_act="silu",
                attention_dropout=cfg.attn_dropout, **common)


def _groups(cfg: ModelConfig) -> list[Group]:
    return _model_groups(cfg) + _proj_groups(cfg)


def _proj_groups(cfg: ModelConfig) -> list[Group]:
    if not cfg.thought_proj_dim:
        return []
    T = lambda a: [np.ascontiguousarray(a[0].T)]  # noqa: E731 (torch Linear weights are [out, in])
    g = [([PRJ + "1.weight"], ["thought_proj.w_in"], T, T), ([PRJ + "1.bias"], ["thought_proj.b_in"], list, list),
         ([PRJ + "3.weight"], ["thought_proj.w_out"], T, T), ([PRJ + "3.bias"], ["thought_proj.b_out"], list, list)]
    if cfg.thought_proj_norm:
        g.append(([PRJ + "ln.weight", PRJ + "ln.bias"], ["thought_proj.ln_scale", "thought_proj.ln_bias"], list, list))
    return g


def _model_groups(cfg: ModelConfig) -> list[Group]:
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    one = lambda a: [a[0]]  # noqa: E731
    g: list[Group] = []
    if cfg.family == "gpt2":
        g += [(["transformer.wte.weight"], ["embed"], one, one),
              (["transformer.wpe.weight"], ["pos_embed"], one, one)]
        for i in range(cfg.n_layers):
            h, o = f"transformer.h.{i}.", f"blocks.{i}."
            g += [([h + "ln_1.weight", h + "ln_1.bias"], [o + "attn_norm.scale", o + "attn_norm.bias"], list, list),
                  ([h + "ln_2.weight", h + "ln_2.bias"], [o + "mlp_norm.scale", o + "mlp_norm.bias"], list, list),
                  ([h + "attn.c_attn.weight"], [o + "attn.wq", o + "attn.wk", o + "attn.wv"],
                   lambda a: [w.reshape(D, N, H) for w in np.split(a[0], 3, axis=1)],
                   lambda a: [np.concatenate([w.reshape(D, N * H) for w in a], axis=1)]),
                  ([h + "attn.c_attn.bias"], [o + "attn.bq", o + "attn.bk", o + "attn.bv"],
                   lambda a: [b.reshape(N, H) for b in np.split(a[0], 3)],
                   lambda a: [np.concatenate([b.reshape(N * H) for b in a])]),
                  ([h + "attn.c_proj.weight", h + "attn.c_proj.bias"], [o + "attn.wo", o + "attn.bo"],
                   lambda a: [a[0].reshape(N, H, D), a[1]], lambda a: [a[0].reshape(N * H, D), a[1]]),
                  ([h + "mlp.c_fc.weight", h + "mlp.c_fc.bias", h + "mlp.c_proj.weight", h + "mlp.c_proj.bias"],
                   [o + "mlp.w_in", o + "mlp.b_in", o + "mlp.w_out", o + "mlp.b_out"], list, list)]
            if cfg.smear_keys:
                g.append(([h + "attn.smear"], [o + "attn.smear"], one, one))
        g.append((["transformer.ln_f.weight", "transformer.ln_f.bias"], ["final_norm.scale", "final_norm.bias"],
                  list, list))
        return g
    T = lambda a: [np.ascontiguousarray(x.T) for x in a]  # noqa: E731
    g.append((["model.embed_tokens.weight"], ["embed"], one, one))
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}.", f"blocks.{i}."
        g += [([h + "input_layernorm.weight"], [o + "attn_norm.scale"], one, one),
              ([h + "post_attention_layernorm.weight"], [o + "mlp_norm.scale"], one, one),
              ([h + "self_attn.q_proj.weight"], [o + "attn.wq"], lambda a: [a[0].T.reshape(D, N, H)],
               lambda a: [np.ascontiguousarray(a[0].reshape(D, N * H).T)]),
              ([h + "self_attn.k_proj.weight"], [o + "attn.wk"], lambda a: [a[0].T.reshape(D, K, H)],
               lambda a: [np.ascontiguousarray(a[0].reshape(D, K * H).T)]),
              ([h + "self_attn.v_proj.weight"], [o + "attn.wv"], lambda a: [a[0].T.reshape(D, K, H)],
               lambda a: [np.ascontiguousarray(a[0].reshape(D, K * H).T)]),
              ([h + "self_attn.o_proj.weight"], [o + "attn.wo"], lambda a: [a[0].T.reshape(N, H, D)],
               lambda a: [np.ascontiguousarray(a[0].reshape(N * H, D).T)]),
              ([h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight", h + "mlp.down_proj.weight"],
               [o + "mlp.w_gate", o + "mlp.w_in", o + "mlp.w_out"], T, T)]
        if cfg.smear_keys:
            g.append(([h + "self_attn.smear"], [o + "attn.smear"], one, one))
        if cfg.attn_bias:
            g += [([h + f"self_attn.{p}_proj.bias"], [o + f"attn.b{p}"],
                   lambda a, n=(N if p == "q" else K): [a[0].reshape(n, H)], lambda a: [a[0].reshape(-1)])
                  for p in "qkv"]
        if cfg.mlp_bias:
            g.append(([h + "mlp.gate_proj.bias", h + "mlp.up_proj.bias", h + "mlp.down_proj.bias"],
                      [o + "mlp.b_gate", o + "mlp.b_in", o + "mlp.b_out"], list, list))
    g.append((["model.norm.weight"], ["final_norm.scale"], one, one))
    if not cfg.tie_embeddings:
        g.append((["lm_head.weight"], ["lm_head"], one, one))
    return g


class _Reader:
    """Lazily reads tensors from model.safetensors or a sharded set with model.safetensors.index.json."""

    def __init__(self, folder: pathlib.Path):
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [single.name]
            weight_map = None
        else:
            found = sorted(p.name for p in folder.iterdir())
            raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json"
                                    f" (found: {found}); convert .bin checkpoints to safetensors first")
        self.location: dict[str, pathlib.Path] = {}
        for f in files:
            path = folder / f
            if not path.exists():
                raise FileNotFoundError(f"{path}: shard listed in {index.name} is missing")
            with safe_open(str(path), framework="np") as h:
                for k in h.keys():
                    self.location[k] = path
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.location))
            if absent:
                raise ValueError(f"{index}: tensors {absent[:5]} listed in the index are not in their shards")

    def get(self, name: str) -> np.ndarray:
        path = self.location[name]
        with safe_open(str(path), framework="np") as h:
            dtype = h.get_slice(name).get_dtype()
            if dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}; supported: {sorted(SUPPORTED_DTYPES)}")
            return h.get_tensor(name)


def resolve_checkpoint(path_or_id: str | os.PathLike) -> pathlib.Path:
    """A local folder, or a hub id downloaded with huggingface_hub when online."""
    p = pathlib.Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1:
        raise FileNotFoundError(f"{path_or_id}: not a checkpoint folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(f"{path_or_id}: no such folder, and huggingface_hub is not installed to fetch"
                                " it as a hub id (pip install 'latent_jax[hf]')") from e
    return pathlib.Path(snapshot_download(str(path_or_id), allow_patterns=[
        "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "vocab.json", "merges.txt",
        "special_tokens_map.json", "generation_config.json", "original/tokenizer.model"]))


def load_hf(path_or_id, param_dtype: str = "float32", dtype: str | None = None):
    """Load a HF GPT-2 / Llama checkpoint. Returns (cfg, graphdef, params)."""
    folder = resolve_checkpoint(path_or_id)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: missing (a HF checkpoint folder needs config.json)")
    cfg = config_from_hf(json.loads(cfg_path.read_text()), source=str(cfg_path))
    cfg = cfg.replace(param_dtype=param_dtype, dtype=dtype or param_dtype)
    reader = _Reader(folder)
    raw_name = {k: k for k in reader.location}  # normalised name -> name in the file
    if cfg.family == "gpt2":  # original GPT-2 files have no "transformer." prefix
        raw_name = {(k if k.startswith(("transformer.", "lm_head", PRJ)) else "transformer." + k): k
                    for k in reader.location}
    names = raw_name
    flat, used = {}, set()
    for hf_names, ours, to_ours, _ in _groups(cfg):
        for n in hf_names:
            if n not in names:
                raise ValueError(f"{folder}: tensor {n!r} is missing from the checkpoint")
        arrays = [reader.get(raw_name[n]) for n in hf_names]
        for o, a in zip(ours, to_ours(arrays)):
            flat[o] = a
        used.update(hf_names)
    leftover = [n for n in names if n not in used and not n.endswith(_IGNORED_SUFFIXES)
                and not (n == "lm_head.weight" and cfg.tie_embeddings)]
    if leftover:
        raise ValueError(f"{folder}: unexpected tensors {sorted(leftover)[:8]} for a {cfg.family} checkpoint")
    graphdef, params = params_from_flat(cfg, flat, source=str(folder))
    return cfg, graphdef, params


def save_hf(folder, cfg: ModelConfig, params, max_shard_bytes: int | None = None) -> pathlib.Path:
    """Write config.json + safetensors (sharded with an index when over max_shard_bytes)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    tensors: dict[str, np.ndarray] = {}
    for hf_names, ours, _, to_hf in _groups(cfg):
        for n, a in zip(hf_names, to_hf([flat[o] for o in ours])):
            tensors[n] = np.ascontiguousarray(a)
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    if max_shard_bytes is None or sum(a.nbytes for a in tensors.values()) <= max_shard_bytes:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    shards, cur, size = [], {}, 0
    for name, a in tensors.items():
        if cur and size + a.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = a
        size += a.nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}, indent=2))
    return folder
