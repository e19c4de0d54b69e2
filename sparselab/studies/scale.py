"""Recordings at scale: the memory profile of a recording, in memory or streamed.

    >>> trace, profile = memory_profile(lambda: sl.record(model, tok, texts, out="run.zarr"))
    >>> profile.rss_mb.max() - profile.rss_mb.iloc[0]            # growth during the run

Analyses of streamed traces are in :mod:`sparselab.masking.chunked`, sweeps in
:mod:`sparselab.studies.sweep` (notebook 11).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pandas as pd

__all__ = ["memory_profile"]


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
