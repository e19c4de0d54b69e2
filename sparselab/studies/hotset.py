"""Hot and cold neurons (PowerInfer): a fixed "hot" set chosen on some texts, tested on others.

    >>> train, test = sl.studies.hotset.held_out_masks(trace, sl.rules.Calibrated(density=0.3))
    >>> df = sl.studies.hotset.hit_rate(train, test, fractions=(0.1, 0.2, 0.5))
    >>> df[df.fraction == 0.2][["layer", "in_sample", "held_out", "random"]]

A hot set is the ``fraction`` of a layer's neurons that fire most often on the training
tokens (ranked like :func:`sparselab.metrics.neuron_frequency`: by count, ties by neuron
index). Its *hit rate* on some tokens is the share of their activations (active
(token, neuron) pairs) that fall inside it - what a system keeping the hot set resident
(on the GPU, in fast memory) serves without loading anything. A random set of the same
size has an expected hit rate of exactly ``n_hot / n_neurons``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from sparselab._checks import check_fractions
from sparselab._version import versions
from sparselab.masking import rules
from sparselab.masking.masks import Masks, as_masks
from sparselab.masking.sweeps import calibrated_rules
from sparselab.models import corpus

__all__ = ["held_out_masks", "hit_rate", "hot_neurons"]


def _fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    return tuple(sorted(set(check_fractions("fractions", fractions))))


def _n_hot(fraction: float, n_neurons: int) -> int:
    return int(round(fraction * n_neurons))


def _ranking(counts: np.ndarray) -> np.ndarray:
    """Neurons of each layer, most frequent first; ties by index (a stable sort)."""
    return np.argsort(-counts, axis=1, kind="stable")


def hot_neurons(masks: Masks, fraction: float) -> np.ndarray:
    """Bool ``[layers, neurons]``: the ``round(fraction * n_neurons)`` most frequent neurons.

        >>> hot = sl.studies.hotset.hot_neurons(train_masks, 0.2); hot.sum(axis=1)   # 307 each
    """
    masks = as_masks(masks, "masks")
    (fraction,) = _fractions([fraction])
    order = _ranking(masks.neuron_counts())[:, : _n_hot(fraction, masks.n_neurons)]
    hot = np.zeros((masks.n_layers, masks.n_neurons), dtype=bool)
    np.put_along_axis(hot, order, True, axis=1)
    return hot


def held_out_masks(trace, rule, held_out: float = 0.25) -> tuple[Masks, Masks]:
    """Masks of training and held-out *sequences*, the rule fitted on training ones only.

        >>> train, test = sl.studies.hotset.held_out_masks(trace, sl.rules.Calibrated(density=0.3))

    Sequences (texts) are split with :func:`sparselab.models.corpus.split` on their ids, so no
    text contributes tokens to both parts. A rule that needs statistics
    (``Calibrated``, ``GateThreshold``) is fitted on the training sequences and applied
    unchanged to the held-out ones, so nothing about the held-out text leaks.
    """
    ids = [int(s) for s in np.unique(trace.seq_ids)]
    if len(ids) < 2:
        raise ValueError(f"need at least 2 sequences to hold one out, the trace has {len(ids)}")
    train_ids, test_ids = corpus.split(ids, held_out=held_out)
    if not train_ids or not test_ids:
        raise ValueError(f"held_out={held_out} leaves an empty part of {len(ids)} sequences")
    train_trace = trace.select_sequences(train_ids)
    if isinstance(rule, rules.Calibrated):
        # same thresholds as rule.fit (an exact order statistic), from one histogram pass
        # instead of a selection over every magnitude of every layer
        fitted = calibrated_rules(train_trace, (rule.density,), rule.source)[rule.density]
    else:
        fitted = rule.fit(train_trace)
    return train_trace.masks(fitted), trace.select_sequences(test_ids).masks(fitted)


def hit_rate(
    train: Masks, test: Masks, fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5)
) -> pd.DataFrame:
    """Share of activations a hot set chosen on ``train`` covers, on ``train`` and on ``test``.

        >>> df = sl.studies.hotset.hit_rate(train, test)
        >>> (df.held_out > df.random).groupby(df.fraction).mean()   # share of layers

    One row per layer and fraction. Columns: ``layer, fraction, n_hot`` (neurons in the
    set), ``in_sample`` (hit rate on ``train``, where the set was chosen), ``held_out``
    (hit rate on ``test``), ``oracle`` (hit rate on ``test`` of ``test``'s own most
    frequent ``n_hot`` neurons: the best any fixed set of that size can do), ``random``
    (``n_hot / n_neurons``, the expected hit rate of a random set). Rates are NaN for a
    layer with no activation in that part.
    """
    train = as_masks(train, "train")
    test = as_masks(test, "test")
    if train.n_neurons != test.n_neurons or train.layers != test.layers:
        raise ValueError(
            f"train ({list(train.layers)} x {train.n_neurons} neurons) and test "
            f"({list(test.layers)} x {test.n_neurons} neurons) cover different layers or neurons"
        )
    fractions = _fractions(fractions)
    n = train.n_neurons
    c_train, c_test = train.neuron_counts(), test.neuron_counts()
    # cumulative activations along each part's own ranking: covered[l, j] = top j neurons
    rank_train, rank_test = _ranking(c_train), _ranking(c_test)
    cum_in = np.cumsum(np.take_along_axis(c_train, rank_train, axis=1), axis=1)
    cum_out = np.cumsum(np.take_along_axis(c_test, rank_train, axis=1), axis=1)
    cum_oracle = np.cumsum(np.take_along_axis(c_test, rank_test, axis=1), axis=1)
    tot_train, tot_test = c_train.sum(axis=1), c_test.sum(axis=1)

    def share(cum: np.ndarray, total: np.ndarray, k: int) -> np.ndarray:
        covered = cum[:, k - 1] if k else np.zeros(len(total))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, covered / np.maximum(total, 1), np.nan)

    rows = []
    for fraction in fractions:
        k = _n_hot(fraction, n)
        in_s, out_s, orc = share(cum_in, tot_train, k), share(cum_out, tot_test, k), share(cum_oracle, tot_test, k)
        for li, layer in enumerate(train.layers):
            rows.append(
                {
                    "layer": layer,
                    "fraction": fraction,
                    "n_hot": k,
                    "in_sample": in_s[li],
                    "held_out": out_s[li],
                    "oracle": orc[li],
                    "random": k / n,
                }
            )
    df = pd.DataFrame(rows).sort_values(["layer", "fraction"], ignore_index=True)
    df.attrs.update(
        rule=dict(train.rule),
        config={"fractions": list(fractions), "train_tokens": train.n_tokens, "test_tokens": test.n_tokens},
        versions=versions(),
    )
    return df
