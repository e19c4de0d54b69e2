"""Random low-rank predictors: the shapes and cost of trained ones, for speed benchmarks on
random-weight models (speed does not depend on a predictor's accuracy).

    >>> p = RandomLowRankPredictors(hidden=3072, n_neurons=8192, layers=range(4), rank=327)
    >>> sl.sparsify(model, p)                 # 30 % of neurons per token, every layer
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from sparselab._checks import check_fraction
from sparselab.masking.thresholds import top_k_mask
from sparselab.models.random import fill_uniform_tiled_
from sparselab.prediction.lowrank import low_rank_scores
from sparselab.prediction.protocol import LowRankForm
from sparselab.prediction.training import resolve_rank

__all__ = ["RandomLowRankPredictors"]


class RandomLowRankPredictors:
    """Random low-rank predictors keeping the top ``density`` share of neurons per token.

        >>> p = RandomLowRankPredictors(hidden=3072, n_neurons=8192, layers=range(4), rank=327)
        >>> sl.sparsify(model, p)                 # 30 % of neurons per token, every layer

    Same shapes and cost as trained :class:`~sparselab.prediction.lowrank.Predictors`
    (``first [r, H]``, ``second [N, r]``, bias ``[N]`` per layer; ``bytes`` counts them) with
    random weights; the decode step runs them through the same fused selector (top-k).
    Masks of consecutive tokens are nearly independent, so a weight cache sees far more
    churn than with trained predictors on a real model.
    """

    lookahead = False

    def __init__(self, hidden: int, n_neurons: int, layers: Iterable[int], rank: int | float,
                 density: float = 0.3, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        layers = tuple(int(i) for i in layers)
        if not layers:
            raise ValueError("layers is empty")
        self.hidden_size, self.n_neurons = int(hidden), int(n_neurons)
        self.rank = resolve_rank(rank, self.n_neurons, self.hidden_size)
        self.density = check_fraction("density", density)
        self.seed, self.layers = int(seed), layers
        self.k = max(1, round(self.density * self.n_neurons))
        g = torch.Generator().manual_seed(self.seed)
        self._weights = {}
        for layer in layers:
            first = torch.empty(self.rank, self.hidden_size, dtype=dtype)
            second = torch.empty(self.n_neurons, self.rank, dtype=dtype)
            bias = torch.empty(self.n_neurons, dtype=dtype)
            fill_uniform_tiled_(first, 1 / math.sqrt(self.hidden_size), g)
            fill_uniform_tiled_(second, 1 / math.sqrt(self.rank), g)
            fill_uniform_tiled_(bias, 0.1, g)
            self._weights[layer] = (first, second, bias)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._weights.values()))[0].dtype

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self._weights.values() for t in w)

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return low_rank_scores(*self._weights[int(layer)], x)

    def mask(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return top_k_mask(self.scores(layer, x), self.k)

    def union_mask(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.mask(layer, x).reshape(-1, self.n_neurons).any(0)

    def low_rank_form(self, layer: int) -> LowRankForm:
        return LowRankForm(*self._weights[int(layer)], top_k=self.k)

    def at_density(self, density: float) -> RandomLowRankPredictors:
        """The same weights keeping another share of neurons per token."""
        out = object.__new__(RandomLowRankPredictors)
        out.__dict__.update(self.__dict__)
        out.density = check_fraction("density", density)
        out.k = max(1, round(out.density * self.n_neurons))
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "random_low_rank", "rank": self.rank, "density": self.density,
                "k": self.k, "seed": self.seed, "layers": list(self.layers), "bytes": self.bytes,
                "hidden_size": self.hidden_size, "intermediate_size": self.n_neurons}
