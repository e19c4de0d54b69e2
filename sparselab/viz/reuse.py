"""Figures of neuron reuse: windows, hot sets and batches against independence baselines.

    >>> w = sl.metrics.window_reuse(masks, windows=(1, 2, 4, 8, 16))
    >>> model = sl.studies.independence.frequency_model(masks, sizes=(1, 2, 4, 8, 16))
    >>> sl.figures.aggregated_sparsity(w, model, layers=[0, 15, 29]).show()

Same conventions as :mod:`sparselab.viz.masks` (its template, colours and layer colour
scale): DataFrames of :mod:`sparselab.metrics`, :mod:`sparselab.studies.independence` and
:mod:`sparselab.studies.hotset` in, ``go.Figure`` out; solid lines are data, dashed lines the
uniform independence baseline (every neuron at the layer's density), dotted lines the
frequency-matched one (every neuron at its own firing frequency).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sparselab.viz.style import (
    ACTIVE_COLOR,
    BASELINE_DASH,
    curves_by_layer,
    layer_colors,
    new_figure,
    one_layer,
    require_columns,
    select_layers,
    template,
)

__all__ = [
    "aggregated_sparsity",
    "batch_union_curves",
    "frequency_ecdf",
    "hit_rate_by_layer",
    "hit_rate_curves",
    "union_by_layer",
    "neuron_frequency_cdf",
    "union_comparison_curves",
    "window_reuse_curves",
    "window_reuse_vs_models",
]

WINDOW_COLUMNS = ("layer", "window", "footprint", "new_fraction", "random_footprint",
                  "random_new_fraction")
FREQUENCY_DOT = "dot"
MODEL_COLOR = "#ff7f0e"
UNIFORM_COLOR = "gray"
LOG2_TICKS = float(np.log10(2))


def window_reuse_curves(
    df: pd.DataFrame, layers: Sequence[int] | None = None, title: str = "Windowed neuron reuse"
) -> go.Figure:
    """Footprint and newly loaded neurons vs window length (solid), random reuse (dashed).

        >>> sl.figures.window_reuse_curves(sl.metrics.window_reuse(masks), layers=[0, 15, 29])

    ``df``: frame of :func:`sparselab.metrics.window_reuse`. Left: share of neurons held by
    a cache of the last ``k`` tokens; right: share of neurons loaded per token. Dashed
    lines: independent masks of the same density.
    """
    require_columns(df, WINDOW_COLUMNS, "window_reuse_curves")
    layers = select_layers(df, layers)
    fig = _window_panels(title + " (dashed: random masks, same density)")
    curves_by_layer(fig, df, layers, "window", "footprint", "random_footprint", "random reuse", 1, 1)
    curves_by_layer(fig, df, layers, "window", "new_fraction", "random_new_fraction", "random reuse",
                    1, 2, show_legend=False)
    return fig


def _window_panels(title: str, log_new: bool = False) -> go.Figure:
    """The two panels every window-reuse figure has: footprint of the last k tokens
    (left) and neurons newly loaded per token (right), against k on a log2 axis."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("footprint of the last k tokens", "neurons newly loaded per token"))
    fig.update_layout(template=template(), title={"text": title}, height=420,
                      margin={"l": 70, "r": 30, "t": 80, "b": 60})
    fig.update_xaxes(type="log", dtick=LOG2_TICKS, title_text="window k (tokens)")
    fig.update_yaxes(title_text="footprint (share of neurons)", row=1, col=1)
    fig.update_yaxes(title_text="new per token (share of neurons)", type="log" if log_new else None,
                     row=1, col=2)
    return fig


def neuron_frequency_cdf(
    df: pd.DataFrame, layers: Sequence[int] | None = None, title: str = "Hot and cold neurons"
) -> go.Figure:
    """Share of activations covered by the most frequent neurons, per layer.

        >>> sl.figures.neuron_frequency_cdf(sl.metrics.neuron_frequency(masks), layers=[0, 29])

    ``df``: frame of :func:`sparselab.metrics.neuron_frequency`. The dotted diagonal is
    what equally frequent neurons would give; the further above it, the more a few hot
    neurons carry (PowerInfer).
    """
    require_columns(df, ["layer", "rank_fraction", "cum_share"], "neuron_frequency_cdf")
    layers = select_layers(df, layers)
    fig = new_figure(title, "share of neurons (most frequent first)", "share of activations covered")
    curves_by_layer(fig, df, layers, "rank_fraction", "cum_share", None, "")
    fig.add_trace(
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="uniform",
                   line={"color": "gray", "dash": "dot", "width": 1}, hoverinfo="skip")
    )
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.01])
    return fig


