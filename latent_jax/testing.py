"""Test helpers for latent_jax and downstream JAX test suites.

Tiny random GPT-2 / Llama configs, Hugging Face reference checkpoints built in a folder (needs the `test`
extra: transformers + torch), a logits-parity checker against the PyTorch model, and a toy Coconut-shaped method
with learnable toy records for trainer tests (`ToyMethod`, `toy_records`, `quiet`, `make_batch`).
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from latent_jax.config import ModelConfig, RopeScaling
from latent_jax.curriculum import Curriculum
from latent_jax.layout import IGNORE, Example, Prompt, collate
from latent_jax.methods.base import Method

# name -> HF config kwargs. "llama" exercises GQA (kv_heads < heads), llama3 rope scaling and tied embeddings.
TINY_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(model_type="gpt2", vocab_size=211, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                 bos_token_id=0, eos_token_id=1),
    "llama": dict(model_type="llama", vocab_size=211, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=32)),
    "llama-untied": dict(model_type="llama", vocab_size=211, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6),
}


def tiny_config(family: str = "gpt2", **overrides: Any) -> ModelConfig:
    """A tiny random-init config (no transformers needed)."""
    if family == "gpt2":
        base = dict(family="gpt2", vocab_size=211, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
                    d_ff=256, max_positions=128, attn_bias=True, mlp_bias=True, tie_embeddings=True)
    elif family == "llama":
        base = dict(family="llama", vocab_size=211, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                    d_ff=160, max_positions=256, tie_embeddings=True,
                    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32))
    else:
        raise ValueError(f"unknown family {family!r}; valid: gpt2, llama")
    base.update(overrides)
    return ModelConfig(**base)


def make_hf_checkpoint(folder, name: str = "gpt2", seed: int = 0, **overrides: Any) -> pathlib.Path:
    """Build a tiny random `transformers` model (see TINY_HF_CONFIGS) and save_pretrained it to `folder`."""
    import torch
    import transformers

    if name not in TINY_HF_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; valid: {sorted(TINY_HF_CONFIGS)}")
    kw = {**TINY_HF_CONFIGS[name], **overrides}
    model_type = kw.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # HF inits norms to 1/0 and biases to 0: randomise so parity tests see them
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    folder = pathlib.Path(folder)
    model.save_pretrained(folder)
    return folder


def hf_logits(folder, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """float32 logits [B, T, V] of the `transformers` model saved in `folder`."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        kw = {}
        if attention_mask is not None:
            kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kw)
    return out.logits.float().numpy()


def check_logits_parity(folder, tokens: np.ndarray, atol: float = 1e-5) -> float:
    """Load `folder` with latent_jax and with transformers, compare float32 logits; return max abs diff.

    Raises AssertionError when the difference exceeds `atol`.
    """
    import jax

    from latent_jax.hf import load_hf
    from latent_jax.models import forward

    _, graphdef, params = load_hf(folder)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(forward(graphdef, params, tokens=np.asarray(tokens)).logits)
    ref = hf_logits(folder, tokens)
    diff = float(np.max(np.abs(ours - ref)))
    if not diff <= atol:
        raise AssertionError(f"logits differ from transformers by {diff:.3g} > atol {atol:g} ({folder})")
    return diff


def while_body_copies(hlo_text: str) -> list[tuple[str, int]]:
    """(shape, bytes) of every `copy` op inside the while-loop bodies of a compiled HLO module
    (`jax.jit(f).lower(...).compile().as_text()`): a decode loop that copies its KV cache shows up here."""
    import re

    body_names = set(re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo_text))
    sizes = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
    out, current = [], None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            current = line.split()[0].lstrip("%")
        elif current in body_names:
            m = re.search(r"= (\w+)\[([\d,]*)\]\S* copy\(", line)
            if m:
                n = int(np.prod([int(d) for d in m.group(2).split(",") if d])) if m.group(2) else 1
                out.append((f"{m.group(1)}[{m.group(2)}]", n * sizes.get(m.group(1), 4)))
    return out


# ---- a toy method for trainer tests ------------------------------------------------------------------------
BOT, EOT, LAT, EOS, POISON = 200, 201, 202, 1, 10_000  # POISON >= vocab_size: its embedding is NaN (jnp.take)


