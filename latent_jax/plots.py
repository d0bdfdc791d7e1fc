"""PNG plots: training curves of a run and the latent-thought analysis (`latent_jax.analysis`).

matplotlib is optional (`pip install 'latent_jax[plot]'`) and imported inside each function; the figures use the
object-oriented API (`matplotlib.figure.Figure`), so no pyplot state or GUI backend is touched.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any


def _figure(ncols: int, width: float = 5.0, height: float = 3.6):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'latent_jax[plot]'") from e
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _save(fig, out_png) -> pathlib.Path:
    out = pathlib.Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def read_metrics(metrics_jsonl) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of a `train/metrics.jsonl` (see `checkpoint.MetricsLog`)."""
    steps, evals = [], []
    for line in pathlib.Path(metrics_jsonl).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            (evals if "eval" in rec else steps if "loss" in rec else []).append(rec)
    return steps, evals


def plot_training_curves(metrics_jsonl, out_png) -> pathlib.Path:
    """Left: training loss per optimizer step, one colour per curriculum stage. Right: eval accuracy per epoch
    (points coloured by stage). Reads a run's `train/metrics.jsonl`."""
    steps, evals = read_metrics(metrics_jsonl)
    if not steps and not evals:
        raise ValueError(f"{metrics_jsonl}: no step or eval records")
    fig, (ax_loss, ax_acc) = _figure(2)
    stages = sorted({r.get("stage", 0) for r in steps + evals})
    colour = {s: f"C{i % 10}" for i, s in enumerate(stages)}
    for s in stages:
        pts = [(r["step"], r["loss"]) for r in steps if r.get("stage", 0) == s]
        if pts:
            ax_loss.plot(*zip(*pts), ".-", ms=3, lw=1, color=colour[s], label=f"stage {s}")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss per step")
    if steps and all(r["loss"] > 0 for r in steps):
        ax_loss.set_yscale("log")
    if steps:
        ax_loss.legend(fontsize=8)
    if evals:
        xs = [r.get("epoch", i) + 1 for i, r in enumerate(evals)]
        ys = [100 * r["eval"].get("accuracy", float("nan")) for r in evals]
        ax_acc.plot(xs, ys, "-", color="0.6", lw=1)
        for s in stages:
            pts = [(x, y) for x, y, r in zip(xs, ys, evals) if r.get("stage", 0) == s]
            if pts:
                ax_acc.plot(*zip(*pts), "o", color=colour[s], label=f"stage {s}")
        ax_acc.legend(fontsize=8)
    else:
        ax_acc.text(0.5, 0.5, "no eval records", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="eval accuracy per epoch")
    from matplotlib.ticker import MaxNLocator
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, out_png)


def plot_thought_mass(result: dict[str, Any], out_png) -> pathlib.Path:
    """Per thought: mean cumulative node mass of the top-1/2/3 nodes and the mass on frontier nodes."""
    import numpy as np

    rows = result["per_thought"]
    fig, (ax,) = _figure(1, width=max(5.0, 1.3 * len(rows) + 2))
    keys = [("top1_mass", "top-1 node"), ("top2_mass", "top-2 nodes"), ("top3_mass", "top-3 nodes"),
            ("frontier_mass", "frontier nodes"), ("node_mass", "all nodes")]
    x = np.arange(len(rows))
    w = 0.8 / len(keys)
    for i, (k, label) in enumerate(keys):
        ax.bar(x + (i - (len(keys) - 1) / 2) * w, [r[k] or 0.0 for r in rows], w, label=label)
    ax.set_xticks(x, [f"thought {r['thought']}\n(n={r['n_records']})" for r in rows])
    ax.set(ylabel="mean probability mass", title="node probability mass per continuous thought")
    ax.legend(fontsize=8)
    return _save(fig, out_png)


def plot_value_scatter(result: dict[str, Any], out_png, seed: int = 0) -> pathlib.Path:
    """One panel per thought: node score vs value (1 = reaches the target, jittered); frontier nodes highlighted."""
    import numpy as np

    rows = result["per_thought"]
    c = result.get("c_thought", 1)
    fig, axes = _figure(max(len(rows), 1), width=3.4)
    rng = np.random.default_rng(seed)
    for ax, summ in zip(axes, rows):
        k = summ["thought"]
        pts = [(v, s, d == k // c + 1) for rec in result["records"] if k < len(rec["thoughts"])
               for v, s, d in zip(rec["value"], rec["thoughts"][k]["node_scores"], rec["depth"])]
        if pts:
            v, s, f = map(np.asarray, zip(*pts))
            xj = v + rng.uniform(-0.15, 0.15, len(v))
            ax.scatter(xj[~f], s[~f], s=6, color="0.6", alpha=0.6, label="other")
            ax.scatter(xj[f], s[f], s=8, color="C1", alpha=0.8, label="frontier")
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
        ax.set(xticks=[0, 1], xticklabels=["no", "yes"], xlabel="reaches target",
               title=f"thought {k}: r={fmt(summ['pearson'])} ρ={fmt(summ['spearman'])}")
        ax.title.set_fontsize(9)
    axes[0].set_ylabel("node score (probability mass)")
    axes[0].legend(fontsize=7)
    return _save(fig, out_png)


def plot_accuracy_vs_time(runs: dict[str, list[dict]], out_png, title: str = "") -> pathlib.Path:
    """Held-out accuracy after each epoch against cumulative training time, one line per run. `runs` maps a label
    to a run's `history` (entries with `train_seconds` and `accuracy`, as the trainer writes them)."""
    fig, (ax,) = _figure(1, width=6.0, height=4.0)
    for label, history in runs.items():
        pts = [(h["train_seconds"] / 60, 100 * h["accuracy"]) for h in history
               if "train_seconds" in h and "accuracy" in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
    ax.set_xlabel("training time (min, 2 CPU cores)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, out_png)
