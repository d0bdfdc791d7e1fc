"""VQ-VAE over chunks of CoT tokens (Token Assorted, Su et al. 2025): one discrete code per L-token chunk.

    chunk x_1..x_L --encoder--> z_e (one vector) --nearest of K codebook rows--> z_q --decoder--> x_1..x_L

Encoder: a small causal transformer (`latent_jax.models`) over the chunk; z_e = Linear(final hidden state of the
last position). Quantizer: nearest codebook row (squared L2); straight-through estimator z_e + sg(z_q - z_e) for
the encoder. Decoder: a small causal transformer over [s; z_q; x_1..x_{L-1}] (input embeddings), teacher-forced
to predict x_1..x_L, where s = mean of the decoder's token embeddings over the prompt (the question): the decoder
is conditioned on a summary of the prompt, not on its tokens (a 16-token chunk and a ~400-token ProsQA question
would make every chunk cost a full prompt pass).
Loss = reconstruction CE + codebook loss + beta * commitment. `codebook_update="ema"`: the codebook is an
exponential moving average of the encoder outputs assigned to each code (decay, Laplace-smoothed counts) and gets
no gradient; `"loss"`: it is learned by AdamW through the codebook loss ||sg(z_e) - z_q||^2. Codes unused for
`restart_after` steps are re-seeded with encoder outputs of the current batch (0: never).

Checkpoint: a folder with `vqvae.json` (configs, tokenizer fingerprint, metrics) + `vqvae.safetensors`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import pathlib
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

from latent_jax.config import ModelConfig, check_keys, check_rules, coerce_numbers, gpt2_config
from latent_jax.models import embed_tokens, forward, init_model
from latent_jax.params import flatten_params, params_from_flat

log = logging.getLogger(__name__)
CONFIG_FILE, WEIGHTS_FILE = "vqvae.json", "vqvae.safetensors"
UPDATES = ("ema", "loss")


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """codebook_size K, chunk_len L; encoder/decoder: n_layers, d_model, n_heads (GPT-2 blocks); training: steps of
    batch_size chunks drawn with replacement, AdamW lr / weight_decay."""

    codebook_size: int = 1024
    chunk_len: int = 16
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    beta: float = 0.25
    codebook_update: str = "ema"
    decay: float = 0.99
    restart_after: int = 100
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 100

    def __post_init__(self):
        coerce_numbers(self, "vqvae", strict_types=True)
        check_rules(self, "vqvae", (
            ("codebook_size", self.codebook_size >= 2, ">= 2"), ("chunk_len", self.chunk_len >= 1, ">= 1"),
            ("beta", self.beta >= 0, ">= 0"), ("decay", 0 < self.decay < 1, "in (0, 1)"),
            ("codebook_update", self.codebook_update in UPDATES, f"one of {UPDATES}"),
            ("d_model", self.d_model >= 1 and self.d_model % max(self.n_heads, 1) == 0, "a multiple of n_heads"),
            ("n_layers", self.n_layers >= 1, ">= 1"), ("n_heads", self.n_heads >= 1, ">= 1"),
            ("restart_after", self.restart_after >= 0, ">= 0"), ("steps", self.steps >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"), ("log_every", self.log_every >= 1, ">= 1")))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQVAEConfig":
        check_keys(cls, d, "vqvae option(s)")
        return cls(**d)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The encoder's / decoder's transformer shape (positions: summary + code + L - 1 tokens)."""
        return gpt2_config("tiny", vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_heads, head_dim=self.d_model // self.n_heads,
                           d_ff=4 * self.d_model, max_positions=self.chunk_len + 2, bos_token_id=None,
                           eos_token_id=None)


