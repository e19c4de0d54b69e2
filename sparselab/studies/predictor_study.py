"""Predictor quality across ranks and inputs, next to a random mask of the same density.

    >>> train, test = sl.prediction.split_sequences(trace, held_out=0.25)
    >>> df = sl.studies.predictor_study.predictor_sweep(train, test, ranks=(16, 64), layers=[3, 15])
    >>> df.pivot_table(index="rank", columns="layer", values="recall")

One low-rank predictor is trained per (rank, input, layer) with
:func:`sparselab.prediction.train_predictors` on the training trace and scored with
:meth:`Predictors.evaluate` on the held-out one. Each row also carries the *expected*
scores of a random mask with the same density as the prediction (the baseline every
predictor has to beat): a mask that keeps each (token, neuron) with probability ``p``
independently of the labels has recall ``p``, precision ``q`` (the labels' density), F1
``2pq / (p + q)`` and keeps a share ``p`` of the ``|h|`` mass, in expectation. With
hundreds of thousands of (token, neuron) cells per layer the deviation of one draw from
these expectations is far below a percent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from sparselab._checks import check_fractions

__all__ = ["INPUTS", "predictor_sweep", "random_baseline"]

INPUTS = {False: "mlp_in (own input)", True: "layer_in (look-ahead)"}


def random_baseline(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (a :meth:`Predictors.evaluate` frame) with the random-mask expectations added.

        >>> random_baseline(predictors.evaluate(test))[["recall", "random_recall"]]

    Adds ``random_recall, random_precision, random_f1, random_mass_kept`` for a random
    mask of density ``predicted_density`` against labels of density ``true_density``.
    """
    missing = [c for c in ("predicted_density", "true_density") if c not in df.columns]
    if missing:
        raise ValueError(f"random_baseline needs columns {missing}; got {list(df.columns)}")
    out = df.copy()
    p, q = out["predicted_density"], out["true_density"]
    out["random_recall"] = p
    out["random_precision"] = q
    out["random_f1"] = (2 * p * q / (p + q)).where(p + q > 0, 0.0)
    out["random_mass_kept"] = p
    return out


def predictor_sweep(
    train,
    test,
    ranks: Sequence[int | float] = (16, 64, 256),
    layers: Sequence[int] | None = None,
    lookaheads: Sequence[bool] = (False,),
    rule=None,
    densities: Sequence[float] | None = None,
    progress: bool = True,
    **train_kwargs: Any,
) -> pd.DataFrame:
    """Held-out quality of predictors for every rank, input and layer, one row each.

        >>> df = predictor_sweep(train, test, ranks=(64,), lookaheads=(False, True))
        >>> df.pivot_table(index="layer", columns="input", values="recall")

    - ``train`` / ``test``: traces of *different* sequences
      (:func:`sparselab.prediction.split_sequences`); ``test`` must hold ``h`` and the
      inputs the predictors read.
    - ``rule``: labels (default of :func:`train_predictors`: ``Calibrated(0.5)`` on
      ``|h|``), fitted once on ``train`` so every rank learns the same labels.
    - ``lookaheads``: ``False`` reads the MLP's own input, ``True`` the layer's input-norm
      output (before attention).
    - ``densities``: also score every predictor at these target densities (re-thresholded
      from its training score quantiles, no retraining); default: only its own policy.
    - ``train_kwargs``: passed on (``epochs``, ``lr``, ``loss``, ``target_density``, ...).

    Columns: those of :meth:`Predictors.evaluate` (layer, rank, recall, precision, f1,
    predicted_density, true_density, mass_kept, ...), ``input``, ``target_density`` (NaN
    for the training policy), ``train_seconds``, and the ``random_*`` columns of
    :func:`random_baseline`. ``attrs`` hold the config and
    versions.
    """
    from sparselab._version import versions
    from sparselab.masking.rules import Calibrated
    from sparselab.prediction.training import train_predictors

    ranks = list(ranks)
    if not ranks:
        raise ValueError("give at least one rank")
    lookaheads = [bool(x) for x in lookaheads]
    if not lookaheads:
        raise ValueError("give at least one of lookaheads=(False, True)")
    if densities is not None:
        check_fractions("densities", densities)
    if train.n_tokens == 0 or test.n_tokens == 0:
        raise ValueError("train and test traces must hold tokens")
    if test is train:
        raise ValueError("train and test are the same trace: hold out sequences "
                         "(sl.prediction.split_sequences)")
    rule = Calibrated(density=0.5) if rule is None else rule
    rule = rule if rule.fitted else rule.fit(train)
    frames = []
    for lookahead in lookaheads:
        for rank in ranks:
            predictors = train_predictors(train, rule=rule, rank=rank, lookahead=lookahead, layers=layers,
                                          progress=progress, **train_kwargs)
            for d in [None] if densities is None else [float(x) for x in densities]:
                df = predictors.evaluate(test) if d is None else predictors.evaluate(test, target_density=d)
                df["input"] = INPUTS[lookahead]
                df["target_density"] = float("nan") if d is None else d
                df["requested_rank"] = rank
                df["train_seconds"] = df.layer.map(lambda layer, p=predictors: p.layer_info[layer]["seconds"])
                frames.append(df)
    out = random_baseline(pd.concat(frames, ignore_index=True))
    out.attrs["config"] = {"ranks": ranks, "lookaheads": lookaheads, "rule": rule.describe(),
                           "densities": None if densities is None else [float(x) for x in densities],
                           "layers": None if layers is None else [int(x) for x in layers],
                           "n_train_tokens": train.n_tokens, "n_test_tokens": test.n_tokens,
                           "train_kwargs": {k: repr(v) for k, v in train_kwargs.items()}}
    out.attrs["model"] = train.meta.get("model", {})
    out.attrs["versions"] = versions()
    return out
