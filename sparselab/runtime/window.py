"""A windowed weight cache (LLM in a Flash): hold every neuron used in the last ``k`` steps,
compute each step over its own set only.

    >>> wc = WindowedCache(_fast.WeightCache.from_bundle(wf.layer(3)), window=4)
    >>> stats = wc.update(mask)          # loads the neurons the window did not hold
    >>> y = wc.forward(x, "silu")        # over this step's neurons only: same output as k = 1

A longer window holds more rows and loads fewer per step; what is computed is the same set
whatever ``k``, so quality does not change. The same trade-off computed from masks alone
(no weights) is :func:`sparselab.metrics.window_reuse` (its ``footprint`` is ``held`` here,
its ``new_per_token`` is ``stats.added``).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from sparselab._checks import check_positive_ints
from sparselab._fast import WeightCache
from sparselab._fast._validate import (
    activation_code,
    check_threads,
    finish,
    prep_x,
    resolve_out_dtype,
)
from sparselab._fast.masks import indices, pack

__all__ = ["WindowedCache"]


class WindowedCache:
    """A :class:`~sparselab._fast.WeightCache` holding the union of the last ``window`` masks.

        >>> wc = WindowedCache(cache, window=4); wc.update(mask); y = wc(x, "silu")

    ``update`` returns the inner cache's :class:`~sparselab._fast.UpdateStats` for the
    window's union: ``added`` = rows loaded this step (from storage, for a file-backed
    cache), ``removed`` = rows evicted, ``n_active`` = rows held. ``window=1`` is the
    per-step cache. ``n_active``/``capacity``/``hidden``/``dtype``/``totals`` are the inner
    cache's.
    """

    def __init__(self, cache: WeightCache, window: int) -> None:
        if not isinstance(cache, WeightCache):
            raise ValueError(f"cache must be a sparselab._fast.WeightCache, got {type(cache).__name__}")
        (self.window,) = check_positive_ints("window", [window])
        self.cache = cache
        self._recent: deque[np.ndarray] = deque(maxlen=self.window)
        self._slots = np.empty(0, dtype=np.int64)
        self._current = np.empty(0, dtype=np.int64)

    def __repr__(self) -> str:
        return f"WindowedCache(window={self.window}, held={self.n_active}, computed={self._current.size})"

    n_active = property(lambda self: self.cache.n_active, doc="Rows held (the window's union).")
    capacity = property(lambda self: self.cache.capacity)
    hidden = property(lambda self: self.cache.hidden)
    dtype = property(lambda self: self.cache.dtype)
    totals = property(lambda self: self.cache.totals)

    @property
    def current(self) -> np.ndarray:
        """Sorted neuron ids the last step computes with."""
        return self._current

    def reset(self) -> None:
        """Forget the window (the next update loads its whole set)."""
        self._recent.clear()

    def update(self, mask):
        """Make the cache hold the union of this mask and the previous ``window - 1``; returns
        the inner cache's stats. ``mask``: bool ``[I]`` or packed uint64 words."""
        n = self.cache.n_neurons
        if isinstance(mask, torch.Tensor):
            mask = mask.numpy()
        arr = np.asarray(mask)
        if arr.dtype == np.bool_:
            if arr.shape != (n,):
                raise ValueError(f"mask has shape {arr.shape}; this cache has {n} neurons")
            words = pack(arr)
        elif arr.dtype == np.uint64 and arr.shape == self.cache.mask.shape:
            words = arr.copy()
        else:
            raise ValueError(f"mask must be bool [{n}] or uint64 words {self.cache.mask.shape}, "
                             f"got {arr.dtype} {arr.shape}")
        held = words.copy()
        for w in list(self._recent)[max(0, len(self._recent) - (self.window - 1)):] if self.window > 1 else ():
            held |= w  # the previous window - 1 masks (the oldest one leaves with this step)
        stats = self.cache.update(held)  # checks the mask (bits past n) before any change
        self._recent.append(words)
        self._current = indices(words, n)
        self._slots = self.cache.slots_of(self._current)
        return stats

    def forward(self, x, activation: str, n_threads=None, out_dtype=None) -> torch.Tensor:
        """The sparse MLP over the last update's own neurons (not the whole window)."""
        if self.window == 1:
            return self.cache.forward(x, activation, n_threads, out_dtype)
        code = activation_code(activation)
        nt = check_threads(n_threads)
        od = resolve_out_dtype(out_dtype, self.cache.dtype)
        x32, was_1d = prep_x(x, self.cache.hidden, self.cache.dtype)
        return finish(self.cache.forward_slots_unchecked(x32, self._slots, code, nt), was_1d, od)

    __call__ = forward
