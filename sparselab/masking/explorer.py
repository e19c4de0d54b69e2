"""Masks of one recorded trace under any rule, fast enough for a slider: the compute
behind the dashboard, with no widget in it.

    >>> explorer = RuleExplorer(trace)
    >>> rule = explorer.rule("Calibrated", 0.3)          # fitted from the cached index
    >>> explorer.layer_densities(rule)                   # every layer's mean density
    >>> explorer.layer_mask(rule, layer=12)              # bool [tokens, neurons] of one layer

Why it is fast: a slider move needs the density of *every* layer but the mask of only
one. :class:`~sparselab.masking.thresholds.MagnitudeIndex` keeps, per layer, the exact
distribution of ``|h|`` (a histogram over the 2^15 fp16 magnitudes, or sorted values for
other dtypes), from which calibrated thresholds (any target) and the share above a
threshold come in microseconds; TopK's density is ``k / n``; MassCoverage tabulates every
layer's mean density for each slider position the first time it is chosen. The one mask
drawn is computed with the rule itself, so it is exactly ``trace.masks(rule)``'s.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pandas as pd
import torch

from sparselab.masking import rules
from sparselab.masking.thresholds import MagnitudeIndex, top_count

__all__ = ["PARAMETERS", "RULE_NAMES", "RuleExplorer"]

RULE_NAMES = ("Calibrated", "TopK", "MassCoverage", "GateThreshold", "Threshold")
# rule name -> (the parameter a slider sets, its default; None: from the data)
PARAMETERS: dict[str, tuple[str, float | None]] = {
    "Calibrated": ("density", 0.5),
    "TopK": ("keep", 0.5),
    "MassCoverage": ("p", 0.9),
    "GateThreshold": ("density", 0.5),
    "Threshold": ("tau", None),
}
MASS_GRID = np.round(np.arange(1, 101) * 0.01, 2)  # MassCoverage p values tabulated at once
_RECENT = 4  # layers whose values (or sorted magnitudes) stay cached


class RuleExplorer:
    """Rules, per-layer densities and one layer's mask of a trace, with caches.

        >>> explorer = RuleExplorer(trace)
        >>> explorer.layer_densities(sl.rules.TopK(0.3)).density.mean()
        0.3

    ``rule_names``: the rules this trace supports (GateThreshold needs ``gate``).
    ``default_tau`` / ``tau_max``: a sensible default and range for ``Threshold``.
    """

    def __init__(self, trace) -> None:
        if "h" not in trace.arrays:
            raise ValueError(f"exploring rules needs 'h' in the trace (recorded: {sorted(trace.arrays)})")
        self.trace = trace
        self.rule_names = tuple(r for r in RULE_NAMES if r != "GateThreshold" or "gate" in trace.arrays)
        self._index: dict[str, MagnitudeIndex] = {}
        self._recent: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._neuron_order: dict[tuple[int, int], np.ndarray] = {}
        self._mass_table: dict[np.float32, np.ndarray] | None = None
        self._thresholds: dict[tuple[str, float], dict[int, float]] = {}
        h_index = self.index("h")
        n_layers = trace.n_layers
        self.default_tau = float(np.median([h_index.quantile(i, 0.5) for i in range(n_layers)]))
        tau_max = max(h_index.quantile(i, 0.9) for i in range(n_layers))
        self.tau_max = float(f"{tau_max * 1.05:.2g}") or 1.0

    # -- caches -------------------------------------------------------------------------
    def index(self, source: str) -> MagnitudeIndex:
        """The :class:`MagnitudeIndex` of ``|source|`` (built on first use)."""
        if source not in self._index:
            self._index[source] = MagnitudeIndex(self.trace.arrays[source])
        return self._index[source]

    def _cached(self, key: tuple[str, int], make) -> Any:
        if key not in self._recent:
            self._recent[key] = make()
            while len(self._recent) > _RECENT:
                self._recent.popitem(last=False)
        self._recent.move_to_end(key)
        return self._recent[key]

    def values(self, source: str, layer: int) -> torch.Tensor:
        """float32 ``[tokens, neurons]`` of a layer; a few recent layers stay cached."""
        return self._cached((source, layer), lambda: self.trace.values(source, layer))

    def neuron_order(self, layer: int, max_neurons: int) -> np.ndarray:
        """Heatmap columns: at most ``max_neurons`` neurons by mean |h|, spread evenly over
        the ranking (rule-independent, so the columns stay put as the slider moves)."""
        key = (layer, int(max_neurons))
        if key not in self._neuron_order:
            mean_abs = self.values("h", layer).abs().mean(0).numpy()
            order = np.argsort(-mean_abs, kind="stable")
            if len(order) > max_neurons:
                order = order[np.linspace(0, len(order) - 1, max_neurons).round().astype(np.int64)]
            self._neuron_order[key] = order
        return self._neuron_order[key]

    @property
    def mass_table_ready(self) -> bool:
        """Whether MassCoverage's densities are tabulated (the first use sorts every layer)."""
        return self._mass_table is not None

    def _mass_density_table(self) -> dict[np.float32, np.ndarray]:
        """MassCoverage mean density of every layer for each ``p`` of :data:`MASS_GRID`.

        Built on first use: one sort per layer (the rule's own ops, so the counts are the
        rule's), then a binary search per token for all grid values at once. Keyed by
        ``float32(p)``, so a slider value a rounding away from a grid point finds it.
        """
        if self._mass_table is None:
            grid = torch.tensor(MASS_GRID, dtype=torch.float64)
            n = self.trace.n_neurons
            means = np.empty((self.trace.n_layers, len(MASS_GRID)))
            for i, layer in enumerate(self.trace.layers):
                mags = self.trace.activations(layer).abs().float()
                # the rule's own steps: float32 cumulative sums, compared in float64
                cum = mags.sort(dim=-1, descending=True).values.cumsum(-1).double()
                # cumulative sums never decrease: "how many < p * total" is a binary search
                counts = (torch.searchsorted(cum, cum[:, -1:] * grid) + 1).clamp(max=n)
                means[i] = counts.double().mean(0).numpy() / n
            self._mass_table = {np.float32(p): means[:, j] for j, p in enumerate(MASS_GRID)}
        return self._mass_table

    # -- rules ----------------------------------------------------------------------------
    def check_rule_name(self, name: str) -> None:
        if name not in self.rule_names:
            raise ValueError(f"unknown rule {name!r} for this trace; choose from {list(self.rule_names)}")

    def rule(self, name: str, value: float) -> rules.Rule:
        """Rule ``name`` with its parameter at ``value``, fitted (calibrated thresholds come
        from the cached index, identical to ``rule.fit(trace)``)."""
        self.check_rule_name(name)
        value = float(value)
        if name in ("Calibrated", "GateThreshold"):
            source = "h" if name == "Calibrated" else "gate"
            key = (source, value)
            if key not in self._thresholds:
                self._thresholds[key] = rules.calibrated_thresholds(
                    self.trace, source, [value], self.index(source))[value]
            return rules.RULES[name](density=value, thresholds=dict(self._thresholds[key]))
        return rules.RULES[name](**{PARAMETERS[name][0]: value})

    def layer_densities(self, rule: rules.Rule) -> pd.DataFrame:
        """Mean density of every layer under ``rule``, by the fast paths (module docstring)."""
        n, layers = self.trace.n_neurons, self.trace.layers
        if isinstance(rule, rules.TopK):
            values = np.full(len(layers), top_count(rule.keep, n) / n)
        elif isinstance(rule, rules.Calibrated):  # also GateThreshold
            index = self.index(rule.source)
            values = np.array([index.share_above(i, rule.thresholds[layer]) for i, layer in enumerate(layers)])
        elif isinstance(rule, rules.Threshold):
            index = self.index("h")
            values = np.array([index.share_above(i, rule.tau) for i in range(len(layers))])
        elif isinstance(rule, rules.MassCoverage):
            table = self._mass_density_table()
            if np.float32(rule.p) in table:
                values = table[np.float32(rule.p)]
            else:  # off the grid (set from code): the slow, exact way
                values = np.array([
                    float(rule.mask(self.trace.activations(layer), layer).double().mean())
                    for layer in layers
                ])
        else:
            raise TypeError(f"no fast density path for {type(rule).__name__}")
        return pd.DataFrame({"layer": list(layers), "density": values})

    def layer_mask(self, rule: rules.Rule, layer: int) -> np.ndarray:
        """Bool ``[tokens, neurons]`` mask of one layer under ``rule`` (MassCoverage reuses a
        cached sort of the layer, the rule's own steps after sorting)."""
        if isinstance(rule, rules.MassCoverage):
            def sort_layer():
                sorted_vals, order = self.values("h", layer).abs().float().sort(dim=-1, descending=True)
                return sorted_vals.cumsum(-1), order

            cum, order = self._cached(("mass", layer), sort_layer)
            return rules.mass_coverage_mask(cum, order, rule.p).numpy()
        return rule.mask(self.values(rule.source, layer), layer).numpy()