def batch_union_curves(
    df: pd.DataFrame, layers: Sequence[int] | None = None, title: str = "Density of the batch union"
) -> go.Figure:
    """Density of the union of ``B`` tokens' masks vs ``B`` (solid) and ``1-(1-p)^B`` (dashed).

        >>> sl.figures.batch_union_curves(sl.metrics.batch_union(masks), layers=[0, 15, 29])

    ``df``: frame of :func:`sparselab.metrics.batch_union`; error bars are the std over
    the random batches.
    """
    require_columns(df, ["layer", "size", "union_density", "independent"], "batch_union_curves")
    layers = select_layers(df, layers)
    fig = new_figure(title + " (dashed: independent masks)", "batch size B (tokens)",
                  "union density (share of neurons)")
    error = "union_std" if "union_std" in df.columns else None
    curves_by_layer(fig, df, layers, "size", "union_density", "independent", "independent", error=error)
    fig.update_xaxes(type="log", dtick=np.log10(2))
    fig.update_yaxes(range=[0, 1.02])
    return fig


def _with_model(window: pd.DataFrame, model: pd.DataFrame | None) -> pd.DataFrame:
    """Window frame joined with the frequency model on ``window == size`` (if given)."""
    if model is None:
        return window
    require_columns(model, ["layer", "size", "frequency_union", "frequency_new"], "frequency model")
    cols = model[["layer", "size", "frequency_union", "frequency_new"]].rename(columns={"size": "window"})
    return window.merge(cols, on=["layer", "window"], how="left")


def aggregated_sparsity(
    window: pd.DataFrame,
    model: pd.DataFrame | None = None,
    layers: Sequence[int] | None = None,
    title: str = "Aggregated sparsity over a window of k tokens",
) -> go.Figure:
    """Share of neurons *no* token of a ``k``-token window needs (ReLU strikes back).

        >>> sl.figures.aggregated_sparsity(sl.metrics.window_reuse(masks), model)

    ``window``: frame of :func:`sparselab.metrics.window_reuse`; y is ``1 - footprint``
    (log scale: the random baseline decays exponentially). Dashed: ``(1 - d)^k``, the
    random-reuse baseline (independent masks of the same density); dotted (with
    ``model``, a frame of :func:`sparselab.studies.independence.frequency_model`): each neuron at
    its own frequency.
    """
    require_columns(window, ["layer", "window", "footprint", "random_footprint"], "aggregated_sparsity")
    layers = select_layers(window, layers)
    df = _with_model(window, model)
    colors = layer_colors(layers)
    fig = new_figure(title + " (dashed: random reuse, dotted: frequency-matched)", "window k (tokens)",
                  "aggregated sparsity (share of neurons never needed)")
    floor = 1e-6  # random baselines reach 1e-10 quickly; a floor keeps the data readable
    for layer in layers:
        part = df[df["layer"] == layer].sort_values("window")
        x = part["window"].to_numpy()
        curves = [("", 1.0 - part["footprint"].to_numpy(), "solid", 2.0, True)]
        curves.append(("random reuse", 1.0 - part["random_footprint"].to_numpy(), BASELINE_DASH, 1.0, False))
        if "frequency_union" in part.columns:
            curves.append(("frequency-matched", 1.0 - part["frequency_union"].to_numpy(), FREQUENCY_DOT, 1.0, False))
        for name, y, dash, width, legend in curves:
            fig.add_trace(
                go.Scatter(
                    x=x, y=np.maximum(y, floor), mode="lines+markers" if legend else "lines",
                    name=f"layer {layer}" if legend else name, legendgroup=f"layer {layer}",
                    showlegend=legend, line={"color": colors[layer], "dash": dash, "width": width},
                    hovertemplate=f"layer {layer} {name}<br>k %{{x}}<br>%{{y:.2e}}<extra></extra>",
                )
            )
    fig.update_xaxes(type="log", dtick=LOG2_TICKS)
    fig.update_yaxes(type="log", exponentformat="power")
    return fig


def window_reuse_vs_models(
    window: pd.DataFrame,
    model: pd.DataFrame,
    layer: int,
    title: str | None = None,
) -> go.Figure:
    """One layer: footprint and new neurons per token vs ``k``, data against both models.

        >>> sl.figures.window_reuse_vs_models(window_df, model_df, layer=15)

    Left: share of neurons a cache of the last ``k`` tokens holds; right: share of
    neurons newly loaded per token (log y). Data solid, random reuse (same density)
    dashed, frequency-matched dotted. Data below the dotted line means neighbouring
    tokens share neurons beyond what hot neurons explain.
    """
    require_columns(window, WINDOW_COLUMNS, "window_reuse_vs_models")
    layer = one_layer(window, layer, "window_reuse_vs_models")
    part = _with_model(window, model)
    part = part[part["layer"] == layer].sort_values("window")
    fig = _window_panels(title or f"Windowed neuron reuse, layer {layer}", log_new=True)
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    x = part["window"].to_numpy()
    series = [
        ("masks", "footprint", "new_fraction", ACTIVE_COLOR, "solid"),
        ("random reuse (same density)", "random_footprint", "random_new_fraction", UNIFORM_COLOR, BASELINE_DASH),
        ("frequency-matched", "frequency_union", "frequency_new", MODEL_COLOR, FREQUENCY_DOT),
    ]
    for name, left, right, color, dash in series:
        for col, column in ((1, left), (2, right)):
            fig.add_trace(
                go.Scatter(x=x, y=part[column].to_numpy(), mode="lines+markers", name=name,
                           legendgroup=name, showlegend=col == 1, line={"color": color, "dash": dash},
                           hovertemplate=f"{name}<br>k %{{x}}<br>%{{y:.4f}}<extra></extra>"),
                row=1, col=col,
            )
    return fig


