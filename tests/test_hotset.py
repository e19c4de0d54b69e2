"""sl.hotset against a hand-computed example, numpy recomputation and a synthetic trace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparselab.masking import rules
from sparselab.masking.masks import Masks
from sparselab.recording import Trace
from sparselab.studies import hotset

# train counts per neuron [3, 1, 2, 0]; test counts [1, 1, 0, 2]
TRAIN = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=bool)
TEST = np.array([[0, 1, 0, 1], [1, 0, 0, 1]], dtype=bool)


def test_hot_neurons_rank_by_count_then_index():
    hot = hotset.hot_neurons(Masks.from_bool(TRAIN), 0.5)
    assert hot.tolist() == [[True, False, True, False]]
    tied = hotset.hot_neurons(Masks.from_bool(np.ones((2, 4), dtype=bool)), 0.5)
    assert tied.tolist() == [[True, True, False, False]]


def test_hit_rate_hand_example():
    df = hotset.hit_rate(Masks.from_bool(TRAIN), Masks.from_bool(TEST), fractions=(0.25, 0.5))
    half = df[df.fraction == 0.5].iloc[0]
    # hot set {0, 2}: covers 5 of 6 train activations, 1 of 4 test activations; the test
    # texts' own best pair is {3, 0} (neuron 0 wins the tie with 1 by index): 3 of 4
    assert half.n_hot == 2
    assert half.in_sample == pytest.approx(5 / 6)
    assert half.held_out == pytest.approx(1 / 4)
    assert half.oracle == pytest.approx(3 / 4)
    assert half.random == 0.5
    quarter = df[df.fraction == 0.25].iloc[0]
    assert (quarter.in_sample, quarter.held_out, quarter.oracle) == pytest.approx((3 / 6, 1 / 4, 2 / 4))


@settings(max_examples=30, deadline=None)
@given(arrays(bool, st.tuples(st.just(2), st.integers(1, 6), st.integers(1, 130))),
       arrays(bool, st.tuples(st.just(2), st.integers(1, 6), st.integers(1, 130))),
       st.floats(0.01, 1.0))
def test_hit_rate_matches_numpy_and_is_bounded_by_the_oracle(train, test, fraction):
    n = min(train.shape[2], test.shape[2])
    train_m = Masks.from_bool(train[..., :n], layers=[3, 9])
    test_m = Masks.from_bool(test[..., :n], layers=[3, 9])
    df = hotset.hit_rate(train_m, test_m, fractions=(fraction,))
    hot = hotset.hot_neurons(train_m, fraction)
    for li in range(2):
        row = df.iloc[li]
        for part, column in ((train[li, :, :n], "in_sample"), (test[li, :, :n], "held_out")):
            total = part.sum()
            expected = (part & hot[li]).sum() / total if total else np.nan
            np.testing.assert_allclose(row[column], expected)
        if test[li, :, :n].sum():
            assert row.held_out <= row.oracle + 1e-12
        assert row.random == pytest.approx(row.n_hot / n)


def _trace(n_seq: int = 4, length: int = 6, n: int = 70) -> Trace:
    gen = torch.Generator().manual_seed(0)
    # sequence s has magnitudes scaled by s + 1: a threshold fitted on all texts would
    # differ from one fitted on the training texts only
    h = torch.randn(2, n_seq * length, n, generator=gen)
    h *= torch.arange(1, n_seq + 1).repeat_interleave(length)[None, :, None]
    seq = np.repeat(np.arange(n_seq), length)
    return Trace(layers=(0, 4), arrays={"h": h.half()}, token_ids=np.zeros(n_seq * length),
                 seq_ids=seq, positions=np.tile(np.arange(length), n_seq), steps=np.zeros(n_seq * length),
                 is_prefill=np.ones(n_seq * length, dtype=bool))


def test_held_out_masks_split_texts_and_fit_on_training_texts_only():
    trace = _trace()
    train, test = hotset.held_out_masks(trace, rules.Calibrated(density=0.3), held_out=0.25)
    assert set(train.seq_ids) == {0, 1, 2} and set(test.seq_ids) == {3}
    fitted = rules.Calibrated(density=0.3).fit(trace.select_sequences([0, 1, 2]))
    assert train.rule == test.rule == fitted.describe()
    for layer in trace.layers:
        values = trace.select_sequences([3]).activations(layer).abs()
        np.testing.assert_array_equal(test.layer(layer), (values > fitted.thresholds[layer]).numpy())
    # the held-out text is louder, so the training thresholds keep more of it
    assert test.density().mean() > 0.3 > train.density().mean() - 0.01


def test_held_out_masks_with_a_rule_that_needs_no_fit():
    trace = _trace()
    train, test = hotset.held_out_masks(trace, rules.TopK(keep=7), held_out=0.5)
    assert set(train.seq_ids) == {0, 2} and set(test.seq_ids) == {1, 3}
    np.testing.assert_array_equal(test.bits, trace.select_sequences([1, 3]).masks(rules.TopK(keep=7)).bits)
    assert (test.counts() == 7).all()


def test_clear_errors():
    m = Masks.from_bool(TRAIN)
    with pytest.raises(ValueError, match="fractions"):
        hotset.hit_rate(m, m, fractions=(0.0, 0.5))
    with pytest.raises(ValueError, match="different layers"):
        hotset.hit_rate(m, Masks.from_bool(TRAIN, layers=[2]))
    with pytest.raises(TypeError, match="Masks"):
        hotset.hot_neurons(TRAIN, 0.5)
    with pytest.raises(ValueError, match="at least 2 sequences"):
        hotset.held_out_masks(_trace(n_seq=1), rules.TopK(keep=0.5))
