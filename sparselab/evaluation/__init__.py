"""Evaluation: what running sparsely costs in quality and gains in speed.

    >>> sl.evaluate(model, tokenizer, held_out[:8], predictors=predictors)   # perplexity, KL
    >>> budget = sl.evaluation.decode_bytes(model); budget.bound(0.5)        # the byte bound
    >>> runs = sl.evaluation.compare(model, ids, {"dense": None, "sparse": make_handle})

Modules: :mod:`.quality` (``evaluate``: perplexity, KL to dense, greedy agreement),
:mod:`.frontier` (``frontier``: every selection method's quality against bytes read),
:mod:`.byte_bound` (bytes read per decoded token and the bound they set),
:mod:`.timing` (one timed generation and its per-part split), :mod:`.memory` (RSS and
its peak), :mod:`.compare` (variants run alternately), :mod:`.summaries` (medians,
speedups, the gap to the bound, targets), :mod:`.suite` + :mod:`.suite_report` (config
driven benchmark runs and their files), :mod:`.kernel_bench` (kernel micro-benchmarks).
"""

from sparselab.evaluation.byte_bound import (
    DecodeBytes,
    bound_curve,
    byte_bound,
    decode_bytes,
    decode_bytes_from_config,
)
from sparselab.evaluation.compare import compare
from sparselab.evaluation.frontier import FRONTIER_COLUMNS, frontier, smallest_bytes
from sparselab.evaluation.memory import MemorySampler, release_memory, rss_bytes
from sparselab.evaluation.quality import EVALUATION_MODES, evaluate
from sparselab.evaluation.summaries import (
    check_targets,
    headline,
    shortfall,
    speedups,
    split_table,
    summarize,
)
from sparselab.evaluation.timing import GenerationTiming, decode_split, time_generate

__all__ = [
    "EVALUATION_MODES",
    "FRONTIER_COLUMNS",
    "DecodeBytes",
    "GenerationTiming",
    "MemorySampler",
    "bound_curve",
    "byte_bound",
    "check_targets",
    "compare",
    "decode_bytes",
    "decode_bytes_from_config",
    "decode_split",
    "evaluate",
    "frontier",
    "headline",
    "release_memory",
    "rss_bytes",
    "shortfall",
    "smallest_bytes",
    "speedups",
    "split_table",
    "summarize",
    "time_generate",
]
