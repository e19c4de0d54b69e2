"""Variants of one model measured alternately in one process, one row per run.

    >>> runs = compare(model, prompt_ids, {"dense": None,
    ...     "sparse": lambda: sl.sparsify(model, predictors, density=0.5)}, num_runs=5)

:func:`compare` runs the variants (dense, sparse with or without the weight cache, ...)
*alternately* - a run of each variant per cycle, the order rotating every cycle - so a
noisy neighbour or a frequency change hits all of them alike. Each run is one greedy
``model.generate`` with the KV cache and a fixed number of new tokens (no EOS stop), timed
by forward hooks (:func:`~sparselab.evaluation.timing.time_generate`) while a background
thread samples the process's resident memory
(:class:`~sparselab.evaluation.memory.MemorySampler`). What the runs say is summarised by
:mod:`sparselab.evaluation.summaries`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sparselab.evaluation.memory import MB, MemorySampler, release_memory, rss_bytes
from sparselab.evaluation.timing import decode_split, time_generate

# --------------------------------------------------------------------------------------
# alternating comparison
# --------------------------------------------------------------------------------------

Factory = Callable[[], Any] | None


def _order(names: Sequence[str], cycle: int) -> list[str]:
    k = cycle % len(names)
    return list(names[k:]) + list(names[:k])


def compare(
    model: nn.Module,
    input_ids: torch.Tensor,
    variants: Mapping[str, Factory],
    num_runs: int = 10,
    warmup_runs: int = 1,
    max_new_tokens: int = 32,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    memory_interval: float = 0.002,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Generate with each variant ``warmup_runs + num_runs`` times, alternating; one row per run.

        >>> runs = compare(model, ids, {"dense": None,
        ...                             "sparse": lambda: sl.sparsify(model, p, density=0.5)})

    ``variants``: name -> ``None`` (the model as it is) or a factory returning a handle
    that changes the model until ``.restore()`` (e.g. :func:`sparselab.sparsify`). Each
    cycle runs every variant once, the order rotating by one per cycle. Before each run
    (untimed): the factory is called, one single-token forward primes it (fills a weight
    cache as the previous request would have; done for every variant alike), the
    handle's stats are reset and garbage is collected. During the run the resident
    memory is sampled (:class:`MemorySampler`). Columns: cycle, variant, warmup, timings
    (``ttft_ms``, ``decode_tokens_per_s``, ``total_tokens_per_s``, ``total_s``), memory in
    bytes (``rss_at_rest``, ``peak_rss``, ``kernel_peak_rss``, ``extra_bytes`` of the
    handle) and the :func:`decode_split` columns. ``df.attrs["outputs"]`` holds each
    variant's generated ids of its last run.
    """
    from tqdm.auto import tqdm

    if not variants:
        raise ValueError("variants is empty: give at least one {name: factory or None}")
    if not isinstance(num_runs, int) or num_runs < 1:
        raise ValueError(f"num_runs must be an int >= 1, got {num_runs!r}")
    if not isinstance(warmup_runs, int) or warmup_runs < 0:
        raise ValueError(f"warmup_runs must be an int >= 0, got {warmup_runs!r}")
    for name, factory in variants.items():
        if factory is not None and not callable(factory):
            raise ValueError(f"variant {name!r} must be None or a callable returning a handle")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be an int >= 2, got {max_new_tokens!r}")
    names = list(variants)
    cycles = warmup_runs + num_runs
    rows, outputs = [], {}
    bar = tqdm(total=cycles * len(names), desc="benchmark", unit="run", disable=not progress)
    try:
        for cycle in range(cycles):
            for name in _order(names, cycle):
                row, out_ids = _one_run(model, input_ids, variants[name], max_new_tokens,
                                        attention_mask, pad_token_id, memory_interval)
                row = {"cycle": cycle, "variant": name, "warmup": cycle < warmup_runs, **row}
                rows.append(row)
                outputs[name] = out_ids
                bar.update()
                bar.set_postfix(variant=name, tok_s=f"{row['decode_tokens_per_s']:.2f}")
                if log is not None:
                    log(f"{'warm-up' if row['warmup'] else 'run'} {cycle:3d} {name:<14} "
                        f"ttft {row['ttft_ms']:8.1f} ms  decode {row['decode_tokens_per_s']:7.2f} tok/s  "
                        f"peak {row['peak_rss'] / MB:8.1f} MiB")
    finally:
        bar.close()
    df = pd.DataFrame(rows)
    df.attrs["outputs"] = outputs
    df.attrs["variants"] = names
    return df


def _one_run(model, input_ids, factory, max_new_tokens, attention_mask, pad_token_id,
             memory_interval) -> tuple[dict, torch.Tensor]:
    handle = factory() if factory is not None else None
    try:
        with torch.no_grad():
            model(input_ids=input_ids[:, :1], use_cache=False)  # prime (untimed)
        if handle is not None and hasattr(handle, "reset_stats"):
            handle.reset_stats()
        release_memory()
        rest = rss_bytes()
        with MemorySampler(memory_interval) as mem:
            timing = time_generate(model, input_ids, max_new_tokens, attention_mask, pad_token_id)
        stats = handle.stats() if handle is not None and hasattr(handle, "stats") else None
        extra = int(getattr(handle, "extra_bytes", 0) or 0) if handle is not None else 0
        held = _active_rows_bytes(handle, stats)
    finally:
        if handle is not None:
            handle.restore()
    row = {
        "ttft_ms": timing.ttft_s * 1e3,
        "decode_tokens_per_s": timing.decode_tokens_per_s,
        "total_tokens_per_s": timing.total_tokens_per_s,
        "total_s": timing.total_s,
        "n_prompt": timing.n_prompt,
        "n_new": timing.n_new,
        "rss_at_rest": rest,
        "peak_rss": mem.peak_rss,
        "kernel_peak_rss": mem.kernel_peak_rss if mem.kernel_peak_rss is not None else np.nan,
        "memory_samples": mem.n_samples,
        "extra_bytes": extra,
        "active_rows_bytes": held,
        **decode_split(timing, stats),
    }
    return row, timing.output_ids


def _active_rows_bytes(handle, stats: pd.DataFrame | None) -> int:
    """Bytes of the weight rows a handle's caches needed at most during the run: per layer
    the largest active set of a decode step (gate + up + down row per neuron). The
    caches' ``extra_bytes`` is their capacity, which growth by doubling can make larger."""
    caches = getattr(handle, "caches", None) if handle is not None else None
    if not caches:
        return 0
    dec = stats[stats["phase"] == "decode"] if stats is not None and len(stats) else None
    peak = dec.groupby("layer")["active"].max() if dec is not None else pd.Series(dtype=float)
    total = 0
    for layer, cache in caches.items():
        n = max(int(peak.get(layer, 0)), int(cache.n_active))
        total += n * 3 * int(cache.hidden) * cache.dtype.itemsize
    return total