def frequency_ecdf(
    freq: pd.DataFrame, layers: Sequence[int] | None = None, title: str = "Firing frequency of neurons"
) -> go.Figure:
    """Cumulative distribution of neuron firing frequencies, one line per layer.

        >>> sl.figures.frequency_ecdf(sl.metrics.neuron_frequency(masks), layers=[0, 29])

    ``freq``: frame of :func:`sparselab.metrics.neuron_frequency`. A point ``(x, y)``: a
    share ``y`` of the layer's neurons fire in at most a share ``x`` of the tokens. A
    step near the layer's density means equally busy neurons; a long flat stretch means
    cold neurons next to hot ones.
    """
    require_columns(freq, ["layer", "frequency"], "frequency_ecdf")
    layers = select_layers(freq, layers)
    colors = layer_colors(layers)
    fig = new_figure(title, "firing frequency (share of tokens where the neuron is active)",
                  "share of neurons (cumulative)")
    for layer in layers:
        f = np.sort(freq.loc[freq["layer"] == layer, "frequency"].to_numpy())
        y = np.arange(1, len(f) + 1) / max(len(f), 1)
        fig.add_trace(
            go.Scatter(x=f, y=y, mode="lines", name=f"layer {layer}", line={"color": colors[layer], "shape": "hv"},
                       hovertemplate=f"layer {layer}<br>frequency <= %{{x:.3f}}<br>%{{y:.3f}} of neurons<extra></extra>")
        )
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.01])
    return fig


def hit_rate_curves(hits: pd.DataFrame, layer: int, title: str | None = None) -> go.Figure:
    """One layer: share of activations the hot set covers vs its size, four ways.

        >>> sl.figures.hit_rate_curves(sl.studies.hotset.hit_rate(train, test), layer=15)

    ``hits``: frame of :func:`sparselab.studies.hotset.hit_rate`. Held-out (the set chosen on
    other texts), in-sample, oracle (the test texts' own hottest neurons) and random.
    """
    require_columns(hits, ["layer", "fraction", "in_sample", "held_out", "oracle", "random"], "hit_rate_curves")
    layer = one_layer(hits, layer, "hit_rate_curves")
    part = hits[hits["layer"] == layer].sort_values("fraction")
    fig = new_figure(title or f"Hot-set hit rate, layer {layer}", "hot set size (share of neurons)",
                  "share of activations covered")
    x = np.concatenate([[0.0], part["fraction"].to_numpy()])
    series = [
        ("held-out texts", "held_out", ACTIVE_COLOR, "solid"),
        ("in-sample", "in_sample", "#2ca02c", "solid"),
        ("oracle (test's own hot set)", "oracle", MODEL_COLOR, FREQUENCY_DOT),
        ("random set", "random", UNIFORM_COLOR, BASELINE_DASH),
    ]
    for name, column, color, dash in series:
        y = np.concatenate([[0.0], part[column].to_numpy()])
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, line={"color": color, "dash": dash},
                                 hovertemplate=f"{name}<br>set %{{x:.2f}}<br>covers %{{y:.3f}}<extra></extra>"))
    fig.update_xaxes(range=[0, 1.0])
    fig.update_yaxes(range=[0, 1.01])
    return fig


def hit_rate_by_layer(hits: pd.DataFrame, fraction: float, title: str | None = None) -> go.Figure:
    """Every layer at one hot-set size: held-out hit rate (bars), oracle and random (lines).

        >>> sl.figures.hit_rate_by_layer(sl.studies.hotset.hit_rate(train, test), fraction=0.2)
    """
    require_columns(hits, ["layer", "fraction", "held_out", "oracle", "random"], "hit_rate_by_layer")
    present = np.sort(hits["fraction"].unique())
    match = present[np.isclose(present, float(fraction))]
    if not len(match):
        raise ValueError(f"fraction {fraction} not in the frame (fractions: {present.tolist()})")
    part = hits[hits["fraction"] == match[0]].sort_values("layer")
    fig = new_figure(title or f"Hot set of {match[0]:.0%} of neurons, chosen on other texts",
                  "layer", "share of held-out activations covered", height=380)
    return _bars_and_baselines(fig, part, bars=[("held-out", "held_out", ACTIVE_COLOR)],
                               lines=[("oracle", "oracle", MODEL_COLOR, FREQUENCY_DOT, "lines+markers"),
                                      ("random set", "random", UNIFORM_COLOR, BASELINE_DASH, "lines")])


