"""Figures of the kernel benchmark: cache update cost and sparse MLP time vs density.

    >>> import pandas as pd, bench_kernels as bk        # experiments/bench_kernels.py
    >>> upd = pd.DataFrame(bk.update_sweep(densities=(0.1, 0.5), swaps=(4, 64)))
    >>> sl.figures.update_cost(upd, density=0.5, swaps=64).show()

Frames are rows of ``experiments/bench_kernels.py`` (``update_sweep`` and the ``"mlp"``
section of ``bench_mlp``) as DataFrames; times are medians in ms with the
inter-quartile range as error bars. Same look as :mod:`sparselab.viz`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sparselab.viz.style import ACTIVE_COLOR, BASELINE_DASH, TEMPLATE, require_columns

__all__ = ["METHOD_NAMES", "mlp_time_vs_density", "update_cost"]

REGATHER_COLOR = "#d62728"
METHOD_NAMES = {
    "dense_torch": ("dense (torch)", "gray"),
    "regather_matmul": ("re-gather + matmul", REGATHER_COLOR),
    "cache_kernel": ("over the cache (contiguous rows)", ACTIVE_COLOR),
    "index_kernel": ("by index (full weights, no copy)", "#2ca02c"),
}


def _errors(part: pd.DataFrame) -> dict | None:
    if not {"q1_ms", "q3_ms"} <= set(part.columns):
        return None
    med = part["median_ms"].to_numpy()
    return {"type": "data", "symmetric": False, "array": part["q3_ms"].to_numpy() - med,
            "arrayminus": med - part["q1_ms"].to_numpy(), "thickness": 1}


def _pick(values: np.ndarray, wanted: float, what: str) -> float:
    match = values[np.isclose(values, float(wanted))]
    if not len(match):
        raise ValueError(f"{what} {wanted} not in the frame ({what}s: {sorted(values.tolist())})")
    return float(match[0])


def update_cost(df: pd.DataFrame, density: float, swaps: int, title: str | None = None) -> go.Figure:
    """Cache update vs full re-gather: time vs neurons swapped, and vs active size.

        >>> sl.figures.update_cost(pd.DataFrame(bk.update_sweep()), density=0.3, swaps=64)

    ``df``: rows of ``update_sweep`` (``method`` ``update_rows`` / ``full_regather``).
    Left: at active ``density``, update time vs ``k`` neurons swapped, the re-gather of
    the whole active set as a dashed line. Right: at ``k = swaps``, time vs the number of
    active neurons for both - the update should stay flat, the re-gather grow. Hover
    shows the rows each call copies.
    """
    require_columns(df, ["density", "n_active", "method", "neurons_swapped", "median_ms", "rows_copied"], "update_cost")
    density = _pick(np.sort(df["density"].unique()), density, "density")
    upd = df[df["method"] == "update_rows"]
    reg = df[df["method"] == "full_regather"].sort_values("n_active")
    swaps = int(_pick(np.sort(upd["neurons_swapped"].unique()).astype(float), swaps, "neurons_swapped"))
    left = upd[upd["density"] == density].sort_values("neurons_swapped")
    right = upd[upd["neurons_swapped"] == swaps].sort_values("n_active")
    reg_here = reg[reg["density"] == density]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        f"vs churn, {density:.0%} of neurons active", f"vs active size, {swaps} neurons swapped"))
    hover = "%{x}<br>%{y:.3f} ms<br>rows copied %{customdata}<extra></extra>"
    fig.add_trace(go.Scatter(
        x=left["neurons_swapped"].to_numpy(), y=left["median_ms"].to_numpy(), error_y=_errors(left),
        mode="lines+markers", name="cache update (paired replacement)", legendgroup="update",
        line={"color": ACTIVE_COLOR}, customdata=left["rows_copied"].to_numpy(), hovertemplate=hover), row=1, col=1)
    if len(reg_here):
        x = left["neurons_swapped"].to_numpy()
        xs = [x.min(), x.max()] if len(x) else [1, 1]
        fig.add_trace(go.Scatter(
            x=xs, y=[float(reg_here["median_ms"].iloc[0])] * 2, mode="lines", name="full re-gather",
            legendgroup="regather", line={"color": REGATHER_COLOR, "dash": BASELINE_DASH},
            customdata=[int(reg_here["rows_copied"].iloc[0])] * 2, hovertemplate=hover), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=right["n_active"].to_numpy(), y=right["median_ms"].to_numpy(), error_y=_errors(right),
        mode="lines+markers", name="cache update", legendgroup="update", showlegend=False,
        line={"color": ACTIVE_COLOR}, customdata=right["rows_copied"].to_numpy(), hovertemplate=hover), row=1, col=2)
    fig.add_trace(go.Scatter(
        x=reg["n_active"].to_numpy(), y=reg["median_ms"].to_numpy(), error_y=_errors(reg),
        mode="lines+markers", name="full re-gather", legendgroup="regather", showlegend=False,
        line={"color": REGATHER_COLOR, "dash": BASELINE_DASH}, customdata=reg["rows_copied"].to_numpy(),
        hovertemplate=hover), row=1, col=2)
    fig.update_layout(template=TEMPLATE, height=420, margin={"l": 70, "r": 30, "t": 80, "b": 60},
                      title={"text": title or "Weight cache update vs full re-gather (1 thread)"})
    fig.update_xaxes(type="log", title_text="neurons swapped per update (k)", row=1, col=1)
    fig.update_xaxes(title_text="active neurons", row=1, col=2)
    fig.update_yaxes(type="log", title_text="time per update (ms)")
    return fig


def mlp_time_vs_density(df: pd.DataFrame, title: str = "Sparse MLP time vs density (batch 1, 1 thread)") -> go.Figure:
    """Time and speedup of each MLP method vs active density, against the bandwidth line.

        >>> mlp = pd.DataFrame(rows.rows).query("section == 'mlp'")   # from bk.bench_mlp
        >>> sl.figures.mlp_time_vs_density(mlp)

    ``df``: ``section == "mlp"`` rows of ``bench_mlp`` for one shape, dtype and thread
    count (``density, method, median_ms`` and optionally ``q1_ms, q3_ms``). Left: time;
    the dashed line is ``d x`` dense time, what a kernel reading only the active rows at
    the dense kernel's bandwidth would take. Right: speedup over dense with the line
    ``1 / d``.
    """
    require_columns(df, ["density", "method", "median_ms"], "mlp_time_vs_density")
    if "dense_torch" not in set(df["method"]):
        raise ValueError("mlp_time_vs_density needs the 'dense_torch' rows (the reference)")
    for key in ("shape", "dtype", "threads"):
        if key in df.columns and df[key].nunique() > 1:
            raise ValueError(f"the frame mixes several {key} values {sorted(df[key].unique())}; filter to one")
    dense = df[df["method"] == "dense_torch"].groupby("density")["median_ms"].first()
    dense_ms = float(dense.median())
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("time per token", "speedup over dense"))
    grid = np.sort(df["density"].unique())
    for method, (name, color) in METHOD_NAMES.items():
        part = df[df["method"] == method].sort_values("density")
        if part.empty:
            continue
        x = part["density"].to_numpy()
        speed = dense.reindex(x).to_numpy() / part["median_ms"].to_numpy()
        fig.add_trace(go.Scatter(x=x, y=part["median_ms"].to_numpy(), error_y=_errors(part),
                                 mode="lines+markers", name=name, legendgroup=method, line={"color": color},
                                 hovertemplate=f"{name}<br>density %{{x:.2f}}<br>%{{y:.3f}} ms<extra></extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=speed, mode="lines+markers", name=name, legendgroup=method,
                                 showlegend=False, line={"color": color},
                                 hovertemplate=f"{name}<br>density %{{x:.2f}}<br>%{{y:.2f}}x<extra></extra>"),
                      row=1, col=2)
    fig.add_trace(go.Scatter(x=grid, y=dense_ms * grid, mode="lines", name="bandwidth line: d x dense",
                             legendgroup="bound", line={"color": "black", "dash": BASELINE_DASH, "width": 1}),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=grid, y=1.0 / grid, mode="lines", name="1 / d", legendgroup="bound",
                             showlegend=False, line={"color": "black", "dash": BASELINE_DASH, "width": 1}),
                  row=1, col=2)
    fig.update_layout(template=TEMPLATE, height=420, margin={"l": 70, "r": 30, "t": 80, "b": 60},
                      title={"text": title})
    fig.update_xaxes(title_text="density (share of neurons active)", type="log")
    fig.update_yaxes(title_text="ms", type="log", row=1, col=1)
    fig.update_yaxes(title_text="dense time / time", type="log", row=1, col=2)
    return fig
