"""The selection methods of the field, each a :class:`~sparselab.prediction.selection.SelectionMethod`.

    >>> from sparselab.prediction import methods as M
    >>> teal = M.TEAL(x_keep=0.7, h_keep=0.5).fit(model, train_trace)   # thresholds from training text
    >>> df = sl.frontier(model, tokenizer, [M.Oracle(0.5), teal], held_out)

- :class:`Oracle`: the top ``density`` of ``|h|`` for gate, up and down (needs ``h`` to
  choose: not realizable, the envelope every method is judged against);
- :class:`Predicted`: any :class:`~sparselab.prediction.MaskPredictor` (e.g. the trained
  low-rank ``sl.Predictors``): its mask for gate, up and down, its weights as extra bytes;
- :class:`Shadow`: a ``bits``-bit group-quantized copy of gate and up computes an
  approximate ``h``; its top ``density`` rows are then computed exactly (gate, up, down);
- :class:`TEAL`: per-layer calibrated magnitude threshold on ``x`` (gate and up read the
  kept input channels only), then the top ``h_keep`` of the computed ``|h|`` for down;
- :class:`WINA`: as TEAL, scoring input channel ``j`` by ``|x_j|`` times the norm of
  gate's and up's column ``j``, and neuron ``i`` for down by ``|h_i|`` times the norm of
  down's column ``i`` (its exact contribution size);
- :class:`CATS`: dense gate, then up and down only where ``|act(gate)|`` exceeds a
  per-layer calibrated threshold;
- :class:`TwoStage`: a predictor's superset for gate and up, then the top ``keep`` of the
  computed ``|h|`` within it for down.

Thresholds are fitted by :meth:`fit` on a trace of *training* text (recorded with
``mlp_in`` and ``gate``); evaluate on held-out text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from sparselab._checks import check_fraction
from sparselab.masking.thresholds import layer_threshold
from sparselab.prediction.quantize import dequantize_groups, quantize_groups, quantized_bytes
from sparselab.prediction.selection import MLPWeights, Selection, top_share

__all__ = ["CATS", "TEAL", "WINA", "Oracle", "Predicted", "Shadow", "TwoStage", "default_methods"]


def _layer_weights(model) -> dict[int, MLPWeights]:
    from sparselab.models import activation_module, adapter_for

    adapter = adapter_for(model)
    out = {}
    for spec in adapter.layers:
        gate, up = spec.gate_up_weights()
        act = activation_module(spec.mlp) or adapter.act_fn
        out[spec.index] = MLPWeights(spec.index, gate.detach(), up.detach(),
                                     spec.down_proj.weight.detach(), act)
    return out


def _need(table: dict, layer: int, what: str) -> Any:
    if layer not in table:
        raise ValueError(f"{what} has no fitted value for layer {layer} (fitted layers: "
                         f"{sorted(table)}): call .fit(model, trace) with a trace of every layer")
    return table[layer]


def _check_trace(trace, arrays: tuple[str, ...], what: str) -> None:
    missing = [a for a in arrays if a not in getattr(trace, "arrays", {})]
    if missing:
        raise ValueError(f"{what}.fit needs a trace recorded with {missing} "
                         f"(sl.record(..., store=('h', 'gate', 'mlp_in')))")


class _Base:
    """Shared plumbing: a label, a fitted flag, a JSON-able description."""

    name = "method"
    realizable = True

    @property
    def fitted(self) -> bool:
        return True

    def fit(self, model, trace):
        return self

    def describe(self) -> dict[str, Any]:
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if not f.name.startswith("_") and f.name != "predictors"}
        return {"method": self.name, "point": self.point, "realizable": self.realizable, **params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.point})"


@dataclass(repr=False)
class Oracle(_Base):
    """The top ``density`` of the exact ``|h|`` per token for gate, up and down."""

    density: float
    name = "oracle"
    realizable = False

    def __post_init__(self) -> None:
        self.density = check_fraction("density", self.density)

    @property
    def point(self) -> str:
        return f"{self.density:g}"

    def select(self, x: torch.Tensor, w: MLPWeights) -> Selection:
        m = top_share(w.h(x).abs(), self.density)
        return Selection(gate_rows=m, up_rows=m, down_rows=m)


def _predictor_layer_bytes(predictors, layer: int) -> int:
    lw = getattr(predictors, "layer_weights", None)
    if callable(lw):
        return int(sum(t.numel() * t.element_size() for t in lw(layer)))
    return int(predictors.bytes) // max(1, len(predictors.layers))


@dataclass(repr=False)
class Predicted(_Base):
    """A :class:`~sparselab.prediction.MaskPredictor` at ``density`` (None: as given):
    its mask for gate, up and down; its own weights are read on every token."""

    predictors: Any
    density: float | None = None
    name = "predicted"

    def __post_init__(self) -> None:
        if getattr(self.predictors, "lookahead", False):
            raise ValueError("selection methods read the MLP input; lookahead predictors are "
                             "run by sl.sparsify(model, predictors) instead")
        if self.density is not None:
            self.predictors = self.predictors.at_density(check_fraction("density", self.density))

    @property
    def point(self) -> str:
        return "as trained" if self.density is None else f"{self.density:g}"

    def select(self, x: torch.Tensor, w: MLPWeights) -> Selection:
        p = self.predictors
        m = p.mask(w.layer, x.to(p.dtype)).to(torch.bool)
        return Selection(gate_rows=m, up_rows=m, down_rows=m,
                         extra_bytes=_predictor_layer_bytes(p, w.layer))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["predictors"] = self.predictors.describe() if hasattr(self.predictors, "describe") else None
        return d


@dataclass(repr=False)
class TwoStage(Predicted):
    """A predictor's mask at ``superset`` density for gate and up, then the top ``keep``
    (share of all neurons) of the computed ``|h|`` within it for down."""

    superset: float = 0.7
    keep: float = 0.5
    name = "two-stage"

    def __post_init__(self) -> None:
        self.superset = check_fraction("superset", self.superset)
        self.keep = check_fraction("keep", self.keep)
        self.density = self.superset
        super().__post_init__()

    @property
    def point(self) -> str:
        return f"{self.superset:g}->{self.keep:g}"

    def select(self, x: torch.Tensor, w: MLPWeights) -> Selection:
        first = super().select(x, w)
        h = w.h(x).abs() * first.gate_rows
        down = top_share(h, self.keep) & first.gate_rows
        return dataclasses.replace(first, down_rows=down)


@dataclass(repr=False)
class Shadow(_Base):
    """Approximate ``h`` from ``bits``-bit copies of gate and up; its top ``density`` rows
    are computed exactly. Extra bytes: the quantized gate and up (codes + fp16 scales).
    ``calibrated=True``: the rows above a per-layer threshold on the approximate ``|h|``
    that keeps ``density`` on training text (a per-token count that varies, same mean)."""

    density: float
    bits: int = 4
    group: int = 64
    calibrated: bool = False
    x_bits: int | None = None
    _gate: dict = field(default_factory=dict)
    _up: dict = field(default_factory=dict)
    _thresholds: dict = field(default_factory=dict)
    _codes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.density = check_fraction("density", self.density)
        if self.x_bits not in (None, 8):
            raise ValueError(f"x_bits must be None (float x) or 8, got {self.x_bits!r}")

    @property
    def name(self) -> str:
        return "shadow-cal" if self.calibrated else "shadow"

    @property
    def point(self) -> str:
        return f"{self.density:g}" + ("/x8" if self.x_bits == 8 else "")

    @property
    def fitted(self) -> bool:
        return bool(self._gate)

    def _x(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The input the scores read: ``x``, or (``x_bits=8``) its per-group int8 rounding
        as the compiled kernel computes it."""
        if self.x_bits == 8:
            from sparselab._fast.shadow import quantize_x

            return quantize_x(x, self.group).to(dtype)
        return x.to(dtype)

    @property
    def bytes(self) -> int:
        """Bytes of the quantized copies of every fitted layer (read once per token)."""
        return int(sum(2 * quantized_bytes(tuple(g.shape), self.bits, self.group)
                       for g in self._gate.values()))

    @property
    def fast_decode(self) -> bool:
        """Whether ``sl.sparsify(..., kernel="fast")`` runs decode steps with the compiled
        selection (:class:`sparselab._fast.shadow.ShadowSelector`): 4-bit codes, group 64
        and ``x_bits=8`` (the kernel's int8 x), so it selects what :meth:`select` does
        (up to float32 rounding at the threshold)."""
        return self.bits == 4 and self.x_bits == 8 and self.group % 64 == 0 and bool(self._codes)

    def fast_selector(self, layer: int, activation: str):
        """The compiled selection of ``layer`` (see :attr:`fast_decode`)."""
        from sparselab._fast.shadow import ShadowSelector

        if not self.fast_decode:
            raise ValueError("the compiled shadow selection needs bits=4, x_bits=8 and a fitted method")
        qg, sg, qu, su = _need(self._codes, layer, "Shadow")
        return ShadowSelector(qg, sg, qu, su, self.group, activation)

    def fast_rule(self, layer: int, n_neurons: int) -> tuple[float | None, int | None]:
        """``(threshold, None)`` (calibrated) or ``(None, k)`` (top-k) of ``layer``."""
        if self.calibrated:
            return float(_need(self._thresholds, layer, "Shadow(calibrated=True)")), None
        from sparselab.masking.thresholds import top_count

        return None, int(top_count(self.density, n_neurons))

    def fit(self, model, trace=None) -> Shadow:
        """Quantize every layer's gate and up (no data needed unless ``calibrated``: then
        the per-layer threshold on the approximate ``|h|`` comes from ``trace``'s inputs)."""
        if self.calibrated:
            _check_trace(trace, ("mlp_in",), "Shadow(calibrated=True)")
        gates, ups, thresholds, codes = {}, {}, {}, {}
        for layer, w in _layer_weights(model).items():
            qg, qu = quantize_groups(w.gate, self.bits, self.group), quantize_groups(w.up, self.bits, self.group)
            gates[layer] = dequantize_groups(*qg, self.group)
            ups[layer] = dequantize_groups(*qu, self.group)
            if self.bits == 4:  # kept for the compiled selection (fast_selector)
                codes[layer] = (*qg, *qu)
            if self.calibrated and layer in trace.layers:
                x = self._x(trace.mlp_inputs(layer), gates[layer].dtype)
                approx = w.act(x @ gates[layer].T) * (x @ ups[layer].T)
                thresholds[layer] = layer_threshold(approx.abs(), self.density)
        return dataclasses.replace(self, _gate=gates, _up=ups, _thresholds=thresholds, _codes=codes)

    def at_density(self, density: float) -> Shadow:
        """The same quantized copies at another density (no re-quantization)."""
        return dataclasses.replace(self, density=density)

    def select(self, x: torch.Tensor, w: MLPWeights) -> Selection:
        g = _need(self._gate, w.layer, "Shadow")
        u = self._up[w.layer]
        xf = self._x(x, g.dtype)
        approx = w.act(xf @ g.T) * (xf @ u.T)
        if self.calibrated:
            m = approx.abs() > _need(self._thresholds, w.layer, "Shadow(calibrated=True)")
        else:
            m = top_share(approx.abs(), self.density)
        extra = 2 * quantized_bytes(tuple(w.gate.shape), self.bits, self.group)
        return Selection(gate_rows=m, up_rows=m, down_rows=m, extra_bytes=extra)


