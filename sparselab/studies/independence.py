"""Independence models for neuron reuse: what masks would give if tokens were unrelated.

    >>> masks = trace.masks(sl.rules.Calibrated(density=0.3))
    >>> model = sl.studies.independence.frequency_model(masks, sizes=(1, 4, 16))
    >>> model[["layer", "size", "independent", "frequency_union"]]
    >>> sl.studies.independence.union_comparison(masks, sizes=(1, 4, 16))   # data next to both models

Two baselines for the union of the masks of ``B`` tokens (a batch, or a window of ``B``
consecutive tokens), both with tokens drawn independently of each other:

- *uniform*: every neuron fires with the layer's mean density ``p``; the union covers
  ``1 - (1 - p)^B`` of the neurons (the curve of :func:`sparselab.metrics.batch_union`);
- *frequency-matched*: neuron ``i`` fires with its own recorded frequency ``f_i``; the
  union covers ``1 - mean_i (1 - f_i)^B``.

By Jensen's inequality the second is never above the first: unequal frequencies (hot and
cold neurons) alone shrink the union. Real data falling below the *frequency-matched*
curve is what shows that tokens share neurons beyond that, i.e. contextual reuse.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from sparselab import metrics
from sparselab._checks import check_positive_ints
from sparselab._version import versions
from sparselab.masking.masks import Masks, as_masks

__all__ = ["frequency_model", "neuron_frequencies", "union_comparison"]


def _check_masks(masks: object) -> Masks:
    masks = as_masks(masks)
    if masks.n_tokens == 0:
        raise ValueError("masks hold no tokens: neuron frequencies are undefined")
    return masks


def neuron_frequencies(masks: Masks) -> np.ndarray:
    """Share of tokens in which each neuron is active, float64 ``[layers, neurons]``.

        >>> f = sl.studies.independence.neuron_frequencies(masks); f.mean(axis=1)  # == mean density
    """
    masks = _check_masks(masks)
    return masks.neuron_counts() / float(masks.n_tokens)


def frequency_model(masks: Masks, sizes: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> pd.DataFrame:
    """Union density and new neurons per token of ``B`` independent tokens, two models.

        >>> df = sl.studies.independence.frequency_model(masks, sizes=(1, 2, 4, 8))
        >>> df[df.layer == 29][["size", "independent", "frequency_union"]]

    One row per layer and size ``B``. Columns: ``layer, size, density`` (``p``, the mean
    share of active neurons), ``independent`` = ``1 - (1 - p)^B`` and ``independent_new``
    = ``p (1 - p)^B`` (every neuron at rate ``p``), ``frequency_union`` =
    ``1 - mean_i (1 - f_i)^B`` and ``frequency_new`` = ``mean_i f_i (1 - f_i)^B`` (neuron
    ``i`` at its own frequency ``f_i`` over all tokens of ``masks``). The ``*_new`` columns
    are the share of neurons a token needs that none of ``B`` earlier tokens needed - the
    baselines of ``new_fraction`` in :func:`sparselab.metrics.window_reuse` with ``k = B``.
    Tokens are modelled as drawn with replacement; for batches of distinct tokens out of
    ``T`` the error is of order ``B / T``.
    """
    masks = _check_masks(masks)
    sizes = check_positive_ints("sizes", sizes)
    freq = neuron_frequencies(masks)
    rows = []
    for li, layer in enumerate(masks.layers):
        f = freq[li]
        p = float(f.mean())
        for b in sizes:
            rows.append(
                {
                    "layer": layer,
                    "size": b,
                    "density": p,
                    "independent": 1.0 - (1.0 - p) ** b,
                    "independent_new": p * (1.0 - p) ** b,
                    "frequency_union": 1.0 - float(np.mean((1.0 - f) ** b)),
                    "frequency_new": float(np.mean(f * (1.0 - f) ** b)),
                }
            )
    df = pd.DataFrame(rows)
    df.attrs.update(rule=dict(masks.rule), config={"sizes": list(sizes)}, versions=versions())
    return df


def union_comparison(
    masks: Masks,
    sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
    n_batches: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Union density of ``B`` tokens: random batches, consecutive tokens and both models.

        >>> df = sl.studies.independence.union_comparison(masks, sizes=(1, 4, 16))
        >>> df[df.layer == 15][["size", "random_batch", "consecutive", "frequency_union"]]

    ``random_batch`` (and ``random_batch_std``) is :func:`sparselab.metrics.batch_union`:
    ``B`` distinct tokens drawn at random, mostly from different texts, as in batched
    decoding of unrelated requests. ``consecutive`` is the footprint of
    :func:`sparselab.metrics.window_reuse` with window ``B``: ``B`` neighbouring tokens
    of one text, as in a prefill chunk (NaN when no sequence is that long). Next to them
    the columns of :func:`frequency_model`. Random batches match ``frequency_union`` up to
    sampling noise (by linearity of expectation, whatever the masks); ``consecutive``
    below it measures how much neighbouring tokens share beyond hot neurons.
    """
    masks = _check_masks(masks)
    sizes = check_positive_ints("sizes", sizes)
    batch = metrics.batch_union(masks, sizes=sizes, n_batches=n_batches, seed=seed)
    window = metrics.window_reuse(masks, windows=sizes)
    model = frequency_model(masks, sizes)
    df = model.merge(
        batch[["layer", "size", "union_density", "union_std"]].rename(
            columns={"union_density": "random_batch", "union_std": "random_batch_std"}
        ),
        on=["layer", "size"],
    ).merge(
        window[["layer", "window", "footprint"]].rename(
            columns={"window": "size", "footprint": "consecutive"}
        ),
        on=["layer", "size"],
    )
    df = df[["layer", "size", "density", "random_batch", "random_batch_std", "consecutive",
             "independent", "frequency_union"]].sort_values(["layer", "size"], ignore_index=True)
    df.attrs.update(rule=dict(masks.rule), versions=versions(),
                    config={"sizes": list(sizes), "n_batches": n_batches, "seed": seed})
    return df
