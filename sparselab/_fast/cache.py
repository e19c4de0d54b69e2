"""The paired-replacement weight cache: the active rows of one gated MLP in contiguous
buffers, updated at a cost proportional to the neurons that change.

    >>> cache = WeightCache(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    >>> stats = cache.update(mask_bool)                 # or packed uint64 words
    >>> y = cache.forward(x, "silu")                    # the sparse MLP over the cache's rows
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparselab._fast import _cache, _mlp
from sparselab._fast._validate import (
    activation_code,
    bits_view,
    bool_array,
    check_bundle,
    check_tail,
    check_threads,
    check_weight,
    check_x_int8,
    finish,
    n_words,
    prep_x,
    resolve_out_dtype,
    word_array,
)
from sparselab._fast.masks import pack, xor_diff
from sparselab._fast.pages import use_huge_pages
from sparselab._fast.quant import output_scales, stacked_scales

__all__ = ["UpdateStats", "WeightCache"]


@dataclass(frozen=True)
class UpdateStats:
    """What one :meth:`WeightCache.update` did.

        >>> s = cache.update(mask); (s.added, s.removed, s.rows_copied, s.n_active)

    ``rows_copied`` counts neurons whose rows (gate + up + down, i.e. three weight rows)
    were written into a slot: every entering neuron plus every tail slot moved into a hole.
    ``bytes_moved`` is the bytes those copies wrote plus, when the buffers had to grow,
    the bytes of the active prefix carried over (``grew`` is then True). ``overflow``: neurons
    of the step computed outside the cache (a capacity-bounded
    :class:`~sparselab.runtime.window.WindowedCache`; 0 for a plain cache).
    """

    added: int
    removed: int
    rows_copied: int
    bytes_moved: int
    n_active: int
    moved: int = 0
    grew: bool = False
    overflow: int = 0


class WeightCache:
    """The active rows of one gated MLP, kept in contiguous buffers by paired replacement.

        >>> cache = WeightCache(gate_proj.weight, up_proj.weight, down_proj.weight)
        >>> cache.update(mask)                      # bool [I] or uint64 words [ceil(I/64)]
        >>> y = cache.forward(x, "silu")            # x [B, H] or [H]

    Layout: ``gate_up`` is ``[n_active, 2, H]`` (a neuron's gate row then its up row, adjacent
    so the forward kernel streams both in one pass; ``.gate`` / ``.up`` are strided views of
    it) and ``down_t`` is ``[n_active, H]`` (row ``s`` = column ``order[s]`` of ``down``).
    Slot ``s`` holds neuron ``order[s]``. Views returned by these properties share memory
    with the buffers; fetch them again after an update (a growing update re-allocates).

    The pool rows are copied from is the caller's weights, kept by reference, never a second
    copy of the MLP. Given ``down`` ``[H, I]`` (an ``nn.Linear`` weight), ``down_mode``
    chooses how its columns are read:

    * ``"transpose"`` (default): one contiguous ``down.t()`` copy ``[I, H]`` is made at
      construction (``I * H`` elements: the one extra cost, counted in ``extra_bytes``);
      entering neurons are then three contiguous row copies;
    * ``"columns"``: columns are gathered in place from ``down`` (no extra memory; but an
      update reads one cache line per element of each entering down column: at the 3B
      shapes it measured 5-15x slower than ``"transpose"``, e.g. 9.8 ms vs 0.9 ms for 123
      swapped neurons, see experiments/results/bench_kernels.md).

    Passing ``down_t=`` ``[I, H]`` (already transposed, contiguous) avoids both.

    The weights are referenced, not snapshotted: if they are modified in place, slots
    filled before the change keep the old values.
    """

    def __init__(self, gate_weight, up_weight, down_weight=None, capacity=None, *,
                 down_t=None, down_mode: str = "transpose", n_threads=None):
        gate, gate_np = check_weight(gate_weight, "gate_weight")
        dtype = gate.dtype
        up, up_np = check_weight(up_weight, "up_weight", dtype)
        n_neurons, hidden = gate.shape
        if tuple(up.shape) != (n_neurons, hidden):
            raise ValueError(f"up_weight has shape {tuple(up.shape)}, gate_weight "
                             f"{tuple(gate.shape)}: they must match")
        if (down_weight is None) == (down_t is None):
            raise ValueError("pass exactly one of down_weight [H, I] or down_t= [I, H]")
        if down_mode not in ("transpose", "columns"):
            raise ValueError(f"down_mode must be 'transpose' or 'columns', got {down_mode!r}")
        if dtype == torch.int8 and down_t is None:
            raise ValueError("int8 weights need down_t= (quantize_int8 of down_proj.weight.t())")
        self._n_threads = check_threads(n_threads)
        self._columns = False
        self._owned_down_bytes = 0
        if down_t is not None:
            dt, dt_np = check_weight(down_t, "down_t", dtype)
            if tuple(dt.shape) != (n_neurons, hidden):
                raise ValueError(f"down_t has shape {tuple(dt.shape)}; expected "
                                 f"[I, H] = {(n_neurons, hidden)}")
        else:
            down, down_np = check_weight(down_weight, "down_weight", dtype)
            if tuple(down.shape) != (hidden, n_neurons):
                raise ValueError(f"down_weight has shape {tuple(down.shape)}; expected "
                                 f"[H, I] = {(hidden, n_neurons)}")
            if down_mode == "columns":
                dt, dt_np = down, down_np
                self._columns = True
            else:
                dt = down.t().contiguous()
                dt_np = bits_view(dt)
                self._owned_down_bytes = dt.numel() * dt.element_size()
        if capacity is None:
            capacity = 0
        elif isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) \
                or not 0 <= capacity <= n_neurons:
            raise ValueError(f"capacity must be an int in [0, {n_neurons}], got {capacity!r}")

        self._weights = (gate, up, dt)  # references keep the numpy views below valid
        self._src = (gate_np, up_np, dt_np)
        self._bundle = None
        self._prefetch = None
        # int8: every neuron's (gate, up, down) scale; the cache keeps its slots' copy in _sc
        self._src_sc = self._out_sc = None
        if dtype == torch.int8:
            self._src_sc = stacked_scales(gate_weight, up_weight, down_t)
            # down_t's column scales (per output channel, not per slot): stay as they are
            self._out_sc = output_scales(down_t)
        self._headroom = 0.25
        self._init_state(dtype, n_neurons, hidden, capacity)

    @classmethod
    def from_bundle(cls, bundle: np.ndarray, dtype: torch.dtype = torch.float32, capacity=None,
                    *, n_threads=None, prefetch=None, headroom: float = 0.0) -> WeightCache:
        """A cache whose rows are filled from a bundled ``[I, 3, H]`` array (a neuron's gate
        row, up row and down column adjacent: one contiguous read per entering neuron), e.g.
        a memory-mapped :class:`~sparselab.runtime.weight_file.MLPWeightFile` layer.

            >>> cache = WeightCache.from_bundle(weight_file.layer(3), torch.float32)
            >>> cache.update(mask); y = cache.forward(x, "silu")

        The bundle is referenced, never copied; only entering neurons are read from it.
        ``prefetch``: called with the entering neurons (int64, sorted) before they are
        copied, e.g. :meth:`MLPWeightFile.prefetcher` to start their reads asynchronously.
        ``headroom``: spare rows a growing update adds, as a share of the capacity (0 here:
        under a memory cap every spare row is memory the page cache cannot use; the
        in-RAM constructor keeps 1/4 for amortised growth).
        """
        bundle = check_bundle(bundle, "bundle", dtype)
        n_neurons, _, hidden = bundle.shape
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(
                capacity, (int, np.integer)) or not 0 <= capacity <= n_neurons):
            raise ValueError(f"capacity must be an int in [0, {n_neurons}], got {capacity!r}")
        self = cls.__new__(cls)
        self._n_threads = check_threads(n_threads)
        self._columns = False
        self._owned_down_bytes = 0
        self._weights = ()
        self._src = ()
        self._bundle = bundle
        self._prefetch = prefetch
        self._src_sc = self._out_sc = None  # a bundle holds float weights only
        if not 0.0 <= float(headroom) <= 4.0:
            raise ValueError(f"headroom must be in [0, 4], got {headroom!r}")
        self._headroom = float(headroom)
        self._init_state(dtype, n_neurons, hidden, 0 if capacity is None else capacity)
        return self

    def _init_state(self, dtype, n_neurons, hidden, capacity) -> None:
        self._dtype = dtype
        self._n_neurons = int(n_neurons)
        self._hidden = int(hidden)
        self._itemsize = torch.empty(0, dtype=dtype).element_size()
        self._mask = np.zeros(n_words(self._n_neurons), dtype=np.uint64)
        self._slot_of = np.full(self._n_neurons, -1, dtype=np.int64)
        self._n = 0
        self._totals = {"updates": 0, "rows_copied": 0, "bytes_moved": 0, "grows": 0}
        self._alloc(int(capacity))

    # -- buffers
    # The row buffers are advised into 2 MiB pages when allocated or grown
    # (sparselab._fast.pages; SPARSELAB_HUGE_PAGES=0 turns it off): the kernel streams them
    # in order, and the hardware prefetchers stop at every 4 KiB page boundary.
    # experiments/bench_huge_pages.py measures it against the same cache on 4 KiB pages.

    def _alloc(self, capacity: int) -> None:
        self._sc = (np.zeros((capacity, 3, self._src_sc.shape[2]), np.float32)
                    if self._src_sc is not None else None)
        self._gu = torch.empty((capacity, 2, self._hidden), dtype=self._dtype)
        self._dt = torch.empty((capacity, self._hidden), dtype=self._dtype)
        use_huge_pages(self._gu, self._dt)  # 2 MiB pages (see above)
        self._gu_np = bits_view(self._gu)
        self._dt_np = bits_view(self._dt)
        self._order = np.full(capacity, -1, dtype=np.int64)

    @property
    def _slot_bytes(self) -> int:
        return 3 * self._hidden * self._itemsize

    # -- read-only state

    @property
    def n_neurons(self) -> int:
        return self._n_neurons

    @property
    def hidden(self) -> int:
        return self._hidden

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def n_active(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return self._gu.shape[0]

    @property
    def order(self) -> np.ndarray:
        """int64 ``[n_active]``: slot -> neuron (a read-only view)."""
        view = self._order[: self._n]
        view.flags.writeable = False
        return view

    @property
    def mask(self) -> np.ndarray:
        """Current mask as uint64 words (a read-only view)."""
        view = self._mask[:]
        view.flags.writeable = False
        return view

    @property
    def gate_up(self) -> torch.Tensor:
        """``[n_active, 2, H]`` view of the fused buffer: ``[:, 0]`` gate rows, ``[:, 1]`` up rows."""
        return self._gu[: self._n]

    @property
    def gate(self) -> torch.Tensor:
        return self._gu[: self._n, 0]

    @property
    def up(self) -> torch.Tensor:
        return self._gu[: self._n, 1]

    @property
    def down_t(self) -> torch.Tensor:
        """``[n_active, H]`` view: row ``s`` is column ``order[s]`` of ``down``."""
        return self._dt[: self._n]

    @property
    def totals(self) -> dict:
        return dict(self._totals)

    @property
    def extra_bytes(self) -> int:
        """Bytes this cache owns: its slot buffers, plus the transposed down if it made one."""
        return self.capacity * self._slot_bytes + self._owned_down_bytes

    def __repr__(self) -> str:
        return (f"WeightCache(n_active={self._n}/{self._n_neurons}, hidden={self._hidden}, "
                f"capacity={self.capacity}, dtype={self._dtype})")

    # -- update

    def _mask_words(self, mask) -> np.ndarray:
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool or \
                isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
            arr = bool_array(mask, "mask")
            if arr.shape != (self._n_neurons,):
                raise ValueError(f"mask has shape {arr.shape}; this cache has "
                                 f"{self._n_neurons} neurons")
            return pack(arr)
        words = word_array(mask, "mask", (1,))
        if words.shape != self._mask.shape:
            raise ValueError(f"mask has {words.shape[0]} words; {self._n_neurons} neurons "
                             f"need {self._mask.shape[0]}")
        check_tail(words[None], self._n_neurons, "mask")
        return words.copy()

    def update(self, mask, n_threads=None) -> UpdateStats:
        """Make the cache hold exactly the neurons of ``mask``; cost ~ changed neurons.

            >>> s = cache.update(new_mask); s.added, s.removed, s.rows_copied

        Paired replacement: leaving neurons are sorted by slot; the lowest slots are handed
        to entering neurons one for one, surplus entering neurons are appended, and surplus
        leaving slots below the new end are filled by moving still-active tail slots down.
        Nothing is concatenated or re-gathered. Raises ``ValueError`` (cache unchanged) on a
        mask of the wrong length or dtype, or with bits past ``n_neurons``.
        """
        words = self._mask_words(mask)
        nt = check_threads(n_threads) if n_threads is not None else self._n_threads
        added, removed = xor_diff(self._mask, words)
        na, nr = added.size, removed.size
        n_old = self._n
        n_new = n_old + na - nr
        slot_of = self._slot_of

        # plan (pure index arithmetic, O(churn log churn); no state touched yet)
        p = min(na, nr)
        rem_slots = np.sort(slot_of[removed])
        in_slots = rem_slots[:p]
        if na > nr:
            in_slots = np.concatenate([in_slots, np.arange(n_old, n_new, dtype=np.int64)])
        mv_src = mv_dst = np.empty(0, dtype=np.int64)
        if nr > na:
            surplus = rem_slots[p:]
            # pairing the lowest freed slots guarantees every paired slot is below n_new,
            # so only surplus holes below n_new need a survivor from the tail
            mv_dst = surplus[surplus < n_new]
            keep = np.ones(n_old - n_new, dtype=bool)
            keep[surplus[surplus >= n_new] - n_new] = False
            mv_src = np.arange(n_new, n_old, dtype=np.int64)[keep]

        grow_bytes = 0
        grew = n_new > self.capacity
        if grew:
            # geometric growth by 1/4, capped at the layer size: amortized O(1) per row while
            # holding at most 25 % spare rows (the first update allocates exactly, so a
            # fixed-size top-k mask never carries spare rows); allocate before touching state
            # so a MemoryError leaves the cache as it was
            new_cap = min(self._n_neurons, max(n_new, self.capacity + int(self.capacity * self._headroom)))
            old_gu_np, old_dt_np = self._gu_np, self._dt_np
            gu = torch.empty((new_cap, 2, self._hidden), dtype=self._dtype)
            dt = torch.empty((new_cap, self._hidden), dtype=self._dtype)
            use_huge_pages(gu, dt)  # before the copy below faults the pages in
            order = np.full(new_cap, -1, dtype=np.int64)
            gu_np, dt_np = bits_view(gu), bits_view(dt)
            _cache.copy_prefix(old_gu_np, old_dt_np, gu_np, dt_np, n_old)
            order[:n_old] = self._order[:n_old]
            if self._sc is not None:
                sc = np.zeros((new_cap, *self._src_sc.shape[1:]), np.float32)
                sc[:n_old] = self._sc[:n_old]
                self._sc = sc
            self._gu, self._dt, self._gu_np, self._dt_np, self._order = gu, dt, gu_np, dt_np, order
            grow_bytes = n_old * self._slot_bytes
            self._totals["grows"] += 1

        # commit: copies, then bookkeeping
        if self._bundle is not None:
            if self._prefetch is not None and na:
                self._prefetch(added)
            _cache.copy_in_bundle(self._bundle, self._gu_np, self._dt_np, added, in_slots, nt)
        else:
            gate_np, up_np, dt_src = self._src
            copy = _cache.copy_in_columns if self._columns else _cache.copy_in
            copy(gate_np, up_np, dt_src, self._gu_np, self._dt_np, added, in_slots, nt)
        if self._sc is not None:
            self._sc[in_slots] = self._src_sc[added]
        if mv_src.size:
            _cache.move_slots(self._gu_np, self._dt_np, mv_src, mv_dst)
            if self._sc is not None:
                self._sc[mv_dst] = self._sc[mv_src]
        order = self._order
        slot_of[removed] = -1
        order[in_slots] = added
        slot_of[added] = in_slots
        if mv_src.size:
            moved = order[mv_src]
            order[mv_dst] = moved
            slot_of[moved] = mv_dst
        order[n_new:n_old] = -1
        self._n = n_new
        self._mask = words

        rows = na + mv_src.size
        nbytes = rows * self._slot_bytes + grow_bytes
        self._totals["updates"] += 1
        self._totals["rows_copied"] += rows
        self._totals["bytes_moved"] += nbytes
        return UpdateStats(added=na, removed=nr, rows_copied=rows, bytes_moved=nbytes,
                           n_active=n_new, moved=int(mv_src.size), grew=grew)

    # -- forward

    def forward(self, x, activation: str, n_threads=None, out_dtype=None,
                x_int8: bool = False) -> torch.Tensor:
        """The sparse MLP over the cache's contiguous active rows.

            >>> y = cache.forward(x, "silu")      # x [B, H] or [H] in the weights' dtype

        Returns ``sum_s down_t[s] * act(gate[s] . x) * (up[s] . x)`` in ``out_dtype``
        (default: the weights' dtype), float32 accumulation. An empty cache returns zeros.
        ``x_int8`` (int8 weights only): gate and up read x rounded to int8 per group of 64
        channels, in integer dot products (see :class:`~sparselab._fast.kernels.IndexedMLP`).
        """
        code = activation_code(activation)
        nt = check_threads(n_threads)
        od = resolve_out_dtype(out_dtype, self._dtype)
        check_x_int8(x_int8, self._dtype)
        x32, was_1d = prep_x(x, self._hidden, self._dtype)
        y = torch.empty(x32.shape, dtype=torch.float32)
        if x32.shape[0]:
            _mlp.cache_forward(self._gu_np, self._dt_np, self._n, x32, y.numpy(), code, nt,
                               self._sc, bool(x_int8), self._out_sc)
        return finish(y, was_1d, od)

    __call__ = forward

    def forward_neurons(self, x, neurons, activation: str, n_threads=None,
                        out_dtype=None) -> torch.Tensor:
        """The sparse MLP over some of the cached neurons only (a windowed cache holds the
        last k tokens' neurons but a step computes its own set).

            >>> y = cache.forward_neurons(x, idx, "silu")   # == sparse_mlp(x, ..., idx, "silu")

        ``neurons``: 1-D unique integer neuron ids, every one held by the cache (else
        ``ValueError``). Returns what the by-index kernel over the full weights returns.
        """
        code = activation_code(activation)
        nt = check_threads(n_threads)
        od = resolve_out_dtype(out_dtype, self._dtype)
        arr = np.asarray(neurons)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"neurons must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self._n_neurons):
            raise ValueError(f"neurons must be in [0, {self._n_neurons})")
        if np.unique(arr).size != arr.size:
            raise ValueError("neurons contains duplicates")
        slots = self._slot_of[arr]
        if arr.size and slots.min() < 0:
            raise ValueError(f"neuron {int(arr[slots < 0][0])} is not in the cache")
        x32, was_1d = prep_x(x, self._hidden, self._dtype)
        return finish(self.forward_slots_unchecked(x32, slots, code, nt), was_1d, od)

    def forward_slots_unchecked(self, x32: np.ndarray, slots: np.ndarray, code: int,
                                n_threads: int) -> torch.Tensor:
        """:meth:`forward_neurons` on checked arguments: float32 ``x32`` ``[B, H]``, int64
        cache ``slots`` (unique, held). Float32 ``[B, H]``."""
        y = torch.empty(x32.shape, dtype=torch.float32)
        if x32.shape[0]:
            _mlp.slots_forward(self._gu_np, self._dt_np, np.ascontiguousarray(slots, np.int64),
                               x32, y.numpy(), code, n_threads)
        return y

    def slots_of(self, neurons: np.ndarray) -> np.ndarray:
        """Cache slots of ``neurons`` (-1 where a neuron is not held)."""
        return self._slot_of[neurons]
