"""A windowed weight cache (LLM in a Flash): hold every neuron used in the last ``k`` steps,
compute each step over its own set only.

    >>> wc = WindowedCache(_fast.WeightCache.from_bundle(wf.layer(3)), window=4)
    >>> stats = wc.update(mask)          # loads the neurons the window did not hold
    >>> y = wc.forward(x, "silu")        # over this step's neurons only: same output as k = 1

A longer window holds more rows and loads fewer per step; what is computed is the same set
whatever ``k``, so quality does not change. The same trade-off computed from masks alone
(no weights) is :func:`sparselab.metrics.window_reuse` (its ``footprint`` is ``held`` here,
its ``new_per_token`` is ``stats.added``).

Under a memory cap the rows held must be bounded: ``capacity=`` caps them (the inner cache
pre-sized to it never reallocates). The step's own neurons come first, then those of the
previous steps newest first while they fit; a step whose own set exceeds the capacity keeps
the neurons already held and computes the rest with ``overflow`` (the by-index kernel
reading the file in place), so the computed set is still exactly the step's:

    >>> cache = _fast.WeightCache.from_bundle(wf.layer(3), capacity=600)
    >>> wc = WindowedCache(cache, window=4, capacity=600, overflow=_fast.BundleMLP(wf.layer(3), ...))
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np
import torch

from sparselab._checks import check_positive_ints
from sparselab._fast import WeightCache
from sparselab._fast._validate import (
    activation_code,
    check_tail,
    check_threads,
    finish,
    prep_x,
    resolve_out_dtype,
)
from sparselab._fast.masks import indices, pack, unpack

__all__ = ["WindowedCache"]


class WindowedCache:
    """A :class:`~sparselab._fast.WeightCache` holding the union of the last ``window`` masks.

        >>> wc = WindowedCache(cache, window=4); wc.update(mask); y = wc(x, "silu")

    ``update`` returns the inner cache's :class:`~sparselab._fast.UpdateStats` for the
    window's union: ``added`` = rows loaded this step (from storage, for a file-backed
    cache), ``removed`` = rows evicted, ``n_active`` = rows held. ``window=1`` is the
    per-step cache. ``n_active``/``capacity``/``hidden``/``dtype``/``totals`` are the inner
    cache's.

    ``capacity`` (rows, default None: unbounded): at most this many rows held, whatever the
    window (see the module docstring); ``overflow`` then computes a step's neurons beyond
    it: an object with ``run_unchecked(x32, idx)`` (``_fast.BundleMLP``/``IndexedMLP``).
    ``stats.overflow`` counts them per step, ``overflow_rows`` in total.
    """

    def __init__(self, cache: WeightCache, window: int, capacity: int | None = None,
                 overflow=None) -> None:
        if not isinstance(cache, WeightCache):
            raise ValueError(f"cache must be a sparselab._fast.WeightCache, got {type(cache).__name__}")
        (self.window,) = check_positive_ints("window", [window])
        if capacity is not None:
            (capacity,) = check_positive_ints("capacity", [capacity])
            if capacity > cache.n_neurons:
                raise ValueError(f"capacity {capacity} exceeds the cache's {cache.n_neurons} neurons")
            if capacity < cache.n_neurons and not hasattr(overflow, "run_unchecked"):
                raise ValueError("a capacity below the neuron count needs overflow= (a kernel with "
                                 "run_unchecked(x32, idx)) for the neurons that do not fit")
        self.cache = cache
        self.limit = capacity
        self.overflow = overflow
        self.overflow_rows = 0
        self._recent: deque[np.ndarray] = deque(maxlen=self.window)
        self._slots = np.empty(0, dtype=np.int64)
        self._current = np.empty(0, dtype=np.int64)
        self._over = np.empty(0, dtype=np.int64)
        self._exact = True  # the cache holds exactly the step's set (cache.forward applies)

    def __repr__(self) -> str:
        return (f"WindowedCache(window={self.window}, held={self.n_active}, "
                f"computed={self._current.size}, limit={self.limit})")

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
        previous = list(self._recent)[max(0, len(self._recent) - (self.window - 1)):] if self.window > 1 else []
        current = indices(words, n)
        over = current[:0]
        if self.limit is None:
            held = words.copy()
            for w in previous:
                held |= w  # the previous window - 1 masks (the oldest one leaves with this step)
        else:
            check_tail(words[None], n, "mask")  # the bounded set is built from indices < n
            held, over = self._bounded(current, previous)
        stats = self.cache.update(held)  # checks the mask (bits past n) before any change
        self._recent.append(words)
        self._current = current
        self._over = over
        self._exact = self.window == 1 and not over.size
        self._slots = self.cache.slots_of(np.setdiff1d(current, over, assume_unique=True)
                                          if over.size else current)
        self.overflow_rows += int(over.size)
        return dataclasses.replace(stats, overflow=int(over.size)) if over.size else stats

    def _bounded(self, current: np.ndarray, previous: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(words to hold, neurons computed by ``overflow``) under ``limit`` rows: the
        step's own neurons first (those already held preferred when they do not all fit),
        then each previous step's newest first while they fit."""
        n, limit = self.cache.n_neurons, self.limit
        slot_of = self.cache.slots_of
        if current.size > limit:
            cached = slot_of(current) >= 0
            keep = np.concatenate([current[cached], current[~cached]])[:limit]
            held = np.zeros(n, dtype=bool)
            held[keep] = True
            return pack(held), current[~held[current]]
        held = np.zeros(n, dtype=bool)
        held[current] = True
        room = limit - current.size
        for w in reversed(previous):
            if not room:
                break
            extra = np.flatnonzero(unpack(w, n) & ~held)
            if extra.size > room:  # part of it: rows already held first (no load)
                extra = np.concatenate([extra[slot_of(extra) >= 0], extra[slot_of(extra) < 0]])[:room]
            held[extra] = True
            room -= extra.size
        return pack(held), current[:0]

    def forward(self, x, activation: str, n_threads=None, out_dtype=None) -> torch.Tensor:
        """The sparse MLP over the last update's own neurons (not the whole window): the
        cached ones from the cache, any beyond ``capacity`` with ``overflow``."""
        if self._exact:
            return self.cache.forward(x, activation, n_threads, out_dtype)
        code = activation_code(activation)
        nt = check_threads(n_threads)
        od = resolve_out_dtype(out_dtype, self.cache.dtype)
        x32, was_1d = prep_x(x, self.cache.hidden, self.cache.dtype)
        y = self.cache.forward_slots_unchecked(x32, self._slots, code, nt)
        if self._over.size:
            y += self.overflow.run_unchecked(x32, self._over)
        return finish(y, was_1d, od)

    __call__ = forward
