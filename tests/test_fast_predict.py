"""``_fast.LowRankSelector`` (scores, threshold and batch union in one C pass) against a
float64 reference of the same low-rank scores.

    pytest tests/test_fast_predict.py
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselab import _fast


def make_predictor(rank, hidden, n_neurons, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(rank, hidden, generator=g) / math.sqrt(hidden)
    second = torch.randn(n_neurons, rank, generator=g) / math.sqrt(rank)
    bias = torch.randn(n_neurons, generator=g) * 0.5
    return first, second, bias


def reference_scores(first, second, bias, x):
    """``bias + second @ first @ x`` per row in float64, written independently of the kernel."""
    x64 = x.reshape(-1, first.shape[1]).double()
    return bias.double() + (x64 @ first.double().T) @ second.double().T


@settings(deadline=None, max_examples=60)
@given(rank=st.integers(1, 40), hidden=st.integers(1, 70), n_neurons=st.integers(1, 300),
       batch=st.integers(1, 5), quantile=st.floats(0.0, 1.0), n_threads=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**16))
def test_selection_is_the_union_of_rows_above_the_threshold(rank, hidden, n_neurons, batch, quantile,
                                                            n_threads, seed):
    first, second, bias = make_predictor(rank, hidden, n_neurons, seed)
    x = torch.randn(batch, hidden, generator=torch.Generator().manual_seed(seed + 1))
    ref = reference_scores(first, second, bias, x)
    threshold = float(torch.quantile(ref.flatten(), quantile))
    idx, mask = _fast.LowRankSelector(first, second, bias, n_threads=n_threads)(x, threshold)
    expected = (ref > threshold).any(0).numpy()
    # float32 sums may round across the threshold: only neurons whose best row score is
    # within rounding of it may differ
    near = ((ref - threshold).abs() < 1e-4 * (1 + ref.abs())).any(0).numpy()
    assert mask.dtype == np.bool_ and mask.shape == (n_neurons,)
    assert np.array_equal(mask[~near], expected[~near])
    assert np.array_equal(idx, np.flatnonzero(mask))
    assert idx.dtype == np.int64


def test_thread_count_does_not_change_the_selection():
    first, second, bias = make_predictor(64, 576, 1536)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(5))
    threshold = float(reference_scores(first, second, bias, x).median())
    results = [_fast.LowRankSelector(first, second, bias, n_threads=t)(x, threshold) for t in (1, 2, 3)]
    for idx, mask in results[1:]:
        assert np.array_equal(idx, results[0][0]) and np.array_equal(mask, results[0][1])
    assert 0 < len(results[0][0]) < 1536


def test_extreme_thresholds_give_empty_and_full_sets_and_any_input_shape():
    first, second, bias = make_predictor(4, 16, 10)
    sel = _fast.LowRankSelector(first, second, bias)
    x = torch.randn(16)
    idx, mask = sel(x, math.inf)
    assert len(idx) == 0 and not mask.any()
    idx, mask = sel(x.to(torch.bfloat16), -math.inf)  # bf16 inputs are widened
    assert np.array_equal(idx, np.arange(10)) and mask.all()
    idx, mask = sel(torch.zeros(0, 16), -math.inf)  # no rows: nothing is needed
    assert len(idx) == 0 and not mask.any()


def test_masks_are_fresh_arrays():
    first, second, bias = make_predictor(4, 16, 10)
    sel = _fast.LowRankSelector(first, second, bias)
    _, m1 = sel(torch.randn(16), 0.0)
    before = m1.copy()
    sel(-torch.randn(16) * 10, 0.0)
    assert np.array_equal(m1, before)  # a caller keeping the last mask keeps it intact


@pytest.mark.parametrize("make,message", [
    (lambda f, s, b: (f.double(), s, b), "first must be float32"),
    (lambda f, s, b: (f, s[:, :3], b), "second has shape"),
    (lambda f, s, b: (f, s, b[:5]), "bias has 5 entries"),
    (lambda f, s, b: (f[0], s, b), "first must have 2 dimension"),
    (lambda f, s, b: (f.numpy(), s, b), "first must be a CPU torch tensor"),
])
def test_bad_weights_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        _fast.LowRankSelector(*make(*make_predictor(4, 16, 10)))


@pytest.mark.parametrize("x,threshold,message", [
    (torch.randn(2, 15), 0.0, r"x must be \[batch, 16\]"),
    (torch.randn(1, 2, 16), 0.0, r"x must be \[batch, 16\]"),
    (np.zeros((1, 16), np.float32), 0.0, "x must be a CPU torch tensor"),
    (torch.randn(1, 16), float("nan"), "threshold is NaN"),
])
def test_bad_calls_are_named(x, threshold, message):
    sel = _fast.LowRankSelector(*make_predictor(4, 16, 10))
    with pytest.raises(ValueError, match=message):
        sel(x, threshold)


def test_concurrent_calls_from_python_threads_do_not_share_buffers():
    # the GIL is released inside the kernel: two threads may be in it at once
    from concurrent.futures import ThreadPoolExecutor

    first, second, bias = make_predictor(32, 256, 1024)
    sel = _fast.LowRankSelector(first, second, bias, n_threads=1)
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(b % 3 + 1, 256, generator=g) for b in range(64)]
    expected = [sel(x, 0.0) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: sel(x, 0.0), xs * 4))
    for i, (idx, mask) in enumerate(got):
        assert np.array_equal(idx, expected[i % 64][0]) and np.array_equal(mask, expected[i % 64][1])
