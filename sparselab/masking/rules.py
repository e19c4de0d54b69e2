"""Rules that turn activations into binary neuron masks.

    >>> masks = trace.masks(sl.rules.TopK(keep=0.3))               # 30 % per token
    >>> rule = sl.rules.Calibrated(density=0.5).fit(trace)         # per-layer thresholds
    >>> rule.thresholds[0], trace.masks(rule).density().mean()

Every rule reads one recorded array (``source``: ``"h"`` = act(gate)*up, or ``"gate"`` =
act(gate)) and looks at magnitudes. Rules that need statistics of a recording
(``Calibrated``, ``GateThreshold``) are fitted once with :meth:`Rule.fit` and can then be
applied to other traces or to live activations with :meth:`Rule.mask`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from sparselab._checks import check_fraction, check_fractions
from sparselab._fast.masks import pack
from sparselab.masking.masks import Masks
from sparselab.masking.thresholds import MagnitudeIndex, layer_threshold, top_count, top_k_mask

__all__ = [
    "RULES",
    "Calibrated",
    "GateThreshold",
    "MassCoverage",
    "Rule",
    "Threshold",
    "TopK",
    "apply_rule",
    "calibrated_thresholds",
    "layer_threshold",
    "mass_coverage_mask",
    "rule_from_dict",
]


@dataclass(frozen=True)
class Rule:
    """Base class: ``mask(values, layer)`` -> bool ``[tokens, neurons]``."""

    source: ClassVar[str] = "h"

    @property
    def fitted(self) -> bool:
        return True

    def fit(self, trace) -> Rule:
        """Return a rule ready to apply (rules without statistics return themselves)."""
        return self

    def mask(self, values: torch.Tensor, layer: int) -> torch.Tensor:
        """Boolean mask of ``values`` (the raw ``source`` array, any sign) of one layer."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able description (kept with masks, predictors and results)."""
        out = {"name": type(self).__name__, "source": self.source}
        for key, value in asdict(self).items():
            if isinstance(value, dict):
                value = {str(k): float(v) for k, v in value.items()}
            out[key] = value
        return out

    @property
    def label(self) -> str:
        """Short human-readable label for legends and tables."""
        params = {k: v for k, v in asdict(self).items() if not isinstance(v, dict)}
        inner = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        return f"{type(self).__name__}({inner})"


@dataclass(frozen=True)
class Threshold(Rule):
    """Active where ``|h| > tau`` (one threshold for every layer)."""

    tau: float = 0.05

    def __post_init__(self) -> None:
        if not self.tau >= 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")

    def mask(self, values: torch.Tensor, layer: int) -> torch.Tensor:
        return values.abs() > self.tau


@dataclass(frozen=True)
class TopK(Rule):
    """The ``keep`` largest ``|h|`` per token: a fraction in (0, 1] or a count (> 1)."""

    keep: float = 0.5

    def __post_init__(self) -> None:
        # a count must be whole: TopK(keep=2.5) would silently keep 2
        if not self.keep > 0 or (self.keep > 1 and self.keep != int(self.keep)):
            raise ValueError(
                f"keep must be a fraction in (0, 1] or a whole count > 1, got {self.keep}"
            )

    def mask(self, values: torch.Tensor, layer: int) -> torch.Tensor:
        n = values.shape[-1]
        k = top_count(self.keep, n)
        if k > n:
            raise ValueError(f"TopK keeps {k} neurons but the layer has {n}")
        return top_k_mask(values.abs(), k)


def calibrated_thresholds(trace, source: str, densities: Sequence[float],
                          index: MagnitudeIndex | None = None) -> dict[float, dict[int, float]]:
    """``{density: {layer: threshold}}``: per layer, the ``1 - density`` order statistic of
    ``|source|`` over all recorded tokens (the thresholds ``Calibrated`` fits).

        >>> calibrated_thresholds(trace, "h", [0.3, 0.5])[0.3][0]

    The magnitudes are read once into a :class:`MagnitudeIndex` (a histogram for fp16
    recordings; pass ``index`` to reuse one built on ``trace.arrays[source]``), so each
    extra density costs microseconds per layer.
    """
    values = check_fractions("densities", densities)
    if source not in trace.arrays:
        raise KeyError(f"{source!r} was not recorded (recorded: {sorted(trace.arrays)}); "
                       f"record with store=(..., {source!r})")
    if index is None and hasattr(trace.arrays[source], "to_dask"):  # a streamed (Zarr) trace
        from sparselab.masking.streamed import chunked_thresholds

        return chunked_thresholds(trace, source, values)
    index = MagnitudeIndex(trace.arrays[source]) if index is None else index
    return {d: {layer: index.threshold(i, d) for i, layer in enumerate(trace.layers)} for d in values}


