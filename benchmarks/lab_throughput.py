"""Issue 15: the lab's reach. Train-step throughput at the lab's shapes against this CPU's own f32 matmul peak.

Measures, on the threads jax uses here:
  * peak: a large f32 matmul in JAX (--peak-n, default 2048) and one at the lab's own matmul shape
    ([B*T, d] @ [d, d_ff]), in GFLOP/s;
  * the compiled train step alone (loss + grads + AdamW on one collated batch of the lab's data, no host work), at
    the configured batch size and --batches, for the CoT layout (stage 0) and the final Coconut layout; FLOPs per
    token as benchmarks/throughput.py (6N + 12·L·H·T), as a share of the peak;
  * the trainer's own loop over an epoch of the same data (collation, bucketing, dispatch, metrics): tokens/s
    (real, unpadded tokens) and the padding share of the buckets;
  * compile count of a curriculum run (distinct (B, prefix, T, thoughts) shapes) per bucket size.

    python benchmarks/lab_throughput.py                                   # the default job's config
    python benchmarks/lab_throughput.py --config configs/lab/... --batches 32,64,128,256 --out results/x.json
"""
import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from throughput import train_flops_per_token  # benchmarks/throughput.py (6N + 12·L·H·T)


def gflops_matmul(m: int, k: int, n: int, reps: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k), np.float32))
    b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n), np.float32))
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a, b)
    out.block_until_ready()
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="prosqa_symbolic_cpu")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--batches", default="32,64,128,256", help="batch sizes for the compiled-step sweep")
    ap.add_argument("--buckets", default="8,16,32,64", help="bucket sizes for the padding / compile-count sweep")
    ap.add_argument("--length-groups", default="0,8,32", help="train.length_groups values for the padding sweep")
    ap.add_argument("--peak-n", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--loop-records", type=int, default=2048, help="records in the trainer-loop measurement")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from latent_jax.train.pipeline import epoch_dataset, epoch_iterator
    from latent_jax.experiment import _records_and_build, load_config
    from latent_jax.methods.base import collate
    from latent_jax.train.trainer import TrainConfig, make_steps, train

    cfg = load_config(args.config, list(args.overrides))
    if cfg.compare:  # the comparison's latent method (`compare=null method=...` measures another)
        cfg = cfg.replace(method=cfg.compare[-1], compare=None)
    n = max(args.loop_records, max(int(b) for b in args.batches.split(",")))
    cfg = cfg.replace(data=cfg.data.replace(train_n=n))
    train_records, _, _, (tok, method, mcfg, graphdef, params) = _records_and_build(cfg)
    out = {"config": args.config, "overrides": args.overrides, "method": method.name, "device": jax.devices()[0].device_kind,
           "cpu_threads": jax.local_device_count(), "model_params": mcfg.num_params(),
           "peak_gflops": {"square": round(gflops_matmul(args.peak_n, args.peak_n, args.peak_n), 1)}}
    t = cfg.train
    B0 = t.get("batch_size", 32)
    final = method.num_stages()
    stages = {"cot_stage0": 0, "final": final if final > 1 else 0}

    def batch_at(stage: int, B: int):
        exs = [method.encode(r, stage) for r in train_records[:B]]
        return collate(exs, tok.pad_id, bucket=t.get("bucket", 32), max_len=mcfg.max_positions)

    T0 = batch_at(0, B0).tokens.shape[1]
    out["peak_gflops"]["lab_shape"] = round(gflops_matmul(B0 * T0, mcfg.d_model, mcfg.d_ff), 1)
    peak = out["peak_gflops"]["square"]
    tx, micro, apply = make_steps(graphdef, 0.01, 1.0)
    step_rows = []
    for B in (int(b) for b in args.batches.split(",")):
        for name, stage in stages.items():
            b = batch_at(stage, B)
            p = jax.tree.map(jnp.copy, params)
            opt = tx.init(p)
            acc = jax.tree.map(jnp.zeros_like, p)
            arrays = {k: jnp.asarray(v) for k, v in b.arrays().items()}

            def one():
                nonlocal p, opt, acc
                acc, s = micro(p, acc, arrays, None, b.prefix_len, b.n_latent)
                p, opt, acc, g = apply(p, opt, acc, s["n_tokens"].astype(jnp.float32), jnp.float32(1e-4))
                return g
            one().block_until_ready()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                g = one()
            g.block_until_ready()
            dt = (time.perf_counter() - t0) / args.steps
            T = b.tokens.shape[1]
            flops = train_flops_per_token(mcfg, T) * B * T
            step_rows.append({"batch": B, "layout": name, "T": T, "thoughts": b.n_latent, "step_s": round(dt, 4),
                              "padded_tok_s": round(B * T / dt), "real_tok_s": round(int(b.mask.sum()) / dt),
                              "gflops": round(flops / dt / 1e9, 2), "share_of_peak": round(flops / dt / 1e9 / peak, 3)})
            print(json.dumps(step_rows[-1]), flush=True)
    out["compiled_step"] = step_rows

    pad_rows = []
    for groups in (int(x) for x in args.length_groups.split(",")):
        for bucket in (int(x) for x in args.buckets.split(",")):
            shapes, real, padded = set(), 0, 0
            for stage in range(final + 1 if final > 1 else 1):
                it = epoch_iterator(epoch_dataset(method, train_records, epoch=0, stage=stage, seed=0, batch_size=B0,
                                                  uniform_prob=0.0, bucket=bucket, max_len=mcfg.max_positions,
                                                  stage_fn=lambda m, s=stage: s, length_groups=groups))
                for b in it:
                    shapes.add((b.tokens.shape, b.prefix_len, b.n_latent))
                    real, padded = real + int(b.mask.sum()), padded + b.mask.size
                it.close()
            pad_rows.append({"length_groups": groups, "bucket": bucket, "compiles": len(shapes),
                             "padding_share": round(1 - real / padded, 3)})
            print(json.dumps(pad_rows[-1]), flush=True)
    out["bucketing"] = pad_rows

    tcfg = TrainConfig.from_dict({**{k: v for k, v in t.items() if k not in ("epochs",)}, "epochs": 1,
                                  "output_dir": None, "progress": False})
    seen = []
    t0 = time.perf_counter()
    train(method, train_records, graphdef, params, tcfg, on_step=lambda r: seen.append((time.perf_counter(), r)))
    wall = time.perf_counter() - t0
    steady = seen[len(seen) // 4:]  # after the compiles
    dt = (steady[-1][0] - steady[0][0]) / max(len(steady) - 1, 1)
    loss_tok = np.mean([r["tokens"] for _, r in steady])
    out["trainer_loop"] = {"batch": B0, "steps": len(seen), "wall_s": round(wall, 1), "steady_step_s": round(dt, 4),
                           "steady_real_tok_s": round(np.mean([r["tok_per_s"] for _, r in steady])),
                           "loss_tokens_per_step": round(float(loss_tok), 1)}
    print(json.dumps(out["trainer_loop"]), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
