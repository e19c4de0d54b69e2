"""The shared look of sparselab's figures and the small checks every figure function makes.

    >>> fig = new_figure("Density by layer", "layer", "density")
    >>> require_columns(df, ["layer", "density"], "density_by_layer")
    >>> colors = layer_colors(select_layers(df, None))

One template (:data:`TEMPLATE`), one colour scale along layers, one accent colour; the
figure modules of :mod:`sparselab.viz` build on these so that they look
alike and reject bad frames with the same messages.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

__all__ = [
    "curves_by_layer",
    "ACTIVE_COLOR",
    "BASELINE_DASH",
    "HIGHLIGHT_COLOR",
    "LAYER_SCALE",
    "TEMPLATE",
    "hline",
    "layer_colors",
    "new_figure",
    "one_layer",
    "require_columns",
    "select_layers",
    "template",
    "unstyled",
]

TEMPLATE = "plotly_white"
LAYER_SCALE = "Viridis"
ACTIVE_COLOR = "#1f4e99"
BASELINE_DASH = "dash"
HIGHLIGHT_COLOR = "#d62728"


# Applying a template deep-copies and validates it (~0.1 s a figure). A dashboard that
# copies fresh figures' data into widgets already styled skips it, see `unstyled()`.
_STYLED: ContextVar[bool] = ContextVar("sparselab_figures_styled", default=True)


@contextmanager
def unstyled() -> Iterator[None]:
    """Build figures without the template (fast), for in-place updates of styled widgets.

        >>> with sl.figures.unstyled():
        ...     fresh = sl.figures.churn_over_tokens(df, layer=3)
    """
    token = _STYLED.set(False)
    try:
        yield
    finally:
        _STYLED.reset(token)


def new_figure(title: str, x_title: str, y_title: str, height: int = 420, **layout: Any) -> go.Figure:
    # one Layout construction (plotly validates per call, so fewer calls is faster)
    spec: dict[str, Any] = {
        "title": {"text": title},
        "xaxis": {"title": {"text": x_title}},
        "yaxis": {"title": {"text": y_title}},
        "height": height,
        "margin": {"l": 70, "r": 30, "t": 60, "b": 60},
        **layout,
    }
    spec["template"] = template()
    return go.Figure(layout=spec)


def template() -> str | dict:
    # an empty template also skips plotly's default one (validated on every figure)
    return TEMPLATE if _STYLED.get() else {}


def hline(y: float, text: str) -> dict[str, list[dict[str, Any]]]:
    """Layout entries for a dashed horizontal reference line across the plot."""
    return {
        "shapes": [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": y, "y1": y,
                    "line": {"dash": BASELINE_DASH, "color": "gray", "width": 1}}],
        "annotations": [{"xref": "paper", "x": 0, "yref": "y", "y": y, "text": text, "showarrow": False,
                         "xanchor": "left", "yanchor": "bottom", "font": {"color": "gray"}}],
    }


def require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} expects a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {missing}; got {list(df.columns)}")


def select_layers(df: pd.DataFrame, layers: Sequence[int] | None) -> list[int]:
    present = sorted(int(x) for x in df["layer"].unique())
    if layers is None:
        return present
    unknown = [x for x in layers if x not in present]
    if unknown:
        raise ValueError(f"layers {unknown} not in the frame (layers: {present})")
    return [int(x) for x in layers]


def layer_colors(layers: Sequence[int]) -> dict[int, str]:
    if len(layers) == 1:
        return {layers[0]: ACTIVE_COLOR}
    points = np.linspace(0.0, 0.9, len(layers))  # the top of Viridis is too pale on white
    return dict(zip(layers, sample_colorscale(LAYER_SCALE, list(points)), strict=True))


def one_layer(df: pd.DataFrame, layer: int | None, what: str) -> int:
    present = sorted(int(x) for x in df["layer"].unique())
    if layer is not None and df.empty:
        return int(layer)
    if layer is None:
        if len(present) != 1:
            raise ValueError(f"{what}: the frame holds layers {present}; pick one with layer=")
        return present[0]
    if int(layer) not in present:
        raise ValueError(f"{what}: layer {layer} not in the frame (layers: {present})")
    return int(layer)


def curves_by_layer(
    fig: go.Figure,
    df: pd.DataFrame,
    layers: list[int],
    x: str,
    y: str,
    baseline: str | None,
    baseline_name: str,
    row: int | None = None,
    col: int | None = None,
    show_legend: bool = True,
    error: str | None = None,
) -> None:
    """Add one line per layer of ``df[y]`` against ``df[x]`` (and, dashed, ``df[baseline]``)
    to ``fig`` (at ``row``/``col`` of a subplot grid), coloured by :func:`layer_colors`."""
    colors = layer_colors(layers)
    where = {} if row is None else {"row": row, "col": col}
    for layer in layers:
        part = df[df["layer"] == layer].sort_values(x)
        fig.add_trace(
            go.Scatter(
                x=part[x].to_numpy(),
                y=part[y].to_numpy(),
                mode="lines+markers" if len(part) <= 40 else "lines",
                name=f"layer {layer}",
                legendgroup=f"layer {layer}",
                showlegend=show_legend,
                line={"color": colors[layer]},
                error_y=None if error is None else {"type": "data", "array": part[error].to_numpy()},
                hovertemplate=f"layer {layer}<br>{x} %{{x}}<br>{y} %{{y:.3f}}<extra></extra>",
            ),
            **where,
        )
        if baseline is not None:
            fig.add_trace(
                go.Scatter(
                    x=part[x].to_numpy(),
                    y=part[baseline].to_numpy(),
                    mode="lines",
                    name=baseline_name,
                    legendgroup=f"layer {layer}",
                    showlegend=False,
                    line={"color": colors[layer], "dash": BASELINE_DASH, "width": 1},
                    hovertemplate=f"layer {layer}<br>{baseline_name}<br>%{{y:.3f}}<extra></extra>",
                ),
                **where,
            )
