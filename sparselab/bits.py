"""Packed-bit masks in pure numpy: the layout every part of sparselab agrees on.

Neuron ``i`` of a mask lives in word ``i // 64``, bit ``i % 64`` (little-endian), so a
``[..., n_neurons]`` boolean array packs into ``[..., ceil(n_neurons / 64)]`` uint64 words.
Bits past ``n_neurons`` in the last word are always zero. ``sparselab._fast`` implements
the same operations in Cython on the same layout; these are the reference versions.

    >>> words = pack_bits(np.array([True, False, True]))
    >>> int(words[0]), unpack_bits(words, 3).tolist()
    (5, [True, False, True])
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 64

# popcount of every byte value, for a vectorised popcount over uint64 words viewed as bytes
_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def n_words(n_neurons: int) -> int:
    """Number of uint64 words holding ``n_neurons`` bits."""
    return (int(n_neurons) + WORD_BITS - 1) // WORD_BITS


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """Pack a boolean array ``[..., n]`` into uint64 words ``[..., ceil(n / 64)]``."""
    mask = np.asarray(mask, dtype=bool)
    n = mask.shape[-1]
    pad = n_words(n) * WORD_BITS - n
    if pad:
        mask = np.concatenate([mask, np.zeros(mask.shape[:-1] + (pad,), dtype=bool)], axis=-1)
    packed = np.packbits(mask, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)


def unpack_bits(words: np.ndarray, n_neurons: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint64 words ``[..., w]`` -> bool ``[..., n_neurons]``."""
    words = np.ascontiguousarray(words, dtype=np.uint64)
    if words.shape[-1] != n_words(n_neurons):
        raise ValueError(
            f"{words.shape[-1]} words cannot hold exactly {n_neurons} neurons "
            f"(expected {n_words(n_neurons)})"
        )
    as_bytes = words.view(np.uint8)
    bits = np.unpackbits(as_bytes, axis=-1, bitorder="little")
    return bits[..., :n_neurons].astype(bool)


def popcount(words: np.ndarray) -> np.ndarray:
    """Number of set bits along the last axis of a uint64 word array."""
    words = np.ascontiguousarray(words, dtype=np.uint64)
    # the uint8 view already has shape [..., 8 * w]; no reshape (a -1 reshape fails when
    # another axis is empty, e.g. masks of zero tokens)
    return _BYTE_POPCOUNT[words.view(np.uint8)].sum(axis=-1, dtype=np.int64)
