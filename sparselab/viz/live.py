"""Figures of a live sparse generation and of predictor quality: frames in, ``go.Figure`` out.

    >>> r = sl.runtime.sparse_generate(model, tok, "Hello", mode="oracle", density=0.3)
    >>> sl.figures.step_heatmap(r.masks, layer=10, pieces=r.tokens).show()
    >>> sl.figures.time_split_bars(sl.runtime.time_split(r)).show()
    >>> sl.figures.predictor_quality(predictors.evaluate(test)).show()

Same look as :mod:`sparselab.viz` (its template, colours and helpers). Nothing here
runs a model: the frames come from :mod:`sparselab.runtime.generate` and
:meth:`sparselab.prediction.Predictors.evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go

from sparselab.masking.masks import Masks
from sparselab.viz.masks import token_heatmap
from sparselab.viz.style import ACTIVE_COLOR, new_figure, require_columns

__all__ = [
    "cache_traffic_bars",
    "predictor_quality",
    "step_heatmap",
    "step_layer_density",
    "time_split_bars",
]

# one fixed colour per time component, so the stacks read the same in every figure
COMPONENT_COLORS = {
    "predictor": "#9467bd",
    "mask + union": "#ff7f0e",
    "cache update": "#d62728",
    "sparse MLP": ACTIVE_COLOR,
    "rest of the model": "#bdbdbd",
}
QUALITY_COLUMNS = {
    "recall": ("recall", ACTIVE_COLOR),
    "precision": ("precision", "#ff7f0e"),
    "f1": ("F1", "#2ca02c"),
    "mass_kept": ("|h| mass kept", "#9467bd"),
}


def step_heatmap(
    masks: Masks,
    layer: int,
    pieces: Sequence[str] | None = None,
    max_steps: int = 128,
    max_neurons: int = 256,
    title: str | None = None,
) -> go.Figure:
    """Decode steps x neurons of one layer: which neurons the sparse model computed.

        >>> sl.figures.step_heatmap(result.masks, layer=10, pieces=result.tokens)

    ``masks``: :attr:`sparselab.runtime.generate.LiveResult.masks` (tokens are decode steps);
    ``pieces``: the token each step consumed (row labels). Columns: neurons sorted by
    how often they were active over the steps shown (hottest left).
    """
    if not isinstance(masks, Masks):
        raise TypeError(f"step_heatmap expects sparselab.Masks, got {type(masks).__name__}")
    if layer not in masks.layers:
        raise ValueError(f"layer {layer} was not sparsified in this run (layers: {list(masks.layers)})")
    if masks.n_tokens == 0:
        raise ValueError("no decode steps to show (generate at least 2 tokens)")
    fig = token_heatmap(
        masks.layer(layer), layer=layer, pieces=pieces, max_tokens=max_steps, max_neurons=max_neurons,
        title=title or f"Layer {layer}: neurons computed at each decode step",
    )
    fig.update_yaxes(title_text="decode step (token fed back)")
    return fig


def step_layer_density(stats: pd.DataFrame, title: str = "Share of neurons computed, per step and layer") -> go.Figure:
    """Heatmap of ``density`` over decode steps (rows) and layers (columns).

        >>> sl.figures.step_layer_density(result.stats)

    ``stats``: :attr:`sparselab.runtime.generate.LiveResult.stats` (one row per step and layer; with
    several rows per step and layer, e.g. ``union=False``, their mean is shown).
    """
    require_columns(stats, ["step", "layer", "density"], "step_layer_density")
    grid = stats.pivot_table(index="step", columns="layer", values="density", aggfunc="mean").sort_index()
    fig = new_figure(title, "layer", "decode step", height=max(300, min(700, 16 * len(grid) + 140)),
                  yaxis={"title": {"text": "decode step"}, "autorange": "reversed"})
    fig.add_trace(go.Heatmap(
        z=grid.to_numpy(), x=[int(c) for c in grid.columns], y=grid.index.to_numpy(), zmin=0, zmax=1,
        colorscale="Blues", colorbar={"title": {"text": "density"}},
        hovertemplate="step %{y}<br>layer %{x}<br>density %{z:.3f}<extra></extra>",
    ))
    return fig


def cache_traffic_bars(traffic: pd.DataFrame, title: str = "Weight-cache traffic per decode step") -> go.Figure:
    """Rows the cache copied per step (bars) next to how many neurons changed (line).

        >>> sl.figures.cache_traffic_bars(sl.runtime.cache_traffic(result))

    ``traffic``: frame of :func:`sparselab.runtime.generate.cache_traffic` (summed over layers). The
    first step loads the whole active set (the cache starts cold); without a cache
    (oracle, static) the bars are 0 and the line says what a cache would have churned.
    """
    require_columns(traffic, ["step", "rows_copied", "changed"], "cache_traffic_bars")
    part = traffic.sort_values("step")
    fig = new_figure(title, "decode step", "rows (summed over layers)", height=340,
                  legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"})
    fig.add_trace(go.Bar(x=part["step"].to_numpy(), y=part["rows_copied"].to_numpy(), name="rows copied",
                         marker_color=ACTIVE_COLOR,
                         hovertemplate="step %{x}<br>%{y} rows copied<extra></extra>"))
    fig.add_trace(go.Scatter(x=part["step"].to_numpy(), y=part["changed"].to_numpy(), mode="lines+markers",
                             name="neurons changed (added + removed)", line={"color": "gray", "dash": "dash"},
                             hovertemplate="step %{x}<br>%{y} changed<extra></extra>"))
    return fig


def time_split_bars(split: pd.DataFrame, title: str = "Where each decode step's time goes") -> go.Figure:
    """Stacked bars of milliseconds per decode step, one colour per component.

        >>> sl.figures.time_split_bars(sl.runtime.time_split(result))

    ``split``: long frame of :func:`sparselab.runtime.generate.time_split` (``step, component, ms``).
    Component order follows the frame's categories (or first appearance).
    """
    require_columns(split, ["step", "component", "ms"], "time_split_bars")
    comps = split["component"]
    order = list(comps.cat.categories) if isinstance(comps.dtype, pd.CategoricalDtype) else \
        list(dict.fromkeys(comps))
    fig = new_figure(title, "decode step", "time (ms)", height=360, barmode="stack",
                  legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"})
    for name in order:
        part = split[split["component"] == name].sort_values("step")
        fig.add_trace(go.Bar(x=part["step"].to_numpy(), y=part["ms"].to_numpy(dtype=float), name=str(name),
                             marker_color=COMPONENT_COLORS.get(str(name)),
                             hovertemplate=f"step %{{x}}<br>{name}: %{{y:.2f}} ms<extra></extra>"))
    return fig


def predictor_quality(df: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Per-layer recall, precision, F1 and ``|h|`` mass kept (grouped bars).

        >>> sl.figures.predictor_quality(predictors.evaluate(test))

    ``df``: frame of :meth:`sparselab.prediction.Predictors.evaluate`. A dotted line
    marks the predicted density (share of neurons the predictors keep), when present.
    """
    require_columns(df, ["layer", *QUALITY_COLUMNS], "predictor_quality")
    part = df.sort_values("layer")
    x = part["layer"].to_numpy()
    if title is None:
        bits = [str(part[c].iloc[0]) for c in ("rule", "policy") if c in part.columns and len(part)]
        title = "Predictor quality by layer" + (f" ({', '.join(bits)})" if bits else "")
    fig = new_figure(title, "layer", "share", height=380, barmode="group",
                  legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"})
    for column, (name, color) in QUALITY_COLUMNS.items():
        fig.add_trace(go.Bar(x=x, y=part[column].to_numpy(dtype=float), name=name, marker_color=color,
                             hovertemplate=f"layer %{{x}}<br>{name} %{{y:.3f}}<extra></extra>"))
    if "predicted_density" in part.columns:
        fig.add_trace(go.Scatter(x=x, y=part["predicted_density"].to_numpy(dtype=float), mode="lines+markers",
                                 name="predicted density", line={"color": "black", "dash": "dot", "width": 1},
                                 hovertemplate="layer %{x}<br>predicted density %{y:.3f}<extra></extra>"))
    fig.update_yaxes(range=[0, 1.02])
    return fig

