"""Figures of masks and activations per layer and token: density by layer, the token x
neuron heatmap, churn over tokens, magnitudes by layer.

    >>> masks = trace.masks(sl.rules.Calibrated(density=0.5))
    >>> sl.figures.density_by_layer(sl.metrics.density(masks)).show()
    >>> sl.figures.token_heatmap(masks, layer=10, pieces=trace.pieces).show()

Figure functions only reshape what :mod:`sparselab.metrics` computed (group means,
filtering, sorting columns for display); they never touch a model. All share one look:
template :data:`TEMPLATE`, a title, labelled axes, layers coloured along one colour scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from sparselab.masking.masks import Masks
from sparselab.viz.style import (
    ACTIVE_COLOR,
    BASELINE_DASH,
    HIGHLIGHT_COLOR,
    hline,
    new_figure,
    one_layer,
    require_columns,
)

__all__ = [
    "activation_magnitude_by_layer",
    "churn_over_tokens",
    "density_by_layer",
    "token_heatmap",
]

def _piece_label(piece: Any) -> str:
    text = str(piece).replace("\n", "\u23ce").replace("\t", "\u21e5")
    return text if len(text) <= 14 else text[:13] + "\u2026"


# ----------------------------------------------------------------------------- density


def density_by_layer(
    df: pd.DataFrame,
    target: float | None = None,
    highlight: int | None = None,
    title: str = "Density by layer",
) -> go.Figure:
    """Mean share of active neurons per layer (bars, with the spread over tokens).

        >>> sl.figures.density_by_layer(sl.metrics.density(masks), target=0.5)

    ``df``: per-token frame of :func:`sparselab.metrics.density` (mean and std over
    tokens are shown) or any per-layer frame with ``layer`` and ``density`` (e.g.
    :func:`sparselab.metrics.summary`). With a ``rule`` column, one bar group per rule.
    ``target`` draws a horizontal reference line; ``highlight`` colours one layer's bar.
    """
    require_columns(df, ["layer", "density"], "density_by_layer")
    groups = list(df.groupby("rule", sort=False)) if "rule" in df.columns else [(None, df)]
    extra = hline(float(target), f"target {target:g}") if target is not None else {}
    fig = new_figure(title, "layer", "density (share of neurons active)", height=360, barmode="group",
                  showlegend=len(groups) > 1, **extra)
    fig.update_yaxes(range=[0, 1.02])
    for name, part in groups:
        stats = part.groupby("layer").density.agg(["mean", "std", "size"]).sort_index()
        spread = stats["std"].fillna(0.0).to_numpy() if stats["size"].max() > 1 else None
        colors: Any = ACTIVE_COLOR
        if highlight is not None and name is None:
            colors = [HIGHLIGHT_COLOR if int(x) == int(highlight) else ACTIVE_COLOR for x in stats.index]
        fig.add_trace(
            go.Bar(
                x=stats.index.to_numpy(),
                y=stats["mean"].to_numpy(),
                error_y=None if spread is None else {"type": "data", "array": spread, "thickness": 1},
                marker_color=None if name is not None else colors,
                name="density" if name is None else str(name),
                hovertemplate="layer %{x}<br>density %{y:.3f}<extra></extra>",
            )
        )
    return fig


# ----------------------------------------------------------------------------- heatmap


def token_heatmap(
    masks_or_bool: Masks | np.ndarray,
    layer: int | None = None,
    pieces: Sequence[str] | None = None,
    max_tokens: int = 96,
    max_neurons: int = 256,
    neurons: str | np.ndarray = "frequency",
    title: str | None = None,
) -> go.Figure:
    """Token x neuron picture of one layer's mask: rows are tokens, labelled by their text.

        >>> sl.figures.token_heatmap(masks, layer=10, pieces=trace.pieces)
        >>> sl.figures.token_heatmap(bool_array, layer=10, neurons=np.arange(128))

    ``masks_or_bool``: a :class:`sparselab.Masks` (then ``layer`` picks the layer) or a
    bool array ``[tokens, neurons]`` of one layer (``layer`` is then only a label).
    The first ``max_tokens`` tokens are shown. Columns: ``neurons="frequency"`` sorts
    the neurons by how often they fire among the shown tokens (hottest left) and keeps
    ``max_neurons`` of them evenly spread over that ranking, so the picture spans hot to
    cold neurons; ``"index"`` does the same in neuron order; an index array shows
    exactly those neurons in that order (a fixed order keeps the picture stable while
    a dashboard changes the rule).
    """
    if isinstance(masks_or_bool, Masks):
        if layer is None:
            if masks_or_bool.n_layers != 1:
                raise ValueError(f"pick a layer with layer= (masks hold {list(masks_or_bool.layers)})")
            layer = masks_or_bool.layers[0]
        dense = masks_or_bool.layer(layer)
    else:
        dense = np.asarray(masks_or_bool)
        if dense.ndim != 2:
            raise ValueError(f"expected a bool array [tokens, neurons], got shape {dense.shape}")
        dense = dense.astype(bool, copy=False)
    if max_tokens < 1 or max_neurons < 1:
        raise ValueError(f"max_tokens and max_neurons must be >= 1, got {max_tokens}, {max_neurons}")
    if pieces is not None and len(pieces) < dense.shape[0]:
        raise ValueError(f"{len(pieces)} text pieces for {dense.shape[0]} tokens")
    rows = dense[:max_tokens]
    n_neurons = dense.shape[1]
    if isinstance(neurons, str):
        if neurons == "frequency":
            ranking = np.argsort(-rows.sum(axis=0), kind="stable")
        elif neurons == "index":
            ranking = np.arange(n_neurons)
        else:
            raise ValueError(f"neurons must be 'frequency', 'index' or an index array, got {neurons!r}")
        if n_neurons > max_neurons:
            ranking = ranking[np.linspace(0, n_neurons - 1, max_neurons).round().astype(np.int64)]
        how = "sorted by frequency" if neurons == "frequency" else "in index order"
        step = "" if n_neurons <= max_neurons else f", 1 in {n_neurons / max_neurons:.3g} shown"
        x_title = f"neuron ({how}{step})"
    else:
        ranking = np.asarray(neurons, dtype=np.int64)
        if ranking.ndim != 1 or (ranking.size and (ranking.min() < 0 or ranking.max() >= n_neurons)):
            raise ValueError(f"neuron indices must be a 1-d array within [0, {n_neurons})")
        x_title = "neuron"
    z = rows[:, ranking].astype(np.uint8)
    token_labels = [
        f"{i} {_piece_label(pieces[i])}" if pieces is not None else str(i) for i in range(len(rows))
    ]
    label = "" if layer is None else f", layer {layer}"
    fig = new_figure(
        title or f"Active neurons per token{label}",
        x_title,
        "token",
        height=max(360, min(900, 14 * len(rows) + 120)),
        xaxis={"title": {"text": x_title}, "type": "category", "showticklabels": False},
        yaxis={"title": {"text": "token"}, "type": "category", "autorange": "reversed",
               "tickfont": {"size": 9}},
    )
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=[str(i) for i in ranking],
            y=token_labels,
            zmin=0,
            zmax=1,
            colorscale=[[0.0, "#f2f2f2"], [1.0, ACTIVE_COLOR]],
            showscale=False,
            hovertemplate="token %{y}<br>neuron %{x}<br>active %{z}<extra></extra>",
        )
    )
    return fig


# ----------------------------------------------------------------------------- churn


def churn_over_tokens(
    df: pd.DataFrame,
    layer: int | None = None,
    max_tokens: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """Churn from each token to the next for one layer, next to the random-mask baseline.

        >>> sl.figures.churn_over_tokens(sl.metrics.churn(masks), layer=10)

    ``df``: frame of :func:`sparselab.metrics.churn`. x is the token index; the line
    breaks at sequence boundaries (churn is never measured across them). The dashed
    line is ``random_churn`` (independent masks of the same sizes) when present.
    """
    require_columns(df, ["layer", "token", "seq_id", "churn"], "churn_over_tokens")
    layer = one_layer(df, layer, "churn_over_tokens")
    part = df[df["layer"] == layer].sort_values("token")
    if max_tokens is not None:
        part = part[part["token"] < max_tokens]
    # a NaN row after each sequence makes plotly break the line there
    blank = {c: np.nan for c in ("churn", "random_churn") if c in part.columns}
    breaks = part.groupby("seq_id", sort=False).tail(1).assign(**blank)
    breaks = breaks.assign(token=breaks["token"] + 0.5)
    shown = pd.concat([part, breaks]).sort_values("token", kind="stable")
    fig = new_figure(
        title or f"Churn between consecutive tokens, layer {layer}",
        "token",
        "churn (share of neurons changed)",
        height=340,
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
    )
    fig.add_trace(
        go.Scatter(
            x=shown["token"].to_numpy(),
            y=shown["churn"].to_numpy(),
            mode="lines",
            name="churn",
            line={"color": ACTIVE_COLOR, "width": 1.5},
            connectgaps=False,
            hovertemplate="token %{x}<br>churn %{y:.3f}<extra></extra>",
        )
    )
    if "random_churn" in shown.columns:
        fig.add_trace(
            go.Scatter(
                x=shown["token"].to_numpy(),
                y=shown["random_churn"].to_numpy(),
                mode="lines",
                name="independent masks",
                line={"color": "gray", "dash": BASELINE_DASH, "width": 1},
                connectgaps=False,
                hovertemplate="token %{x}<br>random %{y:.3f}<extra></extra>",
            )
        )
    return fig


def activation_magnitude_by_layer(
    data: pd.DataFrame | Any, title: str = "Activation magnitude |h| by layer"
) -> go.Figure:
    """Median ``|h|`` per layer with the 10-90 % band, log scale.

        >>> sl.figures.activation_magnitude_by_layer(trace)
        >>> sl.figures.activation_magnitude_by_layer(sl.metrics.activation_magnitude(trace))

    ``data``: a frame of :func:`sparselab.metrics.activation_magnitude` or a trace (which
    is summarised with it). A slope across layers is why one global threshold cannot fit
    every layer.
    """
    if not isinstance(data, pd.DataFrame):
        from sparselab.metrics import activation_magnitude

        data = activation_magnitude(data)
    require_columns(data, ["layer", "median"], "activation_magnitude_by_layer")
    df = data.sort_values("layer")
    fig = new_figure(title, "layer", "|h|", height=360)
    if {"q10", "q90"} <= set(df.columns):
        x = df["layer"].to_numpy()
        fig.add_trace(
            go.Scatter(x=np.concatenate([x, x[::-1]]),
                       y=np.concatenate([df["q90"].to_numpy(), df["q10"].to_numpy()[::-1]]),
                       fill="toself", fillcolor="rgba(31,78,153,0.15)", line={"width": 0},
                       name="10-90 %", hoverinfo="skip")
        )
    fig.add_trace(
        go.Scatter(x=df["layer"].to_numpy(), y=df["median"].to_numpy(), mode="lines+markers",
                   name="median", line={"color": ACTIVE_COLOR},
                   hovertemplate="layer %{x}<br>median |h| %{y:.4f}<extra></extra>")
    )
    fig.update_yaxes(type="log")
    return fig