@dataclass(frozen=True)
class Calibrated(Rule):
    """Per-layer thresholds on ``|h|`` so that each layer keeps a share ``density``.

    TEAL-style: the threshold of a layer is the ``1 - density`` quantile of its ``|h|``
    over all recorded tokens. :meth:`fit` computes them; the fitted rule applies the same
    thresholds to any other tokens.
    """

    density: float = 0.5
    thresholds: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fraction("density", self.density)

    @property
    def fitted(self) -> bool:
        return bool(self.thresholds)

    def fit(self, trace) -> Rule:
        thresholds = calibrated_thresholds(trace, self.source, [self.density])[float(self.density)]
        return replace(self, thresholds=thresholds)

    def mask(self, values: torch.Tensor, layer: int) -> torch.Tensor:
        if layer not in self.thresholds:
            raise ValueError(
                f"{type(self).__name__} has no threshold for layer {layer}: call .fit(trace) "
                f"first (fitted layers: {sorted(self.thresholds)})"
            )
        return values.abs() > self.thresholds[layer]


@dataclass(frozen=True)
class GateThreshold(Calibrated):
    """CATS-style: per-layer thresholds on ``|act(gate)|`` calibrated to ``density``."""

    source: ClassVar[str] = "gate"


@dataclass(frozen=True)
class MassCoverage(Rule):
    """Per token, the smallest neuron set holding a share ``p`` of the ``|h|`` mass."""

    p: float = 0.9

    def __post_init__(self) -> None:
        check_fraction("p", self.p)

    def mask(self, values: torch.Tensor, layer: int) -> torch.Tensor:
        sorted_vals, order = values.abs().float().sort(dim=-1, descending=True)
        return mass_coverage_mask(sorted_vals.cumsum(-1), order, self.p)


def mass_coverage_mask(cum: torch.Tensor, order: torch.Tensor, p: float) -> torch.Tensor:
    """:class:`MassCoverage`'s mask from each row's magnitudes sorted in descending order:
    ``cum`` their cumulative sums, ``order`` the sort's indices (callers that try many
    ``p`` on the same rows sort once and call this for each)."""
    n = cum.shape[-1]
    cum = cum.double()  # p * total rounded to float32 can fall below the mass it must reach
    # neurons before the one whose cumulative mass first reaches p * total, plus it
    count = ((cum < p * cum[..., -1:]).sum(-1, keepdim=True) + 1).clamp(max=n)
    ranks_kept = torch.arange(n, device=cum.device) < count
    return torch.zeros_like(ranks_kept).scatter_(-1, order, ranks_kept)


RULES = {cls.__name__: cls for cls in (Threshold, TopK, Calibrated, MassCoverage, GateThreshold)}


def rule_from_dict(spec: dict[str, Any]) -> Rule:
    """Inverse of :meth:`Rule.describe` (used when loading saved artefacts)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    spec.pop("source", None)
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; known: {sorted(RULES)}")
    if "thresholds" in spec:
        spec["thresholds"] = {int(k): float(v) for k, v in spec["thresholds"].items()}
    return RULES[name](**spec)


def apply_rule(rule: Rule, trace, layers=None) -> Masks:
    """Masks of every token of ``trace`` in ``layers`` (default: all recorded) under ``rule``.

    A rule that needs fitting and is not fitted is fitted on this trace.
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"expected a sparselab.rules rule, got {type(rule).__name__}")
    if not rule.fitted:
        rule = rule.fit(trace)
    layers = trace.layers if layers is None else tuple(layers)
    bits = np.stack(
        [pack(rule.mask(trace.values(rule.source, layer), layer).cpu().numpy()) for layer in layers]
    ) if layers else np.zeros((0, trace.n_tokens, 0), dtype=np.uint64)
    return Masks(
        bits=bits,
        n_neurons=trace.n_neurons,
        layers=layers,
        seq_ids=trace.seq_ids,
        positions=trace.positions,
        rule=rule.describe(),
    )
