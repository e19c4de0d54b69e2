"""Viz: DataFrames in, Plotly figures out; the dashboard and HTML reports built on them.

    >>> sl.figures.density_by_layer(sl.metrics.density(masks))       # sl.figures is this package
    >>> sl.dashboard(trace)                                          # ipywidgets app
    >>> sl.report({"density": fig}, "report.html")                   # self-contained HTML

Figure modules by topic, each function ``(frame, ...) -> go.Figure`` that never touches a
model: :mod:`.masks` (density, heatmap, churn, magnitudes), :mod:`.reuse` (windows, hot
sets, batches, frequencies against independence baselines), :mod:`.quality`
(calibration, quality vs density, predictors), :mod:`.live` (a live sparse generation),
:mod:`.kernels` (kernel benchmarks), :mod:`.frontier` (quality against bytes read, per
selection method); :mod:`.style` is their shared look. Widgets:
:mod:`.interact` (a figure driven by controls, in-place updates), :mod:`.dashboard` and
:mod:`.dashboard_live`; :mod:`.report` writes HTML. A new figure goes in the module of its
topic, takes a tidy frame, checks it with ``style.require_columns`` and uses
``style.new_figure``.
"""

from sparselab.viz.frontier import frontier_figure
from sparselab.viz.kernels import METHOD_NAMES, mlp_time_vs_density, update_cost
from sparselab.viz.live import (
    cache_traffic_bars,
    predictor_quality,
    step_heatmap,
    step_layer_density,
    time_split_bars,
)
from sparselab.viz.masks import (
    activation_magnitude_by_layer,
    churn_over_tokens,
    density_by_layer,
    token_heatmap,
)
from sparselab.viz.paper import export, paper_style
from sparselab.viz.quality import (
    PREDICTOR_METRICS,
    calibration_overview,
    cosine_by_layer,
    layer_density_spread,
    lookahead_recall,
    magnitude_quantiles,
    mass_kept_by_layer,
    predictor_metrics,
    predictor_vs_rank,
    quality_vs_density,
)
from sparselab.viz.reuse import (
    aggregated_sparsity,
    batch_union_curves,
    frequency_ecdf,
    hit_rate_by_layer,
    hit_rate_curves,
    neuron_frequency_cdf,
    union_by_layer,
    union_comparison_curves,
    window_reuse_curves,
    window_reuse_vs_models,
)
from sparselab.viz.static import keep, stack, static_bundle
from sparselab.viz.style import TEMPLATE, template, unstyled

__all__ = [
    "METHOD_NAMES",
    "PREDICTOR_METRICS",
    "TEMPLATE",
    "activation_magnitude_by_layer",
    "aggregated_sparsity",
    "batch_union_curves",
    "cache_traffic_bars",
    "calibration_overview",
    "churn_over_tokens",
    "cosine_by_layer",
    "density_by_layer",
    "export",
    "frequency_ecdf",
    "frontier_figure",
    "hit_rate_by_layer",
    "hit_rate_curves",
    "keep",
    "layer_density_spread",
    "lookahead_recall",
    "magnitude_quantiles",
    "mass_kept_by_layer",
    "mlp_time_vs_density",
    "neuron_frequency_cdf",
    "paper_style",
    "predictor_metrics",
    "predictor_quality",
    "predictor_vs_rank",
    "stack",
    "static_bundle",
    "quality_vs_density",
    "step_heatmap",
    "step_layer_density",
    "template",
    "time_split_bars",
    "token_heatmap",
    "union_by_layer",
    "union_comparison_curves",
    "unstyled",
    "update_cost",
    "window_reuse_curves",
    "window_reuse_vs_models",
]

from sparselab.viz import static as _static  # noqa: E402

if _static._in_kernel():  # plain figures get a text/html copy too (see sparselab.viz.static)
    _static.install()
