"""What alternating benchmark runs say: medians with spread, speedups, the gap to the byte
bound by component, the issue's targets and the headline table (pure functions of the
runs frame that :func:`~sparselab.evaluation.compare.compare` returns).

    >>> summarize(runs).loc[("dense", "decode_tokens_per_s")]
    >>> speedups(runs).loc["sparse", "decode_speedup"]
    >>> shortfall(runs, budget, 0.5, predictors.bytes)
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from sparselab.evaluation.byte_bound import DecodeBytes
from sparselab.evaluation.memory import MB

# --------------------------------------------------------------------------------------
# summaries and targets (pure functions of the runs frame)
# --------------------------------------------------------------------------------------

# variants run beside the baseline for reference (the float model next to an int8 dense
# baseline; the dense MLP through the sparse kernel): reported, never held to the sparse
# targets or the byte bound
REFERENCE_VARIANTS = frozenset({"dense_float", "dense_kernel"})
# what the sparse variants are measured against (never a sparse variant themselves)
BASELINE_VARIANTS = REFERENCE_VARIANTS | {"dense"}

SUMMARY_METRICS = ("ttft_ms", "decode_tokens_per_s", "step_ms", "total_tokens_per_s",
                   "peak_rss", "kernel_peak_rss", "rss_at_rest", "extra_bytes", "active_rows_bytes")


def _measured(runs: pd.DataFrame) -> pd.DataFrame:
    """Non-warm-up runs, ordered by variant as given to :func:`compare` (then by cycle)."""
    out = runs[~runs["warmup"]] if "warmup" in runs else runs
    if out.empty:
        raise ValueError("no measured (non-warm-up) runs in the frame")
    order = list(runs.attrs.get("variants") or dict.fromkeys(runs["variant"]))
    rank = out["variant"].map({v: i for i, v in enumerate(order)})
    return out.assign(_rank=rank).sort_values(["_rank", "cycle"], kind="stable").drop(columns="_rank")


def summarize(runs: pd.DataFrame, metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """Median, quartiles, IQR, min and max of each metric per variant (warm-ups excluded).

        >>> summarize(runs).loc[("dense", "decode_tokens_per_s")]
    """
    runs = _measured(runs)
    metrics = [m for m in (metrics or SUMMARY_METRICS) if m in runs]
    rows = []
    for variant, part in runs.groupby("variant", sort=False):
        for m in metrics:
            v = part[m].to_numpy(dtype=np.float64)
            v = v[np.isfinite(v)]
            if not len(v):
                continue
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            rows.append({"variant": variant, "metric": m, "n": len(v), "median": med, "q1": q1,
                         "q3": q3, "iqr": q3 - q1, "min": v.min(), "max": v.max()})
    return pd.DataFrame(rows).set_index(["variant", "metric"])


def split_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Median over runs of each :func:`decode_split` column, one row per variant (ms/step)."""
    runs = _measured(runs)
    cols = [c for c in ("step_ms", "generate_ms", "forward_ms", "rest_ms", "mlp_ms", "predictor_ms",
                        "mask_ms", "cache_ms", "kernel_ms", "mlp_other_ms", "active_density",
                        "rows_copied", "added") if c in runs]
    return runs.groupby("variant", sort=False)[cols].median()


GAP_PARTS = ("kernel_ms", "predictor_ms", "mask_ms", "cache_ms", "mlp_other_ms", "rest_ms",
             "generate_ms")


