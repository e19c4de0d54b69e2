"""Packed-bit masks: the one bit-mask library of sparselab (compiled).

Neuron ``i`` of a mask lives in word ``i // 64``, bit ``i % 64`` (little-endian), so a
``[..., n_neurons]`` boolean array packs into ``[..., ceil(n_neurons / 64)]`` uint64 words;
bits past ``n_neurons`` in the last word are always zero.

    >>> words = pack(np.array([True, False, True]))
    >>> int(words[0]), unpack(words, 3).tolist(), popcount(words)
    (5, [True, False, True], 2)

An independent pure-numpy version of the layout (for tests) is
:mod:`sparselab.testing.reference`.
"""

from __future__ import annotations

import math

import numpy as np

from sparselab._fast import _masks
from sparselab._fast._validate import bool_array, check_n_neurons, check_tail, n_words, word_array

__all__ = ["WORD_BITS", "indices", "n_words", "pack", "popcount", "union", "unpack", "xor_diff"]

WORD_BITS = 64


def pack(mask_bool) -> np.ndarray:
    """Pack booleans ``[..., n]`` into uint64 words ``[..., ceil(n / 64)]``.

        >>> int(pack(np.array([True, False, True]))[0])
        5
    """
    arr = bool_array(mask_bool, "mask_bool")
    n = arr.shape[-1]
    rows = math.prod(arr.shape[:-1])
    flat = arr.reshape(rows, n).view(np.uint8)
    out = np.empty((rows, n_words(n)), dtype=np.uint64)
    _masks.pack_into(flat, out)
    return out.reshape(arr.shape[:-1] + (out.shape[1],))


def unpack(words, n_neurons) -> np.ndarray:
    """Unpack uint64 words ``[..., w]`` into booleans ``[..., n_neurons]``.

        >>> unpack(pack(np.array([True, False, True])), 3).tolist()
        [True, False, True]
    """
    n = check_n_neurons(n_neurons)
    arr = word_array(words, "words", (1, 2, 3, 4))
    if arr.shape[-1] != n_words(n):
        raise ValueError(f"words has {arr.shape[-1]} words per mask; {n} neurons need "
                         f"{n_words(n)} (expected {n_words(n)})")
    flat = arr.reshape(math.prod(arr.shape[:-1]), arr.shape[-1])
    check_tail(flat, n, "words")
    out = np.empty((flat.shape[0], n), dtype=np.uint8)
    _masks.unpack_into(flat, out)
    return out.view(np.bool_).reshape(arr.shape[:-1] + (n,))


def popcount(words):
    """Set bits: an ``int`` for one mask (1-D), int64 per row for ``[..., w]``.

        >>> popcount(pack(np.array([True, False, True])))
        2
    """
    arr = word_array(words, "words", (1, 2, 3, 4))
    flat = arr.reshape(math.prod(arr.shape[:-1]), arr.shape[-1])
    out = np.empty(flat.shape[0], dtype=np.int64)
    _masks.popcount_rows(flat, out)
    if arr.ndim == 1:
        return int(out[0])
    return out.reshape(arr.shape[:-1])


def xor_diff(old_words, new_words) -> tuple[np.ndarray, np.ndarray]:
    """Neurons entering and leaving between two masks, as sorted int64 index arrays.

        >>> added, removed = xor_diff(pack(np.array([1, 1, 0], bool)), pack(np.array([0, 1, 1], bool)))
        >>> added.tolist(), removed.tolist()
        ([2], [0])
    """
    fast = _masks.xor_diff_fast(old_words, new_words)
    if fast is not None:
        return fast
    old = word_array(old_words, "old_words", (1,))
    new = word_array(new_words, "new_words", (1,))
    if old.shape != new.shape:
        raise ValueError(f"old_words has {old.shape[0]} words, new_words has {new.shape[0]}")
    na, nr = _masks.diff_counts(old, new)
    added = np.empty(na, dtype=np.int64)
    removed = np.empty(nr, dtype=np.int64)
    _masks.diff_fill(old, new, added, removed)
    return added, removed


def union(words_2d) -> np.ndarray:
    """OR over the rows of ``[rows, w]``: the one mask a batch shares.

        >>> union(pack(np.array([[1, 0, 0], [0, 0, 1]], bool))).tolist()
        [5]
    """
    fast = _masks.union_fast(words_2d)
    if fast is not None:
        return fast
    arr = word_array(words_2d, "words_2d", (2,))
    out = np.empty(arr.shape[1], dtype=np.uint64)
    _masks.union_into(arr, out)
    return out


def indices(words, n_neurons) -> np.ndarray:
    """Sorted int64 indices of the set bits of a 1-D mask.

        >>> indices(pack(np.array([0, 1, 1], bool)), 3).tolist()
        [1, 2]
    """
    n = check_n_neurons(n_neurons)
    arr = word_array(words, "words", (1,))
    if arr.shape[0] != n_words(n):
        raise ValueError(f"words has {arr.shape[0]} words; {n} neurons need {n_words(n)}")
    check_tail(arr[None], n, "words")
    out = np.empty(popcount(arr), dtype=np.int64)
    _masks.indices_fill(arr, out)
    return out
