"""sl.dashboard: controls recompute the figures from the trace, matching trace.masks(rule);
its tabs; sl.runtime.sparse_generate and the live figures (stats per step, masks, restore)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import sparselab as sl
from sparselab import metrics
from sparselab.masking import rules
from sparselab.masking.masks import Masks
from sparselab.masking.thresholds import MagnitudeIndex
from sparselab.recording import Trace
from sparselab.runtime import generate as live
from sparselab.viz import live as figures_live
from sparselab.viz.dashboard import Dashboard


def _synthetic_trace(n_layers: int = 3, seq_len: int = 20, n_seq: int = 2, n_neurons: int = 100,
                     hidden: int = 0) -> Trace:
    """A model-free trace: fp16 h and gate like the recorder stores, growing with depth
    (and float32 MLP inputs of size ``hidden`` when > 0, for predictors)."""
    rng = np.random.default_rng(0)
    n_tokens = seq_len * n_seq
    scale = np.linspace(0.05, 1.0, n_layers)[:, None, None]
    gate = rng.normal(size=(n_layers, n_tokens, n_neurons)) * scale
    h = gate * rng.normal(size=(n_layers, n_tokens, n_neurons))
    arrays = {"h": torch.tensor(h, dtype=torch.float16), "gate": torch.tensor(gate, dtype=torch.float16)}
    if hidden:
        arrays["mlp_in"] = torch.tensor(rng.normal(size=(n_layers, n_tokens, hidden)), dtype=torch.float32)
    return Trace(
        layers=tuple(range(n_layers)),
        arrays=arrays,
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


# ----------------------------------------------------------------------------- tabs


def _tab_figures(dash: Dashboard, title: str) -> list:
    return [w for w in dash.tabs.children[dash.tab_titles.index(title)].children if hasattr(w, "data")]


def test_tabs_masks_first_then_churn_and_reuse():
    import ipywidgets

    dash = sl.dashboard(_synthetic_trace(), layer=1)
    assert isinstance(dash.tabs, ipywidgets.Tab)
    assert dash.tab_titles == ("Masks", "Churn & reuse")  # no predictors, no model: no other tabs
    assert list(dash.tabs.titles) == list(dash.tab_titles)
    assert dash.tabs.selected_index == 0
    first = _tab_figures(dash, "Masks")
    assert any(t.type == "heatmap" for fig in first for t in fig.data)  # the browser test's target
    assert _tab_figures(dash, "Churn & reuse") == [dash.figures["churn"], dash.figures["reuse"]]
    assert dash.tabs in dash.widget.children
    with pytest.raises(ValueError, match="no tab 'Predictors'"):
        dash.select_tab("Predictors")


def _reuse_lines(dash: Dashboard) -> dict[str, np.ndarray]:
    """The reuse figure's curves by axis and style: (footprint|new, data|random)."""
    out = {}
    for t in dash.figures["reuse"].data:
        which = "footprint" if t.xaxis in (None, "x") else "new"
        kind = "random" if t.line.dash == "dash" else "data"
        out[f"{which}_{kind}"] = np.asarray(t.y, dtype=float)
    return out


def test_reuse_curves_follow_the_rule_and_wait_for_their_tab():
    trace = _synthetic_trace()
    dash = sl.dashboard(trace, layer=2, rule="TopK", value=0.5)
    assert dash.windows == (1, 2, 4, 8, 16)  # 32 does not fit in 20-token sequences
    before = _reuse_lines(dash)
    dash.set(value=0.2)  # the Masks tab is shown: the reuse figure waits
    np.testing.assert_array_equal(_reuse_lines(dash)["footprint_data"], before["footprint_data"])
    dash.select_tab("Churn & reuse")

    # independent reference: the union of the last k masks, straight from numpy
    ref = trace.masks(rules.TopK(keep=0.2)).layer(2).reshape(2, 20, -1)  # [seq, pos, neurons]
    for i, k in enumerate(dash.windows):
        footprint = np.mean([ref[s, t - k + 1 : t + 1].any(0).mean() for s in range(2) for t in range(k, 20)])
        new = np.mean([(ref[s, t] & ~ref[s, t - k : t].any(0)).mean() for s in range(2) for t in range(k, 20)])
        lines = _reuse_lines(dash)
        assert lines["footprint_data"][i] == pytest.approx(footprint)
        assert lines["new_data"][i] == pytest.approx(new)
        assert lines["footprint_random"][i] == pytest.approx(1 - (1 - 0.2) ** k, abs=0.02)
    dash.set(value=0.6)  # now shown: updated at once
    assert _reuse_lines(dash)["footprint_data"][0] == pytest.approx(0.6, abs=0.01)
    assert "TopK" in dash.figures["reuse"].layout.title.text


