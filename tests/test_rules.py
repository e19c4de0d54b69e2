"""Mask rules (sparselab.rules) against hand-computed masks and numpy recomputation.

    pytest -q tests/test_rules.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparselab.masking import rules
from sparselab.masking.masks import Masks
from sparselab.masking.rules import Calibrated, GateThreshold, MassCoverage, Threshold, TopK
from sparselab.recording import Trace

# -- helpers ----------------------------------------------------------------------------


def synthetic_trace(
    seed: int = 0,
    layers=(0, 3, 4),
    n_tokens: int = 60,
    n_neurons: int = 50,
    dtype: torch.dtype = torch.float32,
) -> Trace:
    """A trace with random h and gate; layer k is scaled by 10**k so that one global
    threshold would be wrong and per-layer calibration visibly matters."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([10.0**k for k in range(len(layers))])[:, None, None]
    h = torch.randn(len(layers), n_tokens, n_neurons, generator=g) * scale
    gate = torch.randn(len(layers), n_tokens, n_neurons, generator=g) * scale
    seq = np.repeat([0, 1], [n_tokens // 2, n_tokens - n_tokens // 2])
    pos = np.concatenate([np.arange(n_tokens // 2), np.arange(n_tokens - n_tokens // 2)])
    return Trace(
        layers=layers,
        arrays={"h": h.to(dtype), "gate": gate.to(dtype)},
        token_ids=np.arange(n_tokens),
        seq_ids=seq,
        positions=pos,
        steps=np.zeros(n_tokens),
        is_prefill=np.ones(n_tokens, dtype=bool),
    )


def numpy_order_statistic(values: np.ndarray, density: float) -> float:
    """Independent recomputation: the drop-th smallest |value|, drop = round((1-d) * n)."""
    flat = np.sort(np.abs(values).ravel())
    drop = int(round((1.0 - density) * flat.size))
    return -np.inf if drop == 0 else float(flat[drop - 1])


def as_np(mask: torch.Tensor) -> np.ndarray:
    assert mask.dtype == torch.bool
    return mask.numpy()


# -- Threshold --------------------------------------------------------------------------


def test_threshold_hand_example():
    values = torch.tensor([[0.1, -0.3, 0.05, 0.0], [-0.06, 0.049, 2.0, -0.05]])
    got = as_np(Threshold(tau=0.05).mask(values, layer=0))
    assert got.tolist() == [[True, True, False, False], [True, False, True, False]]


def test_threshold_zero_keeps_nonzero_only():
    values = torch.tensor([[0.0, 1e-8, -1e-8, 0.0]])
    assert as_np(Threshold(tau=0.0).mask(values, 0)).tolist() == [[False, True, True, False]]


def test_threshold_on_trace_matches_numpy_per_layer():
    trace = synthetic_trace()
    masks = trace.masks(Threshold(tau=0.7))
    assert isinstance(masks, Masks) and masks.layers == trace.layers
    for i, layer in enumerate(trace.layers):
        np.testing.assert_array_equal(masks.layer(layer), np.abs(trace.arrays["h"][i].numpy()) > 0.7)
    np.testing.assert_array_equal(masks.seq_ids, trace.seq_ids)
    np.testing.assert_array_equal(masks.positions, trace.positions)
    assert masks.rule == {"name": "Threshold", "source": "h", "tau": 0.7}


# -- TopK -------------------------------------------------------------------------------


def test_topk_fraction_hand_example():
    values = torch.tensor(
        [
            [0.1, -0.9, 0.3, 0.2, -0.05, 0.8, 0.0, 0.4],
            [5.0, 4.0, -3.0, 2.0, 1.0, 0.5, 0.25, -6.0],
        ]
    )
    got = as_np(TopK(keep=0.25).mask(values, 0))  # 2 of 8 per token, by magnitude
    assert np.flatnonzero(got[0]).tolist() == [1, 5]
    assert np.flatnonzero(got[1]).tolist() == [0, 7]


def test_topk_count_hand_example():
    values = torch.tensor([[0.1, -0.9, 0.3, 0.2, -0.05, 0.8, 0.0, 0.4]])
    got = as_np(TopK(keep=3).mask(values, 0))
    assert np.flatnonzero(got[0]).tolist() == [1, 5, 7]


def test_topk_fraction_one_keeps_all():
    values = torch.randn(3, 7)
    assert as_np(TopK(keep=1.0).mask(values, 0)).all()


@settings(deadline=None, max_examples=40)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(2, 40)), unique=True,
           elements=st.floats(-100, 100, width=32)),
    st.floats(0.05, 1.0),
)
def test_topk_matches_argsort_reference(values, keep):
    n = values.shape[1]
    k = int(round(keep * n))
    got = as_np(TopK(keep=keep).mask(torch.from_numpy(values), 0))
    ref = np.zeros_like(got)
    # unique values, but +x and -x tie in magnitude: the reference must only check sizes
    # and that every kept |value| >= every dropped one
    assert (got.sum(1) == k).all()
    for row, mask in zip(np.abs(values), got, strict=True):
        if mask.any() and (~mask).any():
            assert row[mask].min() >= row[~mask].max()
    order = np.argsort(-np.abs(values), axis=1, kind="stable")[:, :k]
    np.put_along_axis(ref, order, True, axis=1)
    distinct_mags = np.array([len(np.unique(np.abs(r))) == n for r in values])
    np.testing.assert_array_equal(got[distinct_mags], ref[distinct_mags])


def test_topk_count_larger_than_layer_is_an_error():
    with pytest.raises(ValueError, match="keeps 9 neurons but the layer has 8"):
        TopK(keep=9).mask(torch.randn(2, 8), 0)


# -- MassCoverage -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, p, kept",
    [
        ([4.0, 3.0, 2.0, 1.0], 0.7, [0, 1]),  # 4 + 3 = 7 = 0.7 of 10
        ([4.0, 3.0, 2.0, 1.0], 0.39, [0]),  # 4 alone holds 0.4
        ([4.0, 3.0, 2.0, 1.0], 0.41, [0, 1]),
        ([4.0, 3.0, 2.0, 1.0], 0.95, [0, 1, 2, 3]),  # 9 of 10 is not enough
        ([1.0, 2.0, 3.0, 4.0], 0.7, [2, 3]),  # order of neurons does not matter
        ([-4.0, 1.0, 3.0, -2.0], 0.5, [0, 2]),  # magnitudes: 4 + 3 >= 5
        ([0.0, 5.0, 0.0, 5.0], 1.0, [1, 3]),  # zeros are never needed for the mass
    ],
)
def test_mass_coverage_hand_examples(values, p, kept):
    got = as_np(MassCoverage(p=p).mask(torch.tensor([values]), 0))
    assert np.flatnonzero(got[0]).tolist() == kept


@settings(deadline=None, max_examples=60)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 30)),
           elements=st.floats(-10, 10, width=32)),
    st.floats(0.05, 1.0),
)
def test_mass_coverage_is_smallest_set_holding_p(values, p):
    got = as_np(MassCoverage(p=p).mask(torch.from_numpy(values), 0))
    mags = np.abs(values.astype(np.float64))
    for row, mask in zip(mags, got, strict=True):
        total = row.sum()
        assert mask.sum() >= 1
        if total == 0:
            continue
        kept = np.sort(row[mask])
        rtol = 1e-5  # float32 cumulative sums inside the rule
        # enough mass ...
        assert kept.sum() >= p * total * (1 - rtol)
        # ... no smaller set would do: without the smallest kept neuron, too little mass
        assert kept[1:].sum() < p * total * (1 + rtol) or kept[0] == 0
        # ... and the kept neurons are the largest ones
        if (~mask).any():
            assert kept[0] >= row[~mask].max()


