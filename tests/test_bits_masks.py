"""Packed-bit layout (sparselab._fast.masks) and the Masks container against plain numpy / Python ints.

    pytest -q tests/test_bits_masks.py
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparselab._fast.masks import n_words, popcount
from sparselab._fast.masks import pack as pack_bits
from sparselab._fast.masks import unpack as unpack_bits
from sparselab.masking.masks import Masks

SETTINGS = settings(deadline=None, max_examples=80)

# odd sizes on both sides of every word boundary
odd_sizes = st.sampled_from([1, 2, 3, 7, 31, 63, 64, 65, 100, 127, 128, 129, 191, 193, 257])


@st.composite
def bool_arrays(draw, max_lead_dims: int = 2):
    n = draw(odd_sizes)
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=max_lead_dims))
    return draw(arrays(np.bool_, tuple(lead) + (n,)))


def reference_words(row: np.ndarray) -> list[int]:
    """Pack one boolean row with Python ints: neuron i -> word i // 64, bit i % 64."""
    words = [0] * ((len(row) + 63) // 64)
    for i in np.flatnonzero(row):
        words[i // 64] |= 1 << (int(i) % 64)
    return words


@SETTINGS
@given(bool_arrays())
def test_pack_matches_python_int_reference_and_round_trips(m):
    words = pack_bits(m)
    n = m.shape[-1]
    assert words.dtype == np.uint64
    assert words.shape == m.shape[:-1] + (-(-n // 64),)
    flat_m, flat_w = m.reshape(-1, n), words.reshape(-1, words.shape[-1])
    for row, w in zip(flat_m, flat_w, strict=True):
        assert [int(x) for x in w] == reference_words(row)
    np.testing.assert_array_equal(unpack_bits(words, n), m)


@SETTINGS
@given(bool_arrays())
def test_popcount_matches_numpy_sum(m):
    np.testing.assert_array_equal(popcount(pack_bits(m)), m.sum(axis=-1))


@SETTINGS
@given(arrays(np.bool_, st.tuples(st.integers(1, 5), st.sampled_from([3, 65, 130]))))
def test_pack_of_non_contiguous_view(m):
    view = m[:, ::2]
    np.testing.assert_array_equal(unpack_bits(pack_bits(view), view.shape[-1]), view)


def test_pack_known_values():
    assert pack_bits(np.array([True, False, True]))[0] == 5
    m = np.zeros(130, dtype=bool)
    m[[0, 63, 64, 129]] = True
    assert [int(x) for x in pack_bits(m)] == [1 | (1 << 63), 1, 2]


def test_tail_bits_stay_zero():
    words = pack_bits(np.ones((3, 70), dtype=bool))
    assert int(words[0, 1]) == (1 << 6) - 1  # only 6 of the 64 bits of the last word
    assert popcount(words).tolist() == [70, 70, 70]


def test_n_words():
    assert [n_words(n) for n in (0, 1, 63, 64, 65, 128, 129)] == [0, 1, 1, 1, 2, 2, 3]


def test_unpack_wrong_word_count_is_an_error():
    with pytest.raises(ValueError, match="expected 2"):
        unpack_bits(np.zeros((4, 3), dtype=np.uint64), 100)


def test_popcount_of_empty_token_axis():
    assert popcount(np.zeros((2, 0, 3), dtype=np.uint64)).shape == (2, 0)


# -- Masks ------------------------------------------------------------------------------


def random_masks(seed: int = 0, shape=(3, 11, 97)) -> tuple[np.ndarray, Masks]:
    dense = np.random.default_rng(seed).random(shape) < 0.3
    seq = np.repeat([0, 1], [5, shape[1] - 5])
    pos = np.concatenate([np.arange(5), np.arange(shape[1] - 5)])
    return dense, Masks.from_bool(dense, layers=(2, 5, 7), seq_ids=seq, positions=pos, rule={"name": "x"})


def test_masks_reading_matches_dense():
    dense, masks = random_masks()
    assert masks.bits.shape == (3, 11, 2) and masks.bits.dtype == np.uint64
    assert (masks.n_layers, masks.n_tokens, masks.n_neurons) == (3, 11, 97)
    np.testing.assert_array_equal(masks.to_bool(), dense)
    np.testing.assert_array_equal(masks.layer(5), dense[1])
    np.testing.assert_array_equal(masks.layer_bits(7), pack_bits(dense[2]))
    np.testing.assert_array_equal(masks.counts(), dense.sum(-1))
    np.testing.assert_allclose(masks.density(), dense.mean(-1))
    assert "layers=3" in repr(masks)


def test_masks_select_tokens_bool_and_int():
    dense, masks = random_masks()
    idx = np.array([8, 1, 4])
    sub = masks.select_tokens(idx)
    np.testing.assert_array_equal(sub.to_bool(), dense[:, idx])
    np.testing.assert_array_equal(sub.seq_ids, [1, 0, 0])
    np.testing.assert_array_equal(sub.positions, [3, 1, 4])
    keep = masks.seq_ids == 1
    np.testing.assert_array_equal(masks.select_tokens(keep).to_bool(), dense[:, keep])
    empty = masks.select_tokens(np.zeros(11, dtype=bool))
    assert empty.n_tokens == 0 and empty.counts().shape == (3, 0)


def test_masks_from_2d_defaults():
    dense = np.eye(4, 5, dtype=bool)
    masks = Masks.from_bool(dense)
    assert masks.layers == (0,)
    np.testing.assert_array_equal(masks.seq_ids, np.zeros(4))
    np.testing.assert_array_equal(masks.positions, np.arange(4))
    np.testing.assert_array_equal(masks.layer(0), dense)


def test_masks_unknown_layer_names_recorded_layers():
    _, masks = random_masks()
    with pytest.raises(KeyError, match=r"layer 3 not in these masks \(layers: \[2, 5, 7\]\)"):
        masks.layer(3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": np.zeros((2, 3), np.uint64)}, "must be \\[layers, tokens, words\\]"),
        ({"layers": (0, 1)}, "3 layers but layers lists 2"),
        ({"n_neurons": 200}, "200 neurons need 4"),
        ({"seq_ids": np.zeros(4)}, "seq_ids must have one entry per token"),
        ({"positions": np.zeros((11, 1))}, "positions must have one entry per token"),
        ({"layers": (1, 1, 2)}, "distinct"),
    ],
)
def test_masks_validation_errors(kwargs, message):
    _, good = random_masks()
    args = {
        "bits": good.bits,
        "n_neurons": good.n_neurons,
        "layers": good.layers,
        "seq_ids": good.seq_ids,
        "positions": good.positions,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Masks(**args)


def test_masks_rejects_bits_past_n_neurons():
    # a set bit past neuron 96 would silently inflate counts() and density()
    _, good = random_masks()
    bits = good.bits.copy()
    bits[0, 0, 1] |= np.uint64(1) << np.uint64(40)
    with pytest.raises(ValueError, match="past neuron"):
        Masks(bits, good.n_neurons, good.layers, good.seq_ids, good.positions)


def test_from_bool_rejects_wrong_rank():
    with pytest.raises(ValueError, match="expected \\[layers, tokens, neurons\\]"):
        Masks.from_bool(np.zeros(5, dtype=bool))
