"""Masks from a synthetic activation with the measured token-to-token reuse, for speed
benchmarks on random-weight models whose own predictors would give independent masks.

    >>> p = SyntheticActivationMasks(n_neurons=8192, hidden=3072, layers=range(8), density=0.3)
    >>> sl.sparsify(model, p, weight_file=wf)     # top-k of b + z_t per layer and token

Per layer, a neuron's score for token ``t`` is ``b_j + z_j(t)``: ``b_j ~ N(0, hotness)`` is
fixed (some neurons are used far more often than others) and ``z_j`` is an AR(1) process,
``z(t) = rho z(t-1) + sqrt(1 - rho^2) eps(t)`` (neighbouring tokens share neurons); the mask
keeps the top ``density`` share. The defaults (``hotness=0.5``, ``rho=0.3``) were fitted to
the window sweep SmolLM2-135M's trained predictors gave in
``experiments/results/bench_disk_smollm2.md`` (uncapped cache, d = 0.5: new neurons per
token per neuron 0.164 / 0.100 / 0.043 / 0.011 / 0.003 for k = 1 / 2 / 4 / 8 / 16; these
masks give 0.177 / 0.108 / 0.048 / 0.014 / 0.002, i.e. ~39 % of the active neurons change per
token at d = 0.45, ~54 % at d = 0.26, against 36 % / 50 % measured). The masks do not depend
on the input: each row the predictor sees advances the process by one token.

``cost=`` another predictor (e.g. :class:`~sparselab.prediction.random.RandomLowRankPredictors`
of a trained one's rank) whose scores are computed on the input and discarded, so a decode
step pays a real predictor's time and bytes (``bytes`` is then that predictor's).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from sparselab._checks import check_fraction

__all__ = ["SyntheticActivationMasks"]


class SyntheticActivationMasks:
    """Top-k masks of a synthetic activation ``b + z(t)`` (hot neurons + AR(1) reuse).

        >>> p = SyntheticActivationMasks(8192, 3072, range(8), density=0.5, seed=0)
        >>> p.mask(0, x).shape                  # [..., 8192], exactly round(0.5 * 8192) per row

    Stateful: every call advances each layer's process by the rows of ``x``; ``reset()``
    restarts every layer from its seed (same masks again). ``at_density`` shares nothing
    mutable with the original (a fresh process, same ``b``).
    """

    lookahead = False

    def __init__(self, n_neurons: int, hidden: int, layers: Iterable[int], density: float = 0.3,
                 hotness: float = 0.5, rho: float = 0.3, seed: int = 0, cost=None,
                 dtype: torch.dtype = torch.float32) -> None:
        layers = tuple(int(i) for i in layers)
        if not layers:
            raise ValueError("layers is empty")
        if not 0.0 <= float(rho) < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {rho!r}")
        if float(hotness) < 0:
            raise ValueError(f"hotness must be >= 0, got {hotness!r}")
        if cost is not None and (int(cost.n_neurons) != int(n_neurons) or int(cost.hidden_size) != int(hidden)
                                 or not set(layers) <= {int(i) for i in cost.layers}):
            raise ValueError("cost= must be a predictor of the same shapes covering the same layers")
        self.n_neurons, self.hidden_size, self.layers = int(n_neurons), int(hidden), layers
        self.density = check_fraction("density", density)
        self.k = max(1, round(self.density * self.n_neurons))
        self.hotness, self.rho, self.seed = float(hotness), float(rho), int(seed)
        self.cost = cost
        self._dtype = dtype
        self.reset()

    def reset(self) -> None:
        """Restart every layer's process from its seed."""
        self._rng, self._b, self._z = {}, {}, {}
        for layer in self.layers:
            rng = np.random.default_rng([self.seed, layer])
            self._b[layer] = rng.normal(0.0, self.hotness, self.n_neurons)
            self._z[layer] = rng.normal(0.0, 1.0, self.n_neurons)
            self._rng[layer] = rng

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def bytes(self) -> int:
        return int(self.cost.bytes) if self.cost is not None else 0

    def mask(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        layer = int(layer)
        if layer not in self._b:
            raise ValueError(f"no synthetic masks for layer {layer} (layers {list(self.layers)})")
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"inputs have {x.shape[-1]} features, expected {self.hidden_size}")
        if self.cost is not None:
            self.cost.scores(layer, x)  # the predictor's time and bytes; its values are not used
        rows = int(np.prod(x.shape[:-1], dtype=np.int64))
        out = np.zeros((rows, self.n_neurons), dtype=bool)
        rng, b, z = self._rng[layer], self._b[layer], self._z[layer]
        a, s = self.rho, math.sqrt(1.0 - self.rho ** 2)
        for r in range(rows):
            z = a * z + s * rng.standard_normal(self.n_neurons)
            out[r, np.argpartition(-(b + z), self.k - 1)[: self.k]] = True
        self._z[layer] = z
        return torch.from_numpy(out).reshape(*x.shape[:-1], self.n_neurons)

    def low_rank_form(self, layer: int):
        return None

    def at_density(self, density: float) -> SyntheticActivationMasks:
        """The same process (same hot neurons, restarted) keeping another share per token."""
        return SyntheticActivationMasks(self.n_neurons, self.hidden_size, self.layers, density,
                                        self.hotness, self.rho, self.seed, self.cost, self._dtype)

    def describe(self) -> dict[str, Any]:
        return {"kind": "synthetic_activation", "density": self.density, "k": self.k,
                "hotness": self.hotness, "rho": self.rho, "seed": self.seed, "layers": list(self.layers),
                "cost": None if self.cost is None else self.cost.describe(), "bytes": self.bytes,
                "hidden_size": self.hidden_size, "intermediate_size": self.n_neurons}
