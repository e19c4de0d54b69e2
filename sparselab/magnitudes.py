"""Exact per-layer order statistics of activation magnitudes, built once, queried fast.

    >>> index = MagnitudeIndex(trace.arrays["h"])        # [layers, tokens, neurons]
    >>> index.threshold(0, density=0.5)                  # == sl.rules.layer_threshold(...)

A slider that recalibrates 30 layers per move, or a sweep over densities, asks for many
thresholds of the same values; this answers each in O(log n) instead of a partition of
all of them. :class:`sparselab.rules.Calibrated` computes one threshold per layer once and
uses :func:`sparselab.rules.layer_threshold` directly; both give the same value (tested).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MagnitudeIndex"]

_FP16_PATTERNS = 0x7C00 + 1  # non-negative finite fp16 bit patterns, plus +inf


class MagnitudeIndex:
    """Exact order statistics of ``|values|`` per layer, for instant calibration.

        >>> index = MagnitudeIndex(trace.arrays["h"])        # [layers, tokens, neurons]
        >>> thr = index.threshold(0, density=0.5)            # == rules.layer_threshold
        >>> index.share_above(0, thr)                        # ~0.5

    fp16 arrays (the recorder's default) are indexed by a histogram of their bit patterns:
    magnitudes of fp16 numbers take at most 2^15 values and their bit patterns sort like
    the values, so counting them is exact and O(n). Other dtypes keep sorted float32
    copies.
    """

    def __init__(self, values: torch.Tensor) -> None:
        if values.ndim != 3:
            raise ValueError(f"expected [layers, tokens, neurons], got shape {tuple(values.shape)}")
        self.n = int(values.shape[1] * values.shape[2])
        self._fp16 = values.dtype == torch.float16
        if self._fp16:
            bits = values.contiguous().numpy().view(np.uint16)
            self._table = np.arange(_FP16_PATTERNS, dtype=np.uint16).view(np.float16).astype(np.float32)
            self._cum = np.stack(
                [
                    # NaN patterns (> 0x7C00) are counted in n but never "above" anything
                    np.cumsum(np.bincount((bits[i] & 0x7FFF).ravel(), minlength=0x8000)[:_FP16_PATTERNS])
                    for i in range(values.shape[0])
                ]
            )
        else:
            self._sorted = [np.sort(values[i].float().abs().numpy().ravel()) for i in range(values.shape[0])]

    def threshold(self, layer_index: int, density: float) -> float:
        """Same value as :func:`sparselab.rules.layer_threshold` on that layer's magnitudes."""
        drop = int(round((1.0 - density) * self.n))
        if drop <= 0:
            return float("-inf")
        if self._fp16:
            return float(self._table[min(int(np.searchsorted(self._cum[layer_index], drop)), _FP16_PATTERNS - 1)])
        return float(self._sorted[layer_index][drop - 1])

    def share_above(self, layer_index: int, tau: float) -> float:
        """Share of the layer's magnitudes ``> tau`` (compared in float32, as torch does)."""
        tau32 = np.float32(tau)
        if self._fp16:
            cum = self._cum[layer_index]
            at_most = int(np.searchsorted(self._table, tau32, side="right"))
            below = int(cum[at_most - 1]) if at_most > 0 else 0
            return (int(cum[-1]) - below) / self.n
        s = self._sorted[layer_index]
        finite = len(s) - int(np.isnan(s).sum())
        return (finite - int(np.searchsorted(s[:finite], tau32, side="right"))) / self.n

    def quantile(self, layer_index: int, q: float) -> float:
        """Order-statistic ``q`` quantile of the layer's magnitudes."""
        return self.threshold(layer_index, 1.0 - q)