@dataclasses.dataclass(frozen=True)
class ChunkData:
    """Training chunks [N, L], each chunk's prompt row [N], the prompts [R, P] (right-padded) and their mask."""

    chunks: np.ndarray
    chunk_prompt: np.ndarray
    prompts: np.ndarray
    prompt_mask: np.ndarray

    @classmethod
    def build(cls, items: Sequence[tuple[Sequence[int], Sequence[int]]], chunk_len: int) -> "ChunkData":
        """From (prompt ids, CoT ids) pairs: every full chunk of chunk_len CoT tokens (a partial tail is skipped)."""
        P = max([len(p) for p, _ in items] + [1])
        prompts = np.zeros((len(items), P), np.int32)
        mask = np.zeros((len(items), P), bool)
        chunks, owner = [], []
        for r, (p, cot) in enumerate(items):
            prompts[r, :len(p)], mask[r, :len(p)] = p, True
            for c in range(len(cot) // chunk_len):
                chunks.append(cot[c * chunk_len:(c + 1) * chunk_len])
                owner.append(r)
        return cls(np.asarray(chunks, np.int32).reshape(-1, chunk_len), np.asarray(owner, np.int32), prompts, mask)

    def __len__(self) -> int:
        return len(self.chunks)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        r = self.chunk_prompt[idx]
        return {"chunks": self.chunks[idx], "prompt": self.prompts[r], "prompt_mask": self.prompt_mask[r]}


@dataclasses.dataclass
class VQVAE:
    """A trained (or initialised) VQ-VAE: configs, the static graphdefs (encoder, decoder) and the params dict
    {"enc", "dec", "enc_out": {"w", "b"}, "codebook"}; `state` holds the EMA statistics."""

    cfg: VQVAEConfig
    model_cfg: ModelConfig
    graphdefs: tuple
    params: dict
    state: dict
    meta: dict = dataclasses.field(default_factory=dict)  # tokenizer fingerprint, metrics

    def encode(self, chunks_NxL: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(z_e [N, D], code index [N]) of every chunk, in padded batches of `batch_size` (one compile)."""
        chunks_NxL = np.asarray(chunks_NxL, np.int32).reshape(-1, self.cfg.chunk_len)
        n = len(chunks_NxL)
        z, idx = np.zeros((n, self.cfg.d_model), np.float32), np.zeros((n,), np.int32)
        for lo in range(0, n, batch_size):
            part = chunks_NxL[lo:lo + batch_size]
            out = _encode_jit(self.graphdefs, self.params, np.pad(part, ((0, batch_size - len(part)), (0, 0))))
            z[lo:lo + len(part)], idx[lo:lo + len(part)] = (np.asarray(a)[:len(part)] for a in out)
        return z, idx

    def codes(self, chunks_NxL: np.ndarray) -> np.ndarray:
        """Code index of every chunk [N]."""
        return self.encode(chunks_NxL)[1]


def init_vqvae(cfg: VQVAEConfig, vocab_size: int) -> VQVAE:
    mcfg = cfg.model_config(vocab_size)
    enc_g, enc_p = init_model(mcfg, seed=cfg.seed)
    dec_g, dec_p = init_model(mcfg, seed=cfg.seed + 1)
    k1, k2 = jax.random.split(jax.random.PRNGKey(cfg.seed))
    D, K = cfg.d_model, cfg.codebook_size
    params = {"enc": enc_p, "dec": dec_p,
              "enc_out": {"w": jax.random.normal(k1, (D, D)) / np.sqrt(D), "b": jnp.zeros((D,))},
              "codebook": jax.random.normal(k2, (K, D))}
    state = {"cluster_size": jnp.ones((K,)), "embed_sum": params["codebook"]}
    return VQVAE(cfg, mcfg, (enc_g, dec_g), params, state)


# --- pure functions -------------------------------------------------------------------------------------------

def encode(graphdefs, params, chunks_NxL):
    """z_e [N, D]: the encoder's final hidden state at the chunk's last token, projected."""
    h_NxD = forward(graphdefs[0], params["enc"], tokens=chunks_NxL).hidden[:, -1]
    return h_NxD @ params["enc_out"]["w"] + params["enc_out"]["b"]


def quantize(codebook_KxD, z_NxD):
    """(index [N], z_q [N, D]) of the nearest codebook row (squared L2)."""
    d_NxK = (jnp.sum(z_NxD ** 2, -1, keepdims=True) - 2 * z_NxD @ codebook_KxD.T
             + jnp.sum(codebook_KxD ** 2, -1)[None])
    idx_N = jnp.argmin(d_NxK, axis=-1)
    return idx_N, codebook_KxD[idx_N]


def decode_logits(graphdefs, params, z_NxD, chunks_NxL, prompt_NxP, prompt_mask_NxP):
    """Teacher-forced decoder logits [N, L, V]: position j predicts chunk token j."""
    g, p = graphdefs[1], params["dec"]
    m = prompt_mask_NxP[..., None].astype(jnp.float32)
    s_NxD = jnp.sum(embed_tokens(g, p, prompt_NxP) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)
    x_NxTxD = embed_tokens(g, p, chunks_NxL[:, :-1])
    inp = jnp.concatenate([s_NxD[:, None], z_NxD[:, None].astype(x_NxTxD.dtype), x_NxTxD], axis=1)
    return forward(g, p, embeds=inp).logits[:, 1:]


def vq_loss(params, graphdefs, cfg: VQVAEConfig, batch):
    """(loss, aux): loss = CE + codebook + beta * commitment; aux holds the parts, token accuracy, codes, z_e."""
    z_e = encode(graphdefs, params, batch["chunks"])
    codebook = params["codebook"] if cfg.codebook_update == "loss" else jax.lax.stop_gradient(params["codebook"])
    idx, z_q = quantize(codebook, z_e)
    z_st = z_e + jax.lax.stop_gradient(z_q - z_e)  # straight-through estimator
    logits = decode_logits(graphdefs, params, z_st, batch["chunks"], batch["prompt"], batch["prompt_mask"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["chunks"]).mean()
    commit = jnp.mean((z_e - jax.lax.stop_gradient(z_q)) ** 2)
    cb = jnp.mean((jax.lax.stop_gradient(z_e) - z_q) ** 2) if cfg.codebook_update == "loss" else jnp.zeros(())
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["chunks"])
    return ce + cb + cfg.beta * commit, {"recon": ce, "codebook": cb, "commit": commit, "acc": acc, "codes": idx,
                                         "z_e": z_e}


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(graphdefs, params, chunks_NxL):
    z_e = encode(graphdefs, params, chunks_NxL)
    return z_e, quantize(params["codebook"], z_e)[0]


@functools.partial(jax.jit, static_argnums=0)
def _eval_rows(graphdefs, params, batch):
    """Per chunk: code, teacher-forced token accuracy and CE of the reconstruction from z_q."""
    idx, z_q = quantize(params["codebook"], encode(graphdefs, params, batch["chunks"]))
    logits = decode_logits(graphdefs, params, z_q, batch["chunks"], batch["prompt"], batch["prompt_mask"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["chunks"]).mean(-1)
    return idx, jnp.mean(jnp.argmax(logits, -1) == batch["chunks"], -1), ce


@functools.lru_cache(maxsize=8)
def _make_step(graphdefs, cfg: VQVAEConfig):
    tx = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
    ema = cfg.codebook_update == "ema"

    def step(params, opt_state, state, batch, step_i, rng):
        (loss, aux), grads = jax.value_and_grad(vq_loss, has_aux=True)(params, graphdefs, cfg, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        K = cfg.codebook_size
        onehot_BxK = jax.nn.one_hot(aux["codes"], K, dtype=jnp.float32)
        z_e = jax.lax.stop_gradient(aux["z_e"])
        cs = cfg.decay * state["cluster_size"] + (1 - cfg.decay) * onehot_BxK.sum(0)
        es = cfg.decay * state["embed_sum"] + (1 - cfg.decay) * onehot_BxK.T @ z_e
        if ema:
            n = cs.sum()
            codebook = es / ((cs + 1e-5) / (n + K * 1e-5) * n)[:, None]
        else:
            codebook = params["codebook"]
        last_used = jnp.where(onehot_BxK.sum(0) > 0, step_i, state["last_used"])
        if cfg.restart_after:  # re-seed codes unused for restart_after steps with this batch's encoder outputs
            dead = step_i - last_used >= cfg.restart_after
            k1, k2 = jax.random.split(rng)
            seeds = z_e[jax.random.randint(k1, (K,), 0, z_e.shape[0])]
            seeds = seeds + 0.01 * jnp.std(z_e) * jax.random.normal(k2, seeds.shape)
            codebook = jnp.where(dead[:, None], seeds, codebook)
            cs, es = jnp.where(dead, 1.0, cs), jnp.where(dead[:, None], seeds, es)
            last_used = jnp.where(dead, step_i, last_used)
        params = {**params, "codebook": codebook}
        state = {"cluster_size": cs, "embed_sum": es, "last_used": last_used}
        metrics = {k: aux[k] for k in ("recon", "codebook", "commit", "acc")}
        return params, opt_state, state, {"loss": loss, **metrics}

    return tx, jax.jit(step, donate_argnums=(0, 1, 2))


# --- training and metrics -------------------------------------------------------------------------------------

def codebook_usage(codes: np.ndarray, codebook_size: int) -> dict[str, float]:
    """codes_used (distinct codes assigned), dead_codes (never assigned), perplexity exp(H(code frequencies))."""
    counts = np.bincount(np.asarray(codes, np.int64).ravel(), minlength=codebook_size)[:codebook_size]
    used = int((counts > 0).sum())
    p = counts[counts > 0] / max(counts.sum(), 1)
    return {"codes_used": used, "dead_codes": codebook_size - used,
            "perplexity": float(np.exp(-(p * np.log(p)).sum())) if used else 0.0}


def evaluate_vqvae(vq: VQVAE, data: ChunkData, batch_size: int = 256) -> dict[str, float]:
    """Teacher-forced reconstruction token accuracy (and CE) over all chunks, plus codebook usage."""
    n = len(data)
    B = max(min(batch_size, n), 1)
    codes, hits, ces = [], [], []
    for lo in range(0, n, B):
        k = min(B, n - lo)
        out = jax.device_get(_eval_rows(vq.graphdefs, vq.params, data.batch(np.arange(lo, lo + B) % n)))
        for acc, x in zip((codes, hits, ces), out):
            acc.append(np.asarray(x)[:k])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0,))  # noqa: E731
    return {"chunks": n, "recon_accuracy": float(cat(hits).mean()) if n else 0.0,
            "recon_loss": float(cat(ces).mean()) if n else 0.0,
            **codebook_usage(cat(codes), vq.cfg.codebook_size)}


def train_vqvae(cfg: VQVAEConfig, data: ChunkData, vocab_size: int, progress: bool = True) -> VQVAE:
    """Train a VQ-VAE on `data`; metrics before/after (reconstruction accuracy, codebook usage) land in .meta."""
    if len(data) == 0:
        raise ValueError(f"no full {cfg.chunk_len}-token CoT chunk in the training data: nothing to train the"
                         " VQ-VAE on (shorter vqvae.chunk_len?)")
    t0 = time.perf_counter()
    vq = init_vqvae(cfg, vocab_size)
    rng = np.random.default_rng(cfg.seed)
    # data-dependent init: codebook rows = encoder outputs of random chunks (+ noise), fewer dead codes early
    z0 = vq.encode(data.chunks[rng.integers(0, len(data), cfg.codebook_size)])[0]
    z0 = jnp.asarray(z0 + 0.01 * z0.std() * rng.standard_normal(z0.shape).astype(np.float32))
    vq.params["codebook"] = z0
    before = evaluate_vqvae(vq, data)
    tx, step = _make_step(vq.graphdefs, cfg)
    params, opt_state = vq.params, tx.init(vq.params)
    state = {"cluster_size": jnp.ones((cfg.codebook_size,)), "embed_sum": jnp.copy(z0),
             "last_used": jnp.zeros((cfg.codebook_size,), jnp.int32)}
    key = jax.random.PRNGKey(cfg.seed + 1)
    for i in range(cfg.steps):
        batch = data.batch(rng.integers(0, len(data), cfg.batch_size))
        params, opt_state, state, m = step(params, opt_state, state, batch, jnp.int32(i + 1),
                                           jax.random.fold_in(key, i))
        if progress and ((i + 1) % cfg.log_every == 0 or i + 1 == cfg.steps):
            m = jax.device_get(m)
            log.info("vqvae step %d loss %.4f recon %.4f acc %.3f commit %.4f", i + 1, m["loss"], m["recon"],
                     m["acc"], m["commit"])
    vq.params, vq.state = params, {k: state[k] for k in ("cluster_size", "embed_sum")}
    after = evaluate_vqvae(vq, data)
    vq.meta["metrics"] = {"before": before, "after": after, "steps": cfg.steps,
                          "train_seconds": time.perf_counter() - t0}
    return vq


# --- save / load ----------------------------------------------------------------------------------------------

def save_vqvae(vq: VQVAE, folder) -> pathlib.Path:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {f"enc.{k}": v for k, v in flatten_params(vq.params["enc"]).items()}
    flat.update({f"dec.{k}": v for k, v in flatten_params(vq.params["dec"]).items()})
    flat.update({"enc_out.w": vq.params["enc_out"]["w"], "enc_out.b": vq.params["enc_out"]["b"],
                 "codebook": vq.params["codebook"], **{f"state.{k}": v for k, v in vq.state.items()}})
    save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()},
              str(folder / WEIGHTS_FILE))
    meta = {"vqvae": dataclasses.asdict(vq.cfg), "model": vq.model_cfg.to_dict(), **vq.meta}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return folder


def load_vqvae(folder) -> VQVAE:
    """Load a folder written by `save_vqvae`; missing files / tensors or wrong shapes raise naming the folder."""
    folder = pathlib.Path(folder)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder}: no {f} (not a VQ-VAE checkpoint folder)")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    cfg = VQVAEConfig.from_dict(meta.pop("vqvae"))
    mcfg = ModelConfig.from_dict(meta.pop("model"))
    flat = load_file(str(folder / WEIGHTS_FILE))
    src = str(folder / WEIGHTS_FILE)
    parts = {}
    for prefix in ("enc", "dec"):
        sub = {k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + ".")}
        parts[prefix] = params_from_flat(mcfg, sub, source=f"{src} ({prefix})")
    K, D = cfg.codebook_size, cfg.d_model
    want = {"enc_out.w": (D, D), "enc_out.b": (D,), "codebook": (K, D), "state.cluster_size": (K,),
            "state.embed_sum": (K, D)}
    for name, shape in want.items():
        if name not in flat or tuple(flat[name].shape) != shape:
            got = tuple(flat[name].shape) if name in flat else "missing"
            raise ValueError(f"{src}: tensor {name!r} is {got}, expected shape {shape}")
    params = {"enc": parts["enc"][1], "dec": parts["dec"][1],
              "enc_out": {"w": jnp.asarray(flat["enc_out.w"]), "b": jnp.asarray(flat["enc_out.b"])},
              "codebook": jnp.asarray(flat["codebook"])}
    state = {"cluster_size": jnp.asarray(flat["state.cluster_size"]), "embed_sum": jnp.asarray(flat["state.embed_sum"])}
    return VQVAE(cfg, mcfg, (parts["enc"][0], parts["dec"][0]), params, state, meta)


def tokenizer_fingerprint(tok, n: int) -> str:
    """A short hash of the first n token strings: a VQ-VAE only fits the tokenizer it was trained with."""
    h = hashlib.sha1()
    for i in range(n):
        h.update(tok.decode([i]).encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()[:16]
