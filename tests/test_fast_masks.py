"""Packed-bit mask kernels of ``sparselab._fast`` against the numpy reference in ``sparselab.testing.reference``.

    pytest tests/test_fast_masks.py
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselab import _fast
from sparselab.testing import reference as bits

SETTINGS = settings(deadline=None, max_examples=60)

neuron_counts = st.sampled_from([1, 5, 63, 64, 65, 127, 128, 129, 200, 300])
ROWS = st.integers(1, 4)


@st.composite
def bool_masks(draw, rows=ROWS):
    n = draw(neuron_counts)
    r = draw(rows)
    p = draw(st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    m = np.random.default_rng(seed).random((r, n)) < p
    return m


@SETTINGS
@given(bool_masks())
def test_pack_unpack_popcount_match_reference(m):
    words = _fast.pack(m)
    np.testing.assert_array_equal(words, bits.pack_bits(m))
    assert words.dtype == np.uint64 and words.shape == (m.shape[0], _fast.n_words(m.shape[1]))
    np.testing.assert_array_equal(_fast.unpack(words, m.shape[1]), m)
    np.testing.assert_array_equal(_fast.popcount(words), bits.popcount(words))
    assert _fast.popcount(words[0]) == int(m[0].sum())
    assert isinstance(_fast.popcount(words[0]), int)


@SETTINGS
@given(bool_masks())
def test_union_and_indices_match_reference(m):
    words = _fast.pack(m)
    np.testing.assert_array_equal(_fast.union(words), bits.pack_bits(m.any(axis=0)))
    idx = _fast.indices(words[0], m.shape[1])
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, np.flatnonzero(m[0]))


@SETTINGS
@given(bool_masks(rows=st.just(2)), st.sampled_from(["random", "same", "disjoint", "empty", "full"]))
def test_xor_diff_matches_set_difference(m, kind):
    old = m[0]
    new = {"random": m[1], "same": old, "disjoint": ~old,
           "empty": np.zeros_like(old), "full": np.ones_like(old)}[kind]
    added, removed = _fast.xor_diff(bits.pack_bits(old), bits.pack_bits(new))
    assert added.dtype == np.int64 and removed.dtype == np.int64
    np.testing.assert_array_equal(added, np.flatnonzero(new & ~old))
    np.testing.assert_array_equal(removed, np.flatnonzero(old & ~new))


def test_torch_inputs_and_nd_shapes():
    m = torch.rand(2, 3, 70) < 0.5
    words = _fast.pack(m)
    assert words.shape == (2, 3, 2)
    np.testing.assert_array_equal(words, bits.pack_bits(m.numpy()))
    np.testing.assert_array_equal(_fast.unpack(torch.from_numpy(words), 70), m.numpy())
    assert _fast.popcount(words).shape == (2, 3)
    # a non-contiguous view packs the same as its contiguous copy
    np.testing.assert_array_equal(_fast.pack(m.numpy()[:, ::2]), bits.pack_bits(m.numpy()[:, ::2]))


def test_zero_rows_and_zero_neurons():
    assert _fast.pack(np.zeros((0, 10), bool)).shape == (0, 1)
    assert _fast.pack(np.zeros((3, 0), bool)).shape == (3, 0)
    np.testing.assert_array_equal(_fast.union(np.zeros((0, 2), np.uint64)), [0, 0])
    assert _fast.indices(np.zeros(0, np.uint64), 0).size == 0


def test_bad_inputs_raise_with_a_message():
    w = _fast.pack(np.ones(70, bool))
    with pytest.raises(ValueError, match="boolean"):
        _fast.pack(np.ones(10, np.float32))
    with pytest.raises(ValueError, match="uint64"):
        _fast.popcount(w.astype(np.int64))
    with pytest.raises(ValueError, match="need"):
        _fast.unpack(w, 200)
    with pytest.raises(ValueError, match="beyond"):
        _fast.unpack(w, 65)  # bits 65..69 are set: the neuron count is wrong
    with pytest.raises(ValueError, match="beyond"):
        _fast.indices(w, 66)
    with pytest.raises(ValueError, match="old_words has 2 words"):
        _fast.xor_diff(w, np.zeros(3, np.uint64))
    with pytest.raises(ValueError, match="dimension"):
        _fast.union(w)
    with pytest.raises(ValueError, match="dimension"):
        _fast.xor_diff(w[None], w[None])
    with pytest.raises(ValueError, match="n_neurons"):
        _fast.unpack(w, -1)
    with pytest.raises(ValueError, match="numpy array or a torch tensor"):
        _fast.popcount([1, 2])
