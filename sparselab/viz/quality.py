"""Figures of thresholds, quality costs, the residual stream and predictors.

    >>> fits = sl.studies.calibration.threshold_rules(trace, (0.3, 0.5))
    >>> sl.figures.layer_density_spread(sl.studies.calibration.layer_densities(trace, fits), 0.5)
    >>> sl.figures.quality_vs_density(sl.evaluate(model, tok, texts), x="sparsity")
    >>> sl.figures.predictor_vs_rank(sweep_df, metric="recall")

Same conventions as :mod:`sparselab.viz` (template, colours, layer colour scale):
DataFrames of :mod:`sparselab.studies.calibration`, :func:`sparselab.evaluate`,
:mod:`sparselab.studies.residual` and :mod:`sparselab.studies.predictor_study` in, ``go.Figure`` out.
Solid lines are data, dashed lines baselines (a random mask of the same density, the
target density, the dense model).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from sparselab.viz.style import (
    ACTIVE_COLOR,
    BASELINE_DASH,
    hline,
    layer_colors,
    new_figure,
    one_layer,
    require_columns,
    select_layers,
    template,
)

__all__ = [
    "PREDICTOR_METRICS",
    "calibration_overview",
    "cosine_by_layer",
    "layer_density_spread",
    "lookahead_recall",
    "magnitude_quantiles",
    "mass_kept_by_layer",
    "predictor_metrics",
    "predictor_vs_rank",
    "quality_vs_density",
]

SOURCE_TITLES = {"h": "|h| = |act(gate) * up|", "gate": "|act(gate)|"}
SCHEME_DASH = {"uniform": BASELINE_DASH, "calibrated": "solid"}
SOURCE_COLORS = {"h": ACTIVE_COLOR, "gate": "#ff7f0e"}
DENSE_COLOR = "gray"
# random-mask expectation of each predictor metric (columns of predictor_study.random_baseline)
PREDICTOR_METRICS = {
    "recall": "random_recall",
    "precision": "random_precision",
    "f1": "random_f1",
    "predicted_density": None,
    "mass_kept": "random_mass_kept",
}


def _series_colors(names: Sequence[str]) -> dict[str, str]:
    palette = qualitative.Plotly
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


# ----------------------------------------------------------------------------- thresholds


def magnitude_quantiles(df: pd.DataFrame, title: str = "Activation magnitudes by layer") -> go.Figure:
    """Quantile lines of ``|h|`` and ``|act(gate)|`` across layers, one panel per source.

        >>> sl.figures.magnitude_quantiles(sl.studies.calibration.magnitude_quantiles(trace))

    ``df``: frame of :func:`sparselab.studies.calibration.magnitude_quantiles`. Log y: a line
    that climbs across layers is why one global threshold cannot fit every layer.
    """
    require_columns(df, ["source", "layer", "quantile", "value"], "magnitude_quantiles")
    sources = list(dict.fromkeys(df["source"]))
    qs = sorted(df["quantile"].unique())
    colors = dict(zip(qs, sample_colorscale("Viridis", list(np.linspace(0.0, 0.85, len(qs)))), strict=True))
    fig = make_subplots(rows=1, cols=len(sources), horizontal_spacing=0.08,
                        subplot_titles=[SOURCE_TITLES.get(s, s) for s in sources])
    for col, source in enumerate(sources, start=1):
        part = df[df["source"] == source]
        for q in qs:
            line = part[part["quantile"] == q].sort_values("layer")
            fig.add_trace(
                go.Scatter(x=line["layer"].to_numpy(), y=np.maximum(line["value"].to_numpy(), 1e-6),
                           mode="lines", name=f"q{100 * q:g}", legendgroup=f"q{q}", showlegend=col == 1,
                           line={"color": colors[q], "width": 2.5 if q == 0.5 else 1.2},
                           hovertemplate=f"{source} q{100 * q:g}<br>layer %{{x}}<br>%{{y:.4f}}<extra></extra>"),
                row=1, col=col,
            )
    fig.update_layout(template=template(), title={"text": title + " (quantiles over tokens and neurons)"},
                      height=400, margin={"l": 70, "r": 30, "t": 80, "b": 60}, legend_title_text="quantile")
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text="magnitude", col=1)
    return fig


def layer_density_spread(
    df: pd.DataFrame, target_density: float, title: str | None = None
) -> go.Figure:
    """Per-layer density of each scheme (and source) at one target density.

        >>> layers = sl.studies.calibration.layer_densities(test_trace, fits)
        >>> sl.figures.layer_density_spread(layers, 0.5)

    ``df``: frame of :func:`sparselab.studies.calibration.layer_densities`. Solid: per-layer
    calibrated thresholds; dashed: one global threshold; colour: source. The grey dashed
    line is the target.
    """
    require_columns(df, ["scheme", "source", "target_density", "layer", "density"], "layer_density_spread")
    targets = np.asarray(sorted(df["target_density"].unique()), dtype=float)
    if not np.isclose(targets, target_density).any():
        raise ValueError(f"target density {target_density} not in the frame (targets: {targets.tolist()})")
    part = df[np.isclose(df["target_density"].to_numpy(dtype=float), target_density)]
    fig = new_figure(title or f"Density per layer at target {target_density:g}", "layer",
                  "density (share of neurons kept)", height=380, **hline(target_density, "target"))
    for (scheme, source), line in part.groupby(["scheme", "source"], sort=False):
        line = line.sort_values("layer")
        fig.add_trace(
            go.Scatter(x=line["layer"].to_numpy(), y=line["density"].to_numpy(), mode="lines+markers",
                       name=f"{scheme} ({source})",
                       line={"color": SOURCE_COLORS.get(source, ACTIVE_COLOR), "dash": SCHEME_DASH.get(scheme, "dot")},
                       hovertemplate=f"{scheme} {source}<br>layer %{{x}}<br>density %{{y:.3f}}<extra></extra>")
        )
    fig.update_yaxes(range=[0, 1.02])
    return fig


def _quality_traces(df: pd.DataFrame, metric: str, x: str, label: str):
    """(name, xs, ys) per mode, dense excluded, sorted by x."""
    out = []
    for name, part in df[df["mode"] != "dense"].groupby(label, sort=False):
        xs = part["density"].to_numpy(dtype=float)
        xs = 1.0 - xs if x == "sparsity" else xs
        order = np.argsort(xs)
        out.append((str(name), xs[order], part[metric].to_numpy(dtype=float)[order]))
    return out


def quality_vs_density(
    df: pd.DataFrame,
    metric: str = "perplexity",
    x: str = "density",
    mark: float | None = None,
    label: str = "mode",
    title: str | None = None,
) -> go.Figure:
    """Quality metric vs density (or sparsity), one line per mode; dense as a dashed line.

        >>> sl.figures.quality_vs_density(sl.evaluate(model, tok, texts), "kl")

    ``df``: frame of :func:`sparselab.evaluate` (or any frame with ``mode, density`` and
    ``metric``); ``label``: the column naming the lines (e.g. ``label`` of
    :func:`sparselab.studies.contextual.contextual_vs_static`). ``x``: ``"density"`` or
    ``"sparsity"`` (1 - density). ``mark`` draws a vertical line at that x. Perplexity
    is drawn on a log axis.
    """
    if x not in ("density", "sparsity"):
        raise ValueError(f"x must be 'density' or 'sparsity', got {x!r}")
    require_columns(df, ["mode", "density", metric, label], "quality_vs_density")
    fig = new_figure(title or f"{metric} vs {x}", f"{x} (share of neurons {'dropped' if x == 'sparsity' else 'kept'})",
                  metric, height=400)
    series = _quality_traces(df, metric, x, label)
    colors = _series_colors([name for name, _, _ in series])
    for name, xs, ys in series:
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name, line={"color": colors[name]},
                                 hovertemplate=f"{name}<br>{x} %{{x:.2f}}<br>{metric} %{{y:.4g}}<extra></extra>"))
    dense = _dense_line(df, metric, series)
    if dense is not None:
        fig.add_trace(dense)
    if metric == "perplexity":
        fig.update_yaxes(type="log")
    if mark is not None:
        fig.add_vline(x=float(mark), line={"color": "gray", "dash": "dot", "width": 1})
    return fig


def _dense_line(df: pd.DataFrame, metric: str, series) -> go.Scatter | None:
    """The dense model's value as a dashed line across the x range (a trace, so it works on
    log axes and shows in the legend)."""
    dense = df.loc[df["mode"] == "dense", metric]
    if not len(dense) or not series:
        return None
    xs = np.concatenate([xs for _, xs, _ in series])
    y = float(dense.iloc[0])
    return go.Scatter(x=[float(xs.min()), float(xs.max())], y=[y, y], mode="lines", name="dense",
                      line={"color": DENSE_COLOR, "dash": BASELINE_DASH, "width": 1},
                      hovertemplate=f"dense<br>{metric} {y:.4g}<extra></extra>")


def calibration_overview(
    layers: pd.DataFrame, quality: pd.DataFrame, sparsity: float, metric: str = "perplexity",
    title: str | None = None,
) -> go.Figure:
    """Left: per-layer density at ``1 - sparsity``; right: ``metric`` vs sparsity, marked.

        >>> sl.figures.calibration_overview(layer_df, eval_df, sparsity=0.5)

    ``layers``: frame of :func:`sparselab.studies.calibration.layer_densities`; ``quality``: frame of
    :func:`sparselab.evaluate` whose modes are named ``"<scheme> (<source>)"`` (as in
    notebook 02), plus ``dense``. One slider over the sparsity moves both panels.
    """
    density = round(1.0 - float(sparsity), 6)
    left = layer_density_spread(layers, density)
    right = quality_vs_density(quality, metric, x="sparsity", mark=float(sparsity))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, column_widths=[0.55, 0.45],
                        subplot_titles=(f"density per layer at target {density:g} (grey: target)",
                                        f"{metric} on held-out text vs overall sparsity"))
    styles = {}
    for trace in left.data:
        styles[trace.name] = trace.line.color, trace.line.dash
        fig.add_trace(trace.update(legendgroup=trace.name), row=1, col=1)
    for trace in right.data:
        color, dash = styles.get(trace.name, (trace.line.color, trace.line.dash))
        fig.add_trace(trace.update(legendgroup=trace.name, showlegend=trace.name not in styles,
                                   line={"color": color, "dash": dash}), row=1, col=2)
    fig.add_hline(y=density, line={"color": "gray", "dash": BASELINE_DASH, "width": 1}, row=1, col=1)
    fig.add_vline(x=float(sparsity), line={"color": "gray", "dash": "dot", "width": 1}, row=1, col=2)
    fig.update_layout(template=template(), height=430, margin={"l": 70, "r": 30, "t": 90, "b": 60},
                      title={"text": title or f"Uniform vs per-layer calibrated thresholds, sparsity {sparsity:g}"})
    fig.update_xaxes(title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text="sparsity (share of neurons dropped)", row=1, col=2)
    fig.update_yaxes(title_text="density", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text=metric, type="log" if metric == "perplexity" else "linear", row=1, col=2)
    return fig


def mass_kept_by_layer(df: pd.DataFrame, density: float, title: str | None = None) -> go.Figure:
    """Per layer, the share of ``|h|`` mass each kind of mask keeps at one density.

        >>> sl.figures.mass_kept_by_layer(sl.studies.contextual.mass_kept_by_mode(test, train), 0.25)

    ``df``: frame of :func:`sparselab.studies.contextual.mass_kept_by_mode` (one line per
    ``label``); the grey dashed line is the density itself, what a random set keeps in
    expectation.
    """
    require_columns(df, ["layer", "density", "label", "mass_kept"], "mass_kept_by_layer")
    values = df["density"].to_numpy(dtype=float)
    if not np.isclose(values, density).any():
        raise ValueError(f"density {density} not in the frame (densities: {sorted(set(values.tolist()))})")
    part = df[np.isclose(values, density)]
    fig = new_figure(title or f"Share of |h| mass kept on held-out tokens, density {density:g}", "layer",
                  "mass kept (mean over tokens)", height=380, **hline(float(density), "density"))
    labels = list(dict.fromkeys(df["label"]))
    colors = _series_colors(labels)
    for name in labels:
        line = part[part["label"] == name].sort_values("layer")
        fig.add_trace(go.Scatter(x=line["layer"].to_numpy(), y=line["mass_kept"].to_numpy(), mode="lines+markers",
                                 name=name, line={"color": colors[name]},
                                 hovertemplate=f"{name}<br>layer %{{x}}<br>mass kept %{{y:.3f}}<extra></extra>"))
    fig.update_yaxes(range=[0, 1.02])
    return fig


# ----------------------------------------------------------------------------- residual


def cosine_by_layer(
    summaries: dict[str, pd.DataFrame], title: str = "Cosine similarity per layer"
) -> go.Figure:
    """Mean cosine per layer with its 10-90 % band, one line per named summary.

        >>> sl.figures.cosine_by_layer({
        ...     "residual in vs out": sl.studies.residual.summarize_cosine(res_df),
        ...     "layer_in vs mlp_in": sl.studies.residual.summarize_cosine(sl.studies.residual.input_cosine(trace))})

    ``summaries``: name -> frame of :func:`sparselab.studies.residual.summarize_cosine`.
    """
    if not summaries:
        raise ValueError("give at least one summary")
    colors = _series_colors(list(summaries))
    fig = new_figure(title, "layer", "cosine similarity", height=400)
    for name, df in summaries.items():
        require_columns(df, ["layer", "mean", "q10", "q90"], "cosine_by_layer")
        df = df.sort_values("layer")
        x = df["layer"].to_numpy()
        color = colors[name]
        rgb = tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
        fig.add_trace(go.Scatter(
            x=np.concatenate([x, x[::-1]]), y=np.concatenate([df["q90"].to_numpy(), df["q10"].to_numpy()[::-1]]),
            mode="lines", fill="toself", fillcolor=f"rgba({rgb[0]},{rgb[1]},{rgb[2]},0.15)", line={"width": 0},
            name=f"{name}: 10-90 %", legendgroup=name, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=df["mean"].to_numpy(), mode="lines+markers", name=name, legendgroup=name,
                                 line={"color": color},
                                 hovertemplate=f"{name}<br>layer %{{x}}<br>mean cos %{{y:.3f}}<extra></extra>"))
    fig.update_yaxes(range=[min(-0.1, *(float(d["q10"].min()) for d in summaries.values())) - 0.02, 1.02])
    return fig


def lookahead_recall(df: pd.DataFrame, rank: int | None = None, title: str | None = None) -> go.Figure:
    """Per layer: recall and mass kept of predictors reading each input, random baseline dashed.

        >>> sl.figures.lookahead_recall(predictor_sweep(train, test, (64,), lookaheads=(False, True)))

    ``df``: frame of :func:`sparselab.studies.predictor_study.predictor_sweep` with an ``input``
    column; ``rank`` picks one rank if the frame holds several.
    """
    require_columns(df, ["layer", "rank", "input", "recall", "mass_kept", "random_recall", "random_mass_kept"],
             "lookahead_recall")
    if rank is None:
        ranks = sorted(df["rank"].unique())
        if len(ranks) != 1:
            raise ValueError(f"the frame holds ranks {ranks}; pick one with rank=")
        rank = int(ranks[0])
    part = df[df["rank"] == rank]
    if part.empty:
        raise ValueError(f"rank {rank} not in the frame (ranks: {sorted(df['rank'].unique())})")
    inputs = list(dict.fromkeys(part["input"]))
    colors = _series_colors(inputs)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("recall (dashed: random mask, same density)",
                                        "share of |h| mass kept (dashed: random)"))
    for col, (metric, baseline) in enumerate((("recall", "random_recall"), ("mass_kept", "random_mass_kept")), 1):
        for i, name in enumerate(inputs):
            line = part[part["input"] == name].sort_values("layer")
            x = line["layer"].to_numpy()
            # the inputs often score alike: the first is drawn wide and pale, the next ones
            # thin on top of it, so that coinciding lines stay visible
            style = {"color": colors[name], "width": 6 if i == 0 else 2}
            fig.add_trace(go.Scatter(x=x, y=line[metric].to_numpy(), mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1, line=style,
                                     opacity=0.45 if i == 0 and len(inputs) > 1 else 1.0,
                                     marker={"size": 11 if i == 0 else 6},
                                     hovertemplate=f"{name}<br>layer %{{x}}<br>{metric} %{{y:.3f}}<extra></extra>"),
                          row=1, col=col)
            fig.add_trace(go.Scatter(x=x, y=line[baseline].to_numpy(), mode="lines", name=f"random ({name})",
                                     legendgroup=name, showlegend=False,
                                     line={"color": colors[name], "dash": BASELINE_DASH, "width": 1},
                                     hovertemplate="random mask<br>layer %{x}<br>%{y:.3f}<extra></extra>"),
                          row=1, col=col)
    fig.update_layout(template=template(), height=420, margin={"l": 70, "r": 30, "t": 80, "b": 60},
                      title={"text": title or f"Look-ahead vs own input, rank {rank}"})
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(range=[0, 1.02])
    return fig


# ----------------------------------------------------------------------------- predictors


def _check_metric(metric: str) -> None:
    if metric not in PREDICTOR_METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {list(PREDICTOR_METRICS)}")


def predictor_vs_rank(
    df: pd.DataFrame, metric: str = "recall", layers: Sequence[int] | None = None, title: str | None = None
) -> go.Figure:
    """One predictor metric vs rank, one line per layer; dashed: a random mask of the same density.

        >>> sl.figures.predictor_vs_rank(sweep_df, metric="mass_kept")

    ``df``: frame of :func:`sparselab.studies.predictor_study.predictor_sweep` (one input). For
    ``mass_kept`` a dotted line shows the best mask with the same per-token counts
    (``oracle_mass_kept``), the ceiling of any predictor at that density.
    """
    _check_metric(metric)
    require_columns(df, ["layer", "rank", metric], "predictor_vs_rank")
    if "input" in df.columns and df["input"].nunique() > 1:
        raise ValueError(f"the frame holds several inputs {sorted(df['input'].unique())}; filter one")
    layers = select_layers(df, layers)
    colors = layer_colors(layers)
    baseline = PREDICTOR_METRICS[metric]
    note = " (dashed: random mask, same density" + (", dotted: best mask)" if metric == "mass_kept" else ")")
    fig = new_figure(title or f"Predictor {metric} vs rank" + (note if baseline else ""), "rank", metric, height=400)
    for layer in layers:
        part = df[df["layer"] == layer].sort_values("rank")
        x = part["rank"].to_numpy()
        fig.add_trace(go.Scatter(x=x, y=part[metric].to_numpy(), mode="lines+markers", name=f"layer {layer}",
                                 legendgroup=f"layer {layer}", line={"color": colors[layer]},
                                 hovertemplate=f"layer {layer}<br>rank %{{x}}<br>{metric} %{{y:.3f}}<extra></extra>"))
        if baseline and baseline in part.columns:
            fig.add_trace(go.Scatter(x=x, y=part[baseline].to_numpy(), mode="lines", name="random mask",
                                     legendgroup=f"layer {layer}", showlegend=False,
                                     line={"color": colors[layer], "dash": BASELINE_DASH, "width": 1},
                                     hovertemplate=f"layer {layer} random mask<br>%{{y:.3f}}<extra></extra>"))
        if metric == "mass_kept" and "oracle_mass_kept" in part.columns:
            fig.add_trace(go.Scatter(x=x, y=part["oracle_mass_kept"].to_numpy(), mode="lines",
                                     name="best mask, same counts", legendgroup=f"layer {layer}", showlegend=False,
                                     line={"color": colors[layer], "dash": "dot", "width": 1},
                                     hovertemplate=f"layer {layer} best mask with the same counts<br>"
                                                   "%{y:.3f}<extra></extra>"))
    fig.update_xaxes(type="log", dtick=float(np.log10(2)))
    fig.update_yaxes(range=[0, 1.02])
    return fig


def predictor_metrics(df: pd.DataFrame, layer: int, title: str | None = None) -> go.Figure:
    """Every predictor metric vs rank for one layer; dashed: each metric's random-mask value.

        >>> sl.figures.predictor_metrics(sweep_df, layer=10)
    """
    require_columns(df, ["layer", "rank", *PREDICTOR_METRICS], "predictor_metrics")
    layer = one_layer(df, layer, "predictor_metrics")
    part = df[df["layer"] == layer].sort_values("rank")
    if "input" in part.columns and part["input"].nunique() > 1:
        raise ValueError(f"the frame holds several inputs {sorted(part['input'].unique())}; filter one")
    colors = _series_colors(list(PREDICTOR_METRICS))
    fig = new_figure(title or f"Predictor quality vs rank, layer {layer} (dashed: random mask, same density)",
                  "rank", "share", height=400)
    x = part["rank"].to_numpy()
    for metric, baseline in PREDICTOR_METRICS.items():
        fig.add_trace(go.Scatter(x=x, y=part[metric].to_numpy(), mode="lines+markers", name=metric,
                                 legendgroup=metric, line={"color": colors[metric]},
                                 hovertemplate=f"{metric}<br>rank %{{x}}<br>%{{y:.3f}}<extra></extra>"))
        if baseline and baseline in part.columns:
            fig.add_trace(go.Scatter(x=x, y=part[baseline].to_numpy(), mode="lines", name=f"random {metric}",
                                     legendgroup=metric, showlegend=False,
                                     line={"color": colors[metric], "dash": BASELINE_DASH, "width": 1},
                                     hovertemplate=f"random mask {metric}<br>%{{y:.3f}}<extra></extra>"))
    fig.update_xaxes(type="log", dtick=float(np.log10(2)))
    fig.update_yaxes(range=[0, 1.02])
    return fig