@dataclass(repr=False)
class TEAL(_Base):
    """Gate and up read the input channels with ``|x_j|`` above a per-layer threshold that
    keeps ``x_keep`` of them on training text; down reads the top ``h_keep`` of ``|h|``
    (``calibrated=True``: the ``|h|`` above a per-layer threshold keeping ``h_keep`` of
    the recorded ``h`` of training text)."""

    x_keep: float
    h_keep: float
    calibrated: bool = False
    _thresholds: dict = field(default_factory=dict)
    _down_thresholds: dict = field(default_factory=dict)
    base_name = "teal"

    @property
    def name(self) -> str:
        return f"{self.base_name}-cal" if self.calibrated else self.base_name

    def __post_init__(self) -> None:
        self.x_keep = check_fraction("x_keep", self.x_keep)
        self.h_keep = check_fraction("h_keep", self.h_keep)

    @property
    def point(self) -> str:
        return f"x{self.x_keep:g}/h{self.h_keep:g}"

    @property
    def fitted(self) -> bool:
        return bool(self._thresholds)

    def _channel_scores(self, x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
        return x.abs()

    def _down_scores(self, h: torch.Tensor, w: MLPWeights) -> torch.Tensor:
        return h.abs()

    def fit(self, model, trace):
        _check_trace(trace, ("mlp_in",), type(self).__name__)
        if self.calibrated:
            _check_trace(trace, ("h",), type(self).__name__ + "(calibrated=True)")
        weights = _layer_weights(model)
        thresholds, down = {}, {}
        for layer in trace.layers:
            w = weights[layer]
            x = trace.mlp_inputs(layer).to(w.gate.dtype)
            thresholds[int(layer)] = layer_threshold(self._channel_scores(x, w), self.x_keep)
            if self.calibrated:
                h = trace.activations(layer).to(w.gate.dtype)
                down[int(layer)] = layer_threshold(self._down_scores(h, w), self.h_keep)
        return dataclasses.replace(self, _thresholds=thresholds, _down_thresholds=down)

    def select(self, x: torch.Tensor, w: MLPWeights) -> Selection:
        t = _need(self._thresholds, w.layer, type(self).__name__)
        inputs = self._channel_scores(x, w) > t
        h = w.h(x * inputs.to(x.dtype))
        if self.calibrated:
            down = self._down_scores(h, w) > _need(self._down_thresholds, w.layer, type(self).__name__)
        else:
            down = top_share(self._down_scores(h, w), self.h_keep)
        return Selection(inputs=inputs, down_rows=down)


@dataclass(repr=False)
class WINA(TEAL):
    """TEAL with weight-informed scores: input channel ``j`` by ``|x_j|`` times the norm of
    gate's and up's column ``j`` together; neuron ``i`` by ``|h_i|`` times the norm of
    down's column ``i``."""

    base_name = "wina"

    def _channel_scores(self, x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
        norms = (w.gate.pow(2).sum(0) + w.up.pow(2).sum(0)).sqrt()
        return x.abs() * norms

    def _down_scores(self, h: torch.Tensor, w: MLPWeights) -> torch.Tensor:
        return h.abs() * w.down.norm(dim=0)


@dataclass(repr=False)
class CATS(_Base):
    """Dense gate; up and down only for neurons with ``|act(gate)|`` above a per-layer
    threshold that keeps ``density`` of them on training text."""

    density: float
    _thresholds: dict = field(default_factory=dict)
    name = "cats"

    def __post_init__(self) -> None:
        self.density = check_fraction("density", self.density)

    @property
    def point(self) -> str:
        return f"{self.density:g}"

    @property
    def fitted(self) -> bool:
        return bool(self._thresholds)

    def fit(self, model, trace) -> CATS:
        _check_trace(trace, ("gate",), "CATS")
        thresholds = {int(layer): layer_threshold(trace.gate_activations(layer).abs(), self.density)
                      for layer in trace.layers}
        return dataclasses.replace(self, _thresholds=thresholds)

    def select(self, x: torch.Tensor, w: MLPWeights) -> Selection:
        t = _need(self._thresholds, w.layer, "CATS")
        a = w.act(x @ w.gate.T)
        m = a.abs() > t
        return Selection(up_rows=m, down_rows=m)


def default_methods(predictors=None) -> list:
    """A small grid of every method (unfitted) for a frontier: each method at two or three
    operating points around half the MLP's bytes. ``predictors`` (trained, not lookahead)
    adds the trained and two-stage rows."""
    out: list = [Oracle(d) for d in (0.4, 0.5, 0.6)]
    out += [Shadow(d) for d in (0.45, 0.5, 0.6)]
    out += [TEAL(0.7, 0.5), TEAL(0.8, 0.5), WINA(0.7, 0.5), WINA(0.8, 0.5)]
    out += [CATS(0.5), CATS(0.7)]
    if predictors is not None:
        out += [Predicted(predictors, d) for d in (0.5, 0.7)]
        out += [TwoStage(predictors, superset=s, keep=k) for s, k in ((0.7, 0.5), (0.8, 0.5))]
    return out
