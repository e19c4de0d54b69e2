"""Per-layer calibrated thresholds of a recording larger than memory, read chunk by chunk.

    >>> trace = sl.Trace.open("run.zarr")
    >>> chunked_thresholds(trace, "h", [0.3, 0.5])[0.5][12]      # exact, one pass per layer

Each layer's ``[tokens, neurons]`` array is a Dask array over the store's token chunks
(``LazyArray.to_dask``; an in-memory trace is wrapped in chunks of the same size), so at
most a few chunks of activations are in memory at once and Dask runs the chunks in parallel
(threads, or the workers of an active ``dask.distributed`` client).

The thresholds are **exact**: the same order statistic as
:class:`~sparselab.masking.thresholds.MagnitudeIndex`. fp16 magnitudes are counted by their
15-bit patterns in one pass (as the index does); float32 magnitudes by a two-pass radix
select (a histogram of the upper 16 bits of the pattern, then of the lower 16 bits inside
the one bucket holding the order statistic). No quantile is approximated. This module knows
no rules, so :func:`~sparselab.masking.rules.calibrated_thresholds` can call it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sparselab._checks import check_fractions
from sparselab.masking.thresholds import _FP16_PATTERNS, drop_count

__all__ = ["chunked_thresholds", "layer_blocks"]

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
