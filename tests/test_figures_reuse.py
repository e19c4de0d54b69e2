"""sl.figures_reuse on small frames computed from synthetic masks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sparselab import metrics
from sparselab.masking.masks import Masks
from sparselab.studies import hotset, independence
from sparselab.viz import reuse as figures_reuse

SIZES = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def masks() -> Masks:
    rng = np.random.default_rng(1)
    dense = rng.random((3, 120, 70)) < np.linspace(0.05, 0.7, 70)
    return Masks.from_bool(dense, layers=[0, 5, 9], seq_ids=np.repeat(np.arange(4), 30),
                           positions=np.tile(np.arange(30), 4), rule={"name": "synthetic"})


def test_aggregated_sparsity(masks):
    window = metrics.window_reuse(masks, windows=SIZES)
    model = independence.frequency_model(masks, sizes=SIZES)
    fig = figures_reuse.aggregated_sparsity(window, model, layers=[0, 9])
    assert len(fig.data) == 6  # per layer: data, random reuse, frequency-matched
    data = fig.data[0]
    part = window[window.layer == 0].sort_values("window")
    np.testing.assert_allclose(data.y, np.maximum(1 - part.footprint, 1e-6))
    np.testing.assert_allclose(fig.data[1].y, np.maximum((1 - part.density) ** part.window, 1e-6))
    assert [t.line.dash for t in fig.data[:3]] == ["solid", "dash", "dot"]
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.type == "log"
    assert "Aggregated sparsity" in fig.layout.title.text
    no_model = figures_reuse.aggregated_sparsity(window)
    assert len(no_model.data) == 6  # three layers, data + random reuse


def test_window_reuse_vs_models(masks):
    window = metrics.window_reuse(masks, windows=SIZES)
    model = independence.frequency_model(masks, sizes=SIZES)
    fig = figures_reuse.window_reuse_vs_models(window, model, layer=5)
    assert len(fig.data) == 6
    assert [t.name for t in fig.data[::2]] == ["masks", "random reuse (same density)", "frequency-matched"]
    np.testing.assert_allclose(fig.data[5].y, model[model.layer == 5].sort_values("size").frequency_new)
    assert "layer 5" in fig.layout.title.text
    with pytest.raises(ValueError, match="layer 4 not in the frame"):
        figures_reuse.window_reuse_vs_models(window, model, layer=4)


def test_frequency_ecdf(masks):
    freq = metrics.neuron_frequency(masks)
    fig = figures_reuse.frequency_ecdf(freq, layers=[9])
    (trace,) = fig.data
    assert trace.name == "layer 9"
    assert np.all(np.diff(trace.x) >= 0) and trace.y[-1] == 1.0 and len(trace.y) == 70
    with pytest.raises(ValueError, match="needs columns"):
        figures_reuse.frequency_ecdf(pd.DataFrame({"layer": [0]}))


def test_hit_rate_figures(masks):
    train = masks.select_tokens(masks.seq_ids < 3)
    test = masks.select_tokens(masks.seq_ids == 3)
    hits = hotset.hit_rate(train, test, fractions=(0.1, 0.2, 0.5))
    fig = figures_reuse.hit_rate_curves(hits, layer=5)
    assert [t.name for t in fig.data][0] == "held-out texts"
    assert list(fig.data[0].x) == [0.0, 0.1, 0.2, 0.5]
    np.testing.assert_allclose(fig.data[3].y, [0.0, *hits[hits.layer == 5].random])
    bars = figures_reuse.hit_rate_by_layer(hits, fraction=0.2)
    assert bars.data[0].type == "bar" and list(bars.data[0].x) == [0, 5, 9]
    assert "20%" in bars.layout.title.text
    with pytest.raises(ValueError, match="fraction 0.3"):
        figures_reuse.hit_rate_by_layer(hits, fraction=0.3)


def test_union_figures(masks):
    union = independence.union_comparison(masks, sizes=SIZES, n_batches=20)
    fig = figures_reuse.union_comparison_curves(union, layer=9)
    assert len(fig.data) == 4 and fig.layout.xaxis.type == "log"
    part = union[union.layer == 9].sort_values("size")
    np.testing.assert_allclose(fig.data[0].error_y.array, part.random_batch_std)
    np.testing.assert_allclose(fig.data[2].y, 1 - (1 - part.density) ** part["size"])
    by_layer = figures_reuse.union_by_layer(union, size=4)
    assert [t.type for t in by_layer.data] == ["bar", "bar", "scatter", "scatter"]
    with pytest.raises(ValueError, match="size 3"):
        figures_reuse.union_by_layer(union, size=3)
