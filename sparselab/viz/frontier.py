"""The bytes frontier figure: held-out quality against MLP weight bytes read, per method.

    >>> df = sl.frontier(model, tokenizer, methods, held_out, train_trace=trace)
    >>> sl.figures.frontier_figure(df)                 # one panel per model, one line per method

Same conventions as :mod:`sparselab.viz`: the oracle (not realizable) is the dashed
envelope, the others solid lines; dotted horizontal lines mark quality targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from sparselab.viz.style import BASELINE_DASH, require_columns, template

__all__ = ["frontier_figure"]

_METRICS = {"ppl_vs_dense": "perplexity vs dense (%)", "kl": "KL(dense || sparse) per token",
            "perplexity": "perplexity"}


def frontier_figure(df: pd.DataFrame, metric: str = "ppl_vs_dense", targets: Sequence[float] = (0.05, 0.02),
                    title: str = "Quality at fewer bytes: every selection method") -> go.Figure:
    """Quality (``metric``) against ``bytes_share``, one line per method, one panel per model.

        >>> sl.figures.frontier_figure(df, metric="kl")

    ``df``: frame of :func:`sparselab.frontier` (columns model, method, point, bytes_share
    and ``metric``; the dense row is left out). ``ppl_vs_dense`` is drawn in percent with
    ``targets`` (fractions, e.g. 0.05 = +5 %) as dotted lines.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {list(_METRICS)}, got {metric!r}")
    require_columns(df, ["model", "method", "point", "bytes_share", metric], "frontier_figure")
    data = df[df.method != "dense"]
    if data.empty:
        raise ValueError("frontier_figure: no method rows (only dense) to draw")
    models = list(dict.fromkeys(data.model))
    methods = list(dict.fromkeys(data.method))
    palette = qualitative.Plotly
    colors = {m: ("black" if m == "oracle" else palette[i % len(palette)]) for i, m in enumerate(methods)}
    scale = 100.0 if metric == "ppl_vs_dense" else 1.0
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models, shared_yaxes=True,
                        horizontal_spacing=0.06)
    for c, model in enumerate(models, start=1):
        for method in methods:
            g = data[(data.model == model) & (data.method == method)].sort_values("bytes_share")
            if g.empty:
                continue
            fig.add_trace(go.Scatter(
                x=g.bytes_share, y=g[metric] * scale, mode="lines+markers", name=method,
                legendgroup=method, showlegend=c == 1, text=g.point,
                line={"color": colors[method], "dash": BASELINE_DASH if method == "oracle" else "solid"},
                hovertemplate=f"{method} %{{text}}<br>bytes %{{x:.3f}}<br>{_METRICS[metric]} %{{y:.3g}}<extra></extra>",
            ), row=1, col=c)
        if metric == "ppl_vs_dense":
            for t in targets:
                fig.add_hline(y=100 * t, line={"dash": "dot", "color": "gray", "width": 1},
                              annotation_text=f"+{100 * t:g} %", row=1, col=c)
        fig.update_xaxes(title_text="MLP weight bytes read per token / dense", row=1, col=c)
    fig.update_yaxes(title_text=_METRICS[metric], row=1, col=1)
    if metric != "ppl_vs_dense":
        fig.update_yaxes(type="log")
    fig.update_layout(title={"text": title}, template=template(), height=440,
                      margin={"l": 70, "r": 30, "t": 70, "b": 60})
    return fig
