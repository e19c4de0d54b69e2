"""Window reuse: an LLM-in-a-Flash neuron cache holding the neurons of the last k tokens.

    >>> sl.metrics.window_reuse(masks, windows=(1, 2, 4, 8))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from sparselab._checks import check_positive_ints
from sparselab._fast.masks import popcount
from sparselab.masking.masks import Masks, as_masks
from sparselab.metrics._frames import attach_provenance, sequence_order


def window_reuse(masks: Masks, windows: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> pd.DataFrame:
    """LLM-in-a-Flash sliding-window neuron cache: footprint and new loads vs window ``k``.

        >>> df = sl.metrics.window_reuse(masks, windows=(1, 2, 4, 8))
        >>> df[df.layer == 0][["window", "footprint", "new_fraction", "random_new_fraction"]]

    For token ``t`` and window ``k`` (both inside one sequence):

    - footprint: ``|m[t-k+1] | ... | m[t]| / n_neurons``, the share of neurons a cache
      holding the last ``k`` tokens' neurons keeps;
    - new: ``|m[t] & ~(m[t-k] | ... | m[t-1])|``, neurons token ``t`` needs that the
      previous ``k`` tokens did not load.

    Averaged over the tokens that have at least ``k`` predecessors in their sequence (the
    same tokens for both, so a full window and its baseline are compared; ``n_tokens``
    says how many; a window longer than every sequence gives NaN). Columns: ``layer,
    window, n_tokens, density`` (mean share active over those tokens), ``footprint,
    new_per_token`` (neurons), ``new_fraction`` (share of neurons), and the random-reuse
    baseline for independent masks of that density ``d``: ``random_footprint`` =
    ``1 - (1 - d)^k`` and ``random_new_fraction`` = ``d (1 - d)^k``.
    """
    masks = as_masks(masks)
    windows = check_positive_ints("windows", windows)
    order, rank = sequence_order(masks.seq_ids, masks.positions)
    n = float(masks.n_neurons)
    # one layer at a time: the window unions of a whole trace ([L, T, W] each) would need
    # several times the masks' own memory
    per_layer = [_layer_windows(masks.bits[li, order], rank, windows) for li in range(masks.n_layers)]
    active = np.stack([a for a, _, _ in per_layer])
    footprint = {k: None if per_layer[0][1][k] is None else np.array([f[k] for _, f, _ in per_layer])
                 for k in windows}
    new = {k: None if per_layer[0][2][k] is None else np.array([w[k] for _, _, w in per_layer])
           for k in windows}
    rows = []
    nan = np.full(masks.n_layers, np.nan)
    for k in windows:
        use = rank >= k
        count = int(use.sum())
        d = active[:, use].mean(axis=1) / n if count else nan
        fp = footprint[k] / n if count else nan
        nw = new[k] if count else nan
        for li, layer in enumerate(masks.layers):
            rows.append(
                {
                    "layer": layer,
                    "window": k,
                    "n_tokens": count,
                    "density": d[li],
                    "footprint": fp[li],
                    "new_per_token": nw[li],
                    "new_fraction": nw[li] / n,
                    "random_footprint": 1.0 - (1.0 - d[li]) ** k,
                    "random_new_fraction": d[li] * (1.0 - d[li]) ** k,
                }
            )
    df = pd.DataFrame(rows).sort_values(["layer", "window"], ignore_index=True)
    return attach_provenance(df, masks, windows=list(windows))


def _layer_windows(bits: np.ndarray, rank: np.ndarray, windows: Sequence[int]):
    """One layer's ``[T, W]`` masks in sequence order: per-token active counts, and per
    window ``k`` the mean footprint and mean new neurons over tokens with ``rank >= k``
    (``None`` where no token has that many predecessors)."""
    footprint: dict[int, float | None] = {}
    new: dict[int, float | None] = {}
    # prev_union[t] = m[t-1] | ... | m[t-j] after step j; tokens with rank < j get bits
    # from the previous sequence, but they are never used for a window k >= j
    prev_union = np.zeros_like(bits)
    for j in range(max(windows) + 1):
        if j:
            prev_union[j:] |= bits[:-j]
        if j + 1 in windows:
            use = rank >= j + 1
            footprint[j + 1] = popcount(prev_union[use] | bits[use]).mean() if use.any() else None
        if j in windows:
            use = rank >= j
            new[j] = popcount(bits[use] & ~prev_union[use]).mean() if use.any() else None
    return popcount(bits), footprint, new