def _toy_predictors(trace: Trace, rank: int = 4):
    from sparselab.prediction import Policy, Predictors

    g = torch.Generator().manual_seed(1)
    hidden, n = trace.arrays["mlp_in"].shape[-1], trace.n_neurons
    weights = {
        layer: (torch.randn(rank, hidden, generator=g), torch.randn(n, rank, generator=g), torch.randn(n, generator=g))
        for layer in trace.layers
    }
    return Predictors(weights, rules.TopK(keep=0.3), policy=Policy("top_k", 0.3))


def test_predictors_tab_is_computed_when_first_opened():
    trace = _synthetic_trace(hidden=8)
    predictors = _toy_predictors(trace)
    dash = sl.dashboard(trace, predictors=predictors)
    assert dash.tab_titles == ("Masks", "Churn & reuse", "Predictors")
    assert dash.predictor_quality is None and "predictors" not in dash.figures  # lazy
    dash.select_tab("Predictors")
    assert dash.predictor_quality is not None
    fig = dash.figures["predictors"]
    assert fig in _tab_figures(dash, "Predictors")
    bars = {t.name: np.asarray(t.y, dtype=float) for t in fig.data if t.type == "bar"}
    assert set(bars) == {"recall", "precision", "F1", "|h| mass kept"}
    for i, layer in enumerate(trace.layers):  # numpy recomputation of each bar
        pred = predictors.mask(layer, trace.mlp_inputs(layer)).numpy()
        label = rules.TopK(keep=0.3).mask(trace.activations(layer), layer).numpy()
        mags = np.abs(trace.activations(layer).double().numpy())
        tp = (pred & label).sum()
        assert bars["recall"][i] == pytest.approx(tp / label.sum())
        assert bars["precision"][i] == pytest.approx(tp / pred.sum())
        assert bars["F1"][i] == pytest.approx(2 * tp / (pred.sum() + label.sum()))
        assert bars["|h| mass kept"][i] == pytest.approx(mags[pred].sum() / mags.sum())
    quality = dash.predictor_quality
    dash.select_tab("Masks")
    dash.select_tab("Predictors")
    assert dash.predictor_quality is quality  # evaluated once


def test_live_tab_needs_model_and_tokenizer_together():
    with pytest.raises(ValueError, match="both model= and tokenizer="):
        sl.dashboard(_synthetic_trace(), model=object())
    with pytest.raises(TypeError, match="sl.Predictors"):
        sl.dashboard(_synthetic_trace(), predictors=object())
    with pytest.raises(ValueError, match="without model="):
        sl.dashboard(_synthetic_trace()).generate("hello")


def test_report_writes_the_shown_figures(tmp_path):
    dash = sl.dashboard(_synthetic_trace(), layer=1)
    path = dash.report(tmp_path / "dash.html")
    text = path.read_text()
    assert text.count("Plotly.newPlot") == 4  # density, heatmap, churn, reuse
    assert "Windowed neuron reuse, layer 1" in text


