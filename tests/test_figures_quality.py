"""sl.figures_quality on small hand-made frames: right traces, values, axes and errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from sparselab.studies import predictor_study
from sparselab.viz import quality as fq


def quantile_frame():
    rows = [{"source": s, "layer": layer, "quantile": q, "value": (layer + 1) * q * (2 if s == "h" else 1)}
            for s in ("h", "gate") for layer in range(4) for q in (0.1, 0.5, 0.9)]
    return pd.DataFrame(rows)


def layer_frame():
    rows = []
    for scheme in ("uniform", "calibrated"):
        for source in ("h", "gate"):
            for target in (0.3, 0.5):
                for layer in range(4):
                    density = target if scheme == "calibrated" else target * (0.5 + layer / 3)
                    rows.append({"scheme": scheme, "source": source, "target_density": target, "layer": layer,
                                 "threshold": 0.1, "density": density})
    return pd.DataFrame(rows)


def quality_frame():
    rows = [{"mode": "dense", "density": 1.0, "perplexity": 20.0, "kl": 0.0}]
    for i, name in enumerate(["uniform (h)", "calibrated (h)", "uniform (gate)", "calibrated (gate)"]):
        for d in (0.7, 0.5, 0.3):
            rows.append({"mode": name, "density": d, "perplexity": 20 + (1 - d) * 10 * (i + 1), "kl": (1 - d) * (i + 1)})
    return pd.DataFrame(rows)


def sweep_frame():
    rows = []
    for layer in (0, 5):
        for rank in (8, 32, 128):
            for inp in predictor_study.INPUTS.values():
                r = 0.5 + 0.1 * np.log2(rank / 8) / 2
                rows.append({"layer": layer, "rank": rank, "input": inp, "recall": r, "precision": r - 0.02,
                             "f1": r - 0.01, "predicted_density": 0.5, "true_density": 0.5, "mass_kept": r + 0.1,
                             "oracle_mass_kept": 0.95})
    return predictor_study.random_baseline(pd.DataFrame(rows))


def test_magnitude_quantiles():
    fig = fq.magnitude_quantiles(quantile_frame())
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 2 * 3  # two sources x three quantiles
    assert [t.name for t in fig.data[:3]] == ["q10", "q50", "q90"]
    assert [t.showlegend for t in fig.data] == [True] * 3 + [False] * 3
    np.testing.assert_allclose(fig.data[1].y, [1.0, 2.0, 3.0, 4.0])  # h, median: (layer+1) * 0.5 * 2
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"  # both panels
    assert "|h|" in fig.layout.annotations[0].text


def test_layer_density_spread():
    fig = fq.layer_density_spread(layer_frame(), 0.5)
    assert len(fig.data) == 4
    names = [t.name for t in fig.data]
    assert "uniform (h)" in names and "calibrated (gate)" in names
    cal = fig.data[names.index("calibrated (h)")]
    np.testing.assert_allclose(cal.y, [0.5] * 4)
    assert fig.data[names.index("uniform (h)")].line.dash == "dash"
    assert fig.layout.shapes[0].y0 == 0.5  # target line
    with pytest.raises(ValueError, match="not in the frame"):
        fq.layer_density_spread(layer_frame(), 0.4)


def test_quality_vs_density_and_overview():
    q = quality_frame()
    fig = fq.quality_vs_density(q, "perplexity", x="sparsity", mark=0.5)
    assert len(fig.data) == 5  # four modes + dense line
    first = fig.data[0]
    assert first.name == "uniform (h)"
    np.testing.assert_allclose(first.x, [0.3, 0.5, 0.7])  # sorted by sparsity
    np.testing.assert_allclose(first.y, [23.0, 25.0, 27.0])
    assert fig.data[-1].name == "dense" and list(fig.data[-1].y) == [20.0, 20.0]
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.shapes[-1].x0 == 0.5  # the mark
    kl = fq.quality_vs_density(q, "kl")
    assert kl.layout.yaxis.type != "log" and len(kl.data) == 5
    with pytest.raises(ValueError, match="x must be"):
        fq.quality_vs_density(q, x="keep")
    over = fq.calibration_overview(layer_frame(), q, 0.5)
    left = [t for t in over.data if t.xaxis == "x"]
    right = [t for t in over.data if t.xaxis == "x2"]
    assert len(left) == 4 and len(right) == 5
    # the same scheme keeps one colour and dash style in both panels, one legend entry
    by_name = {t.name: t for t in left}
    for t in right:
        if t.name in by_name:
            assert t.line.color == by_name[t.name].line.color and t.line.dash == by_name[t.name].line.dash
            assert t.showlegend is False
    assert "sparsity 0.5" in over.layout.title.text


def test_mass_kept_by_layer():
    df = pd.DataFrame([{"layer": layer, "density": 0.25, "mode": m, "label": f"{m} set", "mass_kept": v + layer / 100}
                       for layer in range(3) for m, v in (("oracle", 0.8), ("static", 0.5), ("random", 0.25))])
    fig = fq.mass_kept_by_layer(df, 0.25)
    assert [t.name for t in fig.data] == ["oracle set", "static set", "random set"]
    np.testing.assert_allclose(fig.data[1].y, [0.5, 0.51, 0.52])
    with pytest.raises(ValueError, match="not in the frame"):
        fq.mass_kept_by_layer(df, 0.5)


def test_cosine_by_layer():
    summary = pd.DataFrame({"layer": [0, 1, 2], "mean": [0.1, 0.9, 0.95], "q10": [0.0, 0.8, 0.9],
                            "q90": [0.2, 0.95, 0.99]})
    fig = fq.cosine_by_layer({"residual": summary, "inputs": summary.assign(mean=[0.5, 0.6, 0.7])})
    assert len(fig.data) == 4  # band + line per summary
    assert fig.data[1].name == "residual" and fig.data[3].name == "inputs"
    np.testing.assert_allclose(fig.data[0].y, [0.2, 0.95, 0.99, 0.9, 0.8, 0.0])  # q90 then q10 reversed
    with pytest.raises(ValueError, match="at least one"):
        fq.cosine_by_layer({})


def test_lookahead_recall():
    df = sweep_frame()
    fig = fq.lookahead_recall(df, rank=32)
    assert len(fig.data) == 2 * 2 * 2  # two panels x two inputs x (data, random)
    assert fig.data[0].name == predictor_study.INPUTS[False]
    np.testing.assert_allclose(fig.data[1].y, [0.5, 0.5])  # random recall = predicted density
    with pytest.raises(ValueError, match="pick one with rank"):
        fq.lookahead_recall(df)
    with pytest.raises(ValueError, match="rank 7 not in"):
        fq.lookahead_recall(df, rank=7)


def test_predictor_figures():
    df = sweep_frame()
    own = df[df["input"] == predictor_study.INPUTS[False]]
    fig = fq.predictor_vs_rank(own, "mass_kept")
    assert len(fig.data) == 2 * 3  # per layer: data, random, best mask
    assert [t.line.dash for t in fig.data[:3]] == [None, "dash", "dot"]
    np.testing.assert_allclose(fig.data[0].x, [8, 32, 128])
    assert fig.layout.xaxis.type == "log"
    density = fq.predictor_vs_rank(own, "predicted_density", layers=[5])
    assert len(density.data) == 1  # no random baseline for the density itself
    with pytest.raises(ValueError, match="several inputs"):
        fq.predictor_vs_rank(df, "recall")
    with pytest.raises(ValueError, match="unknown metric"):
        fq.predictor_vs_rank(own, "accuracy")
    per = fq.predictor_metrics(own, layer=0)
    names = [t.name for t in per.data if t.showlegend is not False]
    assert names == list(fq.PREDICTOR_METRICS)
    assert "layer 0" in per.layout.title.text
    with pytest.raises(ValueError, match="layer 3 not in the frame"):
        fq.predictor_metrics(own, layer=3)
