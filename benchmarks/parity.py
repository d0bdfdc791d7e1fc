"""Measure logits parity with transformers (f32) and the bf16 error on the tiny test models.

    python benchmarks/parity.py            # prints a JSON line per model
"""
import json
import tempfile

import jax
import numpy as np

from latent_jax.hf import load_hf
from latent_jax.models import forward
from latent_jax.testing import TINY_HF_CONFIGS, hf_logits, make_hf_checkpoint

jax.config.update("jax_default_matmul_precision", "highest")

for name in sorted(TINY_HF_CONFIGS):
    folder = make_hf_checkpoint(tempfile.mkdtemp(), name)
    row = {"model": name}
    for T in (24, 200 if name.startswith("llama") else 128):
        toks = np.random.default_rng(0).integers(0, 211, (2, T))
        _, g, p = load_hf(folder)
        ref = hf_logits(folder, toks)
        row[f"f32_max_abs_diff_T{T}"] = float(np.abs(np.asarray(forward(g, p, tokens=toks).logits) - ref).max())
        _, g16, p16 = load_hf(folder, param_dtype="bfloat16")
        low = np.asarray(forward(g16, p16, tokens=toks).logits)
        row[f"bf16_max_rel_err_T{T}"] = float(np.abs(low - ref).max() / np.abs(ref).max())
        row[f"bf16_argmax_agree_T{T}"] = float((low.argmax(-1) == ref.argmax(-1)).mean())
    print(json.dumps(row))
