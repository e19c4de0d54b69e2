"""Recordings at scale (notebook 11): the memory profile of a recording, in memory or
streamed, and the whole-trace analyses of a streamed trace.

    >>> trace, profile = memory_profile(lambda: sl.record(model, tok, texts, out="run.zarr"))
    >>> profile.rss_mb.max() - profile.rss_mb.iloc[0]            # growth during the run
    >>> analyze(sl.Trace.open("run.zarr"), sl.rules.Calibrated(density=0.5))["churn"]

Masks of streamed traces come from :mod:`sparselab.masking.chunked`, sweeps from
:mod:`sparselab.studies.sweep`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from sparselab import metrics
from sparselab.masking.chunked import chunked_masks
from sparselab.masking.rules import Rule
from sparselab.studies.hotset import hot_neurons

__all__ = ["analyze", "memory_profile"]


def memory_profile(run: Callable[[], Any], interval: float = 0.05, label: str = "") -> tuple[Any, pd.DataFrame]:
    """Call ``run()`` while a thread samples this process's resident memory.

    Returns ``(run's result, frame)`` with columns ``label, seconds, rss_mb`` (the first
    sample is taken before ``run`` starts, the last after it returns).
    """
    import psutil

    if not interval > 0:
        raise ValueError(f"interval must be > 0, got {interval}")
    process = psutil.Process()
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        samples.append((time.perf_counter() - t0, process.memory_info().rss / 2**20))

    def loop() -> None:
        while not stop.wait(interval):
            sample()

    sample()
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        result = run()
    finally:
        stop.set()
        thread.join()
        sample()
    frame = pd.DataFrame(samples, columns=["seconds", "rss_mb"])
    frame.insert(0, "label", label)
    return result, frame


def analyze(trace, rule: Rule, windows: Sequence[int] = (1, 2, 4, 8, 16),
            batch_sizes: Sequence[int] = (1, 4, 16), hot_fractions: Sequence[float] = (0.1, 0.2, 0.5),
            chunk_tokens: int | None = None) -> dict[str, Any]:
    """The whole-trace analyses on a streamed trace: calibrated masks, then every metric.

        >>> out = sl.studies.scale.analyze(sl.Trace.open("run.zarr"), sl.rules.Calibrated(density=0.5))
        >>> out["churn"].groupby("layer").churn.mean()

    Returns ``{"masks", "density", "churn", "window_reuse", "neuron_frequency",
    "batch_union", "hot_sets"}``; ``hot_sets`` is one row per layer and fraction with the
    share of activations the most frequent neurons cover (in sample).
    """
    masks = chunked_masks(trace, rule, chunk_tokens=chunk_tokens)
    counts = masks.neuron_counts()
    total = counts.sum(axis=1)
    rows = []
    for fraction in hot_fractions:
        hot = hot_neurons(masks, fraction)
        covered = (counts * hot).sum(axis=1)
        for li, layer in enumerate(masks.layers):
            rows.append({"layer": layer, "fraction": float(fraction), "n_hot": int(hot[li].sum()),
                         "coverage": covered[li] / total[li] if total[li] else float("nan")})
    sizes = [s for s in batch_sizes if s <= masks.n_tokens]
    return {
        "masks": masks,
        "density": metrics.density(masks),
        "churn": metrics.churn(masks),
        "window_reuse": metrics.window_reuse(masks, windows),
        "neuron_frequency": metrics.neuron_frequency(masks),
        "batch_union": metrics.batch_union(masks, sizes) if sizes else pd.DataFrame(),
        "hot_sets": pd.DataFrame(rows),
    }