def _bars_and_baselines(fig: go.Figure, part: pd.DataFrame, bars: list, lines: list) -> go.Figure:
    """Bars per layer (``(name, column, colour)``) with baseline lines over them
    (``(name, column, colour, dash, mode)``), y from 0 to 1."""
    x = part["layer"].to_numpy()
    for name, column, color in bars:
        fig.add_trace(go.Bar(x=x, y=part[column].to_numpy(), name=name, marker_color=color,
                             hovertemplate=f"layer %{{x}}<br>{name} %{{y:.3f}}<extra></extra>"))
    for name, column, color, dash, mode in lines:
        fig.add_trace(go.Scatter(x=x, y=part[column].to_numpy(), mode=mode, name=name,
                                 line={"color": color, "dash": dash}))
    fig.update_yaxes(range=[0, 1.02])
    return fig


def union_comparison_curves(union: pd.DataFrame, layer: int, title: str | None = None) -> go.Figure:
    """One layer: union density vs batch size ``B`` for random and consecutive tokens.

        >>> sl.figures.union_comparison_curves(sl.studies.independence.union_comparison(masks), 15)

    ``union``: frame of :func:`sparselab.independence.union_comparison`. Random batches
    (error bars: std over batches), ``B`` consecutive tokens of one text, the uniform
    independence curve ``1 - (1 - p)^B`` (dashed) and the frequency-matched one (dotted).
    """
    needed = ["layer", "size", "random_batch", "consecutive", "independent", "frequency_union"]
    require_columns(union, needed, "union_comparison_curves")
    layer = one_layer(union, layer, "union_comparison_curves")
    part = union[union["layer"] == layer].sort_values("size")
    fig = new_figure(title or f"Density of the union of B tokens' masks, layer {layer}", "batch size B (tokens)",
                  "union density (share of neurons)",
                  legend={"orientation": "h", "y": -0.2, "yanchor": "top", "x": 0})
    x = part["size"].to_numpy()
    err = part["random_batch_std"].to_numpy() if "random_batch_std" in part.columns else None
    series = [
        ("random batch (different texts)", "random_batch", ACTIVE_COLOR, "solid", err),
        ("B consecutive tokens (one text)", "consecutive", "#2ca02c", "solid", None),
        ("independent: 1-(1-p)^B", "independent", UNIFORM_COLOR, BASELINE_DASH, None),
        ("frequency-matched", "frequency_union", MODEL_COLOR, FREQUENCY_DOT, None),
    ]
    for name, column, color, dash, error in series:
        fig.add_trace(go.Scatter(
            x=x, y=part[column].to_numpy(), mode="lines+markers", name=name, line={"color": color, "dash": dash},
            error_y=None if error is None else {"type": "data", "array": error, "thickness": 1},
            hovertemplate=f"{name}<br>B %{{x}}<br>%{{y:.3f}}<extra></extra>"))
    fig.update_xaxes(type="log", dtick=LOG2_TICKS)
    fig.update_yaxes(range=[0, 1.02])
    return fig


def union_by_layer(union: pd.DataFrame, size: int, title: str | None = None) -> go.Figure:
    """Every layer at one batch size: union density of random and consecutive tokens.

        >>> sl.figures.union_by_layer(sl.studies.independence.union_comparison(masks), size=8)
    """
    require_columns(union, ["layer", "size", "random_batch", "consecutive", "independent", "frequency_union"],
             "union_by_layer")
    if int(size) not in set(union["size"].astype(int)):
        raise ValueError(f"size {size} not in the frame (sizes: {sorted(union['size'].unique().tolist())})")
    part = union[union["size"] == int(size)].sort_values("layer")
    fig = new_figure(title or f"Union density of B = {int(size)} tokens by layer", "layer",
                  "union density (share of neurons)", height=380, barmode="group")
    return _bars_and_baselines(
        fig, part, bars=[("random batch", "random_batch", ACTIVE_COLOR), ("consecutive", "consecutive", "#2ca02c")],
        lines=[("independent", "independent", UNIFORM_COLOR, BASELINE_DASH, "lines"),
               ("frequency-matched", "frequency_union", MODEL_COLOR, FREQUENCY_DOT, "lines")])