@pytest.mark.slow
def test_live_tab_generates_on_the_real_model(real_model, small_trace):
    model, tok = real_model
    dash = sl.dashboard(small_trace, layer=10, model=model, tokenizer=tok)
    assert dash.tab_titles[-1] == "Live sparse generation"
    assert dash.live_controls["mode"].options == ("oracle", "static")  # no predictors given
    for name in ("prompt", "density", "max_new_tokens", "generate"):
        assert f"sparselab-live-{name.replace('_', '-')}" in dash.live_controls[name]._dom_classes
    result = dash.generate("The list type", mode="static", density=0.25, max_new_tokens=3)
    static = sl.prediction.static_from_trace(small_trace, density=0.25)
    layer = dash.live_controls["layer"].value
    heat = dash.figures["live_heatmap"].data[0]
    shown = np.array([int(x) for x in heat.x])
    # static mode computes the same neuron set at every step: exactly the trace's frequent ones
    expected = np.isin(shown, static[layer])
    np.testing.assert_array_equal(np.asarray(heat.z, dtype=bool), np.tile(expected, (result.n_steps, 1)))
    import html

    assert html.escape(result.text) in dash._live_text.value
    assert result.dense_text is not None and html.escape(result.dense_text) in dash._live_text.value
    split = dash.figures["live_time"]
    assert len(split.data) == 5 and {t.type for t in split.data} == {"bar"}
    dash.live_controls["layer"].value = small_trace.layers[0]
    assert f"Layer {small_trace.layers[0]}" in dash.figures["live_heatmap"].layout.title.text
    assert np.isfinite(dash.last_live_update_seconds)


# ----------------------------------------------------------------------------- live


def _stats(steps: int = 3, layers: tuple[int, ...] = (0, 4)) -> pd.DataFrame:
    """A hand-made stats frame in the runtime's shape (decode rows only)."""
    rows = []
    for s in range(1, steps + 1):
        for layer in layers:
            rows.append({
                "step": s, "layer": layer, "phase": "decode", "active": 10 * s + layer,
                "density": (10 * s + layer) / 100, "added": s, "removed": layer,
                "rows_copied": 2 * s, "bytes_moved": 100 * s,
                "t_predictor_ns": 1_000_000, "t_mask_ns": 2_000_000 * s, "t_cache_ns": 0,
                "t_mlp_ns": 3_000_000,
            })
    return pd.DataFrame(rows)


def test_time_split_sums_components_and_keeps_the_rest_of_the_step():
    stats = _stats()
    wall = pd.DataFrame({"step": [0, 1, 2, 3], "phase": ["prefill"] + ["decode"] * 3,
                         "wall_ns": [50_000_000, 20_000_000, 20_000_000, 5_000_000]})
    split = live.time_split(stats, wall)
    table = split.pivot(index="step", columns="component", values="ms")
    # two layers: predictor 2 ms, mask 4 s ms, mlp 6 ms; the rest is wall - their sum, >= 0
    np.testing.assert_allclose(table["predictor"], [2, 2, 2])
    np.testing.assert_allclose(table["mask + union"], [4, 8, 12])
    np.testing.assert_allclose(table["sparse MLP"], [6, 6, 6])
    np.testing.assert_allclose(table["rest of the model"], [20 - 12, 20 - 16, 0])
    assert list(split["component"].cat.categories)[-1] == "rest of the model"
    assert "rest of the model" not in set(live.time_split(stats)["component"])  # no wall times


def test_cache_traffic_sums_over_layers():
    traffic = live.cache_traffic(_stats())
    assert traffic["step"].tolist() == [1, 2, 3]
    assert traffic["rows_copied"].tolist() == [4, 8, 12]
    assert traffic["changed"].tolist() == [2 * s + 4 for s in (1, 2, 3)]  # added 2s + removed 0 + 4
    with pytest.raises(ValueError, match="rows_copied"):
        live.cache_traffic(_stats().drop(columns="rows_copied"))


