"""Batch union: the neurons a batched sparse MLP must load for B random tokens.

    >>> sl.metrics.batch_union(masks, sizes=(1, 4, 16))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from sparselab._checks import check_positive_ints
from sparselab._fast.masks import popcount
from sparselab.masking.masks import Masks, as_masks
from sparselab.metrics._frames import attach_provenance


def sample_batches(n_tokens: int, size: int, n_batches: int, seed: int = 0) -> np.ndarray:
    """Token indices of ``n_batches`` random batches of ``size`` distinct tokens.

        >>> sample_batches(10, 3, 2, seed=0).shape
        (2, 3)

    Deterministic per ``(seed, size)``, so adding a size to a sweep does not change the
    batches drawn for the others.
    """
    if not 1 <= size <= n_tokens:
        raise ValueError(f"batch size {size} must be between 1 and the number of tokens ({n_tokens})")
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    rng = np.random.default_rng([int(seed), int(size)])
    return np.stack([rng.choice(n_tokens, size=size, replace=False) for _ in range(n_batches)])


def batch_union(
    masks: Masks,
    sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
    n_batches: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Density of the union of the masks of ``B`` random tokens, vs the independence model.

        >>> df = sl.metrics.batch_union(masks, sizes=(1, 4, 16))
        >>> df[["layer", "size", "union_density", "independent"]]

    A batched sparse MLP must load every neuron any token of the batch needs. Batches
    are drawn from all tokens (see :func:`sample_batches`; the same batches for every
    layer). Columns: ``layer, size, n_batches, density`` (``p``, the layer's mean
    density), ``union_density`` and ``union_std`` over the batches, ``independent`` =
    ``1 - (1 - p)^B`` (what masks drawn independently would give).
    """
    masks = as_masks(masks)
    sizes = check_positive_ints("sizes", sizes)
    if sizes[-1] > masks.n_tokens:
        raise ValueError(f"batch size {sizes[-1]} exceeds the {masks.n_tokens} tokens of these masks")
    n = float(masks.n_neurons)
    p = masks.counts().mean(axis=1) / n
    rows = []
    for size in sizes:
        idx = sample_batches(masks.n_tokens, size, n_batches, seed)
        for li, layer in enumerate(masks.layers):
            union = np.bitwise_or.reduce(masks.bits[li][idx], axis=1)  # [n_batches, W]
            dens = popcount(union) / n
            rows.append(
                {
                    "layer": layer,
                    "size": size,
                    "n_batches": n_batches,
                    "density": p[li],
                    "union_density": dens.mean(),
                    "union_std": dens.std(ddof=1) if n_batches > 1 else 0.0,
                    "independent": 1.0 - (1.0 - p[li]) ** size,
                }
            )
    df = pd.DataFrame(rows).sort_values(["layer", "size"], ignore_index=True)
    return attach_provenance(df, masks, sizes=list(sizes), n_batches=n_batches, seed=seed)
