"""Transformer building blocks (Flax NNX) shared by GPT-2 and Llama.

Shape letters: B batch, T query length, S key length (cache slots), D d_model, N query heads,
K kv heads, G = N // K query heads per kv head, H head_dim, F d_ff, V vocab.
Weights carry logical axis names in the `axes` metadata (see latent_jax.sharding).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from latent_jax.config import ModelConfig
from latent_jax.models.dropout import dropout_probs
from latent_jax.sharding import constrain

NEG_INF = -1e30  # finite, so fully-masked (padding) rows give no NaNs


def param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, std: float = 0.02, init: str = "normal"):
    if init == "zeros":
        value = jnp.zeros(shape, cfg.weight_dtype)
    elif init == "ones":
        value = jnp.ones(shape, cfg.weight_dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(cfg.weight_dtype)
    return nnx.Param(value, axes=axes)


class Norm(nnx.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama), computed in float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.rms = cfg.family == "llama"
        self.eps = cfg.norm_eps
        self.scale = param(rngs, (cfg.d_model,), ("norm",), cfg, init="ones")
        self.bias = None if self.rms else param(rngs, (cfg.d_model,), ("norm",), cfg, init="zeros")

    def __call__(self, x_BxTxD):
        dtype = x_BxTxD.dtype
        x = x_BxTxD.astype(jnp.float32)
        if self.rms:
            x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
            return (self.scale[...].astype(jnp.float32) * x.astype(dtype).astype(jnp.float32)).astype(dtype)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2], with HF's `llama3` scaling when configured."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxTxNxH, positions_BxT, inv_freq):
    """Rotary embedding, HF 'rotate_half' convention (first/second half pairs)."""
    freqs_BxTxh = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs_BxTxh, freqs_BxTxh], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x = x_BxTxNxH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)


class Attention(nnx.Module):
    """Multi-head / grouped-query attention with an explicit per-layer (k, v) cache."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.wq = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), cfg)
        self.wk = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        self.wv = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        self.wo = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), cfg,
                        std=0.02 / math.sqrt(2 * cfg.n_layers))
        bias = cfg.attn_bias
        self.bq = param(rngs, (N, H), ("heads", "head_dim"), cfg, init="zeros") if bias else None
        self.bk = param(rngs, (K, H), ("kv_heads", "head_dim"), cfg, init="zeros") if bias else None
        self.bv = param(rngs, (K, H), ("kv_heads", "head_dim"), cfg, init="zeros") if bias else None
        self.bo = param(rngs, (D,), ("embed",), cfg, init="zeros") if cfg.family == "gpt2" else None
        # smeared keys (Olsson et al. 2022): key j attends as sigmoid(a) k_j + (1 - sigmoid(a)) k_{j-1}, per kv head
        self.smear = param(rngs, (K,), ("kv_heads",), cfg, init="zeros") if cfg.smear_keys else None

    def __call__(self, x_BxTxD, positions_BxT, q_slots_BxT, kv, key_valid_BxS, write_index, drop_key=None):
        """kv: (k_RxHxS, v_RxSxH) cache (R = B*K) to write into at `write_index`, or (k_LxRxHxS, v_LxRxSxH, layer)
        the stacked cache of a scanned model and this layer's index, or None (no cache:
        keys are the current tokens). q_slots: cache slot of each query, for the causal mask (and the dropout
        masks' columns). drop_key: dropout of the attention probabilities (`cfg.attn_dropout`), or None."""
        cfg, dt = self.cfg, x_BxTxD.dtype
        q = jnp.einsum("BTD,DNH->BTNH", x_BxTxD, self.wq[...].astype(dt))
        k = jnp.einsum("BTD,DKH->BTKH", x_BxTxD, self.wk[...].astype(dt))
        v = jnp.einsum("BTD,DKH->BTKH", x_BxTxD, self.wv[...].astype(dt))
        if self.bq is not None:
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        if cfg.family == "llama":
            inv_freq = rope_inv_freq(cfg)
            q, k = apply_rope(q, positions_BxT, inv_freq), apply_rope(k, positions_BxT, inv_freq)
        q = constrain(q, ("batch", "length", "act_heads", None))
        k, v = (constrain(a, ("batch", "length", "act_kv_heads", None)) for a in (k, v))
        # B batch, T queries, S keys, K kv heads, G query heads per kv head (N = K*G), H head dim, D model dim;
        # R = B*K attention rows. Cache layouts: keys [R, H, S], values [R, S, H], the operand layouts of the two
        # matmuls with no degenerate dimension even at B = 1: XLA then updates the cache in place and a decode step
        # copies none of it (tests/test_generate.py checks the compiled loop; BUILD_NOTES "decode time").
        B, T, N, H = q.shape
        K = k.shape[2]
        k_RxHxT = jnp.transpose(k, (0, 2, 3, 1)).reshape(B * K, H, T)
        v_RxTxH = jnp.swapaxes(v, 1, 2).reshape(B * K, T, H)
        if kv is not None and len(kv) == 3:  # the whole stacked cache [L, ...] and this layer's index (scanned)
            k_all, v_all, i = kv
            zero = jnp.zeros((), jnp.int32)
            k_all = jax.lax.dynamic_update_slice(k_all, k_RxHxT[None].astype(k_all.dtype), (i, zero, zero, write_index))
            v_all = jax.lax.dynamic_update_slice(v_all, v_RxTxH[None].astype(v_all.dtype), (i, zero, write_index, zero))
            k_RxHxS, v_RxSxH = (jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False) for a in (k_all, v_all))
            new_kv = (k_all, v_all, i)
        elif kv is not None:
            k_cache, v_cache = kv
            k_RxHxS = jax.lax.dynamic_update_slice_in_dim(k_cache, k_RxHxT.astype(k_cache.dtype), write_index, 2)
            v_RxSxH = jax.lax.dynamic_update_slice_in_dim(v_cache, v_RxTxH.astype(v_cache.dtype), write_index, 1)
            new_kv = (k_RxHxS, v_RxSxH)
        else:
            k_RxHxS, v_RxSxH, new_kv = k_RxHxT, v_RxTxH, None
        S = v_RxSxH.shape[1]
        k_attend = k_RxHxS if self.smear is None else self._smeared(k_RxHxS, key_valid_BxS, B, K)
        q_RxGTxH = jnp.transpose((q / math.sqrt(H)).reshape(B, T, K, N // K, H), (0, 2, 3, 1, 4)).reshape(
            B * K, (N // K) * T, H)
        logits = jnp.einsum("RQH,RHS->RQS", q_RxGTxH, k_attend.astype(dt), preferred_element_type=jnp.float32)
        allowed_BxTxS = (jnp.arange(S)[None, None, :] <= q_slots_BxT[:, :, None]) & key_valid_BxS[:, None, :]
        logits_BxKxGxTxS = jnp.where(allowed_BxTxS[:, None, None], logits.reshape(B, K, N // K, T, S), NEG_INF)
        probs = dropout_probs(jax.nn.softmax(logits_BxKxGxTxS, axis=-1), cfg.attn_dropout, drop_key,
                              q_slots_BxT[0])
        probs = probs.astype(dt).reshape(B * K, (N // K) * T, S)
        out_RxGTxH = jnp.einsum("RQS,RSH->RQH", probs, v_RxSxH.astype(dt))  # Q = G*T query rows
        out_BxTxNH = jnp.transpose(out_RxGTxH.reshape(B, K, N // K, T, H), (0, 3, 1, 2, 4)).reshape(B, T, N * H)
        out = jnp.einsum("BTE,ED->BTD", out_BxTxNH, self.wo[...].astype(dt).reshape(N * H, -1))  # E = N*H
        if self.bo is not None:
            out = out + self.bo[...].astype(dt)
        return out, new_kv

    def _smeared(self, k_RxHxS, key_valid_BxS, B, K):
        """Keys mixed with the previous slot's key (zero where that slot is padding or before the start), at read
        time over the whole key tensor, so a cached pass attends to what a full pass does."""
        prev_valid_BxS = jnp.pad(key_valid_BxS[:, :-1], ((0, 0), (1, 0)))
        prev_valid_RxS = jnp.repeat(prev_valid_BxS, K, axis=0)
        k_prev = jnp.pad(k_RxHxS[:, :, :-1], ((0, 0), (0, 0), (1, 0))) * prev_valid_RxS[:, None, :].astype(k_RxHxS.dtype)
        a_R = jnp.tile(jax.nn.sigmoid(self.smear[...].astype(jnp.float32)), B)[:, None, None].astype(k_RxHxS.dtype)
        return a_R * k_RxHxS + (1 - a_R) * k_prev


class Mlp(nnx.Module):
    """GPT-2: GELU-new MLP with biases. Llama: SwiGLU (down(silu(gate(x)) * up(x)))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_ff
        self.gated = cfg.family == "llama"
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        self.w_in = param(rngs, (D, F), ("embed", "mlp"), cfg)
        self.w_gate = param(rngs, (D, F), ("embed", "mlp"), cfg) if self.gated else None
        self.w_out = param(rngs, (F, D), ("mlp", "embed"), cfg, std=out_std)
        bias = cfg.mlp_bias or cfg.family == "gpt2"
        self.b_in = param(rngs, (F,), ("mlp",), cfg, init="zeros") if bias else None
        self.b_gate = param(rngs, (F,), ("mlp",), cfg, init="zeros") if bias and self.gated else None
        self.b_out = param(rngs, (D,), ("embed",), cfg, init="zeros") if bias else None

    def __call__(self, x_BxTxD):
        dt = x_BxTxD.dtype

        def lin(w, b, x, spec):
            y = jnp.einsum(spec, x, w[...].astype(dt))
            return y if b is None else y + b[...].astype(dt)

        h_BxTxF = constrain(lin(self.w_in, self.b_in, x_BxTxD, "BTD,DF->BTF"), ("batch", "length", "act_mlp"))
        if self.gated:
            h_BxTxF = jax.nn.silu(lin(self.w_gate, self.b_gate, x_BxTxD, "BTD,DF->BTF")) * h_BxTxF
        else:
            h_BxTxF = jax.nn.gelu(h_BxTxF, approximate=True)
        return lin(self.w_out, self.b_out, h_BxTxF, "BTF,FD->BTD")


class ThoughtProjection(nnx.Module):
    """CODI's projection of a final hidden state before it is fed back as a thought: Linear(D, P) -> GELU (exact)
    -> Linear(P, D) -> LayerNorm(D) (optional; a LayerNorm for both families, as the reference's nn.LayerNorm)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, P = cfg.d_model, cfg.thought_proj_dim
        self.eps = 1e-5
        self.w_in = param(rngs, (D, P), ("embed", "mlp"), cfg)
        self.b_in = param(rngs, (P,), ("mlp",), cfg, init="zeros")
        self.w_out = param(rngs, (P, D), ("mlp", "embed"), cfg)
        self.b_out = param(rngs, (D,), ("embed",), cfg, init="zeros")
        self.ln_scale = param(rngs, (D,), ("norm",), cfg, init="ones") if cfg.thought_proj_norm else None
        self.ln_bias = param(rngs, (D,), ("norm",), cfg, init="zeros") if cfg.thought_proj_norm else None

    def __call__(self, h_BxD):
        dt = h_BxD.dtype
        x = jnp.einsum("BD,DP->BP", h_BxD, self.w_in[...].astype(dt)) + self.b_in[...].astype(dt)
        x = jnp.einsum("BP,PD->BD", jax.nn.gelu(x, approximate=False), self.w_out[...].astype(dt))
        x = x + self.b_out[...].astype(dt)
        if self.ln_scale is None:
            return x
        y = x.astype(jnp.float32)
        mean = jnp.mean(y, axis=-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True) + self.eps)
        return (y * self.ln_scale[...].astype(jnp.float32) + self.ln_bias[...].astype(jnp.float32)).astype(dt)
