"""Independent reference implementations that tests compare the library against.

    >>> from sparselab.testing.reference import dense_reference, pack_bits
    >>> ref = dense_reference(x, gate, up, down, "silu", mask_bool=m)     # float64
    >>> pack_bits(np.array([True, False, True])).tolist()
    [5]

Written with plain numpy / torch ops and nothing of :mod:`sparselab._fast`, so a bug in the
compiled code cannot hide in its own oracle. Not used by the library itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["dense_reference", "pack_bits", "popcount", "unpack_bits"]

WORD_BITS = 64

# popcount of every byte value, for a vectorised popcount over uint64 words viewed as bytes
_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _n_words(n_neurons: int) -> int:
    return (int(n_neurons) + WORD_BITS - 1) // WORD_BITS


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """Pack a boolean array ``[..., n]`` into uint64 words ``[..., ceil(n / 64)]`` with
    ``np.packbits``: neuron ``i`` -> word ``i // 64``, bit ``i % 64``."""
    mask = np.asarray(mask, dtype=bool)
    n = mask.shape[-1]
    pad = _n_words(n) * WORD_BITS - n
    if pad:
        mask = np.concatenate([mask, np.zeros(mask.shape[:-1] + (pad,), dtype=bool)], axis=-1)
    packed = np.packbits(mask, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)


def unpack_bits(words: np.ndarray, n_neurons: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint64 words ``[..., w]`` -> bool ``[..., n_neurons]``."""
    words = np.ascontiguousarray(words, dtype=np.uint64)
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :n_neurons].astype(bool)


def popcount(words: np.ndarray) -> np.ndarray:
    """Number of set bits along the last axis of a uint64 word array."""
    words = np.ascontiguousarray(words, dtype=np.uint64)
    return _BYTE_POPCOUNT[words.view(np.uint8)].sum(axis=-1, dtype=np.int64)


def _act64(v: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return v * torch.sigmoid(v)
    if activation == "gelu_tanh":
        return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    if activation == "relu":
        return torch.clamp_min(v, 0.0)
    raise ValueError(f"unknown activation {activation!r}; expected silu, gelu_tanh or relu")


def dense_reference(x, gate, up, down, activation: str, mask_bool=None) -> torch.Tensor:
    """``down(act(gate x) * up x)`` in float64 with inactive neurons zeroed: the test oracle.

        >>> ref = dense_reference(x, gate, up, down, "silu", mask_bool=m)   # float64

    ``gate``/``up`` are ``[I, H]``, ``down`` is ``[H, I]`` (``nn.Linear`` layouts). Returns
    float64, shaped like x.
    """
    x64 = torch.as_tensor(x).to(torch.float64)
    g = torch.as_tensor(gate).to(torch.float64)
    u = torch.as_tensor(up).to(torch.float64)
    d = torch.as_tensor(down).to(torch.float64)
    h = _act64(x64 @ g.T, activation) * (x64 @ u.T)
    if mask_bool is not None:
        m = torch.as_tensor(np.asarray(mask_bool, dtype=bool) if not isinstance(
            mask_bool, torch.Tensor) else mask_bool).to(torch.bool)
        if m.shape != (g.shape[0],):
            raise ValueError(f"mask_bool has shape {tuple(m.shape)}; expected ({g.shape[0]},)")
        h = h * m.to(torch.float64)
    return h @ d.T
