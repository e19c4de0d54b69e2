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

__all__ = ["bf16_rounding_slack", "dense_reference", "pack_bits", "popcount", "round_bf16",
           "term_scale", "unpack_bits"]

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


def round_bf16(v: torch.Tensor) -> torch.Tensor:
    """float64 values rounded to the nearest bfloat16 value (ties to even), as float64.

        >>> round_bf16(torch.tensor([1 + 2**-8, 1 + 3 * 2**-8], dtype=torch.float64))
        tensor([1.0000, 1.0156], dtype=torch.float64)

    Rounds once, from float64 (torch's ``.to(torch.bfloat16)`` of a double goes through
    float32, which can round twice). Normal numbers only, which is what the tests make.
    """
    m, e = np.frexp(v.numpy())  # v = m * 2**e, 0.5 <= |m| < 1: 8 significant bits kept
    return torch.from_numpy(np.ldexp(np.rint(np.ldexp(m, 8)), e - 8))


def _as64(*ts) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(t).to(torch.float64) for t in ts)


def _masked(h: torch.Tensor, mask_bool) -> torch.Tensor:
    """``h [B, I]`` with the neurons outside ``mask_bool`` (``[I]``, or None: all in) zeroed."""
    if mask_bool is None:
        return h
    m = torch.as_tensor(np.asarray(mask_bool, dtype=bool) if not isinstance(
        mask_bool, torch.Tensor) else mask_bool).to(torch.bool)
    if m.shape != (h.shape[-1],):
        raise ValueError(f"mask_bool has shape {tuple(m.shape)}; expected ({h.shape[-1]},)")
    return h * m.to(torch.float64)


def bf16_rounding_slack(x, gate, up, down, activation: str, mask_bool=None,
                        eps: float = 1e-4) -> torch.Tensor:
    """The extra error to allow against ``dense_reference(..., h_bf16=True)``: a kernel
    computes h in float32 before rounding it to bf16, so where the exact h lies within
    float32's error of a rounding midpoint, the kernel may round it the other way, one
    bf16 step (at most 2^-7 |h|). Returns ``[B, H]`` float64: ``sum_j 2^-7 |h_j| |down[:, j]|``
    over those terms, with ``eps`` the relative error assumed of float32 dot products.

        >>> bound = 1e-4 * term_scale + bf16_rounding_slack(x, gate, up, down, "silu", m)
    """
    x64, g, u, d = _as64(x, gate, up, down)
    v, w = x64 @ g.T, x64 @ u.T
    a = _act64(v, activation)
    # float32's error in h: of the gate dot product, through act (slope <= 1.1), times w,
    # plus act(v) times that of the up dot product
    err = eps * (1.1 * (x64.abs() @ g.abs().T) * w.abs()
                 + a.abs() * (x64.abs() @ u.abs().T)) + 1e-30
    h = _masked(a * w, mask_bool)
    _, e = np.frexp(h.numpy())
    half_step = torch.from_numpy(np.ldexp(1.0, e - 9))  # half a bf16 step at |h|
    near_midpoint = ((h - round_bf16(h)).abs() - half_step).abs() <= err
    return (2.0**-7 * h.abs() * near_midpoint) @ d.abs().T


def term_scale(x, gate, up, down, activation: str, mask_bool=None) -> torch.Tensor:
    """``sum_j |down[:, j]| |h_j|`` in float64 ``[B, H]``: the size of the terms the down
    projection sums, so a tolerance relative to it survives cancellation (one relative to
    y itself would not).

        >>> bound = 1e-4 * term_scale(x, gate, up, down, "silu", m)
    """
    x64, g, u, d = _as64(x, gate, up, down)
    h = _masked(_act64(x64 @ g.T, activation) * (x64 @ u.T), mask_bool)
    return h.abs() @ d.abs().T


def dense_reference(x, gate, up, down, activation: str, mask_bool=None,
                    h_bf16: bool = False) -> torch.Tensor:
    """``down(act(gate x) * up x)`` in float64 with inactive neurons zeroed: the test oracle.

        >>> ref = dense_reference(x, gate, up, down, "silu", mask_bool=m)   # float64

    ``gate``/``up`` are ``[I, H]``, ``down`` is ``[H, I]`` (``nn.Linear`` layouts). Returns
    float64, shaped like x. ``h_bf16``: the hidden activations rounded to bf16 before the
    down projection, as a bf16 model (and the kernels on bf16 weights) feeds it; allow
    :func:`bf16_rounding_slack` on top of the usual tolerance.
    """
    x64, g, u, d = _as64(x, gate, up, down)
    h = _masked(_act64(x64 @ g.T, activation) * (x64 @ u.T), mask_bool)
    if h_bf16:
        h = round_bf16(h)
    return h @ d.T