def shortfall(runs: pd.DataFrame, budget: DecodeBytes, density: float, predictor_bytes: int = 0,
              baseline: str = "dense") -> pd.DataFrame:
    """Where each sparse variant's decode step loses time against the byte-bound ideal.

        >>> shortfall(runs, budget, 0.5, predictors.bytes).loc["sparse_direct"]

    The ideal sparse step is the dense step with its MLP time scaled to the bytes the
    sparse side reads: the kernel ``d`` x dense MLP time, the predictor its bytes' share of
    the MLP bytes x dense MLP time, mask / cache update / wrapper nothing, the rest of the
    model and the generate loop as dense. Per component (ms per token, medians of per-run
    means): ``actual``, ``ideal``, ``excess`` = actual - ideal and ``share`` of the total
    excess - the excesses add up to the variant's step minus the ideal step.
    """
    split = split_table(runs)
    if baseline not in split.index:
        raise ValueError(f"baseline {baseline!r} is not a variant ({list(split.index)})")
    base = split.loc[baseline]
    mlp = float(base["mlp_ms"])
    ideal = {"kernel_ms": mlp * density, "predictor_ms": mlp * predictor_bytes / budget.mlp,
             "mask_ms": 0.0, "cache_ms": 0.0, "mlp_other_ms": 0.0,
             "rest_ms": float(base["rest_ms"]), "generate_ms": float(base["generate_ms"])}
    rows = []
    for variant, row in split.iterrows():
        if variant == baseline or variant in BASELINE_VARIANTS:
            continue
        excess = {c: float(np.nan_to_num(row.get(c, 0.0))) - ideal[c] for c in GAP_PARTS}
        total = sum(excess.values())
        for c in GAP_PARTS:
            rows.append({"variant": variant, "component": c.removesuffix("_ms"),
                         "actual_ms": excess[c] + ideal[c], "ideal_ms": ideal[c],
                         "excess_ms": excess[c], "share": excess[c] / total if total else np.nan})
    return pd.DataFrame(rows).set_index(["variant", "component"])


