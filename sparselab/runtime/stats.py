"""Per-step statistics of a sparse run: one typed record per forward call and layer.

    >>> handle.stats().groupby("layer").active.mean()      # a DataFrame of StepStats rows

A record says which neuron set a layer computed with (how many, how it changed since the
layer's previous set, what the weight cache copied) and where the time went.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import pandas as pd

__all__ = ["STAT_COLUMNS", "StepStats", "StepTimes", "stats_frame"]


@dataclass(frozen=True, slots=True)
class StepTimes:
    """Nanoseconds a layer's call spent per part (zeros when stats are off)."""

    predictor: int = 0  # scores of the predictor (or the fused selector)
    mask: int = 0  # turning scores or a rule into the neuron set (and the union)
    cache: int = 0  # the weight cache's update
    mlp: int = 0  # the MLP over the set (sparse kernel, or dense compute then masking)


@dataclass(frozen=True, slots=True)
class StepStats:
    """One forward call of one layer (one batch row of it with ``union=False``).

    ``step``: model forward since sparsify / reset; ``phase``: "prefill" or "decode";
    ``row``: -1 for the whole batch; ``active``: neurons computed (mean per token for
    per-token prefill); ``density`` = active / neurons; ``added`` / ``removed``: churn
    against the layer's previous set; ``rows_copied`` / ``bytes_moved``: weight-cache (or
    torch gather) traffic; then the :class:`StepTimes` in nanoseconds.
    """

    step: int
    layer: int
    phase: str
    row: int
    n_tokens: int
    active: float
    density: float
    added: int
    removed: int
    rows_copied: int
    bytes_moved: int
    t_predictor_ns: int
    t_mask_ns: int
    t_cache_ns: int
    t_mlp_ns: int


STAT_COLUMNS = tuple(f.name for f in fields(StepStats))


def stats_frame(records: list) -> pd.DataFrame:
    """The records (:class:`StepStats`, or tuples of its fields in order, as the runtime
    stores them) as a DataFrame with the :data:`STAT_COLUMNS` columns (also when empty)."""
    rows = [astuple(r) if isinstance(r, StepStats) else r for r in records]
    return pd.DataFrame.from_records(rows, columns=list(STAT_COLUMNS))
