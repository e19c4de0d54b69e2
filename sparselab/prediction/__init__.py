"""Prediction: guess, from the hidden state, which MLP neurons each token needs.

    >>> predictors = sl.train_predictors(train_trace, rank=64)
    >>> predictors.evaluate(test_trace)[["layer", "recall", "mass_kept"]]
    >>> isinstance(predictors, sl.prediction.MaskPredictor)
    True

Modules: :mod:`.protocol` (``MaskPredictor``: what the runtime needs from any predictor),
:mod:`.lowrank` (``Predictors``, trained low-rank), :mod:`.training`, :mod:`.policy`
(how scores become masks), :mod:`.scoring` (recall, F1, mass and energy kept),
:mod:`.files` (save / load), :mod:`.identity` (which model they belong to),
:mod:`.static` (fixed neuron sets), :mod:`.random` (random predictors for speed runs),
:mod:`.synthetic` (masks of a synthetic activation with measured token-to-token reuse).
A new predictor form needs no base class: implement :class:`MaskPredictor`.
:mod:`.selection` (``SelectionMethod``: which rows/columns of gate, up and down a method
reads per token, so bytes are counted by the library) and :mod:`.methods` (oracle,
predicted, shadow, TEAL, WINA, CATS, two-stage), :mod:`.quantize` (group-wise int codes).
"""

from sparselab.prediction import methods
from sparselab.prediction.files import PredictorFileError, load_predictors, save_predictors
from sparselab.prediction.identity import PredictorModelMismatch
from sparselab.prediction.lowrank import Predictors, low_rank_scores
from sparselab.prediction.policy import Policy
from sparselab.prediction.protocol import LowRankForm, MaskPredictor
from sparselab.prediction.random import RandomLowRankPredictors
from sparselab.prediction.selection import MLPWeights, Selection, SelectionMethod
from sparselab.prediction.static import static_from_trace
from sparselab.prediction.synthetic import SyntheticActivationMasks
from sparselab.prediction.training import (
    fit_low_rank,
    resolve_rank,
    split_sequences,
    train_predictors,
)

__all__ = [
    "LowRankForm",
    "MLPWeights",
    "MaskPredictor",
    "Policy",
    "PredictorFileError",
    "PredictorModelMismatch",
    "Predictors",
    "RandomLowRankPredictors",
    "Selection",
    "SyntheticActivationMasks",
    "SelectionMethod",
    "fit_low_rank",
    "load_predictors",
    "low_rank_scores",
    "methods",
    "resolve_rank",
    "save_predictors",
    "split_sequences",
    "static_from_trace",
    "train_predictors",
]
