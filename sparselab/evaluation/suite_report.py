"""Benchmark results as files: the machine they ran on, JSON / CSV / Markdown.

    >>> paths = write_results(result, runs, "experiments/results")
    >>> print(report(result, runs))
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sparselab.evaluation.byte_bound import DecodeBytes
from sparselab.evaluation.memory import MB
from sparselab.evaluation.summaries import (
    BASELINE_VARIANTS,
    headline,
    shortfall,
    speedups,
    split_table,
)

__all__ = ["machine_info", "report", "write_results"]


def machine_info() -> dict[str, Any]:
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
        "cpu_count_logical": os.cpu_count(), "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": affinity, "memory_total": psutil.virtual_memory().total,
        "memory_available": psutil.virtual_memory().available,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "fast": _fast_info(),
    }


def _fast_info() -> dict[str, Any]:
    from sparselab import _fast

    return _fast.info()


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _md_table(df: pd.DataFrame, index: bool = True, digits: int = 3) -> str:
    if index:
        df = df.reset_index()
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{digits}f}" if math.isfinite(v) else ""
        return str(v)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def report(result: dict[str, Any], runs: pd.DataFrame) -> str:
    """Markdown summary of one benchmark result (what the latest ``.md`` holds)."""
    b, bound, mem = result["bytes"], result["bound"], result["memory"]
    density = bound["density"]
    budget = DecodeBytes(b["mlp"], b["other"], b["lm_head"], b["embedding_row"], b["n_layers"])
    head = headline(runs, budget, density, bound["predictor_bytes"])
    lines = [
        f"# Benchmark `{result['name']}`", "",
        f"- started: {result['started_at']}, wall time {result['wall_time_s']:.0f} s",
        f"- model: {result['model'].get('name')} ({result['model']['num_hidden_layers']} layers, "
        f"{result['model']['dtype']}), MLP density {density:.0%}, predictors: "
        f"{_predictor_label(result['predictors'])} ({bound['predictor_bytes'] / MB:.1f} MiB)",
        f"- prompt {result['prompt']['n_tokens']} tokens, {result['config']['max_new_tokens']} new "
        f"tokens (greedy, KV cache, no EOS stop), {result['config']['num_runs']} runs + "
        f"{result['config']['warmup_runs']} warm-up per variant, alternating",
        f"- torch threads {result['torch_threads']}, machine {result['machine']['cpu']} "
        f"({result['machine']['cpu_count_logical']} logical CPUs), load average at start "
        f"{result['machine']['loadavg']}, torch {result['versions'].get('torch')}; model weights "
        f"in 2 MiB pages: {result.get('huge_page_bytes', 0) / MB:.0f} MiB",
        f"- bytes read per decoded token: {b['total'] / MB:.1f} MiB, MLP share f = {b['f']:.3f}; "
        f"byte bound at d = {density:g}: {bound['bound']:.3f}x, with the predictors' bytes "
        f"{bound['bound_with_predictor']:.3f}x",
    ]
    weights = result["config"].get("weights", "model")
    if weights != "model":
        lines.append(f"- MLP weights {weights!r} (int8, {_int8_label(weights)}) in every variant but "
                     "dense_float: dense is the dense int8 MLP (all neurons through the by-index "
                     "kernel), dense_float the float model; the byte bound counts the int8 bytes")
    if "full_model" in bound:
        fm = bound["full_model"]
        lines.append(f"- the full {fm['n_layers']}-layer model would have f = {fm['f']:.3f}, bound "
                     f"{fm['bound']:.3f}x ({fm['bound_with_predictor']:.3f}x with predictors)")
    lines += [f"- RSS of the model at rest: {mem['rss_model_at_rest'] / MB:.1f} MiB; "
              f"process at rest (dense): {mem['dense_rss_at_rest'] / MB:.1f} MiB", "",
              "## Headline (median [q1-q3])", "", _md_table(head), "",
              "## Decode step split (ms per token, medians of per-run means)", "",
              _md_table(split_table(runs).T), "", "## Targets", "",
              _md_table(pd.DataFrame(result["targets"]), index=False), "",
              "## Where the gap to the bound goes (ms per token)", "",
              "Ideal: the dense step with the MLP time scaled to the bytes the sparse side reads "
              "(kernel d x dense MLP, predictor its byte share of the MLP, no mask / cache / "
              "wrapper cost, the rest as dense). Excess = actual - ideal; the excesses add up "
              "to the step's distance from the ideal.", "",
              _md_table(shortfall(runs, budget, density, bound["predictor_bytes"])
                        .reset_index().round(3), index=False), ""]
    if "dense_float" in set(runs["variant"]):
        float_sp = speedups(runs, baseline="dense_float")["decode_speedup"]
        lines += ["Decode speed against the float model (dense_float): "
                  + ", ".join(f"{v} {x:.3f}x" for v, x in float_sp.items()), ""]
    if "dense_kernel" in set(runs["variant"]):
        lines += _against_dense_kernel(runs, budget, density, bound["predictor_bytes"])
    agree = result.get("greedy_agreement_with_dense") or {}
    if agree:
        lines += ["Greedy tokens equal to dense's (last run): "
                  + ", ".join(f"{k} {v:.0%}" for k, v in agree.items()), ""]
    return "\n".join(lines)


def _against_dense_kernel(runs: pd.DataFrame, budget: DecodeBytes, density: float,
                          predictor_bytes: float) -> list[str]:
    """The sparse variants against the dense MLP through the same kernel: what sparsity
    gains once the kernel's own advantage over torch's dense MLP is taken out."""
    sp = speedups(runs, baseline="dense_kernel")["decode_speedup"]
    bound = budget.bound(density, predictor_bytes)
    sparse = [v for v in sp.index if v not in BASELINE_VARIANTS]
    lines = ["## Against the dense MLP through the same kernel (dense_kernel)", "",
             f"dense_kernel runs every neuron through the by-index kernel, at {1 / sp['dense']:.3f}x "
             "the decode speed of dense (the model in torch). Decode speed against it: "
             + ", ".join(f"{v} {sp[v]:.3f}x ({sp[v] / bound:.0%} of the {bound:.3f}x byte bound)"
                         for v in sparse), ""]
    gap = shortfall(runs, budget, density, predictor_bytes, baseline="dense_kernel")
    return lines + ["Where the gap to that bound goes (ms per token, ideal from dense_kernel's step):",
                    "", _md_table(gap.reset_index().round(3), index=False), ""]


def _int8_label(weights: str) -> str:
    from sparselab._fast.quant import INT8_FORMATS

    fmt = INT8_FORMATS[weights]
    if fmt["block"]:
        return f"a float32 scale per {fmt['block']} weights"
    return ("a float32 scale per row, and per output channel of down"
            if fmt.get("down_col_scales") else "a float32 scale per row")


def write_results(result: dict[str, Any], runs: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """``<name>_<timestamp>.json/.csv`` plus the latest copies ``<name>.json/.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = result["name"]
    paths = {"json": out / f"{name}_{stamp}.json", "csv": out / f"{name}_{stamp}.csv",
             "latest_json": out / f"{name}.json", "latest_md": out / f"{name}.md"}
    result = {**result, "runs_csv": paths["csv"].name}
    runs.to_csv(paths["csv"], index=False)
    paths["json"].write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    shutil.copyfile(paths["json"], paths["latest_json"])
    paths["latest_md"].write_text(report(result, runs))
    return paths


def _predictor_label(info: dict) -> str:
    """"trained rank 64", or a method's name, point and options."""
    if info.get("kind") == "method":
        opts = ", ".join(f"{k} {info[k]}" for k in ("bits", "group", "x_bits") if k in info)
        return (f"method {info.get('method')} at {info.get('point')} ({opts}; compiled decode "
                f"step: {info.get('fast_decode')})")
    return f"{info.get('kind')} rank {info.get('rank')}"
