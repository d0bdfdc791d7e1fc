"""Issue 6: peak memory per device of one fused train step (loss + grads + AdamW update), from the compiler.

No weights are allocated: params are `abstract_model` shapes, the optimizer state `jax.eval_shape`, the step is
`jax.jit(step, in/out shardings).lower(...).compile().memory_analysis()` on each mesh. On a CPU box the devices are
faked (`--xla_force_host_platform_device_count`); the numbers are XLA:CPU's buffer assignment, a guide to (not a
measurement of) what a GPU/TPU compile gives. Peak per device = arguments + outputs + temporaries - aliased (donated).
XLA:CPU's scheduler is not memory-aware, so remat barely moves its peak; `residuals_gib` (what the forward pass keeps
for the backward pass, per device ≈ total / (data·fsdp); an upper bound when tensor > 1) shows what remat saves.

    python benchmarks/memory.py                                  # GPT-2-124M and Llama-3.2-1B, 32x512, 8 devices
    python benchmarks/memory.py --models gpt2-124m --meshes 2x2x2 --remat none,full,dots --out mem.json
    python benchmarks/memory.py --devices 0 ...                  # on a real multi-device machine: its devices
    # issue 20: compile time against depth, list vs scanned layers, full vs chunked loss (Coconut, 6 thoughts)
    python benchmarks/memory.py --models gpt2-124m,llama-3.2-1b,llama-3.2-3b,llama-3.1-8b --meshes 2x4x1 \
        --remat none --n-latent 6 --scan false,true --loss-chunk 0,128 --out results/compile_scale.json

Each row also gives the time to trace + lower (`lower_s`) and to compile (`compile_s`), the largest saved residual,
the saved residuals with a vocabulary axis (the logits or their softmax; chunked, the head's gradient [V, D]) and
`btv_residuals`: how many of those hold B*(T-1)*V or more elements (the shifted loss reads T - 1 positions).

GPT-2's vocabulary is padded 50257 -> 50304 (a multiple of 128) so that a tensor axis can split it; a mesh whose
axes do not divide a weight (GPT-2-124M has 12 heads: tensor=8) is reported as an error row.
"""
import argparse
import json
import os
import sys
import time

# XLA:CPU only: skip LLVM's expensive passes (buffer assignment, hence the memory numbers, is done before them)
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-124m,llama-3.2-1b")
    ap.add_argument("--meshes", default="8x1x1,2x4x1,2x2x2,1x1x8", help="data x fsdp x tensor, comma separated")
    ap.add_argument("--remat", default="none,full")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--n-latent", type=int, default=0, help="> 0: a Coconut step with this many thoughts")
    ap.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices; 0 = use the real devices")
    ap.add_argument("--out", default=None, help="also write the JSON list here")
    ap.add_argument("--full-opt", action="store_true", help="CPU: compile with LLVM's full pipeline (slower)")
    ap.add_argument("--scan", default="auto", help="scan_layers values: auto, true, false (comma separated)")
    ap.add_argument("--loss-chunk", default="0", help="loss_chunk values (0: full logits), comma separated")
    return ap.parse_args(argv)


def model_config(name: str, remat: str, dtype: str, scan: bool | None = None, loss_chunk: int = 0):
    from latent_jax.config import gpt2_config, llama_config

    kw = dict(remat=remat, dtype=dtype, scan_layers=scan, loss_chunk=loss_chunk)
    if name.startswith("gpt2-"):
        return gpt2_config(name[5:], vocab_size=50304, **kw)
    if name.startswith("llama-"):
        return llama_config(name[6:], **kw)
    raise ValueError(f"unknown model {name!r}: gpt2-<size> or llama-<size>")


