"""Chunked analysis (sparselab.masking.chunked) against the in-memory functions on the
same data: thresholds exact for fp16 and float32, masks bit-identical for every rule,
every metric frame equal; on in-memory traces and on a Zarr store with odd chunks.

    pytest -q tests/test_chunked.py
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import sparselab as sl
from sparselab.masking.chunked import chunked_masks, chunked_thresholds
from sparselab.masking.rules import calibrated_thresholds
from sparselab.masking.thresholds import MagnitudeIndex
from sparselab.studies.scale import analyze

DENSITIES = [0.05, 0.3, 0.5, 0.77, 1.0]


def random_trace(dtype=torch.float16, tokens=203, neurons=70, hidden=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, tokens, neurons, generator=g) * torch.linspace(0.1, 3, neurons)
    h[:, ::7, :5] = 0.25  # ties on the threshold
    seqs = np.repeat(np.arange(7), 29)[:tokens]
    positions = np.concatenate([np.arange((seqs == s).sum()) for s in np.unique(seqs)])
    return sl.Trace(
        layers=(0, 2, 5),
        arrays={"h": h.to(dtype), "gate": (h * 0.5).abs().to(dtype),
                "mlp_in": torch.randn(3, tokens, hidden, generator=g)},
        token_ids=np.arange(tokens), seq_ids=seqs, positions=positions,
        steps=np.zeros(tokens, int), is_prefill=np.ones(tokens, bool),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_thresholds_are_exact(dtype):
    trace = random_trace(dtype)
    for source in ("h", "gate", "mlp_in"):
        expected = calibrated_thresholds(trace, source, DENSITIES)
        for chunk in (1000, 13, 64):
            assert chunked_thresholds(trace, source, DENSITIES, chunk_tokens=chunk) == expected
        # and against a direct order statistic (independent of MagnitudeIndex)
        mags = np.sort(trace.arrays[source][1].float().abs().numpy().ravel())
        drop = int(round(0.7 * mags.size))
        assert chunked_thresholds(trace, source, [0.3])[0.3][2] == mags[drop - 1]
        assert MagnitudeIndex(trace.arrays[source]).threshold(1, 0.3) == mags[drop - 1]


RULES = [sl.rules.Calibrated(density=0.3), sl.rules.GateThreshold(density=0.6), sl.rules.TopK(keep=0.2),
         sl.rules.TopK(keep=9), sl.rules.MassCoverage(p=0.8), sl.rules.Threshold(tau=0.25)]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    trace = random_trace()
    path = tmp_path_factory.mktemp("chunked") / "t.zarr"
    from sparselab.recording.zarr_store import write_zarr

    write_zarr(trace, path, chunk_tokens=11)
    return trace, sl.Trace.open(path)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.label)
def test_masks_bit_identical(stored, rule):
    trace, lazy = stored
    expected = trace.masks(rule)
    for source in (trace, lazy):
        got = chunked_masks(source, rule, chunk_tokens=17)
        np.testing.assert_array_equal(got.bits, expected.bits)
        assert got.rule == expected.rule
    np.testing.assert_array_equal(lazy.masks(rule).bits, expected.bits)  # Trace API, lazily


def test_analyze_equals_in_memory_metrics(stored):
    trace, lazy = stored
    rule = sl.rules.Calibrated(density=0.4)
    out = analyze(lazy, rule, windows=(1, 3, 8), batch_sizes=(1, 4), hot_fractions=(0.1, 0.5))
    masks = trace.masks(rule)
    np.testing.assert_array_equal(out["masks"].bits, masks.bits)
    pd.testing.assert_frame_equal(out["density"], sl.metrics.density(masks))
    pd.testing.assert_frame_equal(out["churn"], sl.metrics.churn(masks))
    pd.testing.assert_frame_equal(out["window_reuse"], sl.metrics.window_reuse(masks, (1, 3, 8)))
    pd.testing.assert_frame_equal(out["neuron_frequency"], sl.metrics.neuron_frequency(masks))
    pd.testing.assert_frame_equal(out["batch_union"], sl.metrics.batch_union(masks, (1, 4)))
    # hot sets: the most frequent 10 % of neurons, coverage recomputed by hand
    dense = masks.to_bool()
    counts = dense.sum(axis=1)
    hot = out["hot_sets"].query("fraction == 0.1")
    for li, layer in enumerate(masks.layers):
        top = np.argsort(-counts[li], kind="stable")[:7]
        row = hot[hot.layer == layer].iloc[0]
        assert row.n_hot == 7
        assert row.coverage == pytest.approx(counts[li, top].sum() / counts[li].sum())