def test_figures_on_small_frames():
    stats = _stats()
    fig = figures_live.step_layer_density(stats)
    np.testing.assert_allclose(fig.data[0].z, [[0.10, 0.14], [0.20, 0.24], [0.30, 0.34]])
    assert list(fig.data[0].x) == [0, 4] and fig.layout.yaxis.title.text == "decode step"

    fig = figures_live.cache_traffic_bars(live.cache_traffic(stats))
    assert [t.type for t in fig.data] == ["bar", "scatter"]
    assert list(fig.data[0].y) == [4, 8, 12] and "cache" in fig.layout.title.text.lower()

    split = live.time_split(stats)
    fig = figures_live.time_split_bars(split)
    assert fig.layout.barmode == "stack"
    assert [t.name for t in fig.data] == ["predictor", "mask + union", "cache update", "sparse MLP"]
    np.testing.assert_allclose(np.sum([t.y for t in fig.data], axis=0), [12, 16, 20])
    assert fig.layout.yaxis.title.text == "time (ms)"

    quality = pd.DataFrame({"layer": [3, 1], "recall": [0.9, 0.8], "precision": [0.5, 0.6], "f1": [0.64, 0.69],
                            "mass_kept": [0.95, 0.9], "predicted_density": [0.4, 0.3]})
    fig = figures_live.predictor_quality(quality)
    assert [t.name for t in fig.data] == ["recall", "precision", "F1", "|h| mass kept", "predicted density"]
    assert list(fig.data[0].x) == [1, 3] and list(fig.data[0].y) == [0.8, 0.9]  # sorted by layer
    with pytest.raises(ValueError, match="mass_kept"):
        figures_live.predictor_quality(quality.drop(columns="mass_kept"))


def test_step_heatmap_shows_the_layer_rows():
    rng = np.random.default_rng(0)
    dense = rng.random((2, 5, 40)) < 0.3
    masks = Masks.from_bool(dense, layers=(2, 7))
    fig = figures_live.step_heatmap(masks, layer=7, pieces=list("abcde"))
    cols = np.array([int(x) for x in fig.data[0].x])
    np.testing.assert_array_equal(fig.data[0].z, dense[1][:, cols])
    assert fig.data[0].y[0].endswith("a") and "Layer 7" in fig.layout.title.text
    with pytest.raises(ValueError, match="not sparsified"):
        figures_live.step_heatmap(masks, layer=3)


def test_sparse_generate_checks_arguments_before_touching_the_model():
    with pytest.raises(ValueError, match="unknown mode"):
        live.sparse_generate(None, None, "hi", mode="magic")
    with pytest.raises(ValueError, match="density"):
        live.sparse_generate(None, None, "hi", density=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        live.sparse_generate(None, None, "hi", max_new_tokens=1)
    with pytest.raises(ValueError, match="predictors="):
        live.sparse_generate(None, None, "hi", mode="predicted")
    with pytest.raises(ValueError, match="prompt"):
        live.sparse_generate(None, None, "  ")


@pytest.mark.slow
def test_sparse_generate_on_the_real_model(real_model):
    model, tok = real_model
    probe = tok("A list is", return_tensors="pt")
    with torch.inference_mode():
        before = model(**probe).logits
    result = live.sparse_generate(model, tok, "A list is", mode="oracle", density=0.5, max_new_tokens=4)

    assert isinstance(result.text, str) and result.text.strip()
    assert len(result.tokens) == 4 and result.n_steps == 3  # the first token comes from the prompt
    n_layers = len(result.layers)
    assert n_layers == 30
    stats = result.stats
    assert len(stats) == 3 * n_layers and not stats.duplicated(["step", "layer"]).any()
    assert (stats["phase"] == "decode").all() and sorted(stats["step"].unique()) == [1, 2, 3]
    assert (stats["rows_copied"] >= 0).all()
    # oracle TopK(0.5): each step computes exactly half of the 1536 neurons in every layer,
    # and the masks kept per step agree with the runtime's own counts and churn
    np.testing.assert_array_equal(result.masks.counts(), np.full((n_layers, 3), 768))
    ordered = stats.sort_values(["layer", "step"])
    np.testing.assert_array_equal(ordered["active"].to_numpy().reshape(n_layers, 3), result.masks.counts())
    churn = sl.metrics.churn(result.masks).sort_values(["layer", "token"])
    later = ordered[ordered["step"] > 1]
    np.testing.assert_array_equal(churn["added"].to_numpy(), later["added"].to_numpy())
    assert list(result.step_times["phase"]) == ["prefill", "decode", "decode", "decode"]
    assert set(live.time_split(result)["component"]) >= {"sparse MLP", "rest of the model"}

    assert not sl.runtime.is_sparsified(model)
    with torch.inference_mode():
        after = model(**probe).logits
    assert torch.equal(before, after)  # dense again, bit for bit
