"""What a predictor must offer to drive a sparse model: the one interface that
:func:`sparselab.sparsify`, the fused C selector and :func:`sparselab.evaluate` use.

    >>> isinstance(predictors, MaskPredictor)       # any form plugs in: trained, random, yours
    True
    >>> form = predictors.low_rank_form(3)          # None: the runtime calls .mask() instead

A predictor needs no base class: anything with these members works. One whose scores are
``bias + second @ (first @ x)`` says so through :meth:`MaskPredictor.low_rank_form`, and a
decode step then runs scores, selection and the union over the batch in one compiled pass
(:class:`sparselab._fast.LowRankSelector`); any other form returns None and its
:meth:`~MaskPredictor.mask` runs in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["LowRankForm", "MaskPredictor", "at_density"]


@dataclass(frozen=True)
class LowRankForm:
    """A layer's predictor as the fused selector runs it: scores
    ``bias + second @ (first @ x)`` (``first [r, H]``, ``second [N, r]``, ``bias [N]``),
    then either the scores ``> threshold`` or each row's ``top_k`` best (exactly one set)."""

    first: torch.Tensor
    second: torch.Tensor
    bias: torch.Tensor
    threshold: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.top_k is None):
            raise ValueError("a LowRankForm selects by exactly one of threshold or top_k")


@runtime_checkable
class MaskPredictor(Protocol):
    """Predicts, per layer, which MLP neurons each token needs.

    - ``layers``: model layer numbers it covers; ``hidden_size``, ``n_neurons``: shapes;
    - ``lookahead``: True if it reads the layer's input-norm output (before attention)
      rather than the MLP's input;
    - ``bytes``: bytes of its own weights, read on every forward (the byte bound counts
      them); ``dtype``: the dtype inputs are cast to;
    - ``mask(layer, x)``: bool ``[..., n_neurons]`` for inputs ``[..., hidden_size]``;
    - ``low_rank_form(layer)``: a :class:`LowRankForm` if the fused selector can run it;
    - ``at_density(d)``: a copy keeping a share ``d`` of neurons per token;
    - ``describe()``: JSON-able description kept with results.
    """

    @property
    def layers(self) -> tuple[int, ...]: ...

    @property
    def lookahead(self) -> bool: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def n_neurons(self) -> int: ...

    @property
    def bytes(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def mask(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...

    def low_rank_form(self, layer: int) -> LowRankForm | None: ...

    def at_density(self, density: float) -> MaskPredictor: ...

    def describe(self) -> dict[str, Any]: ...


def at_density(predictors: MaskPredictor, density: float | None) -> MaskPredictor:
    """``predictors`` keeping a share ``density`` of neurons per token (unchanged for None).

        >>> p30 = at_density(predictors, 0.3)
    """
    from sparselab._checks import check_fraction

    if density is None:
        return predictors
    return predictors.at_density(check_fraction("density", density))
