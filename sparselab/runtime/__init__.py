"""Runtime: run a model sparsely, restore it dense, and watch what each step computed.

    >>> with sl.sparsify(model, predictors, mode="predicted") as handle:
    ...     out = model.generate(**batch, max_new_tokens=32)
    >>> handle.stats().groupby("layer").active.mean()       # model is dense again here

Modules: :mod:`.sparsify` (``sparsify``: checks, then swaps each gated MLP for a
wrapper), :mod:`.sparse_mlp` (the wrapper: predictor -> mask -> union -> weight cache ->
kernel), :mod:`.handle` (``SparseHandle``: restore and stats), :mod:`.stats` (the typed
per-step records), :mod:`.layout` (``down`` transposed in place for the kernels),
:mod:`.generate` (a live sparse generation with per-step masks and timings).
"""

from sparselab.runtime.generate import LiveResult, sparse_generate
from sparselab.runtime.handle import SparseHandle
from sparselab.runtime.sparse_mlp import SparseMLP
from sparselab.runtime.sparsify import (
    KERNELS,
    PREFILLS,
    SPARSIFY_MODES,
    AlreadySparsifiedError,
    is_sparsified,
    sparsify,
)
from sparselab.runtime.stats import STAT_COLUMNS, StepStats, StepTimes

__all__ = [
    "KERNELS",
    "PREFILLS",
    "SPARSIFY_MODES",
    "STAT_COLUMNS",
    "AlreadySparsifiedError",
    "LiveResult",
    "SparseHandle",
    "SparseMLP",
    "StepStats",
    "StepTimes",
    "is_sparsified",
    "sparse_generate",
    "sparsify",
]
