"""Issue 3 speed targets, on the machine it runs on (JSON lines to stdout).

1. Coconut train step with 6 thoughts vs a plain teacher-forced step over the same total length (ratio).
2. Latent generation: per-token decode time at prompt 64 vs 512 (KV cache: should not grow with the prompt).
3. Batched cached latent generation throughput vs a batch-1 uncached loop on the same model.

    python benchmarks/coconut_speed.py [--size small|124m] [--batch 16] [--length 320]
"""
import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_jax.config import gpt2_config
from latent_jax.evaluate import generate_prompts
from latent_jax.generate import SamplingConfig, generate_padded
from latent_jax.latent import loss_fn
from latent_jax.methods.base import Prompt
from latent_jax.models import embed_tokens, forward, init_model
from latent_jax.testing import while_body_copies


def timeit(fn, n=3):
    jax.block_until_ready(fn())  # compile + warm up
    t = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=320)
    ap.add_argument("--vocab", type=int, default=50257)
    args = ap.parse_args()
    cfg = gpt2_config(args.size, vocab_size=args.vocab, max_positions=1024)
    g, p = init_model(cfg)
    opt = optax.adamw(1e-4)
    st = opt.init(p)
    B, T, P, n = args.batch, args.length, args.length // 2, 6
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    batch = {"tokens": toks, "mask": jnp.ones((B, T), bool), "labels": toks, "latent": jnp.zeros((B, T), bool)}

    @functools.partial(jax.jit, static_argnames=("prefix_len", "n_latent"))
    def step(p, st, batch, prefix_len, n_latent):
        (_, aux), gr = jax.value_and_grad(loss_fn, has_aux=True)(p, g, batch, prefix_len, n_latent)
        u, st = opt.update(gr, st, p)
        return optax.apply_updates(p, u), st, aux["loss_sum"]

    plain = timeit(lambda: step(p, st, batch, prefix_len=P, n_latent=0))
    lat = {**batch, "latent": batch["latent"].at[:, P:P + n].set(True)}
    coconut = timeit(lambda: step(p, st, lat, prefix_len=P, n_latent=n))
    print(json.dumps({"bench": "train_step", "size": args.size, "batch": B, "length": T, "thoughts": n,
                      "plain_s": plain, "coconut_s": coconut, "ratio": coconut / plain,
                      "plain_tokens_per_s": B * T / plain, "device": jax.devices()[0].device_kind}), flush=True)

    # decode time per token vs prompt length (cached), batch B, 6 thoughts then <eot>
    per_tok = {}
    for plen in (64, 512):
        prompts = [Prompt([int(x) for x in rng.integers(0, cfg.vocab_size, plen)], n, [1]) for _ in range(B)]
        short, long_ = SamplingConfig(max_new_tokens=8), SamplingConfig(max_new_tokens=72)
        run = lambda s: generate_prompts(g, p, prompts, s, eos_id=-1, pad_id=0)  # noqa: E731
        t_short, t_long = timeit(lambda: run(short), 2), timeit(lambda: run(long_), 2)
        per_tok[plen] = (t_long - t_short) / 64
    copied = {}  # bytes copied inside the compiled decode loop body per step (load-independent)
    for plen in (64, 512):
        hlo = generate_padded.lower(g, p, jnp.ones((B, plen), jnp.int32), jnp.ones((B, plen), bool),
                                    jax.random.PRNGKey(0), sampling=SamplingConfig(max_new_tokens=72), eos_ids=(-1,),
                                    pad_id=0).compile().as_text()
        copied[plen] = sum(n for _, n in while_body_copies(hlo))
    print(json.dumps({"bench": "decode_per_token", "batch": B, "prompt64_ms": 1e3 * per_tok[64],
                      "prompt512_ms": 1e3 * per_tok[512], "ratio_512_vs_64": per_tok[512] / per_tok[64],
                      "loop_copy_bytes_per_step_prompt64": copied[64], "loop_copy_bytes_per_step_prompt512": copied[512]}),
          flush=True)

    # throughput: batched cached latent generation vs a batch-1 uncached loop (each token a full forward)
    new = 16
    prompts = [Prompt([int(x) for x in rng.integers(0, cfg.vocab_size, 64)], n, [1]) for _ in range(B)]
    t_batched = timeit(lambda: generate_prompts(g, p, prompts, SamplingConfig(max_new_tokens=new), eos_id=-1,
                                                pad_id=0), 2)
    fwd = jax.jit(lambda e: forward(g, p, embeds=e))

    def uncached_one(pr):
        emb = embed_tokens(g, p, jnp.asarray([pr.prefix]))
        for _ in range(pr.n_latent):
            emb = jnp.concatenate([emb, fwd(emb).hidden[:, -1:]], axis=1)
        emb = jnp.concatenate([emb, embed_tokens(g, p, jnp.asarray([pr.suffix]))], axis=1)
        for _ in range(new):
            t = jnp.argmax(fwd(emb).logits[0, -1])
            emb = jnp.concatenate([emb, embed_tokens(g, p, t[None, None])], axis=1)
        return emb

    uncached_one(prompts[0])  # compile the shapes once (each length is a new shape)
    t0 = time.perf_counter()
    for pr in prompts[:4]:
        jax.block_until_ready(uncached_one(pr))
    t_uncached = (time.perf_counter() - t0) / 4 * B
    print(json.dumps({"bench": "latent_generation_throughput", "batch": B, "new_tokens": new,
                      "batched_cached_tokens_per_s": B * new / t_batched,
                      "batch1_uncached_tokens_per_s": B * new / t_uncached, "speedup": t_uncached / t_batched}),
          flush=True)


if __name__ == "__main__":
    main()
