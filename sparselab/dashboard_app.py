"""Interactive exploration of a recorded trace: rule, threshold and layer sliders.

    >>> dash = sl.dashboard(trace)              # displays itself in a notebook cell
    >>> dash.set(rule="TopK", value=0.3, layer=12)   # programmatic, same path as a slider
    >>> dash.layer_densities()                  # what the density figure shows

Every control change recomputes masks from the recording (the model is never re-run)
and updates three ``go.FigureWidget`` figures in place: density by layer, the token x
neuron mask of the chosen layer, and churn over tokens of that layer.

Why it is fast: the density of *every* layer is needed on each move, but never the
masks of every layer. :class:`MagnitudeIndex` keeps, per layer, the exact distribution
of ``|h|`` (a histogram over the 2^15 fp16 magnitudes, or sorted values for other
dtypes), from which calibrated thresholds (any target) and the share above a threshold
come in microseconds; TopK's density is ``k / n``; MassCoverage tabulates every layer's
mean density for each slider position the first time it is chosen. Only the selected layer's mask is computed, with
the rule itself, so what is drawn is exactly ``trace.masks(rule)``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from sparselab import figures, metrics, rules
from sparselab.masks import Masks

__all__ = ["RULE_NAMES", "Dashboard", "MagnitudeIndex", "dashboard"]

RULE_NAMES = ("Calibrated", "TopK", "MassCoverage", "GateThreshold", "Threshold")
# rule name -> (parameter the slider sets, its default)
_PARAMETER = {
    "Calibrated": ("density", 0.5),
    "TopK": ("keep", 0.5),
    "MassCoverage": ("p", 0.9),
    "GateThreshold": ("density", 0.5),
    "Threshold": ("tau", None),  # default: median |h| over layers, from the data
}
_FP16_PATTERNS = 0x7C00 + 1  # non-negative finite fp16 bit patterns, plus +inf


class MagnitudeIndex:
    """Exact order statistics of ``|values|`` per layer, for instant calibration.

        >>> index = MagnitudeIndex(trace.arrays["h"])        # [layers, tokens, neurons]
        >>> thr = index.threshold(0, density=0.5)            # == rules.layer_threshold
        >>> index.share_above(0, thr)                        # ~0.5

    fp16 arrays (the recorder's default) are indexed by a histogram of their bit patterns:
    magnitudes of fp16 numbers take at most 2^15 values and their bit patterns sort like
    the values, so counting them is exact and O(n). Other dtypes keep sorted float32
    copies.
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
            self._sorted = [np.sort(values[i].float().abs().numpy().ravel()) for i in range(values.shape[0])]

    def threshold(self, layer_index: int, density: float) -> float:
        """Same value as :func:`sparselab.rules.layer_threshold` on that layer's magnitudes."""
        drop = int(round((1.0 - density) * self.n))
        if drop <= 0:
            return float("-inf")
        if self._fp16:
            return float(self._table[min(int(np.searchsorted(self._cum[layer_index], drop)), _FP16_PATTERNS - 1)])
        return float(self._sorted[layer_index][drop - 1])

    def share_above(self, layer_index: int, tau: float) -> float:
        """Share of the layer's magnitudes ``> tau`` (compared in float32, as torch does)."""
        tau32 = np.float32(tau)
        if self._fp16:
            cum = self._cum[layer_index]
            at_most = int(np.searchsorted(self._table, tau32, side="right"))
            below = int(cum[at_most - 1]) if at_most > 0 else 0
            return (int(cum[-1]) - below) / self.n
        s = self._sorted[layer_index]
        finite = len(s) - int(np.isnan(s).sum())
        return (finite - int(np.searchsorted(s[:finite], tau32, side="right"))) / self.n

    def quantile(self, layer_index: int, q: float) -> float:
        """Order-statistic ``q`` quantile of the layer's magnitudes."""
        return self.threshold(layer_index, 1.0 - q)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    try:
        return bool(a == b)
    except ValueError:  # nested containers holding arrays
        return False


_LAYOUT_KEYS = ("title", "shapes", "annotations")


def _sync(target: go.FigureWidget, source: go.Figure, previous: dict[str, Any]) -> None:
    """Copy what changed in ``source`` into a displayed figure, without re-creating it.

    ``previous`` remembers what was sent last time (per figure), so unchanged properties
    (e.g. the heatmap's axis labels while only the threshold moves) are neither
    re-validated nor re-sent to the browser.
    """
    specs = [t.to_plotly_json() for t in source.data]
    layout = {k: source.layout[k] for k in _LAYOUT_KEYS}
    old_specs = previous.get("traces")
    if old_specs is None or [s["type"] for s in specs] != [s["type"] for s in old_specs]:
        target.data = ()
        target.add_traces(list(source.data))
        changed_traces = []
    else:
        changed_traces = []
        for i, (spec, old) in enumerate(zip(specs, old_specs, strict=True)):
            delta = {k: v for k, v in spec.items() if k not in ("type", "uid") and not _same(v, old.get(k))}
            if delta:
                changed_traces.append((i, delta))
    with target.batch_update():
        for i, delta in changed_traces:
            target.data[i].update(delta, overwrite=True)
        for key, value in layout.items():
            if key not in previous.get("layout", {}) or previous["layout"][key] != value:
                target.layout[key] = value
    previous["traces"] = specs
    previous["layout"] = layout


class Dashboard:
    """The app behind :func:`dashboard`: ``.widget`` to display, ``.set(...)`` to drive it.

        >>> dash = Dashboard(trace, layer=5)
        >>> dash.set(value=0.3)
        >>> dash.figures["heatmap"].data[0].z.shape          # [tokens shown, neurons shown]
        >>> dash.last_update_seconds

    Attributes: ``widget`` (ipywidgets VBox), ``controls`` (``rule``, ``value``,
    ``layer`` widgets), ``figures`` (``density``, ``heatmap``, ``churn`` FigureWidgets),
    ``masks`` (the selected layer's current :class:`Masks`), ``last_update_seconds``.
    """

    def __init__(
        self,
        trace,
        layer: int | None = None,
        rule: str = "Calibrated",
        value: float | None = None,
        max_tokens: int = 96,
        max_neurons: int = 256,
    ) -> None:
        import ipywidgets as widgets

        if "h" not in trace.arrays:
            raise ValueError(f"the dashboard needs 'h' in the trace (recorded: {sorted(trace.arrays)})")
        if trace.n_tokens < 2:
            raise ValueError(f"the trace holds {trace.n_tokens} token(s); the dashboard needs at least 2")
        self.rule_names = tuple(r for r in RULE_NAMES if r != "GateThreshold" or "gate" in trace.arrays)
        layer = trace.layers[0] if layer is None else int(layer)
        trace.layer_index(layer)  # clear error for a layer that was not recorded
        self._check_rule_name(rule)

        self.trace = trace
        self.max_tokens = int(max_tokens)
        self.max_neurons = int(max_neurons)
        self.last_update_seconds = float("nan")
        self.masks: Masks | None = None
        self._index: dict[str, MagnitudeIndex] = {}
        self._values: OrderedDict[tuple[str, int], Any] = OrderedDict()  # small LRU
        self._neuron_order: dict[int, np.ndarray] = {}
        self._mass_table: dict[np.float32, np.ndarray] | None = None
        self._thresholds: dict[tuple[str, float], dict[int, float]] = {}
        self._updating = False

        h_index = self._magnitudes("h")
        medians = [h_index.quantile(i, 0.5) for i in range(trace.n_layers)]
        self._tau_default = float(np.median(medians))
        tau_max = max(h_index.quantile(i, 0.9) for i in range(trace.n_layers))
        self._tau_max = float(f"{tau_max * 1.05:.2g}") or 1.0

        self.controls = {
            "rule": widgets.Dropdown(options=list(self.rule_names), value=rule, description="rule"),
            "value": widgets.FloatSlider(description="target", continuous_update=False,
                                         readout_format=".3g", layout={"width": "380px"}),
            "layer": widgets.SelectionSlider(options=list(trace.layers), value=layer, description="layer",
                                             continuous_update=False, layout={"width": "380px"}),
        }
        for name, control in self.controls.items():
            control.add_class(f"sparselab-{name}")  # stable hooks for browser tests
        self._status = widgets.HTML()
        self._configure_slider(rule, value)

        start = time.perf_counter()
        rule_now, layer_now, mask, densities = self._compute()
        self._sent: dict[str, dict[str, Any]] = {}
        self.figures = {}
        for name, fig in self._fresh_figures(rule_now, layer_now, mask, densities).items():
            self.figures[name] = go.FigureWidget(fig)
            self._sent[name] = {
                "traces": [t.to_plotly_json() for t in fig.data],
                "layout": {k: fig.layout[k] for k in _LAYOUT_KEYS},
            }
        self._report(start, rule_now, layer_now, mask)
        self.widget = widgets.VBox(
            [
                widgets.HBox(list(self.controls.values())),
                self._status,
                self.figures["density"],
                self.figures["heatmap"],
                self.figures["churn"],
            ]
        )
        self.controls["rule"].observe(self._on_rule, names="value")
        self.controls["value"].observe(self._on_change, names="value")
        self.controls["layer"].observe(self._on_change, names="value")

    # -- caches -------------------------------------------------------------------------
    def _magnitudes(self, source: str) -> MagnitudeIndex:
        if source not in self._index:
            self._index[source] = MagnitudeIndex(self.trace.arrays[source])
        return self._index[source]

    def _layer_values(self, source: str, layer: int) -> torch.Tensor:
        """float32 ``[tokens, neurons]`` of a layer; a few recent layers stay cached."""
        key = (source, layer)
        if key not in self._values:
            self._values[key] = self.trace._get(source, layer)
            while len(self._values) > 4:
                self._values.popitem(last=False)
        self._values.move_to_end(key)
        return self._values[key]

    def _neurons_for(self, layer: int) -> np.ndarray:
        """Heatmap columns: neurons by mean |h| (rule-independent, so they stay put)."""
        if layer not in self._neuron_order:
            mean_abs = self._layer_values("h", layer).abs().mean(0).numpy()
            order = np.argsort(-mean_abs, kind="stable")
            if len(order) > self.max_neurons:
                order = order[np.linspace(0, len(order) - 1, self.max_neurons).round().astype(np.int64)]
            self._neuron_order[layer] = order
        return self._neuron_order[layer]

    def _mass_density_table(self) -> dict[np.float32, np.ndarray]:
        """MassCoverage mean density of every layer for each slider position ``p``.

        Built on first use: one sort per layer (the rule's own ops, so the counts are the
        rule's), then a binary search per token for all grid values at once. Keyed by
        ``float32(p)`` because the rule compares in float32.
        """
        if self._mass_table is None:
            grid = np.round(np.arange(1, 101) * 0.01, 2)
            p32 = torch.tensor(grid, dtype=torch.float32)
            n = self.trace.n_neurons
            means = np.empty((self.trace.n_layers, len(grid)))
            for i, layer in enumerate(self.trace.layers):
                mags = self.trace.activations(layer).abs().float()
                cum = mags.sort(dim=-1, descending=True).values.cumsum(-1)
                # cumulative sums never decrease: "how many < p * total" is a binary search
                counts = (torch.searchsorted(cum, cum[:, -1:] * p32) + 1).clamp(max=n)
                means[i] = counts.double().mean(0).numpy() / n
            self._mass_table = {np.float32(p): means[:, j] for j, p in enumerate(grid)}
        return self._mass_table

    def _mass_mask(self, layer: int, p: float) -> np.ndarray:
        """MassCoverage mask of one layer from its cached sort: the rule's steps after sorting."""
        key = ("mass", layer)
        if key not in self._values:
            mags = self._layer_values("h", layer).abs().float()
            sorted_vals, order = mags.sort(dim=-1, descending=True)
            self._values[key] = (sorted_vals.cumsum(-1), order)
            while len(self._values) > 4:
                self._values.popitem(last=False)
        self._values.move_to_end(key)
        cum, order = self._values[key]
        n = cum.shape[-1]
        count = ((cum < p * cum[..., -1:]).sum(-1, keepdim=True) + 1).clamp(max=n)
        kept = torch.arange(n) < count
        return torch.zeros_like(kept).scatter_(-1, order, kept).numpy()

    # -- rules --------------------------------------------------------------------------
    def _check_rule_name(self, name: str) -> None:
        if name not in self.rule_names:
            raise ValueError(f"unknown rule {name!r} for this trace; choose from {list(self.rule_names)}")

    def rule(self) -> rules.Rule:
        """The current rule, fitted (calibrated thresholds come from the cached index)."""
        name, value = self.controls["rule"].value, float(self.controls["value"].value)
        if name in ("Calibrated", "GateThreshold"):
            source = "h" if name == "Calibrated" else "gate"
            key = (source, value)
            if key not in self._thresholds:
                index = self._magnitudes(source)
                self._thresholds[key] = {
                    layer: index.threshold(i, value) for i, layer in enumerate(self.trace.layers)
                }
            return rules.RULES[name](density=value, thresholds=dict(self._thresholds[key]))
        return rules.RULES[name](**{_PARAMETER[name][0]: value})

    def layer_densities(self, rule: rules.Rule | None = None) -> pd.DataFrame:
        """Mean density of every layer under ``rule`` (default: the current one), fast paths."""
        rule = self.rule() if rule is None else rule
        n, layers = self.trace.n_neurons, self.trace.layers
        if isinstance(rule, rules.TopK):
            k = rules._top_count(rule.keep, n)
            values = np.full(len(layers), k / n)
        elif isinstance(rule, rules.Calibrated):  # also GateThreshold
            index = self._magnitudes(rule.source)
            values = np.array([index.share_above(i, rule.thresholds[layer]) for i, layer in enumerate(layers)])
        elif isinstance(rule, rules.Threshold):
            index = self._magnitudes("h")
            values = np.array([index.share_above(i, rule.tau) for i in range(len(layers))])
        elif isinstance(rule, rules.MassCoverage):
            table = self._mass_density_table()
            if np.float32(rule.p) in table:
                values = table[np.float32(rule.p)]
            else:  # off the slider's grid (set from code): the slow, exact way
                values = np.array([
                    float(rule.mask(self.trace.activations(layer), layer).double().mean())
                    for layer in layers
                ])
        else:
            raise TypeError(f"no fast density path for {type(rule).__name__}")
        return pd.DataFrame({"layer": list(layers), "density": values})

    # -- controls -----------------------------------------------------------------------
    def _slider_range(self, rule: str, value: float | None) -> tuple[float, float, float, float]:
        """``(low, high, step, value)`` of the value slider for ``rule``; checks ``value``."""
        param, default = _PARAMETER[rule]
        if rule == "Threshold":
            low, high, step = 0.0, self._tau_max, self._tau_max / 500
            default = self._tau_default
        else:
            low, high, step = 0.01, 1.0, 0.01
        value = default if value is None else float(value)
        if not low <= value <= high:
            raise ValueError(f"{rule} {param}={value} is outside the slider range [{low:g}, {high:g}]")
        return low, high, step, value

    def _configure_slider(self, rule: str, value: float | None) -> None:
        """Range, step and label of the value slider for ``rule``; ``value`` or the default."""
        low, high, step, value = self._slider_range(rule, value)
        slider = self.controls["value"]
        with slider.hold_trait_notifications():
            slider.min, slider.max, slider.step = low, high, step
            slider.value = value
            slider.description = _PARAMETER[rule][0]

    def set(self, rule: str | None = None, value: float | None = None, layer: int | None = None) -> Dashboard:
        """Set any of the controls and update once (what a user's clicks would do).

        A new ``rule`` without ``value`` takes that rule's default. All arguments are
        checked before anything changes.
        """
        new_rule = self.controls["rule"].value if rule is None else rule
        self._check_rule_name(new_rule)
        if layer is not None:
            self.trace.layer_index(layer)
        if rule is not None or value is not None:
            self._slider_range(new_rule, value)
        self._updating = True
        try:
            if rule is not None:
                self.controls["rule"].value = rule
                self._configure_slider(rule, value)
            elif value is not None:
                self.controls["value"].value = float(value)
            if layer is not None:
                self.controls["layer"].value = int(layer)
        finally:
            self._updating = False
        self.update()
        return self

    def _on_rule(self, change: dict[str, Any]) -> None:
        if self._updating:
            return
        self._updating = True
        try:
            self._configure_slider(change["new"], None)
        finally:
            self._updating = False
        self._on_change(change)

    def _on_change(self, change: dict[str, Any]) -> None:
        if self._updating:
            return
        try:
            self.update()
        except Exception as err:  # a widget callback has nowhere to raise to: show it
            self._status.value = f"<b style='color:#b00'>error:</b> {type(err).__name__}: {err}"

    # -- drawing ------------------------------------------------------------------------
    def _compute(self) -> tuple[rules.Rule, int, np.ndarray, pd.DataFrame]:
        """Current rule, layer, that layer's bool mask and every layer's density."""
        rule = self.rule()
        layer = int(self.controls["layer"].value)
        densities = self.layer_densities(rule)
        if isinstance(rule, rules.MassCoverage):
            mask = self._mass_mask(layer, rule.p)
        else:
            mask = rule.mask(self._layer_values(rule.source, layer), layer).numpy()
        self.masks = Masks.from_bool(
            mask[None], layers=(layer,), seq_ids=self.trace.seq_ids, positions=self.trace.positions,
            rule=rule.describe(),
        )
        return rule, layer, mask, densities

    def _fresh_figures(
        self, rule: rules.Rule, layer: int, mask: np.ndarray, densities: pd.DataFrame
    ) -> dict[str, go.Figure]:
        target = rule.density if isinstance(rule, rules.Calibrated) else (
            rule.keep if isinstance(rule, rules.TopK) and rule.keep <= 1 else None
        )
        return {
            "density": figures.density_by_layer(
                densities, target=target, highlight=layer, title=f"Density by layer - {rule.label}"
            ),
            "heatmap": figures.token_heatmap(
                mask, layer=layer, pieces=self.trace.pieces, max_tokens=self.max_tokens,
                neurons=self._neurons_for(layer),
                title=f"Layer {layer}: active neurons per token (columns: neurons by mean |h|)",
            ),
            "churn": figures.churn_over_tokens(metrics.churn(self.masks), layer=layer),
        }

    def _report(self, start: float, rule: rules.Rule, layer: int, mask: np.ndarray) -> None:
        self.last_update_seconds = time.perf_counter() - start
        self._status.value = (
            f"{rule.label} &nbsp;·&nbsp; layer {layer}: density {float(mask.mean()):.3f} &nbsp;·&nbsp; "
            f"{self.trace.n_tokens} tokens &nbsp;·&nbsp; updated in {1000 * self.last_update_seconds:.0f} ms"
        )

    def update(self) -> None:
        """Recompute from the recording and redraw all figures in place."""
        start = time.perf_counter()
        if self.controls["rule"].value == "MassCoverage" and self._mass_table is None:
            self._status.value = "preparing MassCoverage: sorting every layer once (seconds)..."
        rule, layer, mask, densities = self._compute()
        with figures.unstyled():  # the widgets keep the style they were created with
            new = self._fresh_figures(rule, layer, mask, densities)
        for name, fig in new.items():
            _sync(self.figures[name], fig, self._sent.setdefault(name, {}))
        self._report(start, rule, layer, mask)

    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        c = self.controls
        return f"Dashboard(rule={c['rule'].value}, value={c['value'].value:g}, layer={c['layer'].value})"


def dashboard(
    trace,
    layer: int | None = None,
    rule: str = "Calibrated",
    value: float | None = None,
    max_tokens: int = 96,
    max_neurons: int = 256,
) -> Dashboard:
    """Rule / threshold / layer explorer of a recorded trace (see :class:`Dashboard`).

        >>> trace = sl.record(model, tokenizer, sl.load_corpus(n=8), max_length=64)
        >>> sl.dashboard(trace)                   # last expression of a cell: displayed
        >>> sl.dashboard(trace, layer=12, rule="TopK", value=0.3).set(layer=20)

    ``rule``: one of :data:`RULE_NAMES` (GateThreshold needs ``gate`` in the trace);
    ``value``: its parameter (target density, keep fraction, mass share ``p`` or ``tau``;
    default per rule); ``max_tokens`` / ``max_neurons``: size of the heatmap.
    """
    return Dashboard(trace, layer=layer, rule=rule, value=value, max_tokens=max_tokens,
                     max_neurons=max_neurons)
