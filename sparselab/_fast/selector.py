"""A low-rank predictor's decode-step selection fused in one compiled pass: scores,
threshold and the union over the batch rows.

    >>> sel = LowRankSelector(first, second, bias)          # [R, H], [N, R], [N]
    >>> idx, mask = sel(x, threshold)                       # scores > threshold, any row
    >>> idx, mask = sel.top_k(x, 60)                        # each row's 60 best, united
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sparselab._fast import _predict
from sparselab._fast._validate import check_threads

__all__ = ["DecodeSelector", "LowRankSelector"]


class DecodeSelector:
    """What every compiled decode-step selector shares: argument checks, the threshold
    call, and top-k from the scores. A subclass sets ``hidden``, ``n_neurons`` and
    ``_n_threads`` and implements :meth:`select_unchecked` and :meth:`scores_unchecked`.

        >>> idx, mask = sel(x, threshold)        # any subclass: scores > threshold, any row
        >>> idx, mask = sel.top_k(x, 60)         # each row's 60 best, united
    """

    hidden: int
    n_neurons: int
    _n_threads: int | None = None

    def _nt(self) -> int:
        return self._n_threads if self._n_threads is not None else max(1, torch.get_num_threads())

    def _rows(self, x) -> np.ndarray:
        if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
            raise ValueError(f"x must be a CPU torch tensor, got {type(x).__name__}")
        if x.dim() not in (1, 2) or x.shape[-1] != self.hidden:
            raise ValueError(f"x must be [batch, {self.hidden}] or [{self.hidden}], "
                             f"got shape {tuple(x.shape)}")
        return x.detach().reshape(-1, self.hidden).to(torch.float32).contiguous().numpy()

    def __call__(self, x, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        threshold = float(threshold)
        if math.isnan(threshold):
            raise ValueError("threshold is NaN")
        return self.select_unchecked(self._rows(x), threshold)

    def top_k(self, x, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The union over the rows of ``x`` of each row's ``k`` highest scores:
        ``(idx, mask)`` as for a threshold (ties at the k-th score broken arbitrarily, as
        ``torch.topk`` does)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= self.n_neurons:
            raise ValueError(f"k must be an int in [0, {self.n_neurons}], got {k!r}")
        return self.top_k_unchecked(self._rows(x), int(k))

    def select_unchecked(self, x32: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """``self(x, threshold)`` for a caller that has checked its arguments: ``x32``
        float32 C-contiguous ``[B, H]``, ``threshold`` a float that is not NaN."""
        raise NotImplementedError

    def scores_unchecked(self, x32: np.ndarray) -> np.ndarray:
        """float32 ``[B, N]`` scores of checked rows ``x32``."""
        raise NotImplementedError

    def top_k_unchecked(self, x32: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`top_k` for a caller that has checked ``x32`` (as for
        :meth:`select_unchecked`) and ``k`` (an int in ``[0, n_neurons]``)."""
        n = self.n_neurons
        mask = np.zeros(n, dtype=np.bool_)
        if k >= n:
            mask[:] = True
        elif k:
            best = np.argpartition(self.scores_unchecked(x32), n - k, axis=1)[:, n - k:]
            mask[best.ravel()] = True
        return np.flatnonzero(mask), mask


class LowRankSelector(DecodeSelector):
    """A low-rank predictor's decode-step selection, fused: scores, threshold and the
    union over the batch rows, returning the active neuron ids without materialising the
    scores.

        >>> sel = LowRankSelector(first, second, bias)          # [R, H], [N, R], [N]
        >>> idx, mask = sel(x, threshold)    # == nonzero((bias + x @ first.T @ second.T > t).any(0))

    ``idx`` is int64 ascending, ``mask`` bool ``[N]`` (a fresh array per call). float32
    weights only (a copy is not made: they are referenced). ``x`` is ``[B, H]`` or ``[H]``
    of any float dtype. Scores are summed in float32 in a fixed order, so a neuron whose
    score lies within rounding of the threshold may differ from a torch matmul's choice.
    """

    def __init__(self, first, second, bias, n_threads=None) -> None:
        for name, t, ndim in (("first", first, 2), ("second", second, 2), ("bias", bias, 1)):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                raise ValueError(f"{name} must be a CPU torch tensor, got {type(t).__name__}")
            if t.dtype != torch.float32:
                raise ValueError(f"{name} must be float32, got {t.dtype}")
            if t.dim() != ndim:
                raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
        rank, hidden = first.shape
        if second.shape[1] != rank:
            raise ValueError(f"second has shape {tuple(second.shape)}; expected [N, {rank}] "
                             f"for first of shape {tuple(first.shape)}")
        if bias.shape[0] != second.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries, second has {second.shape[0]} rows")
        self._n_threads = None if n_threads is None else check_threads(n_threads)
        self._tensors = tuple(t.detach().contiguous() for t in (first, second, bias))
        self._bound = _predict.BoundSelector(*(t.numpy() for t in self._tensors))
        self.rank, self.hidden, self.n_neurons = int(rank), int(hidden), int(second.shape[0])

    def select_unchecked(self, x32: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        return self._bound.select(x32, threshold, self._nt())

    def scores_unchecked(self, x32: np.ndarray) -> np.ndarray:
        return self._bound.scores(x32, self._nt())