class ToyMethod(Method):
    """Coconut-shaped toy: question <bot> <latent>*(k*c) <eot> remaining steps answer <eos> (token ids as data).
    A record with "poison_stage" == stage gets an out-of-vocabulary token (-> NaN loss)."""

    name = "toy"
    special_tokens = ()

    def __init__(self, c: int = 1, max_latent_stage: int = 1, **curriculum):
        """curriculum: `Curriculum` fields (epochs_per_stage, uniform_prob, reset_optimizer)."""
        self.c, self.max_latent_stage = c, max_latent_stage
        self.curriculum = Curriculum(**curriculum)

    def num_stages(self) -> int:
        return self.max_latent_stage + 1

    def encode(self, record: dict, stage: int) -> Example:
        steps = record["steps"]
        if stage > self.max_latent_stage:
            skip, n_lat = len(steps), min(len(steps), self.max_latent_stage) * self.c
        else:
            skip = min(stage, len(steps))
            n_lat = skip * self.c
        q = list(record["question"])
        if record.get("poison_stage") == stage:
            q[0] = POISON
        rest = [t for s in steps[skip:] for t in s] + list(record["answer"]) + [EOS]
        tokens = q + [BOT] + [LAT] * n_lat + [EOT] + rest
        return Example(tokens, [IGNORE] * (len(q) + n_lat + 2) + rest, latent_start=len(q) + 1, n_latent=n_lat)

    def prompt(self, record: dict, stage: int) -> Prompt:
        return Prompt(list(record["question"]))


def toy_records(n: int, seed: int = 0, n_steps: int = 2, q_len: int = 5) -> list[dict]:
    """Learnable: steps are shifted copies of the question's first tokens, answer = sum(question) mod 50 + 60."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        q = [int(x) for x in rng.integers(10, 60, q_len)]
        out.append({"question": q, "steps": [[t + 1 + i for t in q[:3]] for i in range(n_steps)],
                    "answer": [sum(q) % 50 + 60]})
    return out


def quiet(**kw):
    """A `TrainConfig` for tests: no progress bar, bucket 16, then `kw`."""
    from latent_jax.train.trainer import TrainConfig

    return TrainConfig(**{"progress": False, "bucket": 16, **kw})


def make_batch(rng, vocab, specs, latent_id=7):
    """A collated batch of random tokens; specs: list of (prefix_len, n_latent, rest_len) per row."""
    exs = []
    for p, n, r in specs:
        toks = list(rng.integers(10, vocab, p)) + [latent_id] * n + list(rng.integers(10, vocab, r))
        labels = [IGNORE] * (p + n) + toks[p + n:]
        exs.append(Example([int(t) for t in toks], [int(t) for t in labels], latent_start=p, n_latent=n))
    return collate(exs, pad_id=0, bucket=8)


def naive_latent_greedy(graphdef, params, prompt: Prompt, max_new_tokens: int, feed=None, eos_id: int | None = None,
                        width: int | None = None) -> list[int]:
    """Greedy tokens after `prompt` the slow way (tests' reference for a method's generation): no cache, every step
    one full forward of the whole sequence. Each of the prompt's n thoughts is the previous pass's last final hidden
    state put through `feed(h_1xD)` (None: the hidden state itself, Coconut), then the suffix, then greedy tokens
    until `eos_id`; the prompt's `position_shift` is written out as explicit position ids (every position from the
    suffix on moves by it). Sequences are right-padded to `width` (causal attention: padding after the last
    position cannot change it) so that one jitted forward serves every step."""
    import jax
    import jax.numpy as jnp

    from latent_jax.models import embed_tokens, forward

    width = width or len(prompt.prefix) + prompt.n_latent + len(prompt.suffix) + max_new_tokens
    t = jnp.arange(width, dtype=jnp.int32)
    pos_1xW = (t + prompt.position_shift * (t >= len(prompt.prefix) + prompt.n_latent))[None]
    full = jax.jit(lambda emb_1xWxD: forward(graphdef, params, embeds=emb_1xWxD, positions=pos_1xW))

    def last(emb_1xNxD):
        n = emb_1xNxD.shape[1]
        out = full(jnp.pad(emb_1xNxD, ((0, 0), (0, width - n), (0, 0))))
        return out.hidden[:, n - 1], out.logits[0, n - 1]

    emb = embed_tokens(graphdef, params, jnp.array([prompt.prefix]))
    for _ in range(prompt.n_latent):
        h_1xD = last(emb)[0]
        emb = jnp.concatenate([emb, (h_1xD if feed is None else feed(h_1xD))[:, None].astype(emb.dtype)], axis=1)
    if len(prompt.suffix):
        emb = jnp.concatenate([emb, embed_tokens(graphdef, params, jnp.array([list(prompt.suffix)]))], axis=1)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(jnp.argmax(last(emb)[1]))
        out.append(nxt)
        if nxt == eos_id:
            break
        emb = jnp.concatenate([emb, embed_tokens(graphdef, params, jnp.array([[nxt]]))], axis=1)
    return out
