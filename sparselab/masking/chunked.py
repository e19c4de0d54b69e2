"""Masks of a recording larger than memory: activations read chunk by chunk.

    >>> trace = sl.Trace.open("run.zarr")
    >>> masks = chunked_masks(trace, sl.rules.Calibrated(density=0.5))

Masks are bit-identical to ``trace.masks(rule)`` for every rule (per-token rules only see
their own row; threshold rules use the exact thresholds of
:func:`~sparselab.masking.streamed.chunked_thresholds`). The whole-trace metrics of a
streamed trace (density, churn, window reuse, ...) are the library's own functions on these
packed masks (1 bit per token, neuron and layer: 1/16 of the fp16 activations), see
:func:`sparselab.studies.scale.analyze`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from sparselab._fast.masks import n_words, pack
from sparselab.masking.masks import Masks
from sparselab.masking.rules import Calibrated, Rule
from sparselab.masking.streamed import chunked_thresholds, layer_blocks

__all__ = ["chunked_masks", "chunked_thresholds", "layer_blocks"]


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
