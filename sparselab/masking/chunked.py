"""Rules and metrics on recordings larger than memory: activations read chunk by chunk.

    >>> trace = sl.Trace.open("run.zarr")
    >>> thresholds = chunked_thresholds(trace, "h", [0.3, 0.5])      # exact, one pass
    >>> masks = chunked_masks(trace, sl.rules.Calibrated(density=0.5))
    >>> frames = analyze(trace, sl.rules.Calibrated(density=0.5), windows=(1, 4, 16))

Each layer's ``[tokens, neurons]`` array is a Dask array over the store's token chunks
(``LazyArray.to_dask``; an in-memory trace is wrapped in chunks of the same size), so
at most a few chunks of activations are in memory at once and Dask runs the chunks in
parallel (threads, or the workers of an active ``dask.distributed`` client).

Exactness (tested against the in-memory functions on the same data):

- calibrated thresholds: **exact**, the same order statistic as
  :class:`~sparselab.masking.thresholds.MagnitudeIndex`. fp16 magnitudes are counted by
  their 15-bit patterns in one pass (as the index does); float32 magnitudes by a two-pass
  radix select (a histogram of the upper 16 bits of the pattern, then of the lower 16
  bits inside the one bucket holding the order statistic). No quantile is approximated.
- masks: bit-identical to ``trace.masks(rule)`` for every rule (per-token rules only see
  their own row; threshold rules use the exact thresholds above).
- metrics (density, churn, window reuse, neuron frequency, batch union, hot sets): the
  library's own functions on the packed masks, so identical by construction. Packed masks
  take 1 bit per (token, neuron, layer) - 1/16 of the fp16 activations they come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from sparselab._checks import check_fractions
from sparselab._fast.masks import n_words, pack
from sparselab.masking.masks import Masks
from sparselab.masking.rules import Calibrated, Rule
from sparselab.masking.thresholds import _FP16_PATTERNS, drop_count

__all__ = ["analyze", "chunked_masks", "chunked_thresholds", "layer_blocks"]

DEFAULT_CHUNK = 1024
_HALF = 1 << 16


def layer_blocks(trace, source: str, layer: int, chunk_tokens: int | None = None):
    """One layer of ``source`` as a 2-D dask array ``[tokens, features]`` chunked along tokens."""
    import dask.array as da

    if source not in trace.arrays:
        raise KeyError(f"{source!r} was not recorded (recorded: {sorted(trace.arrays)}); "
                       f"record with store=(..., {source!r})")
    li = trace.layer_index(layer)
    arr = trace.arrays[source]
    if hasattr(arr, "to_dask"):
        x = arr.to_dask()[li]
        return x if chunk_tokens is None else x.rechunk((chunk_tokens, -1))
    return da.from_array(arr[li].numpy(), chunks=(chunk_tokens or DEFAULT_CHUNK, -1))


def _hist_fp16(block: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(block).view(np.uint16) & 0x7FFF
    return np.bincount(bits.ravel(), minlength=0x8000)[None, :]


def _hist_hi(block: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(block, dtype=np.float32).view(np.uint32) & 0x7FFFFFFF
    return np.bincount((bits >> 16).ravel(), minlength=0x8000)[None, :]


def _hist_lo(block: np.ndarray, bucket: int) -> np.ndarray:
    bits = np.ascontiguousarray(block, dtype=np.float32).view(np.uint32) & 0x7FFFFFFF
    inside = bits[(bits >> 16) == bucket]
    return np.bincount((inside & 0xFFFF).ravel(), minlength=_HALF)[None, :]


def _reduce(x, fn, width: int, **kw):
    import dask.array as da

    return da.map_blocks(fn, x, chunks=(1, width), dtype=np.int64, **kw).sum(axis=0)


def chunked_thresholds(trace, source: str, densities: Sequence[float], layers: Sequence[int] | None = None,
                       chunk_tokens: int | None = None) -> dict[float, dict[int, float]]:
    """``{density: {layer: threshold}}`` exactly as ``calibrated_thresholds`` gives them,
    reading ``|source|`` chunk by chunk (module docstring: how it stays exact)."""
    import dask

    values = check_fractions("densities", densities)
    layers = trace.layers if layers is None else tuple(int(x) for x in layers)
    xs = {layer: layer_blocks(trace, source, layer, chunk_tokens) for layer in layers}
    n = {layer: int(np.prod(x.shape)) for layer, x in xs.items()}
    fp16 = trace.arrays[source].dtype == torch.float16
    out: dict[float, dict[int, float]] = {d: {} for d in values}
    if fp16:
        table = np.arange(_FP16_PATTERNS, dtype=np.uint16).view(np.float16).astype(np.float32)
        hists = dask.compute(*[_reduce(xs[layer], _hist_fp16, 0x8000) for layer in layers])
        for layer, hist in zip(layers, hists, strict=True):
            cum = np.cumsum(hist[:_FP16_PATTERNS])
            for d in values:
                drop = drop_count(n[layer], d)
                out[d][layer] = float("-inf") if drop <= 0 else float(
                    table[min(int(np.searchsorted(cum, drop)), _FP16_PATTERNS - 1)])
        return out
    his = dict(zip(layers, dask.compute(*[_reduce(xs[layer], _hist_hi, 0x8000) for layer in layers]),
                   strict=True))
    wanted = {}  # (layer, bucket) -> [(density, rank inside the bucket)]
    for layer in layers:
        cum = np.cumsum(his[layer])
        for d in values:
            drop = drop_count(n[layer], d)
            if drop <= 0:
                out[d][layer] = float("-inf")
                continue
            bucket = int(np.searchsorted(cum, drop))
            before = int(cum[bucket - 1]) if bucket else 0
            wanted.setdefault((layer, bucket), []).append((d, drop - before))
    keys = list(wanted)
    los = dask.compute(*[_reduce(xs[layer], _hist_lo, _HALF, bucket=bucket) for layer, bucket in keys])
    for (layer, bucket), lo in zip(keys, los, strict=True):
        cum = np.cumsum(lo)
        for d, rank in wanted[(layer, bucket)]:
            low = int(np.searchsorted(cum, rank))
            out[d][layer] = float(np.array([(bucket << 16) | low], dtype=np.uint32).view(np.float32)[0])
    return out


def _fit(rule: Rule, trace, chunk_tokens: int | None) -> Rule:
    if rule.fitted:
        return rule
    if isinstance(rule, Calibrated):
        thresholds = chunked_thresholds(trace, rule.source, [rule.density], chunk_tokens=chunk_tokens)
        return replace(rule, thresholds=thresholds[float(rule.density)])
    raise TypeError(f"{type(rule).__name__} needs fitting but has no chunked fit")


def chunked_masks(trace, rule: Rule, layers: Sequence[int] | None = None,
                  chunk_tokens: int | None = None) -> Masks:
    """``trace.masks(rule)``, bit for bit, with activations read one chunk at a time."""
    import dask

    if not isinstance(rule, Rule):
        raise TypeError(f"expected a sparselab.rules rule, got {type(rule).__name__}")
    rule = _fit(rule, trace, chunk_tokens)
    layers = trace.layers if layers is None else tuple(int(x) for x in layers)
    words = n_words(trace.n_neurons)

    def bits_of(block: np.ndarray, layer: int) -> np.ndarray:
        return pack(rule.mask(torch.from_numpy(np.ascontiguousarray(block)).float(), layer).numpy())

    parts = [layer_blocks(trace, rule.source, layer, chunk_tokens).map_blocks(
        bits_of, layer=layer, chunks=(layer_blocks(trace, rule.source, layer, chunk_tokens).chunks[0],
                                      (words,)), dtype=np.uint64) for layer in layers]
    bits = np.stack(dask.compute(*parts)) if layers else np.zeros((0, trace.n_tokens, words), np.uint64)
    return Masks(bits=bits, n_neurons=trace.n_neurons, layers=layers, seq_ids=trace.seq_ids,
                 positions=trace.positions, rule=rule.describe())


def analyze(trace, rule: Rule, windows: Sequence[int] = (1, 2, 4, 8, 16),
            batch_sizes: Sequence[int] = (1, 4, 16), hot_fractions: Sequence[float] = (0.1, 0.2, 0.5),
            chunk_tokens: int | None = None) -> dict[str, Any]:
    """The whole-trace analyses on a streamed trace: calibrated masks, then every metric.

        >>> out = analyze(sl.Trace.open("run.zarr"), sl.rules.Calibrated(density=0.5))
        >>> out["churn"].groupby("layer").churn.mean()

    Returns ``{"masks", "density", "churn", "window_reuse", "neuron_frequency",
    "batch_union", "hot_sets"}``; ``hot_sets`` is one row per layer and fraction with the
    share of activations the most frequent neurons cover (in sample).
    """
    from sparselab import metrics
    from sparselab.studies.hotset import hot_neurons

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
