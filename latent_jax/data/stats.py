"""Real-vs-generated statistics (no scipy needed): two-sample KS test and a markdown comparison table."""
from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence

from .prontoqa import prontoqa_stats
from .prosqa import prosqa_stats
from .records import Record

STATS: dict[str, Callable[[list[Record]], dict[str, list[float]]]] = {
    "prosqa": prosqa_stats, "prontoqa": prontoqa_stats}


def ks_2samp(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test: (statistic D, asymptotic two-sided p-value).

    The p-value uses the Kolmogorov distribution with Stephens' small-sample correction (Numerical Recipes);
    it agrees with ``scipy.stats.ks_2samp(..., method="asymp")`` to about two digits.
    """
    xa, xb = sorted(a), sorted(b)
    na, nb = len(xa), len(xb)
    if not na or not nb:
        raise ValueError("ks_2samp needs two non-empty samples")
    d = 0.0
    for x in set(xa) | set(xb):
        d = max(d, abs(bisect.bisect_right(xa, x) / na - bisect.bisect_right(xb, x) / nb))
    en = math.sqrt(na * nb / (na + nb))
    lam = (en + 0.12 + 0.11 / en) * d
    return d, _kolmogorov_q(lam)


def _kolmogorov_q(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution."""
    if lam < 1e-3:
        return 1.0
    total, sign = 0.0, 1.0
    for j in range(1, 101):
        term = 2.0 * sign * math.exp(-2.0 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-10:
            break
        sign = -sign
    return min(max(total, 0.0), 1.0)


def comparison_rows(real: list[Record], generated: list[Record], task: str) -> list[dict[str, float | str]]:
    """One row per statistic: mean/min/max of the real and the generated records, KS statistic and p-value."""
    stats = STATS[task]
    r, g = stats(real), stats(generated)
    rows: list[dict[str, float | str]] = []
    for key in r:
        d, p = ks_2samp(r[key], g[key])
        rows.append({"stat": key, "real_mean": sum(r[key]) / len(r[key]), "real_min": min(r[key]),
                     "real_max": max(r[key]), "gen_mean": sum(g[key]) / len(g[key]), "gen_min": min(g[key]),
                     "gen_max": max(g[key]), "ks_d": d, "ks_p": p})
    return rows


def markdown_table(rows: list[dict[str, float | str]], n_real: int, n_gen: int) -> str:
    """Format :func:`comparison_rows` as a markdown table."""
    out = [f"| statistic | real mean [min, max] (n={n_real}) | generated mean [min, max] (n={n_gen}) | KS D | KS p |",
           "|---|---|---|---|---|"]
    for row in rows:
        out.append(f"| {row['stat']} | {row['real_mean']:.2f} [{row['real_min']:g}, {row['real_max']:g}] | "
                   f"{row['gen_mean']:.2f} [{row['gen_min']:g}, {row['gen_max']:g}] | {row['ks_d']:.3f} | "
                   f"{row['ks_p']:.3g} |")
    return "\n".join(out)


def ladder_table(n: int = 2000, seed: int = 0) -> str:
    """The ProsQA size ladder (``prosqa.RUNGS``): per rung, its ranges and the statistics of ``n`` generated records,
    with the symbolic CoT sequence length (question + steps + answer tokens, the methods' separators included)."""
    from .prosqa import RUNGS, generate_prosqa
    from .symbolic import symbolic_records

    out = ["| rung | nodes | hops | mean nodes | mean facts | hops histogram | symbolic CoT tokens mean [max] |",
           "|---|---|---|---|---|---|---|"]
    for name, (n0, n1, s0, s1) in RUNGS.items():
        recs = generate_prosqa(n, seed, name)
        st = prosqa_stats(recs)
        lens = [len(r["question"].split()) + 2 * len(r["steps"]) + 4 for r in symbolic_records(recs)]
        hist = " ".join(f"{h}:{st['steps'].count(h)}" for h in range(s0, s1 + 1))
        out.append(f"| {name} | {n0}-{n1} | {s0}-{s1} | {sum(st['nodes']) / n:.1f} | {sum(st['facts']) / n:.1f} | "
                   f"{hist} | {sum(lens) / n:.0f} [{max(lens)}] |")
    return "\n".join(out)
