"""sl.calibration: uniform vs per-layer thresholds, against numpy recomputations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparselab as sl
from sparselab.studies import calibration

LAYERS = (0, 3, 7)
T, N = 200, 96


def scaled_trace(seed: int = 0, tokens: int = T) -> sl.Trace:
    """|h| of layer i spread around 10**i (layers far apart, as in real models); gate x2."""
    g = torch.Generator().manual_seed(seed)
    h = torch.stack([torch.randn(tokens, N, generator=g) * 10.0 ** i for i in range(len(LAYERS))])
    gate = torch.stack([torch.randn(tokens, N, generator=g) * 2.0 ** i for i in range(len(LAYERS))])
    return sl.Trace(
        layers=LAYERS, arrays={"h": h.half(), "gate": gate.half()},
        token_ids=np.zeros(tokens, dtype=np.int64), seq_ids=np.repeat(np.arange(tokens // 20), 20),
        positions=np.tile(np.arange(20), tokens // 20), steps=np.zeros(tokens, dtype=np.int64),
        is_prefill=np.ones(tokens, dtype=bool),
    )


def magnitudes(trace, source="h") -> np.ndarray:
    return trace.arrays[source].float().abs().numpy().reshape(len(trace.layers), -1)


@pytest.fixture(scope="module")
def trace():
    return scaled_trace()


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_uniform_threshold_gives_the_overall_density(trace, density):
    tau = calibration.uniform_threshold(trace, density)
    mags = magnitudes(trace)
    overall = (mags > tau).mean()
    # fp16 values have ties: the share is within one distinct value's count of the target
    assert abs(overall - density) < 0.01
    assert overall <= density + 1e-12  # never more than asked for
    # one tau, so the layers end up far apart (layer scales differ by 10x each)
    per_layer = (mags > tau).mean(1)
    assert per_layer[0] <= per_layer[1] <= per_layer[2] and per_layer[0] < per_layer[2]


def test_threshold_rules_calibrated_matches_fitted_rule(trace):
    fits = calibration.threshold_rules(trace, (0.25, 0.5))
    assert set(fits) == {"uniform", "calibrated"}
    for d in (0.25, 0.5):
        assert fits["calibrated"][d].thresholds == pytest.approx(sl.rules.Calibrated(density=d).fit(trace).thresholds)
        taus = set(fits["uniform"][d].thresholds.values())
        assert len(taus) == 1 and set(fits["uniform"][d].thresholds) == set(LAYERS)
        assert isinstance(fits["uniform"][d], sl.rules.Calibrated)
    gate = calibration.threshold_rules(trace, (0.5,), source="gate", schemes=("calibrated",))
    assert list(gate) == ["calibrated"]
    rule = gate["calibrated"][0.5]
    assert isinstance(rule, sl.rules.GateThreshold) and rule.source == "gate"
    assert rule.thresholds == pytest.approx(sl.rules.GateThreshold(density=0.5).fit(trace).thresholds)


def test_layer_densities_recomputed_with_numpy(trace):
    fits = {s: calibration.threshold_rules(trace, (0.3,), source=s) for s in ("h", "gate")}
    other = scaled_trace(seed=1)  # thresholds fitted on one trace, measured on another
    df = calibration.layer_densities(other, fits)
    assert len(df) == 2 * 2 * len(LAYERS)
    for row in df.itertuples():
        mags = magnitudes(other, row.source)[LAYERS.index(row.layer)]
        assert row.density == pytest.approx((mags > row.threshold).mean())
    # calibrated thresholds transfer to other data of the same distribution
    cal = df[df.scheme == "calibrated"]
    assert (cal.density - 0.3).abs().max() < 0.05
    single = calibration.layer_densities(other, fits["h"])
    assert set(single.source) == {"h"} and len(single) == 2 * len(LAYERS)


def test_density_spread_hand_example():
    import pandas as pd

    df = pd.DataFrame({"scheme": ["u"] * 3, "source": ["h"] * 3, "target_density": [0.5] * 3,
                       "density": [0.1, 0.5, 0.9]})
    out = calibration.density_spread(df)
    row = out.iloc[0]
    assert row.overall_density == pytest.approx(0.5)
    assert (row.min_density, row.max_density) == (0.1, 0.9)
    assert row.std_density == pytest.approx(np.std([0.1, 0.5, 0.9]))
    with pytest.raises(ValueError, match="needs columns"):
        calibration.density_spread(df.drop(columns="density"))


def test_magnitude_quantiles_are_order_statistics(trace):
    df = calibration.magnitude_quantiles(trace, sources=("h",), quantiles=(0.1, 0.5, 0.99))
    assert len(df) == 3 * len(LAYERS)
    for row in df.itertuples():
        flat = np.sort(magnitudes(trace)[LAYERS.index(row.layer)])
        assert row.value == pytest.approx(flat[int(round(row.quantile * flat.size)) - 1])
    with pytest.raises(ValueError, match="quantiles"):
        calibration.magnitude_quantiles(trace, quantiles=(1.5,))


def test_errors_name_the_problem(trace):
    with pytest.raises(ValueError, match="source must be"):
        calibration.threshold_rules(trace, (0.5,), source="up")
    with pytest.raises(ValueError, match="density must be in"):
        calibration.threshold_rules(trace, (0.0,))
    with pytest.raises(ValueError, match="unknown schemes"):
        calibration.threshold_rules(trace, (0.5,), schemes=("global",))
    only_h = sl.Trace(layers=trace.layers, arrays={"h": trace.arrays["h"]}, token_ids=trace.token_ids,
                      seq_ids=trace.seq_ids, positions=trace.positions, steps=trace.steps,
                      is_prefill=trace.is_prefill)
    with pytest.raises(KeyError, match="'gate' was not recorded"):
        calibration.threshold_rules(only_h, (0.5,), source="gate")
    with pytest.raises(ValueError, match="no per-layer thresholds"):
        calibration.layer_densities(trace, {"x": {0.5: sl.rules.Calibrated(0.5)}})
