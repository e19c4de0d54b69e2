"""sl.independence against hand-computed examples and brute-force enumeration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparselab import metrics
from sparselab.masking.masks import Masks
from sparselab.studies import independence


def _masks(dense: np.ndarray, seq_ids=None) -> Masks:
    return Masks.from_bool(dense, seq_ids=seq_ids, positions=None if seq_ids is None else
                           np.concatenate([np.arange(c) for c in np.bincount(seq_ids)]),
                           rule={"name": "hand"})


def test_hand_example_one_hot_one_cold_neuron():
    # neuron 0 fires at every token, neuron 1 never: p = 0.5, but the union of any batch
    # is exactly neuron 0, and no token ever needs a neuron its predecessors did not
    dense = np.zeros((4, 2), dtype=bool)
    dense[:, 0] = True
    df = independence.frequency_model(_masks(dense), sizes=(1, 2)).set_index("size")
    assert df.loc[1, "density"] == 0.5
    assert df.loc[2, "independent"] == pytest.approx(0.75)
    assert df.loc[2, "independent_new"] == pytest.approx(0.125)
    assert df.loc[1, "frequency_union"] == pytest.approx(0.5)
    assert df.loc[2, "frequency_union"] == pytest.approx(0.5)
    assert df.loc[2, "frequency_new"] == pytest.approx(0.0)


def test_equal_frequencies_reduce_to_the_uniform_model():
    # every neuron fires in exactly half the tokens: both models coincide
    dense = np.array([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=bool)
    df = independence.frequency_model(_masks(dense), sizes=(1, 3, 5))
    np.testing.assert_allclose(df.frequency_union, df.independent)
    np.testing.assert_allclose(df.frequency_new, df.independent_new)


def _brute_force(dense: np.ndarray, b: int) -> tuple[float, float]:
    """Exact expectations over all ordered draws (with replacement) of tokens."""
    t, n = dense.shape
    union = np.mean([dense[list(idx)].any(axis=0).sum() / n
                     for idx in itertools.product(range(t), repeat=b)])
    new = np.mean([(dense[idx[-1]] & ~dense[list(idx[:-1])].any(axis=0)).sum() / n
                   for idx in itertools.product(range(t), repeat=b + 1)])
    return float(union), float(new)


@settings(max_examples=25, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 4), st.integers(1, 70))), st.integers(1, 3))
def test_matches_enumeration_of_independent_token_draws(dense, b):
    df = independence.frequency_model(_masks(dense), sizes=(b,))
    union, new = _brute_force(dense, b)
    assert df.frequency_union.iloc[0] == pytest.approx(union, abs=1e-12)
    assert df.frequency_new.iloc[0] == pytest.approx(new, abs=1e-12)
    # Jensen: unequal neuron frequencies can only shrink the union
    assert df.frequency_union.iloc[0] <= df.independent.iloc[0] + 1e-12


def test_neuron_frequencies_per_layer():
    dense = np.zeros((2, 4, 70), dtype=bool)
    dense[0, :, 3] = True
    dense[1, :2, 69] = True
    f = independence.neuron_frequencies(Masks.from_bool(dense, layers=[5, 7]))
    assert f.shape == (2, 70)
    assert f[0, 3] == 1.0 and f[1, 69] == 0.5
    assert f.sum() == 1.5


def test_union_comparison_joins_the_metrics_and_the_model():
    rng = np.random.default_rng(0)
    seq_ids = np.repeat(np.arange(4), 40)
    dense = rng.random((2, 160, 70)) < np.linspace(0.02, 0.6, 70)  # hot and cold neurons
    masks = Masks.from_bool(dense, layers=[0, 1], seq_ids=seq_ids,
                            positions=np.tile(np.arange(40), 4))
    sizes = (1, 2, 8)
    df = independence.union_comparison(masks, sizes=sizes, n_batches=300, seed=3)
    batch = metrics.batch_union(masks, sizes=sizes, n_batches=300, seed=3)
    window = metrics.window_reuse(masks, windows=sizes)
    model = independence.frequency_model(masks, sizes=sizes)
    assert list(df.columns) == ["layer", "size", "density", "random_batch", "random_batch_std",
                                "consecutive", "independent", "frequency_union"]
    np.testing.assert_allclose(df.random_batch, batch.union_density)
    np.testing.assert_allclose(df.consecutive, window.footprint)
    np.testing.assert_allclose(df.frequency_union, model.frequency_union)
    # random batches of independent tokens sit on the frequency-matched curve (a few
    # standard errors; the model draws with replacement, batches without: O(B/T))
    se = df.random_batch_std / np.sqrt(300)
    assert (np.abs(df.random_batch - df.frequency_union) <= 5 * se + 0.01).all()
    assert df.attrs["config"]["n_batches"] == 300


def test_clear_errors():
    with pytest.raises(TypeError, match="Masks"):
        independence.frequency_model(np.zeros((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="no tokens"):
        independence.frequency_model(Masks.from_bool(np.zeros((1, 0, 8), dtype=bool)))
    with pytest.raises(ValueError, match="positive"):
        independence.frequency_model(_masks(np.ones((2, 3), dtype=bool)), sizes=(0, 2))
