"""Static neuron sets: one fixed set per layer, the most frequently active neurons of a
recording (the baseline that contextual sparsity is measured against).

    >>> static = static_from_trace(train_trace, sl.rules.TopK(0.5), density=0.5)
    >>> sl.sparsify(model, mode="static", static_neurons=static)
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from sparselab._checks import check_fraction
from sparselab.masking.rules import Rule, TopK

__all__ = ["static_from_trace"]


def static_from_trace(trace, rule: Rule | None = None, density: float = 0.5,
                      layers: Iterable[int] | None = None) -> dict[int, np.ndarray]:
    """The ``density`` share of neurons most often active under ``rule``, per layer.

        >>> static = static_from_trace(train_trace, sl.rules.TopK(0.5), density=0.5)

    ``rule`` defaults to ``TopK(density)``. Ties in frequency are broken by the mean
    ``|h|`` (a neuron that is rarely top but large when it is should win). Returns sorted
    int64 index arrays keyed by model layer number.
    """
    density = check_fraction("density", density)
    rule = TopK(keep=density) if rule is None else rule
    if not rule.fitted:
        rule = rule.fit(trace)
    layers = trace.layers if layers is None else tuple(int(i) for i in layers)
    missing = sorted(set(layers) - set(trace.layers))
    if missing:
        raise ValueError(f"trace has no recording of layers {missing} (has {trace.layers})")
    k = max(1, int(round(density * trace.n_neurons)))
    out = {}
    for layer in layers:
        values = trace.values(rule.source, layer)
        freq = rule.mask(values, layer).sum(0).double()
        mag = values.abs().double().mean(0)
        # frequency is an integer: adding a value in [0, 0.5) only breaks its ties
        score = freq + 0.5 * mag / (mag.max() + 1e-30)
        out[layer] = score.topk(k).indices.sort().values.numpy().astype(np.int64)
    return out