def speedups(runs: pd.DataFrame, baseline: str = "dense") -> pd.DataFrame:
    """Each variant against ``baseline``: ratios of medians, and paired per-cycle ratios.

        >>> speedups(runs).loc["sparse", ["decode_speedup", "ttft_ratio"]]

    ``decode_speedup`` = median decode tokens/s over the baseline's; ``decode_speedup_q1/q3``
    are quartiles of the same ratio taken cycle by cycle (the runs of one cycle ran back to
    back); ``ttft_ratio`` = median TTFT / baseline's (< 1 is faster); ``peak_rss_ratio``.
    """
    runs = _measured(runs)
    if baseline not in set(runs["variant"]):
        raise ValueError(f"baseline {baseline!r} is not a variant ({sorted(set(runs['variant']))})")
    med = runs.groupby("variant", sort=False)[["decode_tokens_per_s", "ttft_ms",
                                               "total_tokens_per_s", "peak_rss"]].median()
    base = runs[runs["variant"] == baseline].set_index("cycle")
    rows = []
    for variant, part in runs.groupby("variant", sort=False):
        if variant == baseline:
            continue
        paired = part.set_index("cycle")["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        paired = paired.dropna().to_numpy()
        q1, q3 = (np.percentile(paired, [25, 75]) if len(paired) else (np.nan, np.nan))
        rows.append({
            "variant": variant,
            "decode_speedup": med.at[variant, "decode_tokens_per_s"] / med.at[baseline, "decode_tokens_per_s"],
            "decode_speedup_paired": float(np.median(paired)) if len(paired) else np.nan,
            "decode_speedup_q1": q1, "decode_speedup_q3": q3,
            "ttft_ratio": med.at[variant, "ttft_ms"] / med.at[baseline, "ttft_ms"],
            "total_speedup": med.at[variant, "total_tokens_per_s"] / med.at[baseline, "total_tokens_per_s"],
            "peak_rss_ratio": med.at[variant, "peak_rss"] / med.at[baseline, "peak_rss"],
        })
    return pd.DataFrame(rows).set_index("variant")


def check_targets(runs: pd.DataFrame, budget: DecodeBytes, density: float,
                  predictor_bytes: int = 0, baseline: str = "dense",
                  cached: Iterable[str] = (), resident_bytes: int = 0,
                  speed_share: float = 0.9, memory_slack: float = 0.05,
                  ttft_slack: float = 0.05) -> pd.DataFrame:
    """The issue's targets per sparse variant, with the value reached and whether it is met.

        >>> check_targets(runs, budget, 0.5, predictors.bytes, cached=["sparse_cache"])

    - decode speedup >= ``speed_share`` x the byte bound with the predictors' bytes;
    - peak RSS <= dense + ``memory_slack`` x dense, plus, for variants in ``cached``, the
      active rows the cache must hold (``active_rows_bytes``: the largest active set per
      layer - spare capacity beyond it counts as duplicated weights). ``resident_bytes``
      (e.g. predictors kept in memory during the dense runs too) are taken off the dense
      baseline, so the sparse side carries them;
    - TTFT <= dense x (1 + ``ttft_slack``) (the slack absorbs timer noise).
    """
    runs = _measured(runs)
    sp = speedups(runs, baseline)
    if "active_rows_bytes" not in runs:
        runs = runs.assign(active_rows_bytes=0)
    med = runs.groupby("variant", sort=False)[["peak_rss", "extra_bytes", "active_rows_bytes"]].median()
    bound = budget.bound(density, predictor_bytes)
    dense_peak = med.at[baseline, "peak_rss"] - resident_bytes
    cached = set(cached)
    rows = []
    for variant in sp.index.difference(REFERENCE_VARIANTS, sort=False):
        s = sp.loc[variant]
        rows.append({"variant": variant, "target": "decode speedup >= "
                     f"{speed_share:.0%} of byte bound (predictor incl.)",
                     "value": s["decode_speedup"], "threshold": speed_share * bound,
                     "met": bool(s["decode_speedup"] >= speed_share * bound),
                     "detail": f"{s['decode_speedup']:.3f}x vs bound {bound:.3f}x "
                               f"(ratio {s['decode_speedup'] / bound:.2f})"})
        allowance = med.at[variant, "active_rows_bytes"] if variant in cached else 0.0
        limit = dense_peak * (1 + memory_slack) + allowance
        peak = med.at[variant, "peak_rss"]
        what = "dense + active rows + " if variant in cached else "dense + "
        detail = f"{peak / MB:.1f} MiB vs dense {dense_peak / MB:.1f} MiB (+{(peak - dense_peak) / MB:.1f} MiB"
        if variant in cached:
            detail += (f"; active rows {allowance / MB:.1f} MiB, cache capacity "
                       f"{med.at[variant, 'extra_bytes'] / MB:.1f} MiB")
        rows.append({"variant": variant, "target": f"peak RSS <= {what}{memory_slack:.0%}",
                     "value": peak / MB, "threshold": limit / MB, "met": bool(peak <= limit),
                     "detail": detail + ")"})
        rows.append({"variant": variant, "target": "TTFT no worse than dense",
                     "value": s["ttft_ratio"], "threshold": 1 + ttft_slack,
                     "met": bool(s["ttft_ratio"] <= 1 + ttft_slack),
                     "detail": f"TTFT ratio {s['ttft_ratio']:.3f} (slack {ttft_slack:.0%})"})
    return pd.DataFrame(rows)


def headline(runs: pd.DataFrame, budget: DecodeBytes | None = None, density: float | None = None,
             predictor_bytes: int = 0, baseline: str = "dense") -> pd.DataFrame:
    """The original project's headline table: TTFT, decode speed, memory, per variant.

        >>> headline(runs, budget, density=0.5, predictor_bytes=p.bytes)

    Medians with [q1-q3] in the cells; speedups against ``baseline``; with ``budget``
    and ``density`` the byte bound (with predictors) and the share of it reached.
    """
    runs = _measured(runs)
    sp = speedups(runs, baseline) if runs["variant"].nunique() > 1 else pd.DataFrame()
    rows = []
    for variant, part in runs.groupby("variant", sort=False):
        def cell(col, scale=1.0, fmt="{:.1f}", part=part):
            q1, med, q3 = np.percentile(part[col].to_numpy(dtype=float) * scale, [25, 50, 75])
            return f"{fmt.format(med)} [{fmt.format(q1)}-{fmt.format(q3)}]"
        row = {"variant": variant, "TTFT ms": cell("ttft_ms"),
               "decode tok/s": cell("decode_tokens_per_s", fmt="{:.2f}"),
               "total tok/s": cell("total_tokens_per_s", fmt="{:.2f}"),
               "peak RSS MiB": cell("peak_rss", 1 / MB),
               "cache MiB (active / capacity)": (
                   f"{part['active_rows_bytes'].median() / MB:.1f} / {part['extra_bytes'].median() / MB:.1f}"
                   if "active_rows_bytes" in part else f"{part['extra_bytes'].median() / MB:.1f}")}
        if variant in sp.index:
            row["decode speedup"] = f"{sp.at[variant, 'decode_speedup']:.3f}x"
            row["TTFT ratio"] = f"{sp.at[variant, 'ttft_ratio']:.3f}"
            if budget is not None and density is not None and variant not in REFERENCE_VARIANTS:
                bound = budget.bound(density, predictor_bytes)
                row["byte bound"] = f"{budget.bound(density):.3f}x / {bound:.3f}x"
                row["of bound"] = f"{sp.at[variant, 'decode_speedup'] / bound:.0%}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant").fillna("")
