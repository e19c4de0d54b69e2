"""sl.figures on small frames (traces, axes, titles, data) and sl.report's HTML file."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

import sparselab as sl
from sparselab import metrics
from sparselab import viz as figures
from sparselab.masking.masks import Masks


def _masks() -> Masks:
    rng = np.random.default_rng(0)
    dense = rng.random((3, 24, 40)) < np.array([0.2, 0.5, 0.8])[:, None, None]
    seq_ids = np.repeat([0, 1], 12)
    positions = np.tile(np.arange(12), 2)
    return Masks.from_bool(dense, layers=(0, 5, 9), seq_ids=seq_ids, positions=positions)


def _axis_titles(fig: go.Figure) -> tuple[str, str]:
    return fig.layout.xaxis.title.text, fig.layout.yaxis.title.text


def test_density_by_layer_from_token_frame():
    masks = _masks()
    fig = figures.density_by_layer(metrics.density(masks), target=0.5, highlight=5)
    assert len(fig.data) == 1 and fig.data[0].type == "bar"
    np.testing.assert_array_equal(fig.data[0].x, [0, 5, 9])
    np.testing.assert_allclose(fig.data[0].y, masks.density().mean(axis=1))
    np.testing.assert_allclose(fig.data[0].error_y.array, masks.density().std(axis=1, ddof=1))
    assert _axis_titles(fig) == ("layer", "density (share of neurons active)")
    assert fig.layout.title.text == "Density by layer"
    assert fig.layout.shapes[0].y0 == 0.5  # target line
    assert fig.data[0].marker.color[1] != fig.data[0].marker.color[0]  # layer 5 highlighted


def test_density_by_layer_groups_rules_and_accepts_per_layer_frames():
    df = pd.DataFrame({"layer": [0, 1, 0, 1], "density": [0.1, 0.2, 0.5, 0.6], "rule": ["a", "a", "b", "b"]})
    fig = figures.density_by_layer(df)
    assert [t.name for t in fig.data] == ["a", "b"]
    np.testing.assert_allclose(fig.data[1].y, [0.5, 0.6])
    assert fig.data[0].error_y.array is None  # one row per layer: no spread to show


def test_token_heatmap_from_masks_and_bool_array():
    masks = _masks()
    pieces = [f"tok{i}\n" for i in range(24)]
    fig = figures.token_heatmap(masks, layer=5, pieces=pieces, max_tokens=10, max_neurons=16)
    heat = fig.data[0]
    assert heat.type == "heatmap" and heat.z.shape == (10, 16)
    assert heat.y[3] == "3 tok3\u23ce"  # row labels carry the text piece, newline made visible
    # the columns are real neurons, most frequent among the shown tokens first
    columns = np.array([int(x) for x in heat.x])
    np.testing.assert_array_equal(heat.z, masks.layer(5)[:10][:, columns])
    freq = masks.layer(5)[:10].sum(axis=0)[columns]
    assert (np.diff(freq) <= 0).all()
    assert _axis_titles(fig)[1] == "token"
    assert "layer 5" in fig.layout.title.text

    dense = masks.layer(0)
    fig = figures.token_heatmap(dense, layer=0, neurons=np.array([3, 1, 2]))
    np.testing.assert_array_equal(fig.data[0].z, dense[:, [3, 1, 2]])
    assert list(fig.data[0].x) == ["3", "1", "2"]


def test_token_heatmap_errors():
    with pytest.raises(ValueError, match="pick a layer"):
        figures.token_heatmap(_masks())
    with pytest.raises(ValueError, match="neuron indices"):
        figures.token_heatmap(np.zeros((2, 4), dtype=bool), neurons=np.array([5]))


def test_churn_over_tokens_breaks_at_sequences():
    df = metrics.churn(_masks())
    fig = figures.churn_over_tokens(df, layer=9)
    assert [t.name for t in fig.data] == ["churn", "independent masks"]
    y = np.asarray(fig.data[0].y, dtype=float)
    part = df[df.layer == 9]
    assert np.isnan(y).sum() == 2  # one break after each of the two sequences
    np.testing.assert_allclose(y[~np.isnan(y)], part.churn.to_numpy())
    assert _axis_titles(fig) == ("token", "churn (share of neurons changed)")
    with pytest.raises(ValueError, match="pick one"):
        figures.churn_over_tokens(df)


def test_window_reuse_curves_two_panels_with_baselines():
    df = metrics.window_reuse(_masks(), windows=(1, 2, 4))
    fig = figures.window_reuse_curves(df, layers=[0, 9])
    # per layer and panel: observed + dashed random baseline
    assert len(fig.data) == 2 * 2 * 2
    observed = [t for t in fig.data if t.line.dash is None]
    dashed = [t for t in fig.data if t.line.dash == "dash"]
    assert len(observed) == len(dashed) == 4
    np.testing.assert_allclose(observed[0].y, df[df.layer == 0].footprint)
    np.testing.assert_allclose(dashed[0].y, df[df.layer == 0].random_footprint)
    assert fig.layout.xaxis.title.text == "window k (tokens)"
    assert fig.layout.yaxis.title.text == "footprint (share of neurons)"
    assert fig.layout.yaxis2.title.text == "new per token (share of neurons)"
    with pytest.raises(ValueError, match="not in the frame"):
        figures.window_reuse_curves(df, layers=[3])


def test_neuron_frequency_cdf():
    df = metrics.neuron_frequency(_masks())
    fig = figures.neuron_frequency_cdf(df)
    assert len(fig.data) == 3 + 1  # a curve per layer and the uniform diagonal
    first = df[df.layer == 0].sort_values("rank_fraction")
    np.testing.assert_allclose(fig.data[0].y, first.cum_share)
    assert (np.diff(fig.data[0].y) >= 0).all()
    assert _axis_titles(fig) == ("share of neurons (most frequent first)", "share of activations covered")


def test_batch_union_curves():
    df = metrics.batch_union(_masks(), sizes=(1, 2, 8), n_batches=5)
    fig = figures.batch_union_curves(df, layers=[5])
    assert len(fig.data) == 2
    np.testing.assert_allclose(fig.data[0].y, df[df.layer == 5].union_density)
    np.testing.assert_allclose(fig.data[0].error_y.array, df[df.layer == 5].union_std)
    np.testing.assert_allclose(fig.data[1].y, df[df.layer == 5].independent)
    assert _axis_titles(fig) == ("batch size B (tokens)", "union density (share of neurons)")


def test_activation_magnitude_by_layer():
    df = pd.DataFrame({"layer": [1, 0, 2], "median": [0.2, 0.1, 0.4], "q10": [0.01] * 3, "q90": [1.0] * 3})
    fig = figures.activation_magnitude_by_layer(df)
    assert [t.name for t in fig.data] == ["10-90 %", "median"]
    np.testing.assert_allclose(fig.data[1].y, [0.1, 0.2, 0.4])  # sorted by layer
    assert fig.layout.yaxis.type == "log"
    assert _axis_titles(fig) == ("layer", "|h|")


def test_figures_share_the_template_unless_unstyled():
    df = metrics.density(_masks())
    assert figures.density_by_layer(df).layout.template.layout.plot_bgcolor == "white"  # plotly_white
    with figures.unstyled():
        bare = figures.density_by_layer(df)
    assert bare.layout.template.layout.plot_bgcolor is None
    assert figures.density_by_layer(df).layout.template.layout.plot_bgcolor == "white"


def test_figure_functions_name_missing_columns():
    with pytest.raises(ValueError, match="footprint"):
        figures.window_reuse_curves(pd.DataFrame({"layer": [0], "window": [1]}))


# ----------------------------------------------------------------------------- report


def test_report_is_self_contained(tmp_path):
    masks = _masks()
    figs = {
        "Density <by> layer": figures.density_by_layer(metrics.density(masks)),
        "Batch union": figures.batch_union_curves(metrics.batch_union(masks, sizes=(1, 2), n_batches=3)),
    }
    table = metrics.summary(masks)
    path = sl.report(figs, tmp_path / "sub" / "r.html", title="Test report",
                     tables={"Per-layer summary": table}, meta={"rule": {"name": "TopK", "keep": 0.5}})
    text = path.read_text(encoding="utf-8")
    assert path.exists() and path.parent.name == "sub"
    # no script is loaded from anywhere: plotly.js is inline, exactly once
    assert re.search(r"<script[^>]*\bsrc\s*=", text, flags=re.I) is None
    assert "https://cdn.plot.ly/plotly" not in text
    assert text.count("Plotly.newPlot") == 2
    assert text.count("* plotly.js v") == 1
    assert "Test report" in text and "Density &lt;by&gt; layer" in text and "Batch union" in text
    assert "Per-layer summary" in text and "random_churn" in text
    assert '"keep": 0.5' in text and '"sparselab"' in text  # meta and versions printed
    assert not list(tmp_path.glob("sub/.r.html.*"))  # no temp file left behind


def test_report_takes_a_list_and_titles_from_figures(tmp_path):
    fig = figures.density_by_layer(metrics.density(_masks()), title="Only figure")
    text = sl.report([fig], tmp_path / "a.html").read_text(encoding="utf-8")
    assert "<h2>Only figure</h2>" in text


def test_report_rejects_bad_inputs_before_writing(tmp_path):
    with pytest.raises(TypeError, match="not a plotly figure"):
        sl.report({"x": "nope"}, tmp_path / "a.html")
    with pytest.raises(TypeError, match="DataFrame"):
        sl.report([], tmp_path / "a.html", tables={"t": [1, 2]})
    assert not (tmp_path / "a.html").exists()
