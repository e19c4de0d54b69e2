"""Studies: the analyses behind single notebooks, built from the library's parts.

    >>> fits = sl.studies.calibration.threshold_rules(trace, (0.3, 0.5))        # notebook 02
    >>> sl.studies.contextual.contextual_vs_static(model, tok, test, train_trace)  # notebook 03

Modules: :mod:`.calibration` (one global threshold vs per-layer, 02),
:mod:`.contextual` (contextual vs static vs random masks, 03), :mod:`.residual`
(residual-stream look-ahead, 04), :mod:`.predictor_study` (predictors vs rank, 05),
:mod:`.independence` (reuse against independence models, 06/08), :mod:`.hotset` (hot and
cold neurons, 07). A new notebook's analysis goes in a module of its own here.
"""

from sparselab.studies import (
    calibration,
    contextual,
    hotset,
    independence,
    predictor_study,
    residual,
)

__all__ = ["calibration", "contextual", "hotset", "independence", "predictor_study", "residual"]