# -- Calibrated / GateThreshold ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.73])
@pytest.mark.parametrize("cls, source", [(Calibrated, "h"), (GateThreshold, "gate")])
def test_calibrated_thresholds_match_numpy_order_statistic(cls, source, density, dtype):
    trace = synthetic_trace(dtype=dtype)
    fitted = cls(density=density).fit(trace)
    assert fitted.fitted and not cls(density=density).fitted
    assert fitted.source == source
    assert sorted(fitted.thresholds) == list(trace.layers)
    for i, layer in enumerate(trace.layers):
        values = trace.arrays[source][i].float().numpy()
        assert fitted.thresholds[layer] == pytest.approx(numpy_order_statistic(values, density))
        # density of the mask hits the target up to ties at the threshold
        kept = (np.abs(values) > fitted.thresholds[layer]).mean()
        ties = (np.abs(values) == fitted.thresholds[layer]).mean()
        assert abs(kept - density) <= ties + 1.0 / values.size
    # thresholds differ by orders of magnitude between layers (the data was scaled by 10**k)
    t = [fitted.thresholds[layer] for layer in trace.layers]
    assert t[0] < t[1] < t[2]


def test_calibrated_density_exact_without_ties():
    trace = synthetic_trace()  # float32 normal draws: no ties
    masks = trace.masks(Calibrated(density=0.3))
    expected = round(0.3 * trace.n_tokens * trace.n_neurons) / (trace.n_tokens * trace.n_neurons)
    for i in range(trace.n_layers):
        assert masks.density()[i].mean() == pytest.approx(expected)


def test_gate_threshold_reads_gate_not_h():
    trace = synthetic_trace()
    masks = trace.masks(GateThreshold(density=0.5))
    fitted = GateThreshold(density=0.5).fit(trace)
    for i, layer in enumerate(trace.layers):
        ref = np.abs(trace.arrays["gate"][i].numpy()) > fitted.thresholds[layer]
        np.testing.assert_array_equal(masks.layer(layer), ref)
    assert masks.rule["name"] == "GateThreshold" and masks.rule["source"] == "gate"


