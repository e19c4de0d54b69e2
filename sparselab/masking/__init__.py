"""Masking: turn recorded activations into binary neuron masks.

    >>> masks = trace.masks(sl.rules.Calibrated(density=0.5))     # per-layer thresholds
    >>> masks.layer(3)                                            # bool [tokens, neurons]

Modules: :mod:`.rules` (Threshold, TopK, Calibrated, GateThreshold, MassCoverage),
:mod:`.masks` (``Masks``: packed bits plus token metadata), :mod:`.thresholds` (every
threshold, quantile and top-k of the library), :mod:`.sweeps` (one trace at many
densities). A new rule is a frozen dataclass subclassing :class:`~.rules.Rule` in
:mod:`.rules` (``mask(values, layer)``, and ``fit(trace)`` if it needs statistics).
"""

from sparselab.masking import rules
from sparselab.masking.masks import Masks, as_masks
from sparselab.masking.sweeps import calibrated_masks, calibrated_rules
from sparselab.masking.thresholds import MagnitudeIndex

__all__ = ["MagnitudeIndex", "Masks", "as_masks", "calibrated_masks", "calibrated_rules", "rules"]
