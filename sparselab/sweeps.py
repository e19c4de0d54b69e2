"""Masks of one trace at several target densities, calibrated per layer in one pass.

    >>> by_density = sl.sweeps.calibrated_masks(trace, densities=(0.1, 0.3, 0.5))
    >>> {d: m.density().mean() for d, m in by_density.items()}

``trace.masks(sl.rules.Calibrated(density=d))`` fits each layer's threshold with an order
statistic over all of its magnitudes - seconds per density on a 2k-token trace. A sweep
over densities reads the magnitudes once into a
:class:`sparselab.dashboard_app.MagnitudeIndex` (exact order statistics of fp16 data
from a histogram), so each extra density costs only the thresholding. The masks are
exactly those of the fitted ``Calibrated`` / ``GateThreshold`` rule: same thresholds,
same rule description.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from sparselab import rules
from sparselab.masks import Masks

__all__ = ["calibrated_masks", "calibrated_rules"]


def calibrated_rules(
    trace, densities: Sequence[float], source: str = "h"
) -> dict[float, rules.Calibrated]:
    """Fitted per-layer rules, one per density: ``Calibrated`` on ``|h|`` or ``GateThreshold``.

        >>> rule = sl.sweeps.calibrated_rules(trace, (0.3,))[0.3]
        >>> rule.thresholds == sl.rules.Calibrated(density=0.3).fit(trace).thresholds
        True

    ``source``: ``"h"`` (TEAL-style ``Calibrated``) or ``"gate"`` (CATS-style
    ``GateThreshold``).
    """
    from sparselab.dashboard_app import MagnitudeIndex

    kinds = {"h": rules.Calibrated, "gate": rules.GateThreshold}
    if source not in kinds:
        raise ValueError(f"source must be 'h' or 'gate', got {source!r}")
    if source not in trace.arrays:
        raise KeyError(f"{source!r} was not recorded (recorded: {sorted(trace.arrays)})")
    values = [float(d) for d in densities]
    if not values:
        raise ValueError("give at least one density")
    for d in values:
        rules._check_fraction("density", d)  # same message as the rule itself
    index = MagnitudeIndex(trace.arrays[source])
    return {
        d: kinds[source](density=d, thresholds={layer: index.threshold(i, d) for i, layer in enumerate(trace.layers)})
        for d in values
    }


def calibrated_masks(
    trace, densities: Sequence[float], source: str = "h", progress: bool = True
) -> dict[float, Masks]:
    """``{density: masks}`` under per-layer calibrated thresholds (see :func:`calibrated_rules`).

        >>> by_density = sl.sweeps.calibrated_masks(trace, (0.1, 0.3))
        >>> by_density[0.3].rule["name"]
        'Calibrated'
    """
    fitted = calibrated_rules(trace, densities, source)
    return {d: trace.masks(rule) for d, rule in tqdm(fitted.items(), desc="masks", unit="density",
                                                     disable=not progress)}
