"""Per-neuron metrics: how often each neuron fires, and how concentrated firing is.

    >>> sl.metrics.neuron_frequency(masks)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sparselab.masking.masks import Masks, as_masks
from sparselab.metrics._frames import attach_provenance


def neuron_frequency(masks: Masks) -> pd.DataFrame:
    """Firing frequency of every neuron and the sorted CDF of activations it covers.

        >>> df = sl.metrics.neuron_frequency(masks)
        >>> df[(df.layer == 0) & (df.rank_fraction <= 0.2)].cum_share.max()  # top 20 %

    Columns: ``layer, neuron, frequency`` (share of tokens where it is active),
    ``rank`` (1 = most frequent; ties broken by neuron index), ``rank_fraction`` =
    ``rank / n_neurons``, ``cum_share``: share of all activations of the layer carried
    by the neurons of rank <= this one (NaN for a layer with no activation at all).
    """
    masks = as_masks(masks)
    n = masks.n_neurons
    frames = []
    for layer, counts in zip(masks.layers, masks.neuron_counts(), strict=True):
        order = np.argsort(-counts, kind="stable")
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(1, n + 1)
        total = counts.sum()
        cum = np.empty(n, dtype=np.float64)
        cum[order] = np.cumsum(counts[order]) / total if total else np.nan
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "neuron": np.arange(n),
                    "frequency": counts / max(masks.n_tokens, 1),
                    "rank": rank,
                    "rank_fraction": rank / n,
                    "cum_share": cum,
                }
            )
        )
    return attach_provenance(pd.concat(frames, ignore_index=True), masks)
