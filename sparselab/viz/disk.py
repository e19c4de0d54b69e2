"""Figures for MLP weights on disk (frames from :mod:`sparselab.studies.disk`).

    >>> runs = sl.studies.disk.load_disk_bench("experiments/results/bench_disk_smollm2.json")
    >>> disk_vs_cap(runs, "tok_s"); window_tradeoff(window_sweep(runs))
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sparselab.viz.style import ACTIVE_COLOR, HIGHLIGHT_COLOR, new_figure, require_columns, template

__all__ = ["disk_vs_cap", "window_tradeoff"]

_Y = {"tok_s": "decode tokens/s", "read_mb_per_token": "MiB read from storage per token"}
_DASH = {"dense": "solid", "direct": "dot", "cache": "dash"}


def disk_vs_cap(runs: pd.DataFrame, metric: str = "tok_s", title: str | None = None) -> go.Figure:
    """``metric`` (``tok_s`` or ``read_mb_per_token``) against the memory cap, one line per
    variant and density, window 1 only; a killed run is an ``x`` at 0."""
    require_columns(runs, ["variant", "label", "cap", "cap_label", "window", "killed", metric], "disk_vs_cap")
    if metric not in _Y:
        raise ValueError(f"metric must be one of {list(_Y)}, got {metric!r}")
    disk = runs[~runs.variant.str.endswith("_ram") & (runs.window == 1)].copy()
    disk["order"] = disk.cap.fillna(10.0)
    fig = new_figure(title or f"{_Y[metric]} vs memory cap (MLP share that fits in RAM)",
                     "memory cap (share of the MLP weights that fits beside the rest)", _Y[metric])
    order = list(disk.sort_values("order", ascending=False).cap_label.drop_duplicates())
    for label, g in disk.groupby("label", sort=False):
        g = g.sort_values("order", ascending=False)
        ok = g[~g.killed.astype(bool)]
        variant = g.variant.iloc[0]
        fig.add_trace(go.Scatter(x=ok.cap_label, y=ok[metric], mode="lines+markers", name=label,
                                 line={"dash": _DASH.get(variant, "solid")}))
        dead = g[g.killed.astype(bool)]
        if len(dead):
            fig.add_trace(go.Scatter(x=dead.cap_label, y=[0] * len(dead), mode="markers", showlegend=False,
                                     marker={"symbol": "x", "size": 12, "color": HIGHLIGHT_COLOR},
                                     hovertext=[f"{label}: killed (out of memory)"] * len(dead)))
    fig.update_xaxes(categoryorder="array", categoryarray=order)
    return fig


def window_tradeoff(sweep: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Rows held and rows loaded per token (left) and decode tokens/s (right) against the
    window k, one line per density (frames from :func:`~sparselab.studies.disk.window_sweep`)."""
    require_columns(sweep, ["density", "window", "rows_held", "rows_loaded_per_token", "tok_s"], "window_tradeoff")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("rows held / loaded per token (all layers)",
                                                        "decode tokens/s"))
    for d, g in sweep.groupby("density"):
        g = g.sort_values("window")
        cap = g.cap_label.iloc[0] if "cap_label" in g else ""
        fig.add_trace(go.Scatter(x=g.window, y=g.rows_held, name=f"held, d={d:g} (cap {cap})",
                                 mode="lines+markers", line={"color": ACTIVE_COLOR}), 1, 1)
        fig.add_trace(go.Scatter(x=g.window, y=g.rows_loaded_per_token, name=f"loaded/token, d={d:g}",
                                 mode="lines+markers", line={"color": HIGHLIGHT_COLOR, "dash": "dash"}), 1, 1)
        fig.add_trace(go.Scatter(x=g.window, y=g.tok_s, name=f"tok/s, d={d:g}", mode="lines+markers"), 1, 2)
    fig.update_xaxes(type="log", title_text="window k (tokens)")
    fig.update_layout(title={"text": title or "Windowed cache: rows held vs rows loaded"}, height=420,
                      template=template())
    return fig
