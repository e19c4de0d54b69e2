"""Masks of one trace at several target densities, calibrated per layer in one pass.

    >>> by_density = sl.masking.sweeps.calibrated_masks(trace, densities=(0.1, 0.3, 0.5))
    >>> {d: m.density().mean() for d, m in by_density.items()}

The magnitudes are read once (:func:`~sparselab.masking.rules.calibrated_thresholds`), so
each extra density costs only the thresholding. The masks are exactly those of the fitted
``Calibrated`` / ``GateThreshold`` rule: same thresholds, same rule description.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from sparselab._checks import check_choice
from sparselab.masking import rules
from sparselab.masking.masks import Masks
from sparselab.masking.thresholds import MagnitudeIndex

__all__ = ["calibrated_masks", "calibrated_rules"]

_KINDS = {"h": rules.Calibrated, "gate": rules.GateThreshold}


def calibrated_rules(
    trace, densities: Sequence[float], source: str = "h", index: MagnitudeIndex | None = None
) -> dict[float, rules.Calibrated]:
    """Fitted per-layer rules, one per density: ``Calibrated`` on ``|h|`` or ``GateThreshold``.

        >>> rule = calibrated_rules(trace, (0.3,))[0.3]
        >>> rule.thresholds == sl.rules.Calibrated(density=0.3).fit(trace).thresholds
        True

    ``source``: ``"h"`` (TEAL-style ``Calibrated``) or ``"gate"`` (CATS-style
    ``GateThreshold``); ``index``: a :class:`MagnitudeIndex` of ``trace.arrays[source]``
    already built (else one is).
    """
    check_choice("source", source, tuple(_KINDS))
    fitted = rules.calibrated_thresholds(trace, source, densities, index)
    return {d: _KINDS[source](density=d, thresholds=thresholds) for d, thresholds in fitted.items()}


def calibrated_masks(
    trace, densities: Sequence[float], source: str = "h", progress: bool = True
) -> dict[float, Masks]:
    """``{density: masks}`` under per-layer calibrated thresholds (see :func:`calibrated_rules`).

        >>> by_density = calibrated_masks(trace, (0.1, 0.3))
        >>> by_density[0.3].rule["name"]
        'Calibrated'
    """
    fitted = calibrated_rules(trace, densities, source)
    return {d: trace.masks(rule) for d, rule in tqdm(fitted.items(), desc="masks", unit="density",
                                                     disable=not progress)}
