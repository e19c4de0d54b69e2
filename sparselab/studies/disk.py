"""When does differential caching pay? The results of experiments/bench_disk.py as tidy
frames: decode speed and bytes read per token against the memory cap and the window.

    >>> runs = load_disk_bench("experiments/results/bench_disk_smollm2.json")
    >>> speedups(runs)              # each sparse run against dense under the same cap
    >>> memory_vs_dense(runs)       # peak memory against the dense model in RAM
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["cap_label", "load_disk_bench", "memory_vs_dense", "speedups", "window_sweep"]


def cap_label(cap) -> str:
    """``"none"`` for an uncapped run, else the share of the MLP file that fits, e.g. ``"50 %"``."""
    return "none" if cap is None or (isinstance(cap, float) and np.isnan(cap)) else f"{cap * 100:.0f} %"


def load_disk_bench(path) -> pd.DataFrame:
    """One row per run of ``bench_disk.py`` (its ``.json``); ``attrs['config']`` and
    ``attrs['versions']`` say how it was run. Adds ``cap_label`` and ``label`` (variant and
    density), and ``bytes_per_token`` (read from storage, bytes)."""
    meta = json.loads(Path(path).read_text())
    df = pd.DataFrame(meta["rows"]).drop(columns=["tokens"], errors="ignore")
    df["cap_label"] = df["cap"].map(cap_label)
    df["label"] = [v if v.startswith("dense") else f"{v} d={d:g}" for v, d in zip(df.variant, df.density, strict=True)]
    df["bytes_per_token"] = df["read_mb_per_token"] * 2**20
    df.attrs["config"], df.attrs["versions"] = meta["config"], meta["versions"]
    return df


def speedups(runs: pd.DataFrame) -> pd.DataFrame:
    """Every from-disk run at window 1 against dense from disk under the same cap:
    ``speedup`` (tokens/s ratio; NaN when the run was killed) and ``read_ratio``."""
    disk = runs[~runs.variant.str.endswith("_ram") & (runs.window == 1)].copy()
    dense = disk[disk.variant == "dense"].set_index("cap_label")
    out = disk[disk.variant != "dense"].copy()
    out["dense_tok_s"] = out.cap_label.map(dense.tok_s)
    out["dense_mb_per_token"] = out.cap_label.map(dense.read_mb_per_token)
    out["speedup"] = out.tok_s / out.dense_tok_s
    out["read_ratio"] = out.read_mb_per_token / out.dense_mb_per_token
    cols = ["variant", "density", "measured_density", "cap_label", "tok_s", "dense_tok_s", "speedup", "read_mb_per_token",
            "dense_mb_per_token", "read_ratio", "killed"]
    return out.reindex(columns=cols).reset_index(drop=True)


def memory_vs_dense(runs: pd.DataFrame) -> pd.DataFrame:
    """Peak memory of each surviving run against the dense model all in RAM: ``rss_peak``
    (the process's peak resident set, VmHWM: mapped weight pages included),
    ``footprint_peak`` (RSS + the weight file's resident pages, each page once, highest
    after any decode step: :func:`sparselab.evaluation.storage.memory_footprint`) and
    ``charged_peak`` (the cgroup's peak: anonymous memory plus the page cache the run
    read), each as a change against the dense run's (negative = less memory):
    ``rss_change``, ``footprint_change`` (against dense's footprint peak, or its RSS peak
    in results without footprints) and ``charged_change``."""
    ram = runs[runs.variant == "dense_ram"]
    if ram.empty:
        raise ValueError("no dense_ram run to compare against")
    ref = float(ram.rss_peak.iloc[0])
    ok = runs[~runs.killed.astype(bool)].copy()
    if "footprint_peak" not in ok:
        ok["footprint_peak"] = np.nan
    foot_ref = float(ram.footprint_peak.iloc[0]) if "footprint_peak" in ram else np.nan
    ok["rss_change"] = ok.rss_peak / ref - 1
    ok["footprint_change"] = ok.footprint_peak / (ref if np.isnan(foot_ref) else foot_ref) - 1
    ok["charged_change"] = ok.cgroup_peak / ref - 1
    ok.loc[ok.variant.str.endswith("_ram"), "charged_change"] = np.nan  # its file pages are charged elsewhere
    ok["dense_rss_peak"] = ref
    ok["dense_footprint_peak"] = foot_ref
    return ok.reindex(columns=["variant", "density", "cap_label", "window", "rss_peak", "footprint_peak",
                               "cgroup_peak", "weight_resident_end", "dense_rss_peak",
                               "dense_footprint_peak", "rss_change", "footprint_change",
                               "charged_change"]).reset_index(drop=True)


def window_sweep(runs: pd.DataFrame) -> pd.DataFrame:
    """The cache runs of one density and cap across windows k (the window sweep's cap)."""
    cache = runs[(runs.variant == "cache") & ~runs.killed.astype(bool)]
    swept = cache.groupby(["density", "cap_label"]).window.nunique()
    keys = swept[swept > 1].index
    out = cache.set_index(["density", "cap_label"]).loc[list(keys)].reset_index()
    return out.reindex(columns=["density", "cap_label", "window", "rows_held", "rows_loaded_per_token",
                                "overflow_per_token", "read_mb_per_token", "tok_s"]).sort_values(["density", "window"]).reset_index(drop=True)
