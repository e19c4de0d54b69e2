"""Thresholds, quantiles and top-k: how a share of neurons to keep becomes a cut-off.

    >>> layer_threshold(magnitudes, density=0.3)        # exact: 30 % of values are > t
    >>> index = MagnitudeIndex(trace.arrays["h"])       # [layers, tokens, neurons], built once
    >>> index.threshold(0, density=0.3)                 # the same value, in microseconds
    >>> grid = quantile_grid(scores); threshold_from_quantiles(grid, keep=0.3)   # a stored sketch
    >>> top_k_mask(values.abs(), k=60)                  # the k largest per row

Every per-layer threshold of sparselab comes from here: rules calibrate with
:func:`layer_threshold` / :class:`MagnitudeIndex` (the ``(1 - density)`` quantile as an
order statistic, no interpolation: the share above it equals ``density`` up to ties), and
predictors keep a :func:`quantile_grid` of their scores (a 2049-point sketch stored with
them, so a new target density needs no data; thresholds then interpolate in the sketch).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "QUANTILES",
    "MagnitudeIndex",
    "drop_count",
    "layer_threshold",
    "quantile_grid",
    "threshold_from_quantiles",
    "top_count",
    "top_k_mask",
]

_FP16_PATTERNS = 0x7C00 + 1  # non-negative finite fp16 bit patterns, plus +inf
QUANTILES = 2049  # points of a stored score sketch: density/recall resolution ~ 1/2048
_QUANTILE_SAMPLE = 1 << 20  # values beyond this are subsampled for a sketch (error ~5e-4)


def drop_count(n: int, density: float) -> int:
    """How many of ``n`` values fall at or below the threshold that keeps ``density``."""
    return int(round((1.0 - density) * n))


def layer_threshold(magnitudes: torch.Tensor, density: float) -> float:
    """Threshold ``t`` such that a share ``density`` of ``magnitudes`` is ``> t``.

        >>> layer_threshold(trace.activations(0).abs(), 0.5)

    The ``(1 - density)`` quantile taken as an order statistic (no interpolation), so
    ``(magnitudes > t).mean()`` equals ``density`` up to ties. Same value as
    :meth:`MagnitudeIndex.threshold` on the same values (one definition, two access
    patterns: this one for a single query, the index for many).
    """
    flat = magnitudes.reshape(-1).float().cpu().numpy()
    drop = drop_count(flat.size, density)
    if drop <= 0:
        return float("-inf")
    # numpy's introselect is several times faster than torch.kthvalue on millions of values
    return float(np.partition(flat, drop - 1)[drop - 1])


def quantile_grid(values: torch.Tensor, n: int = QUANTILES, generator=None) -> torch.Tensor:
    """``n`` order statistics of ``values`` at probabilities ``0, 1/(n-1), ..., 1``.

        >>> grid = quantile_grid(scores)       # stored with predictors

    Large inputs are subsampled (uniformly, seeded) to bound the sort's memory.
    """
    flat = values.reshape(-1).float()
    if flat.numel() == 0:
        return torch.full((n,), float("nan"))
    if flat.numel() > _QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (_QUANTILE_SAMPLE,), generator=generator)]
    ordered = flat.sort().values
    pos = torch.linspace(0, ordered.numel() - 1, n).round().long()
    return ordered[pos].clone()


def threshold_from_quantiles(grid: torch.Tensor, keep: float) -> float:
    """Threshold ``t`` with a share ``keep`` of the distribution described by ``grid`` above it."""
    if keep >= 1.0:
        return float("-inf")
    if keep <= 0.0:
        return float(grid[-1])
    probs = np.linspace(0.0, 1.0, len(grid))
    return float(np.interp(1.0 - keep, probs, grid.double().numpy()))


def top_count(keep: float, n: int) -> int:
    """Values kept per row by a top-k of ``keep``: a fraction of ``n`` (<= 1) or a count."""
    return int(keep) if keep > 1 else int(round(keep * n))


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` highest values along the last axis (all of them if ``k >= n``)."""
    out = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if k > 0:
        out.scatter_(-1, values.topk(min(k, values.shape[-1]), dim=-1).indices, True)
    return out


class MagnitudeIndex:
    """Exact order statistics of ``|values|`` per layer, for instant calibration.

        >>> index = MagnitudeIndex(trace.arrays["h"])        # [layers, tokens, neurons]
        >>> thr = index.threshold(0, density=0.5)            # == layer_threshold(...)
        >>> index.share_above(0, thr)                        # ~0.5

    fp16 arrays (the recorder's default) are indexed by a histogram of their bit patterns:
    magnitudes of fp16 numbers take at most 2^15 values and their bit patterns sort like
    the values, so counting them is exact and O(n). Other dtypes keep a sorted float32
    copy of each layer, made on the layer's first query.
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
            self._values = values
            self._sorted_layers: dict[int, np.ndarray] = {}

    def _sorted(self, layer_index: int) -> np.ndarray:
        if layer_index not in self._sorted_layers:
            self._sorted_layers[layer_index] = np.sort(
                self._values[layer_index].float().abs().numpy().ravel())
        return self._sorted_layers[layer_index]

    def threshold(self, layer_index: int, density: float) -> float:
        """Same value as :func:`layer_threshold` on that layer's magnitudes."""
        drop = drop_count(self.n, density)
        if drop <= 0:
            return float("-inf")
        if self._fp16:
            return float(self._table[min(int(np.searchsorted(self._cum[layer_index], drop)), _FP16_PATTERNS - 1)])
        return float(self._sorted(layer_index)[drop - 1])

    def share_above(self, layer_index: int, tau: float) -> float:
        """Share of the layer's magnitudes ``> tau`` (compared in float32, as torch does)."""
        tau32 = np.float32(tau)
        if self._fp16:
            cum = self._cum[layer_index]
            at_most = int(np.searchsorted(self._table, tau32, side="right"))
            below = int(cum[at_most - 1]) if at_most > 0 else 0
            return (int(cum[-1]) - below) / self.n
        s = self._sorted(layer_index)
        finite = len(s) - int(np.isnan(s).sum())
        return (finite - int(np.searchsorted(s[:finite], tau32, side="right"))) / self.n

    def quantile(self, layer_index: int, q: float) -> float:
        """Order-statistic ``q`` quantile of the layer's magnitudes."""
        return self.threshold(layer_index, 1.0 - q)
