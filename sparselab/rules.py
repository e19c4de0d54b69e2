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

from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from sparselab.bits import pack_bits
from sparselab.masks import Masks


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


def _check_fraction(name: str, value: float, low_open: bool = True) -> None:
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")


@dataclass(frozen=True)
class Threshold(Rule):
    """Active where ``|h| > tau`` (one threshold for every layer)."""

    tau: float = 0.05

    def __post_init__(self) -> None:
        if not self.tau >= 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")

    def mask(self, values: torch.Tensor, layer: int) -> torch.Tensor:
        return values.abs() > self.tau


def _top_count(keep: float, n: int) -> int:
    return int(keep) if keep > 1 else int(round(keep * n))


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
        k = _top_count(self.keep, n)
        if k > n:
            raise ValueError(f"TopK keeps {k} neurons but the layer has {n}")
        out = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
        if k:
            idx = values.abs().topk(k, dim=-1).indices
            out.scatter_(-1, idx, True)
        return out


def layer_threshold(magnitudes: torch.Tensor, density: float) -> float:
    """Threshold ``t`` such that a share ``density`` of ``magnitudes`` is ``> t``.

    The ``(1 - density)`` quantile taken as an order statistic (no interpolation), so
    ``(magnitudes > t).mean()`` equals ``density`` up to ties.
    """
    flat = magnitudes.reshape(-1).float().cpu().numpy()
    drop = int(round((1.0 - density) * flat.size))
    if drop <= 0:
        return float("-inf")
    # numpy's introselect is several times faster than torch.kthvalue on millions of values
    return float(np.partition(flat, drop - 1)[drop - 1])


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
        _check_fraction("density", self.density)

    @property
    def fitted(self) -> bool:
        return bool(self.thresholds)

    def fit(self, trace) -> Rule:
        thresholds = {
            layer: layer_threshold(trace._get(self.source, layer).abs(), self.density)
            for layer in trace.layers
        }
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
        _check_fraction("p", self.p)

    def mask(self, values: torch.Tensor, layer: int) -> torch.Tensor:
        mags = values.abs().float()
        sorted_vals, order = mags.sort(dim=-1, descending=True)
        cum = sorted_vals.cumsum(-1)
        total = cum[..., -1:]
        # neurons before the one whose cumulative mass first reaches p * total, plus it
        count = (cum < self.p * total).sum(-1, keepdim=True) + 1
        count = count.clamp(max=values.shape[-1])
        ranks_kept = torch.arange(values.shape[-1], device=values.device) < count
        out = torch.zeros_like(ranks_kept)
        out.scatter_(-1, order, ranks_kept)
        return out


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
        [pack_bits(rule.mask(trace._get(rule.source, layer), layer).cpu().numpy()) for layer in layers]
    ) if layers else np.zeros((0, trace.n_tokens, 0), dtype=np.uint64)
    return Masks(
        bits=bits,
        n_neurons=trace.n_neurons,
        layers=layers,
        seq_ids=trace.seq_ids,
        positions=trace.positions,
        rule=rule.describe(),
    )
