"""The shadow method's decode-step selection, compiled: 4-bit group-quantized copies of
gate and up score every neuron (``|act(g~) * u~|``), then a threshold or a top-k picks
the rows the by-index kernel computes exactly.

    >>> sel = ShadowSelector(gate_codes, gate_scales, up_codes, up_scales, 64, "silu")
    >>> idx, mask = sel(x, threshold)          # |h~| > threshold in any row of x
    >>> idx, mask = sel.top_k(x, 691)          # each row's 691 best, united
    >>> y = indexed.run_unchecked(x32, idx)    # then the exact rows (_fast.IndexedMLP)

Codes are the ``int8`` output of :func:`sparselab.prediction.quantize.quantize_groups`
(values in ``[-8, 7]``, 4 bits) and the scales its ``float16`` ``[N, H / group]``. They
are packed two per byte in blocks of 8 neurons (:func:`pack_shadow`; group 64), which
with the float16 scales is what the kernel reads per token: ``N * (H + 4 * H / 64)``
bytes, :attr:`ShadowSelector.nbytes`.

``x`` is quantized to int8 per group of ``group`` channels (scale ``max |x| / 127``); the
dot products are exact in int32 within a group, summed over groups in float32 (see
``csrc/sl_shadow.h``). :func:`quantize_x` is the same quantization in torch.
"""

from __future__ import annotations

import numpy as np
import torch

from sparselab._fast import _predict
from sparselab._fast._validate import activation_code, check_threads
from sparselab._fast.selector import DecodeSelector

__all__ = ["ShadowSelector", "pack_shadow", "quantize_x"]


def quantize_x(x: torch.Tensor, group: int = 64) -> torch.Tensor:
    """``x`` ``[..., H]`` (float32) as the kernel sees it: per group of ``group`` channels,
    rounded to a multiple of ``max |x| / 127`` (the dequantized int8 values)."""
    shape = x.shape
    g = x.to(torch.float32).reshape(*shape[:-1], shape[-1] // group, group)
    s = g.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    q = torch.clamp(torch.round(g * inv), -127, 127)
    return (q * s).reshape(shape)


def _pack_blocks(codes: torch.Tensor) -> np.ndarray:
    """int8 codes ``[Np, H]`` in [-8, 7] (Np a multiple of 8) -> uint8 ``[Np/8, H/64, 8
    chunks, 8 neurons, 4]``: byte t of chunk c of neuron j holds code 4c + t of the group
    (low nibble) and code 32 + 4c + t (high nibble), each + 8."""
    n, h = codes.shape
    u = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(n // 8, 8, h // 64, 2, 8, 4)
    packed = u[:, :, :, 0] | (u[:, :, :, 1] << 4)          # [Nb, 8 j, G, 8 c, 4 t]
    return packed.permute(0, 2, 3, 1, 4).contiguous().numpy()  # [Nb, G, c, j, t]


def pack_shadow(gate_codes: torch.Tensor, gate_scales: torch.Tensor, up_codes: torch.Tensor,
                up_scales: torch.Tensor, group: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(codes uint8 [ceil(N/8), 2 * H/64 * 256], scales uint16 [ceil(N/8), 2 * H/64 * 8])``:
    per block of 8 neurons the gate rows' packed codes then the up rows', and their float16
    scales (as bits) by group then neuron (see ``csrc/sl_shadow.h``). Group 64 only; the
    last block is padded with zero weights."""
    for name, t in (("gate_codes", gate_codes), ("up_codes", up_codes)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            raise ValueError(f"{name} must be an int8 [N, H] tensor")
        if int(t.min()) < -8 or int(t.max()) > 7:
            raise ValueError(f"{name} has values outside [-8, 7]: not 4-bit codes")
    if gate_codes.shape != up_codes.shape:
        raise ValueError(f"gate and up codes differ in shape: {tuple(gate_codes.shape)} vs {tuple(up_codes.shape)}")
    n, h = gate_codes.shape
    if group != 64 or h % 64:
        raise ValueError(f"the compiled shadow scores need group 64 dividing the row length {h}, got group {group}")
    for name, t in (("gate_scales", gate_scales), ("up_scales", up_scales)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, h // group):
            raise ValueError(f"{name} must be [{n}, {h // group}]")
    pad = -n % 8
    nb, ng = (n + pad) // 8, h // 64

    def padded(t, value=0):
        return torch.cat([t, torch.full((pad, t.shape[1]), value, dtype=t.dtype)]) if pad else t

    codes = np.concatenate([_pack_blocks(padded(c)).reshape(nb, 1, -1) for c in (gate_codes, up_codes)],
                           axis=1).reshape(nb, -1)
    scales = [padded(s.to(torch.float16)).reshape(nb, 8, ng).transpose(1, 2).reshape(nb, 1, -1)
              for s in (gate_scales, up_scales)]
    bits = torch.cat(scales, dim=1).reshape(nb, -1).contiguous().view(torch.int16).numpy().view(np.uint16)
    return np.ascontiguousarray(codes), np.ascontiguousarray(bits)


class ShadowSelector(DecodeSelector):
    """Scores and selection of the shadow method for one layer (see module docstring)."""

    def __init__(self, gate_codes, gate_scales, up_codes, up_scales, group: int = 64,
                 activation: str = "silu", n_threads=None) -> None:
        self.codes, self.scales = pack_shadow(gate_codes, gate_scales, up_codes, up_scales, group)
        self.n_neurons, self.hidden = int(gate_codes.shape[0]), int(gate_codes.shape[1])
        self.group = int(group)
        self.activation = activation
        self._n_threads = None if n_threads is None else check_threads(n_threads)
        self._scorer = _predict.ShadowScorer(self.codes, self.scales, self.n_neurons,
                                             activation_code(activation))

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per token: packed codes and float16 scales (of the
        real neurons; a padded last block reads up to 7 rows more)."""
        return int(2 * self.n_neurons * (self.hidden // 2 + 2 * self.hidden // self.group))

    def scores(self, x) -> np.ndarray:
        """float32 ``[B, N]``: ``|act(g~) * u~|``."""
        return self._scorer.scores(self._rows(x), self._nt())

    def gate_up(self, x) -> np.ndarray:
        """float32 ``[B, N, 2]``: the approximate gate and up dot products."""
        return self._scorer.gate_up(self._rows(x), self._nt())

    def select_unchecked(self, x32: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        return self._scorer.select(x32, threshold, self._nt())

    def scores_unchecked(self, x32: np.ndarray) -> np.ndarray:
        return self._scorer.scores(x32, self._nt())
