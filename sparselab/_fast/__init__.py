"""Compiled core of sparselab: packed-bit masks, a paired-replacement weight cache, and
sparse gated-MLP kernels, working on buffers (no HF modules, no autograd).

    >>> from sparselab import _fast
    >>> cache = _fast.WeightCache(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    >>> stats = cache.update(mask_bool)                 # or packed uint64 words
    >>> y = cache.forward(x, "silu")                    # == sparse_mlp(x, ..., cache.order, "silu")

Modules, each one concept (the compiled ``_*.pyx`` behind them trust their inputs):

- :mod:`~sparselab._fast.masks`: pack / unpack / popcount / XOR diff / union of bit masks;
- :mod:`~sparselab._fast.cache`: :class:`WeightCache` (paired replacement) and the sparse
  MLP over the cache's rows;
- :mod:`~sparselab._fast.kernels`: the sparse MLP by index over the full weights
  (:func:`sparse_mlp`, :class:`IndexedMLP`);
- :mod:`~sparselab._fast.selector`: :class:`LowRankSelector`, a predictor's scores,
  threshold and batch union in one pass;
- :mod:`~sparselab._fast.pages`: 2 MiB pages under weight memory (``use_huge_pages``;
  :class:`IndexedMLP` collapses its weights; ``SPARSELAB_HUGE_PAGES=0`` turns it off);
- :mod:`~sparselab._fast._validate`: the argument checks every entry point runs first.

Every public function validates all of its arguments (shape, dtype, contiguity, index range,
activation name) *before* any state changes and raises ``ValueError`` naming the problem.
Results are numpy arrays or torch tensors that share memory with the buffers that hold them.
Weights are ``torch.float32``, ``torch.bfloat16`` (handed to C as raw uint16 bits) or int8
(:mod:`~sparselab._fast.quant`: ``quantize_int8`` with per-block-32 or per-row scales);
accumulation is always float32. The inner loops are chosen at run time from the CPU's
instruction sets (:mod:`~sparselab._fast.isa`; :func:`info` says which path runs).
"""

from __future__ import annotations

import torch

from sparselab._fast import _mlp, isa
from sparselab._fast._validate import ACTIVATIONS, MAX_THREADS
from sparselab._fast.cache import UpdateStats, WeightCache
from sparselab._fast.kernels import BundleMLP, IndexedMLP, sparse_mlp
from sparselab._fast.masks import (
    WORD_BITS,
    indices,
    n_words,
    pack,
    popcount,
    union,
    unpack,
    xor_diff,
)
from sparselab._fast.selector import LowRankSelector
from sparselab.testing.reference import dense_reference  # the test oracle, kept for old callers

__all__ = [
    "ACTIVATIONS",
    "MAX_THREADS",
    "WORD_BITS",
    "BundleMLP",
    "IndexedMLP",
    "LowRankSelector",
    "UpdateStats",
    "WeightCache",
    "dense_reference",
    "indices",
    "info",
    "isa",
    "n_words",
    "pack",
    "popcount",
    "sparse_mlp",
    "union",
    "unpack",
    "xor_diff",
]


def info() -> dict:
    """How this build runs: OpenMP, the instruction-set path in use and the ones this CPU
    supports (see :mod:`sparselab._fast.isa`), the instructions of the int8-x dot products
    at that path (``"int8_dot"``: vpdpbusd, vpmaddubsw or portable), threads.

        >>> _fast.info()["isa"]
        'avx512bf16'
    """
    b = _mlp.build_info()
    return {"openmp": b["openmp"], "isa": isa.current(), "supported_isas": isa.supported(),
            "simd": [isa.current()], "int8_dot": _mlp.int8_dot_path(),
            "omp_max_threads": b["omp_max_threads"],
            "max_threads": torch.get_num_threads()}
