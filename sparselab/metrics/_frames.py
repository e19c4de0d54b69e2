"""Shared shape of every metric frame: one row per layer and token, provenance in attrs,
and the (sequence, position) order that "consecutive tokens" means.

    >>> order, rank = sequence_order(np.array([0, 0, 1]), np.array([0, 1, 0]))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sparselab._version import versions
from sparselab.masking.masks import Masks

__all__ = ["attach_provenance", "long_frame", "sequence_order"]


def attach_provenance(df: pd.DataFrame, masks: Masks, **config: Any) -> pd.DataFrame:
    """Attach provenance: which rule made the masks, the metric's settings, versions."""
    df.attrs["rule"] = dict(masks.rule)
    if config:
        df.attrs["config"] = config
    df.attrs["versions"] = versions()
    return df


def sequence_order(seq_ids: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token order by (sequence, position) and each token's rank inside its sequence.

        >>> order, rank = sequence_order(np.array([0, 0, 1]), np.array([0, 1, 0]))
        >>> order.tolist(), rank.tolist()          # rank is given in sorted order
        ([0, 1, 2], [0, 1, 0])

    ``rank[i]`` is the number of tokens before ``order[i]`` in its sequence, so token
    ``order[i]`` has the previous ``k`` tokens of its own sequence iff ``rank[i] >= k``.
    """
    seq_ids = np.asarray(seq_ids)
    order = np.lexsort((np.asarray(positions), seq_ids))
    sorted_seq = seq_ids[order]
    n = len(order)
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_seq[1:] != sorted_seq[:-1]
    start_index = np.maximum.accumulate(np.where(starts, np.arange(n), 0)) if n else starts
    rank = np.arange(n) - start_index
    return order, rank.astype(np.int64)


def long_frame(masks: Masks, tokens: np.ndarray, columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """Frame with one row per (layer, token): ``columns`` hold ``[layers, len(tokens)]``."""
    n_layers, n = masks.n_layers, len(tokens)
    data: dict[str, np.ndarray] = {
        "layer": np.repeat(np.asarray(masks.layers, dtype=np.int64), n),
        "token": np.tile(tokens, n_layers),
        "seq_id": np.tile(masks.seq_ids[tokens], n_layers),
        "position": np.tile(masks.positions[tokens], n_layers),
    }
    for name, values in columns.items():
        data[name] = np.asarray(values).reshape(-1)
    return pd.DataFrame(data)
