"""sl.dashboard: controls recompute the figures from the trace, matching trace.masks(rule)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparselab as sl
from sparselab import metrics, rules
from sparselab.dashboard_app import Dashboard, MagnitudeIndex
from sparselab.trace import Trace


def _synthetic_trace(n_layers: int = 3, seq_len: int = 20, n_seq: int = 2, n_neurons: int = 100) -> Trace:
    """A model-free trace: fp16 h and gate like the recorder stores, growing with depth."""
    rng = np.random.default_rng(0)
    n_tokens = seq_len * n_seq
    scale = np.linspace(0.05, 1.0, n_layers)[:, None, None]
    gate = rng.normal(size=(n_layers, n_tokens, n_neurons)) * scale
    h = gate * rng.normal(size=(n_layers, n_tokens, n_neurons))
    return Trace(
        layers=tuple(range(n_layers)),
        arrays={"h": torch.tensor(h, dtype=torch.float16), "gate": torch.tensor(gate, dtype=torch.float16)},
        token_ids=np.arange(n_tokens),
        seq_ids=np.repeat(np.arange(n_seq), seq_len),
        positions=np.tile(np.arange(seq_len), n_seq),
        steps=np.zeros(n_tokens, dtype=np.int64),
        is_prefill=np.ones(n_tokens, dtype=bool),
        pieces=[f"w{i}" for i in range(n_tokens)],
    )


RULE_CASES = [
    ("Calibrated", 0.3, lambda v: rules.Calibrated(density=v)),
    ("TopK", 0.17, lambda v: rules.TopK(keep=v)),
    ("MassCoverage", 0.8, lambda v: rules.MassCoverage(p=v)),
    ("MassCoverage", 0.777, lambda v: rules.MassCoverage(p=v)),  # off the slider grid
    ("GateThreshold", 0.6, lambda v: rules.GateThreshold(density=v)),
    ("Threshold", 0.05, lambda v: rules.Threshold(tau=v)),
]


def _heatmap_columns(dash: Dashboard) -> np.ndarray:
    return np.array([int(x) for x in dash.figures["heatmap"].data[0].x])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_magnitude_index_matches_rule_thresholds(dtype):
    trace = _synthetic_trace()
    values = trace.arrays["h"].to(dtype)
    index = MagnitudeIndex(values)
    for li in range(values.shape[0]):
        mags = values[li].float().abs()
        for density in (0.01, 0.3, 0.5, 0.97, 1.0):
            thr = index.threshold(li, density)
            assert thr == rules.layer_threshold(mags, density)
            assert index.share_above(li, thr) == (mags > thr).sum().item() / mags.numel()
        for tau in (0.0, 0.013, 0.1, 0.5, 10.0):
            assert index.share_above(li, tau) == (mags > tau).sum().item() / mags.numel()


def test_slider_move_changes_heatmap_and_matches_recomputed_masks():
    trace = _synthetic_trace()
    dash = sl.dashboard(trace, layer=1, max_tokens=30, max_neurons=64)
    before = np.array(dash.figures["heatmap"].data[0].z)
    dash.controls["value"].value = 0.2  # what dragging the slider does
    after = np.array(dash.figures["heatmap"].data[0].z)
    assert after.shape == before.shape == (30, 64)
    assert not np.array_equal(before, after)
    ref = trace.masks(rules.Calibrated(density=0.2))
    np.testing.assert_array_equal(after, ref.layer(1)[:30][:, _heatmap_columns(dash)])
    np.testing.assert_allclose(dash.figures["density"].data[0].y, ref.density().mean(axis=1), atol=1e-12)
    assert np.isfinite(dash.last_update_seconds)


@pytest.mark.parametrize(("name", "value", "make"), RULE_CASES)
def test_every_rule_matches_trace_masks(name, value, make):
    trace = _synthetic_trace()
    dash = sl.dashboard(trace, layer=2).set(rule=name, value=value)
    ref = trace.masks(make(value))
    np.testing.assert_allclose(dash.layer_densities()["density"], ref.density().mean(axis=1), atol=1e-12)
    np.testing.assert_allclose(dash.figures["density"].data[0].y, ref.density().mean(axis=1), atol=1e-12)
    np.testing.assert_array_equal(dash.masks.layer(2), ref.layer(2))
    churn = metrics.churn(ref)
    y = np.asarray(dash.figures["churn"].data[0].y, dtype=float)
    np.testing.assert_allclose(y[~np.isnan(y)], churn[churn.layer == 2].churn)


def test_layer_slider_switches_the_heatmap_layer():
    trace = _synthetic_trace()
    dash = sl.dashboard(trace, layer=0, rule="TopK", value=0.3, max_tokens=40)
    dash.controls["layer"].value = 2
    ref = trace.masks(rules.TopK(keep=0.3)).layer(2)
    np.testing.assert_array_equal(dash.figures["heatmap"].data[0].z, ref[:, _heatmap_columns(dash)])
    assert "Layer 2" in dash.figures["heatmap"].layout.title.text
    colors = dash.figures["density"].data[0].marker.color
    assert colors[2] != colors[0]  # the selected layer's bar stands out


def test_rule_dropdown_reconfigures_the_slider():
    trace = _synthetic_trace()
    dash = sl.dashboard(trace)
    slider = dash.controls["value"]
    dash.controls["rule"].value = "Threshold"
    assert slider.description == "tau" and slider.min == 0.0 and slider.max > slider.value > 0
    assert isinstance(dash.rule(), rules.Threshold) and dash.rule().tau == slider.value
    dash.controls["rule"].value = "MassCoverage"
    assert slider.description == "p" and slider.value == 0.9 and slider.max == 1.0


def test_bad_settings_raise_before_anything_changes():
    trace = _synthetic_trace()
    dash = sl.dashboard(trace, layer=1, rule="TopK", value=0.4)
    z = np.array(dash.figures["heatmap"].data[0].z)
    with pytest.raises(ValueError, match="unknown rule"):
        dash.set(rule="Magic")
    with pytest.raises(ValueError, match="outside"):
        dash.set(rule="Calibrated", value=1.5)
    with pytest.raises(KeyError, match="layer 9"):
        dash.set(layer=9)
    assert (dash.controls["rule"].value, dash.controls["value"].value, dash.controls["layer"].value) == (
        "TopK", 0.4, 1
    )
    np.testing.assert_array_equal(dash.figures["heatmap"].data[0].z, z)
    with pytest.raises(KeyError, match="not recorded"):
        sl.dashboard(trace, layer=7)


def test_gate_rule_offered_only_when_gate_was_recorded():
    trace = _synthetic_trace()
    no_gate = Trace(**{**trace.__dict__, "arrays": {"h": trace.arrays["h"]}})
    dash = sl.dashboard(no_gate)
    assert "GateThreshold" not in dash.controls["rule"].options
    with pytest.raises(ValueError, match="unknown rule"):
        dash.set(rule="GateThreshold")


def test_dashboard_is_a_displayable_widget():
    import ipywidgets

    dash = sl.dashboard(_synthetic_trace())
    assert isinstance(dash.widget, ipywidgets.VBox)
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "sparselab-value" in dash.controls["value"]._dom_classes


@pytest.mark.slow
def test_dashboard_on_the_real_model(small_trace):
    dash = sl.dashboard(small_trace, layer=10)
    before = np.array(dash.figures["heatmap"].data[0].z)
    dash.set(value=0.3)
    assert not np.array_equal(before, np.array(dash.figures["heatmap"].data[0].z))
    ref = small_trace.masks(rules.Calibrated(density=0.3))
    np.testing.assert_allclose(dash.figures["density"].data[0].y, ref.density().mean(axis=1), atol=1e-12)
    np.testing.assert_array_equal(dash.masks.layer(10), ref.layer(10))
