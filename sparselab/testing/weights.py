"""Random MLP weights for kernel tests, quantized the way the kernels read them.

    >>> from sparselab.testing.weights import random_int8_mlp
    >>> qg, qu, qd, x = random_int8_mlp(64, 256, seed=0, block=32)

Not used by the library itself.
"""

from __future__ import annotations

import math

import torch

from sparselab._fast.quant import quantize_mlp_int8

__all__ = ["random_int8_mlp"]


def random_int8_mlp(n: int, h: int, seed: int, block: int | None = None,
                    outlier: float = 1.0, down_col_scales: bool = False):
    """int8 ``(gate, up, down_t)`` of an ``n``-neuron MLP with hidden size ``h`` (scales per
    row, or per ``block`` weights; ``down_col_scales``: per row, and down_t also per output
    channel, whose channel 0 is then 20x larger, as LLMs' massive residual channels) and a
    float32 ``x [3, h]``; channel 0 of ``x`` is multiplied by ``outlier`` (LLM activations
    have a few large channels)."""
    g = torch.Generator().manual_seed(seed)
    s = 1.0 / math.sqrt(h)
    gate = torch.randn(n, h, generator=g) * 2 * s
    up = torch.randn(n, h, generator=g) * s
    down = torch.randn(h, n, generator=g) * s
    if down_col_scales:
        down[0] *= 20.0
    qg, qu, qd = quantize_mlp_int8(gate, up, down.t().contiguous(), block, down_col_scales)
    x = torch.randn(3, h, generator=g)
    x[:, 0] *= outlier
    return qg, qu, qd, x


def both_kernels(gate, up, down_t, x, mask, path: str, n_threads: int, **kw) -> list[torch.Tensor]:
    """The sparse MLP of ``mask`` by both kernels (over a cache, by index) on ISA ``path``;
    ``kw`` goes to both (e.g. ``x_int8=True``)."""
    import numpy as np

    from sparselab import _fast
    from sparselab._fast import isa

    with isa.use(path):
        cache = _fast.WeightCache(gate, up, down_t=down_t)
        cache.update(mask)
        y1 = cache.forward(x, "silu", n_threads=n_threads, **kw)
        y2 = _fast.IndexedMLP(gate, up, down_t, "silu", n_threads, **kw)(x, np.flatnonzero(mask))
    return [y1, y2]
