"""The sparse gated MLP by index: computed straight from the full weights over a list of
active neurons, no copy.

    >>> y = sparse_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, down_t, idx, "silu")
    >>> layer = IndexedMLP(gate_w, up_w, down_t, "silu"); y = layer(x, idx)

The same computation over a :class:`~sparselab._fast.cache.WeightCache`'s contiguous rows
is :meth:`WeightCache.forward`.
"""

from __future__ import annotations

import numpy as np
import torch

from sparselab._fast import _masks, _mlp
from sparselab._fast._validate import (
    activation_code,
    as_numpy,
    check_bundle,
    check_threads,
    check_weight,
    check_x_int8,
    finish,
    prep_x,
    resolve_out_dtype,
)
from sparselab._fast.pages import use_huge_pages
from sparselab._fast.quant import output_scales, stacked_scales

__all__ = ["BundleMLP", "IndexedMLP", "sparse_mlp"]


def _index_array(active_idx, n_neurons: int) -> np.ndarray:
    arr = as_numpy(active_idx, "active_idx")
    if arr.ndim != 1:
        raise ValueError(f"active_idx must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"active_idx must hold integers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    code = _masks.check_indices(arr, n_neurons)
    if code == 1:
        bad = arr[(arr < 0) | (arr >= n_neurons)][0]
        raise ValueError(f"active_idx contains {bad}, out of range [0, {n_neurons})")
    if code == 2:
        raise ValueError("active_idx contains duplicate indices")
    return arr


def sparse_mlp(x, gate_weight, up_weight, down_t, active_idx, activation: str,
               n_threads=None, out_dtype=None) -> torch.Tensor:
    """The sparse MLP by index, straight from the full weights, by index list, no copy.

        >>> y = sparse_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, down_t, idx, "silu")

    ``gate_weight``/``up_weight``/``down_t`` are ``[I, H]`` contiguous (``down_t`` is
    ``down_proj.weight.t().contiguous()``), float32 or bfloat16, or all three
    :class:`~sparselab._fast.quant.Int8Rows` (``quantize_int8``; ``down_t`` quantized by
    its rows, optionally with a scale per output channel, ``col_scales=True``; then ``x`` is float32 or bfloat16 and ``y`` float32 by default). ``active_idx`` is 1-D
    integer, unique, in ``[0, I)``, any order (sorted is friendlier to the prefetcher).
    With bf16 weights ``act(gate x) * (up x)`` is rounded to bf16 before the down
    projection, as a bf16 model computes it; accumulation is float32 throughout.
    """
    # one call: collapsing the weights to huge pages would cost more than it saves
    return IndexedMLP(gate_weight, up_weight, down_t, activation, n_threads,
                      huge_pages=False)(x, active_idx, out_dtype)


class IndexedMLP:
    """The by-index sparse MLP bound to one layer's weights, checked once: per call only ``x`` and the
    index list are checked (what a decode step changes).

        >>> mlp = IndexedMLP(gate_w, up_w, down_t, "silu")
        >>> y = mlp(x, idx)            # == sparse_mlp(x, gate_w, up_w, down_t, idx, "silu")

    Holds references to the weights (no copy). ``n_threads`` defaults to
    ``torch.get_num_threads()`` at each call.

    ``x_int8`` (int8 weights only): the gate and up dot products read x rounded to int8 per
    group of 64 channels (``sx = max|x| / 127`` per group) and run on integers
    (``vpdpbusd`` with AVX512-VNNI, ``vpmaddubsw`` on AVX2; ``_fast.info()["int8_dot"]``
    names the path). That is a different model from float x: the result equals the float
    computation over the dequantized x (see ``sparselab._fast.quant.round_x_int8``).

    ``huge_pages`` (default on; ``SPARSELAB_HUGE_PAGES=0`` turns it off everywhere): back the
    three weights with 2 MiB pages (:func:`~sparselab._fast.pages.use_huge_pages`; advice,
    contents unchanged). The kernel reads scattered rows, and with 4 KiB pages most row
    starts miss the TLB: 1.06-1.13x at 10-50 % density on Llama-3.2-3B fp32 shapes, bf16
    1.10-1.20x (``experiments/bench_huge_pages.py``). It costs a copy of the
    weights once (about 30 ms per 96 MiB); already collapsed memory costs ~20 us. Weights
    in a file mapping (a model loaded from safetensors) are refused by Linux and stay as
    they are.
    """

    def __init__(self, gate_weight, up_weight, down_t, activation: str, n_threads=None,
                 x_int8: bool = False, huge_pages: bool = True) -> None:
        self._code = activation_code(activation)
        self._n_threads = None if n_threads is None else check_threads(n_threads)
        gate, self._gate_np = check_weight(gate_weight, "gate_weight")
        up, self._up_np = check_weight(up_weight, "up_weight", gate.dtype)
        dt, self._dt_np = check_weight(down_t, "down_t", gate.dtype)
        if up.shape != gate.shape:
            raise ValueError(f"up_weight has shape {tuple(up.shape)}, gate_weight "
                             f"{tuple(gate.shape)}: they must match")
        if dt.shape != gate.shape:
            raise ValueError(f"down_t has shape {tuple(dt.shape)}; expected [I, H] = "
                             f"{tuple(gate.shape)} (transpose down_proj.weight)")
        self._scales = self._out_scales = None
        if gate.dtype == torch.int8:
            # per neuron: (gate, up, down) scale, read by the kernel next to the rows; per
            # output channel (down_t with column scales): multiplied into y at the end
            self._scales = stacked_scales(gate_weight, up_weight, down_t)
            self._out_scales = output_scales(down_t)
        self._weights = (gate, up, dt)  # keep the tensors the numpy views point into alive
        self.x_int8 = check_x_int8(x_int8, gate.dtype)
        self.dtype = gate.dtype
        self.n_neurons, self.hidden = int(gate.shape[0]), int(gate.shape[1])
        # last, once every argument is checked: three strided CPU tensors (BundleMLP, reading
        # a mapped weight file in place, has its own __init__ and leaves the file's pages be)
        self.huge_page_bytes = use_huge_pages(gate, up, dt) if huge_pages else 0

    def __call__(self, x, active_idx, out_dtype=None) -> torch.Tensor:
        idx = _index_array(active_idx, self.n_neurons)
        od = resolve_out_dtype(out_dtype, self.dtype)
        x32, was_1d = prep_x(x, self.hidden, self.dtype)
        return finish(self.run_unchecked(x32, idx), was_1d, od)

    def run_unchecked(self, x32: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        """The kernel on arguments the caller has already checked: ``x32`` float32
        C-contiguous ``[B, H]``, ``idx`` int64 C-contiguous, unique, in range (as
        :class:`LowRankSelector` returns them). Returns float32 ``[B, H]``. For the decode
        loop, where every microsecond of Python is a share of a 135M model's step."""
        y = torch.empty(x32.shape, dtype=torch.float32)
        if x32.shape[0]:
            nt = self._n_threads if self._n_threads is not None else max(1, torch.get_num_threads())
            _mlp.index_forward(self._gate_np, self._up_np, self._dt_np, idx, x32, y.numpy(),
                               self._code, nt, self._scales, self.x_int8, self._out_scales)
        return y


class BundleMLP(IndexedMLP):
    """The by-index sparse MLP over a bundled ``[I, 3, H]`` array: row ``j`` holds neuron
    ``j``'s gate row, up row and down column together (one contiguous read per neuron), e.g.
    a layer of a memory-mapped :class:`~sparselab.runtime.weight_file.MLPWeightFile`, read
    in place.

        >>> mlp = BundleMLP(weight_file.layer(3), torch.float32, "silu")
        >>> y = mlp(x, idx)            # == IndexedMLP(gate, up, down_t, "silu")(x, idx), bit for bit

    ``bundle`` is float32, or bfloat16 stored as uint16 bits (``dtype`` says which).
    ``prefetch``: called with each call's index list before the kernel reads it (e.g.
    :meth:`MLPWeightFile.prefetcher`, which starts the reads asynchronously).
    """

    def __init__(self, bundle: np.ndarray, dtype: torch.dtype, activation: str,
                 n_threads=None, prefetch=None) -> None:
        self._prefetch = prefetch
        self._code = activation_code(activation)
        self._n_threads = None if n_threads is None else check_threads(n_threads)
        self._bundle = check_bundle(bundle, "bundle", dtype)
        self.huge_page_bytes = 0  # file pages: left to the page cache
        self.dtype = dtype
        self.n_neurons, self.hidden = int(bundle.shape[0]), int(bundle.shape[2])

    def run_unchecked(self, x32: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        """As :meth:`IndexedMLP.run_unchecked`, reading the bundle in place."""
        y = torch.empty(x32.shape, dtype=torch.float32)
        if x32.shape[0]:
            if self._prefetch is not None and idx.size:
                self._prefetch(None if idx.size == self.n_neurons else idx)
            nt = self._n_threads if self._n_threads is not None else max(1, torch.get_num_threads())
            _mlp.bundle_forward(self._bundle, idx, x32, y.numpy(), self._code, nt)
        return y
