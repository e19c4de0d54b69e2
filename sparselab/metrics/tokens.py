"""Per-token metrics: how many neurons are active, and how much the mask changes from one
token to the next inside a sequence (churn, against independent random masks).

    >>> sl.metrics.density(masks).groupby("layer").density.mean()
    >>> sl.metrics.churn(masks).groupby("layer")[["churn", "random_churn"]].mean()
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sparselab._fast.masks import popcount
from sparselab.masking.masks import Masks, as_masks
from sparselab.metrics._frames import attach_provenance, long_frame, sequence_order


def density(masks: Masks) -> pd.DataFrame:
    """Active neurons per layer and token.

        >>> sl.metrics.density(masks).groupby("layer").density.mean()

    Columns: ``layer, token, seq_id, position, active`` (count), ``density`` (share).
    """
    masks = as_masks(masks)
    counts = masks.counts()
    tokens = np.arange(masks.n_tokens)
    df = long_frame(masks, tokens, {"active": counts, "density": counts / float(masks.n_neurons)})
    return attach_provenance(df, masks)


def churn(masks: Masks) -> pd.DataFrame:
    """Change of the mask from one token to the next inside each sequence (XOR of bits).

        >>> df = sl.metrics.churn(masks)
        >>> df.groupby("layer")[["churn", "random_churn"]].mean()

    One row per layer and token that has a predecessor in its sequence (the first token
    of every sequence has none and is left out). Columns:

    - ``added``: neurons active now but not at the previous token;
    - ``removed``: neurons active at the previous token but not now;
    - ``active``: neurons active now; ``density`` = ``active / n_neurons``;
    - ``churn`` = ``(added + removed) / n_neurons``: the Hamming distance of the two
      masks as a share of the neurons (what a weight cache must swap, in both directions);
    - ``random_churn``: the expected ``churn`` of two *independent* random masks with
      the same two sizes, ``d_prev (1 - d) + d (1 - d_prev)`` - the baseline that says
      whether consecutive tokens are more alike than chance.
    """
    masks = as_masks(masks)
    order, rank = sequence_order(masks.seq_ids, masks.positions)
    has_prev = np.flatnonzero(rank > 0)
    now, prev = order[has_prev], order[has_prev - 1]
    added, removed, active, active_prev = _pair_counts(masks.bits, now, prev)
    n = float(masks.n_neurons)
    d_now, d_prev = active / n, active_prev / n
    df = long_frame(
        masks,
        now,
        {
            "added": added,
            "removed": removed,
            "active": active,
            "density": d_now,
            "churn": (added + removed) / n,
            "random_churn": d_prev * (1.0 - d_now) + d_now * (1.0 - d_prev),
        },
    )
    return attach_provenance(df, masks)


def _pair_counts(bits: np.ndarray, now: np.ndarray, prev: np.ndarray) -> tuple[np.ndarray, ...]:
    """``added, removed, active, active_prev`` of each (``now``, ``prev``) token pair, ``[L, pairs]``.

    One layer at a time: the whole trace's ``[L, pairs, words]`` temporaries (two gathers,
    their XOR and two ANDs) would need several times the masks' own memory."""
    counts = np.empty((4, bits.shape[0], len(now)), dtype=np.int64)
    for li in range(bits.shape[0]):
        cur, before = bits[li, now], bits[li, prev]
        diff = cur ^ before
        counts[0, li] = popcount(diff & cur)
        counts[1, li] = popcount(diff & before)
        counts[2, li] = popcount(cur)
        counts[3, li] = popcount(before)
    return tuple(counts)