def test_density_one_keeps_everything():
    trace = synthetic_trace()
    assert trace.masks(Calibrated(density=1.0)).to_bool().all()


def test_fitted_rule_applies_to_another_trace_without_refitting():
    fit_on, apply_to = synthetic_trace(seed=1), synthetic_trace(seed=2)
    fitted = Calibrated(density=0.4).fit(fit_on)
    masks = apply_to.masks(fitted)
    for i, layer in enumerate(apply_to.layers):
        ref = np.abs(apply_to.arrays["h"][i].numpy()) > fitted.thresholds[layer]
        np.testing.assert_array_equal(masks.layer(layer), ref)
    assert masks.rule["thresholds"] == {str(k): v for k, v in fitted.thresholds.items()}
    # the thresholds came from the other trace: they are not this trace's own quantiles
    own = Calibrated(density=0.4).fit(apply_to).thresholds
    assert own != fitted.thresholds
    # and applying the rule directly to live values gives the same mask
    live = fitted.mask(apply_to.activations(3), layer=3)
    np.testing.assert_array_equal(live.numpy(), masks.layer(3))


def test_unfitted_rule_fitted_on_the_trace_it_is_applied_to():
    trace = synthetic_trace()
    direct = trace.masks(Calibrated(density=0.25))
    fitted = trace.masks(Calibrated(density=0.25).fit(trace))
    np.testing.assert_array_equal(direct.bits, fitted.bits)
    assert direct.rule == fitted.rule and direct.rule["thresholds"]


def test_unfitted_mask_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no threshold for layer 2.*\.fit\(trace\)"):
        Calibrated(density=0.5).mask(torch.randn(3, 4), layer=2)
    fitted = GateThreshold(density=0.5).fit(synthetic_trace(layers=(0, 1)))
    with pytest.raises(ValueError, match=r"fitted layers: \[0, 1\]"):
        fitted.mask(torch.randn(3, 50), layer=7)


def test_rule_on_unrecorded_array_is_a_clear_error():
    trace = synthetic_trace()
    del trace.arrays["gate"]
    with pytest.raises(KeyError, match="'gate' was not recorded"):
        trace.masks(GateThreshold(density=0.5))


def test_apply_rule_rejects_non_rules():
    with pytest.raises(TypeError, match="expected a sparselab.rules rule"):
        synthetic_trace().masks({"name": "TopK", "keep": 0.5})


# -- parameters and descriptions --------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Threshold(tau=-0.1), "tau must be >= 0"),
        (lambda: Threshold(tau=float("nan")), "tau must be >= 0"),
        (lambda: TopK(keep=0), "keep must be"),
        (lambda: TopK(keep=-3), "keep must be"),
        (lambda: TopK(keep=float("nan")), "keep must be"),
        (lambda: TopK(keep=2.5), "keep must be"),
        (lambda: Calibrated(density=0.0), "density must be in \\(0, 1\\]"),
        (lambda: Calibrated(density=1.5), "density must be in \\(0, 1\\]"),
        (lambda: GateThreshold(density=-0.2), "density must be in \\(0, 1\\]"),
        (lambda: MassCoverage(p=0.0), "p must be in \\(0, 1\\]"),
        (lambda: MassCoverage(p=1.01), "p must be in \\(0, 1\\]"),
        (lambda: MassCoverage(p=float("nan")), "p must be in \\(0, 1\\]"),
    ],
)
def test_invalid_parameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "rule",
    [
        Threshold(tau=0.02),
        TopK(keep=0.3),
        TopK(keep=17),
        MassCoverage(p=0.9),
        Calibrated(density=0.5),
        Calibrated(density=0.5).fit(synthetic_trace()),
        GateThreshold(density=0.35).fit(synthetic_trace()),
    ],
)
def test_rule_from_dict_round_trip(rule):
    spec = rule.describe()
    assert spec["name"] == type(rule).__name__ and spec["source"] == rule.source
    again = rules.rule_from_dict(json.loads(json.dumps(spec)))
    assert again == rule and type(again) is type(rule)
    if isinstance(rule, Calibrated) and rule.fitted:
        assert all(isinstance(k, int) for k in again.thresholds)


def test_rule_from_dict_unknown_name():
    with pytest.raises(ValueError, match="unknown rule 'Magic'"):
        rules.rule_from_dict({"name": "Magic"})


def test_labels():
    assert TopK(keep=0.3).label == "TopK(keep=0.3)"
    assert Calibrated(density=0.5).fit(synthetic_trace()).label == "Calibrated(density=0.5)"
    assert Threshold(tau=0.05).label == "Threshold(tau=0.05)"
