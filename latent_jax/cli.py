"""`latent-jax` command line (also `python -m latent_jax`).

    latent-jax info --model PATH_OR_HUB_ID
    latent-jax generate --model PATH_OR_HUB_ID [--tokenizer PATH|gpt2] --prompt TEXT [--prompt TEXT ...]
    latent-jax train [CONFIG] [key=value ...] [--model PATH_OR_HUB_ID] [--fresh]   (default: prosqa_symbolic_cpu)
    latent-jax eval CONFIG --model-dir EXPORTED_FOLDER [key=value ...] [--out FILE [--overwrite]]
    latent-jax export CONFIG [key=value ...] --checkpoint RUN/train/checkpoints --out FOLDER
    latent-jax vqvae CONFIG [key=value ...] [--out FOLDER]   (token_assorted: train + save its VQ-VAE)
    latent-jax analyze CONFIG --model-dir EXPORTED_FOLDER [--n 200] [--top-k 10] [--out DIR]   (Coconut thoughts)
    latent-jax data generate|stats|list ...
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from latent_jax.train.runlock import RunLockedError  # stdlib only: keeps the CLI's start light

DEFAULT_CONFIG = "prosqa_symbolic_cpu"  # README command one: No-CoT, CoT and Coconut on symbolic ProsQA


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latent-jax", description="Latent reasoning for GPT-2 and Llama in JAX.")
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{train,eval,export,vqvae,analyze,info,generate,data}")
    t = sub.add_parser("train", help="train + evaluate + export an experiment (YAML config)")
    t.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="YAML path or name in configs/")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=3")
    t.add_argument("--model", default=None, help="pretrained HF folder or hub id (sets model.pretrained)")
    t.add_argument("--fresh", action="store_true",
                   help="start from scratch: delete this run's earlier checkpoints instead of resuming them")
    e = sub.add_parser("eval", help="evaluate an exported model folder on the config's validation set")
    e.add_argument("config", help="YAML path or name in configs/")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--model-dir", required=True, help="folder written by `train` ({output_dir}/export)")
    e.add_argument("--out", default=None, help="result JSON file (default: MODEL_DIR/eval.json)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    x = sub.add_parser("export", help="orbax checkpoint of a run -> Hugging Face folder (+ tokenizer)")
    x.add_argument("config", help="the run's YAML config (path or name in configs/)")
    x.add_argument("overrides", nargs="*", help="the run's overrides")
    x.add_argument("--checkpoint", required=True, help="checkpoint folder ({output_dir}/train/checkpoints)")
    x.add_argument("--step", type=int, default=None, help="default: the latest")
    x.add_argument("--out", required=True, help="output folder")
    v = sub.add_parser("vqvae", help="train the VQ-VAE of a token_assorted config and save its checkpoint")
    v.add_argument("config", help="YAML path or name in configs/ (method.name: token_assorted)")
    v.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.vqvae.steps=500")
    v.add_argument("--out", default=None, help="checkpoint folder (default: {output_dir}/vqvae, where train finds it)")
    a = sub.add_parser("analyze", help="decode a Coconut model's continuous thoughts on ProsQA (+ training curves)")
    a.add_argument("config", help="the run's YAML config (path or name in configs/)")
    a.add_argument("overrides", nargs="*")
    a.add_argument("--model-dir", required=True, help="folder written by `train` ({output_dir}/export)")
    a.add_argument("--n", type=int, default=200, help="validation records to analyze")
    a.add_argument("--top-k", type=int, default=10, help="decoded tokens listed per thought")
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--out", default=None, help="output folder (default: MODEL_DIR/../analysis)")
    i = sub.add_parser("info", help="print a checkpoint's config and parameter count")
    i.add_argument("--model", required=True, help="HF checkpoint folder (or hub id when online)")
    g = sub.add_parser("generate", help="batched KV-cache generation from a HF checkpoint")
    g.add_argument("--model", required=True, help="HF checkpoint folder (or hub id when online)")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder/file or 'gpt2' (default: the model folder)")
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    sub.add_parser("data", help="datasets: generate | stats | list (see `latent-jax data -h`)", add_help=False)
    return p


def _info(args) -> int:
    from latent_jax.hf import load_hf

    cfg, _, _ = load_hf(args.model)
    print(json.dumps({**cfg.to_dict(), "num_params": cfg.num_params()}, indent=2, default=str))
    return 0


def _generate(args) -> int:
    from latent_jax.generate import SamplingConfig, generate
    from latent_jax.hf import load_hf, resolve_checkpoint
    from latent_jax.tokenizer import check_vocab_fits, load_tokenizer

    folder = resolve_checkpoint(args.model)
    cfg, graphdef, params = load_hf(folder, param_dtype=args.dtype)
    tok = load_tokenizer(args.tokenizer or folder)  # an export's compact / word vocabulary included
    check_vocab_fits(tok.vocab_size, cfg.vocab_size, f"tokenizer {args.tokenizer or folder}", f"model {args.model}")
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else tok.eos_id
    start = time.perf_counter()
    outs = generate(graphdef, params, [tok.encode(p) for p in args.prompt], sampling, eos_id=eos, seed=args.seed)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(args.prompt, outs):
        print(json.dumps({"prompt": prompt, "completion": tok.decode(out, skip_special=True), "tokens": len(out)}))
    print(f"{sum(map(len, outs))} tokens in {elapsed:.2f}s (includes compile)", file=sys.stderr)
    return 0


def _train(args) -> int:
    from latent_jax.distributed import initialize
    from latent_jax.experiment import format_table, load_config, run_compare, run_train, valid_is_generated

    initialize()  # multi-host: from the environment (launch/*.sh); a no-op for a single process

    overrides = list(args.overrides)
    if "=" in args.config:  # `latent-jax train key=value ...` overrides the default config
        overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIG
    if args.model:
        overrides += [f"model.pretrained={args.model}", "model.compact_vocab=false"]
    cfg = load_config(args.config, overrides)
    d = cfg.data
    methods = [m["name"] for m in cfg.compare] if cfg.compare else [cfg.method["name"]]
    valid = ("a generated held-out set" if valid_is_generated(d) else f"the real {d.task} valid file") + (
        f", {d.encoding} encoding" if d.encoding != "text" else "") + (f", rung {d.rung}" if d.rung else "")
    print(f"[latent-jax] {cfg.name}: {', '.join(methods)} on {d.task} (train data: {d.train_source},"
          f" reported on {valid}); output in {cfg.output_dir}", file=sys.stderr)
    if cfg.compare:
        res = run_compare(cfg, fresh=args.fresh, on_result=lambda r: print(f"[latent-jax] {r['method']}: {100 * r['accuracy']:.1f}%"
                                                         f" in {r['wall_seconds']:.0f}s", file=sys.stderr))
        print()
        print(format_table(res["rows"]))
        print()
        print(res["summary"])
        print(f"results: {cfg.output_dir}/compare.json")
        return 0
    result = run_train(cfg, fresh=args.fresh)
    print()
    print(format_table([result]))
    print(f"result: {cfg.output_dir}/result.json   model: {result['export']}")
    return 0


def _eval(args) -> int:
    from latent_jax.experiment import load_config, run_eval

    res = run_eval(load_config(args.config, args.overrides), args.model_dir, out=args.out, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=2))
    return 0


def _export(args) -> int:
    from latent_jax.experiment import load_config, run_export

    folder = run_export(load_config(args.config, args.overrides), args.checkpoint, args.out, args.step)
    print(f"exported to {folder}")
    return 0


def _vqvae(args) -> int:
    import pathlib

    from latent_jax.experiment import experiment_records, build, load_config

    cfg = load_config(args.config, args.overrides)
    train_records, valid_records = experiment_records(cfg)
    _, method, _, _, _ = build(cfg, train_records, valid_records)  # the same tokenizer as `train` builds
    out = pathlib.Path(args.out or pathlib.Path(cfg.output_dir) / "vqvae")
    metrics = method.fit_auxiliary(train_records, out)  # the base class refuses a method without one
    print(json.dumps({"vqvae": str(out), **metrics}, indent=2))
    return 0


def _analyze(args) -> int:
    from latent_jax.analysis import run_analysis
    from latent_jax.experiment import load_config

    res = run_analysis(load_config(args.config, args.overrides), args.model_dir, n=args.n, top_k=args.top_k,
                       out=args.out, batch_size=args.batch_size)
    print(json.dumps({"per_thought": res["per_thought"], "files": res["files"]}, indent=2))
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; `key=value` overrides may also follow the options
    (`train prosqa_coconut --model gpt2 train.mesh.ici_fsdp=-1`). Anything else unknown exits with usage."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if "=" not in x or x.startswith("-") or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "data":
        from latent_jax.data.cli import main as data_main
        return data_main(argv[1:])
    args = parse_args(argv)
    if not logging.getLogger().handlers:  # library warnings (e.g. a corrupt checkpoint skipped) as one line each
        logging.basicConfig(level=logging.WARNING, format=f"latent-jax {args.command}: %(levelname)s: %(message)s")
    try:
        return {"info": _info, "generate": _generate, "train": _train, "eval": _eval, "export": _export,
                "vqvae": _vqvae, "analyze": _analyze}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, RunLockedError) as e:  # CheckpointError is a ValueError
        print(f"latent-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