def measure(name, mesh_shape, remat, args, scan=None, loss_chunk=0):
    import jax
    import jax.numpy as jnp

    from jax._src.ad_checkpoint import saved_residuals  # jax.ad_checkpoint.print_saved_residuals' counterpart

    from latent_jax.train.checkpoint import abstract_like
    from latent_jax.latent import loss_fn
    from latent_jax.models import abstract_model
    from latent_jax.sharding import MeshConfig, batch_sharding, make_mesh, tree_shardings
    from latent_jax.train.trainer import make_optimizer

    cfg = model_config(name, remat, args.dtype, scan, loss_chunk)
    d, f, t = mesh_shape
    mesh = make_mesh(MeshConfig(ici_data=d, ici_fsdp=f, ici_tensor=t))
    graphdef, abstract = abstract_model(cfg)
    tx = make_optimizer(0.01, 1.0)
    p_sh = tree_shardings(mesh, abstract)  # ValueError here when an axis does not divide
    params = abstract_like(abstract, p_sh)
    opt = jax.eval_shape(tx.init, abstract)
    o_sh = tree_shardings(mesh, opt)
    opt = abstract_like(opt, o_sh)
    B, T, P, n = args.batch, args.length, (args.length // 4 if args.n_latent else 0), args.n_latent
    b_sh = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((B, T), dt, sharding=b_sh)
             for k, dt in (("tokens", jnp.int32), ("labels", jnp.int32), ("mask", bool), ("latent", bool))}

    def step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, batch, P, n)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(lambda p, u: p - 1e-4 * u, params, updates), opt_state, loss

    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(step, in_shardings=(p_sh, o_sh, b_sh), out_shardings=(p_sh, o_sh, rep), donate_argnums=(0, 1))
    gib = 2.0 ** 30
    with jax.set_mesh(mesh):
        # residuals: what the forward pass keeps for the backward pass (not counting params / batch), the part of
        # the activation memory that remat trades for compute; backend-independent, from jax's own bookkeeping
        res = saved_residuals(lambda pr, b: loss_fn(pr, graphdef, b, P, n)[0], abstract, batch)
        res = [(a, why) for a, why in res if "from the argument" not in why]
        res_bytes = sum(a.size * a.dtype.itemsize for a, why in res)
        biggest = max(res, key=lambda r: r[0].size)[0] if res else None
        V = cfg.vocab_size  # residuals with a vocabulary axis: the logits / softmax (or, chunked, the head's grad)
        vocab_res = [a for a, _ in res if V in a.shape]
        btv = sum(a.size >= B * (T - 1) * V for a in vocab_res)  # the shifted logits: T - 1 positions
        big_v = max(vocab_res, key=lambda a: a.size) if vocab_res else None
        t0 = time.perf_counter()
        opts = FAST if jax.default_backend() == "cpu" and not args.full_opt else None
        lowered = jitted.lower(params, opt, batch)
        t1 = time.perf_counter()
        m = lowered.compile(compiler_options=opts).memory_analysis()
        t2 = time.perf_counter()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return dict(peak_gib=round(peak / gib, 3), args_gib=round(m.argument_size_in_bytes / gib, 3),
                temp_gib=round(m.temp_size_in_bytes / gib, 3),
                residuals_gib=round(res_bytes / gib / (mesh.shape["data"] * mesh.shape["fsdp"]), 3),
                params_m=round(cfg.num_params() / 1e6, 1), lower_s=round(t1 - t0, 1), compile_s=round(t2 - t1, 1),
                scanned=cfg.scanned, loss_chunk=cfg.loss_chunk, n_layers=cfg.n_layers, btv_residuals=btv,
                largest_residual=None if biggest is None else f"{biggest.dtype}{list(biggest.shape)}",
                largest_vocab_residual=None if big_v is None else f"{big_v.dtype}{list(big_v.shape)}",
                vocab_residuals_gib_global=round(sum(a.size * a.dtype.itemsize for a in vocab_res) / gib, 3),
                xla_opt="full" if opts is None else "fast")


def main(argv=None):
    args = parse_args(argv)
    if args.devices:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    import jax

    rows = []
    for name in args.models.split(","):
        for mesh in args.meshes.split(","):
            shape = tuple(int(x) for x in mesh.split("x"))
            for remat in args.remat.split(","):
                for scan in args.scan.split(","):
                    for chunk in args.loss_chunk.split(","):
                        row = dict(model=name, mesh=mesh, remat=remat, batch=args.batch, length=args.length,
                                   n_latent=args.n_latent, dtype=args.dtype, device=jax.devices()[0].device_kind)
                        scan_v = {"auto": None, "true": True, "false": False}[scan.strip().lower()]
                        try:
                            row.update(measure(name, shape, remat, args, scan_v, int(chunk)))
                        except ValueError as e:
                            row["error"] = str(e)
                        print(json.dumps(row), flush=True)
                        rows.append(row)
                        if args.out:  # after every row: a long sweep keeps what it has measured
                            with open(args.out, "w") as fh:
                                json.dump(rows, fh, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
