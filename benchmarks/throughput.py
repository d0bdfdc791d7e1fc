"""Issue 6: training and decoding throughput (one JSON object to stdout).

Train step = loss + grads + AdamW update, jitted with donation, on random tokens: "plain" (teacher-forced, no
thoughts) and "coconut" (n_latent continuous thoughts after a prefix of length/4, same total length). Decode =
`generate_padded` (prefill + `lax.while_loop`) of --decode-new tokens after a 32-token prompt, at batch 1 and 32.

MFU = achieved FLOP/s / peak FLOP/s with train FLOPs per token = 6·N + 12·L·(n_heads·head_dim)·T (PaLM appendix B:
N = matmul parameters, i.e. without position embeddings or an untied input embedding; T = sequence length). Peak:
--peak-tflops, else the dense bf16 peak of a known accelerator (H100/H200 989, A100 312, TPU v4 275, v5e 197,
v5p 459, v6e 918 TFLOP/s); on a CPU there is none and MFU is null unless --peak-tflops is given.

    python benchmarks/throughput.py                                            # CPU-sized defaults, ~2 min
    python benchmarks/throughput.py --size 124m --batch 32 --length 512 --dtype bfloat16     # GPU
    python benchmarks/throughput.py --size 124m --batch 32 --length 512 --mesh 1x8x1         # sharded train step
    python benchmarks/throughput.py --family llama --size 3.2-1b --batch 1 --length 64 --optimizer sgd   # 24 GB CPU
    python benchmarks/throughput.py --size 124m --batch 4 --length 128 --scan false --loss-chunk 128   # issue 20
"""
import argparse
import contextlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_jax.config import gpt2_config, llama_config
from latent_jax.generate import SamplingConfig, generate_padded
from latent_jax.latent import loss_fn
from latent_jax.models import init_model
from latent_jax.train.trainer import make_optimizer

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
               "TPU v5p": 459.0, "TPU v6": 918.0}


def timeit(fn, n):
    out = jax.block_until_ready(fn())  # compile + warm-up
    t = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


def train_flops_per_token(cfg, T: int) -> float:
    n = cfg.num_params() - (cfg.max_positions * cfg.d_model if cfg.family == "gpt2" else 0)
    n -= 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model  # the input embedding is a lookup
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--size", default="small", help="gpt2: tiny small 124m 355m ...; llama: tiny 3.2-1b ...")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--n-latent", type=int, default=6)
    ap.add_argument("--dtype", default="float32", help="compute dtype; params stay float32 (master weights)")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--mesh", default=None, help="data x fsdp x tensor for the train steps, e.g. 1x8x1")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--scan", default="auto", choices=["auto", "true", "false"], help="ModelConfig.scan_layers")
    ap.add_argument("--loss-chunk", type=int, default=0, help="ModelConfig.loss_chunk (0: the full logits)")
    ap.add_argument("--decode-new", type=int, default=32)
    ap.add_argument("--decode-batches", default="1,32")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                    help="sgd: no optimizer state (fits Llama-3.2-1B f32 in 24 GB of host memory; same matmul FLOPs)")
    args = ap.parse_args(argv)

    maker = gpt2_config if args.family == "gpt2" else llama_config
    kw = dict(vocab_size=50304) if args.family == "gpt2" and args.size != "tiny" else {}
    kw.update(scan_layers={"auto": None, "true": True, "false": False}[args.scan], loss_chunk=args.loss_chunk)
    cfg = maker(args.size, dtype=args.dtype, param_dtype="float32", remat=args.remat, **kw)
    graphdef, params = init_model(cfg, seed=0)
    B, T, n = args.batch, args.length, args.n_latent
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    batch = dict(tokens=tokens, labels=tokens, mask=np.ones((B, T), bool), latent=np.zeros((B, T), bool))
    P = T // 4
    lat_batch = {**batch, "latent": np.zeros((B, T), bool)}
    lat_batch["latent"][:, P:P + n] = True
    tx = make_optimizer(0.01, 1.0) if args.optimizer == "adamw" else optax.sgd(1.0)
    opt = tx.init(params)
    mesh = None
    if args.mesh:
        from latent_jax.sharding import MeshConfig, batch_sharding, make_mesh, shard_params

        d, f, t = (int(x) for x in args.mesh.split("x"))
        mesh = make_mesh(MeshConfig(ici_data=d, ici_fsdp=f, ici_tensor=t))
        params, opt = shard_params(mesh, params), shard_params(mesh, opt)
        batch, lat_batch = (jax.device_put(b, batch_sharding(mesh)) for b in (batch, lat_batch))

    def make_step(prefix_len, n_latent):
        def step(params, opt_state, batch):
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, batch, prefix_len, n_latent)
            updates, opt_state = tx.update(grads, opt_state, params)
            return jax.tree.map(lambda p, u: p - 1e-4 * u, params, updates), opt_state, loss
        return jax.jit(step, donate_argnums=(0, 1))

    state = {"p": params, "o": opt}
    flops_tok = train_flops_per_token(cfg, T)
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)
    n_dev = len(mesh.devices.flat) if mesh is not None else 1
    out = dict(model=f"{args.family}-{args.size}", params_m=round(cfg.num_params() / 1e6, 2), batch=B, length=T,
               n_latent=n, dtype=args.dtype, remat=args.remat, optimizer=args.optimizer, mesh=args.mesh, device=kind,
               scanned=cfg.scanned, loss_chunk=cfg.loss_chunk,
               n_devices=n_dev,
               backend=jax.default_backend(), train_flops_per_token=flops_tok, peak_tflops_per_device=peak)
    for name, (b, pl, nl) in {"plain": (batch, 0, 0), "coconut": (lat_batch, P, n)}.items():
        step = make_step(pl, nl)

        def run():
            state["p"], state["o"], loss = step(state["p"], state["o"], b)
            return loss
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            dt = timeit(run, args.steps)
        tps = B * T / dt
        out[f"train_{name}"] = dict(step_s=_sig(dt), tokens_per_s=_sig(tps),  # 4 significant digits, whatever the speed
                                    mfu=None if peak is None else _sig(tps * flops_tok / (peak * 1e12 * n_dev)))
    out["coconut_vs_plain_step_time"] = round(out["train_coconut"]["step_s"] / out["train_plain"]["step_s"], 2)
    params = jax.device_get(state["p"]) if mesh is not None else state["p"]
    sampling = SamplingConfig(max_new_tokens=args.decode_new)
    for bsz in (int(x) for x in args.decode_batches.split(",")):
        prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (bsz, 32)).astype(np.int32))
        mask = jnp.ones((bsz, 32), bool)
        dt = timeit(lambda: generate_padded(graphdef, params, prompt, mask, jax.random.PRNGKey(0), sampling=sampling,
                                            eos_ids=(), pad_id=0)[0], args.steps)
        out[f"decode_b{bsz}"] = dict(s_per_call=_sig(dt), new_tokens_per_s=_sig(bsz * args.decode_new / dt))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
