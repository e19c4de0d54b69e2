"""Figures of recordings at scale: memory over a recording, and a sweep's results.

    >>> memory_profile_figure(pd.concat([profile_memory, profile_streamed]))
    >>> sweep_figure(df, metric="mass_kept")      # df from sl.sweep
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from sparselab.viz.style import new_figure, require_columns

__all__ = ["memory_profile_figure", "sweep_figure"]


def memory_profile_figure(df: pd.DataFrame, title: str = "Resident memory during a recording") -> go.Figure:
    """One line per ``label``: RSS (MB) over seconds (frames of ``studies.scale.memory_profile``)."""
    require_columns(df, ["label", "seconds", "rss_mb"], "memory profile")
    fig = new_figure(title, "seconds since the recording started", "resident memory (MB)")
    for label, part in df.groupby("label", sort=False):
        fig.add_trace(go.Scatter(x=part.seconds, y=part.rss_mb, mode="lines", name=str(label)))
    return fig


def sweep_figure(df: pd.DataFrame, metric: str = "mass_kept", title: str | None = None) -> go.Figure:
    """``metric`` (mean over layers) against density, one line per (model, rule, rank)."""
    require_columns(df, ["model", "rule", "rank", "density", metric], "sweep results")
    fig = new_figure(title or f"Sweep: {metric} vs density (mean over layers)", "density", metric)
    mean = df.groupby(["model", "rule", "rank", "density"], as_index=False)[metric].mean()
    for (model, rule, rank), part in mean.groupby(["model", "rule", "rank"]):
        fig.add_trace(go.Scatter(x=part.density, y=part[metric], mode="lines+markers",
                                 name=f"{model} {rule} r={rank}"))
    return fig
