"""Compiled core of sparselab: packed-bit masks, a paired-replacement weight cache, and
sparse gated-MLP kernels, working on buffers (no HF modules, no autograd).

    >>> from sparselab import _fast
    >>> cache = _fast.WeightCache(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    >>> stats = cache.update(mask_bool)                 # or packed uint64 words
    >>> y = cache.forward(x, "silu")                    # == sparse_mlp(x, ..., cache.order, "silu")

Every public function validates all of its arguments (shape, dtype, contiguity, index range,
activation name) *before* any state changes and raises ``ValueError`` naming the problem;
the Cython modules behind it (``masks``, ``cache``, ``mlp``) trust their inputs. Results are
numpy arrays or torch tensors that share memory with the buffers that hold them.

Weights are ``torch.float32`` or ``torch.bfloat16``. bf16 is handed to Cython as raw uint16
bits and widened on the fly; accumulation is always float32. The mask layout is the one of
:mod:`sparselab.bits`: neuron ``i`` is word ``i // 64``, bit ``i % 64``; bits past
``n_neurons`` are zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sparselab._fast import cache as _cache
from sparselab._fast import masks as _masks
from sparselab._fast import mlp as _mlp
from sparselab._fast import predict as _predict

__all__ = [
    "ACTIVATIONS",
    "IndexedMLP",
    "LowRankSelector",
    "UpdateStats",
    "WeightCache",
    "dense_reference",
    "indices",
    "info",
    "pack",
    "popcount",
    "sparse_mlp",
    "union",
    "unpack",
    "xor_diff",
]

ACTIVATIONS = ("silu", "gelu_tanh", "relu")
_ACT_CODE = {"silu": _mlp.ACT_SILU, "gelu_tanh": _mlp.ACT_GELU_TANH, "relu": _mlp.ACT_RELU}
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
_OUT_DTYPES = (torch.float32, torch.bfloat16)


# ----------------------------------------------------------------------------- validation


def _n_words(n_neurons: int) -> int:
    return (n_neurons + 63) // 64


def _check_n_neurons(n_neurons) -> int:
    if isinstance(n_neurons, bool) or not isinstance(n_neurons, (int, np.integer)):
        raise ValueError(f"n_neurons must be an int, got {type(n_neurons).__name__}")
    if n_neurons < 0:
        raise ValueError(f"n_neurons must be >= 0, got {n_neurons}")
    return int(n_neurons)


def _as_numpy(a, name: str) -> np.ndarray:
    """A numpy view of a CPU tensor or an array (no copy when already an array)."""
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got device {a.device}")
        if a.dtype == torch.bfloat16:
            raise ValueError(f"{name} must not be bfloat16 here")
        return a.detach().numpy()
    if isinstance(a, np.ndarray):
        return a
    raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(a).__name__}")


def _bool_array(mask, name: str) -> np.ndarray:
    arr = _as_numpy(mask, name)
    if arr.dtype != np.bool_:
        raise ValueError(f"{name} must be boolean, got dtype {arr.dtype}")
    if arr.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    return np.ascontiguousarray(arr)


def _word_array(words, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    arr = _as_numpy(words, name)
    if arr.dtype != np.uint64:
        raise ValueError(f"{name} must be packed uint64 words, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimension(s), "
                         f"got shape {arr.shape}")
    # masks are a few hundred bytes: a contiguous copy is cheaper than a strided kernel
    return np.ascontiguousarray(arr)


def _check_tail(words2d: np.ndarray, n_neurons: int, name: str) -> None:
    if n_neurons % 64 == 0 or words2d.shape[-1] == 0:
        return
    if np.any(words2d[..., -1] >> np.uint64(n_neurons % 64)):
        raise ValueError(f"{name} has bits set at or beyond n_neurons={n_neurons} "
                         "(wrong mask length or wrong n_neurons?)")


def _activation_code(activation) -> int:
    if activation not in _ACT_CODE:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return _ACT_CODE[activation]


def _n_threads(n_threads) -> int:
    if n_threads is None:
        return max(1, torch.get_num_threads())
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)):
        raise ValueError(f"n_threads must be an int, got {type(n_threads).__name__}")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return int(n_threads)


def _weight(t, name: str, dtype=None) -> tuple[torch.Tensor, np.ndarray]:
    """Check a 2-D CPU weight and return it with a numpy view of its bits (uint16 for bf16)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {t.device}")
    if t.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; expected torch.float32 or torch.bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but the other weights are {dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    # a silent .contiguous() would be a hidden full copy of the weight: refuse instead
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {t.stride()}")
    t = t.detach()
    return t, _bits_view(t)


def _bits_view(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _prep_x(x, hidden: int, dtype: torch.dtype) -> tuple[np.ndarray, bool]:
    """x [B, H] or [H] of the weights' dtype -> (float32 contiguous [B, H], was_1d)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"x must be on the CPU, got device {x.device}")
    if x.dtype != dtype:
        raise ValueError(f"x has dtype {x.dtype} but the weights are {dtype}")
    if x.dim() not in (1, 2):
        raise ValueError(f"x must be [batch, hidden] or [hidden], got shape {tuple(x.shape)}")
    if x.shape[-1] != hidden:
        raise ValueError(f"x has hidden size {x.shape[-1]}, the weights have {hidden}")
    was_1d = x.dim() == 1
    # x is a few kB: converting it once to contiguous float32 is free next to the weights
    x32 = x.detach().reshape(-1, hidden).to(torch.float32).contiguous()
    return x32.numpy(), was_1d


def _out_dtype(out_dtype, dtype: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return dtype
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    return out_dtype


def _finish(y32: torch.Tensor, was_1d: bool, out_dtype: torch.dtype) -> torch.Tensor:
    y = y32 if out_dtype == torch.float32 else y32.to(out_dtype)
    return y[0] if was_1d else y


# ----------------------------------------------------------------------------------- masks


def pack(mask_bool) -> np.ndarray:
    """Pack booleans ``[..., n]`` into uint64 words ``[..., ceil(n / 64)]``.

        >>> int(pack(np.array([True, False, True]))[0])
        5
    """
    arr = _bool_array(mask_bool, "mask_bool")
    n = arr.shape[-1]
    rows = math.prod(arr.shape[:-1])
    flat = arr.reshape(rows, n).view(np.uint8)
    out = np.empty((rows, _n_words(n)), dtype=np.uint64)
    _masks.pack_into(flat, out)
    return out.reshape(arr.shape[:-1] + (out.shape[1],))


def unpack(words, n_neurons) -> np.ndarray:
    """Unpack uint64 words ``[..., w]`` into booleans ``[..., n_neurons]``.

        >>> unpack(pack(np.array([True, False, True])), 3).tolist()
        [True, False, True]
    """
    n = _check_n_neurons(n_neurons)
    arr = _word_array(words, "words", (1, 2, 3, 4))
    if arr.shape[-1] != _n_words(n):
        raise ValueError(f"words has {arr.shape[-1]} words per mask; {n} neurons need "
                         f"{_n_words(n)}")
    flat = arr.reshape(math.prod(arr.shape[:-1]), arr.shape[-1])
    _check_tail(flat, n, "words")
    out = np.empty((flat.shape[0], n), dtype=np.uint8)
    _masks.unpack_into(flat, out)
    return out.view(np.bool_).reshape(arr.shape[:-1] + (n,))


def popcount(words):
    """Set bits: an ``int`` for one mask (1-D), int64 per row for ``[..., w]``.

        >>> popcount(pack(np.array([True, False, True])))
        2
    """
    arr = _word_array(words, "words", (1, 2, 3, 4))
    flat = arr.reshape(math.prod(arr.shape[:-1]), arr.shape[-1])
    out = np.empty(flat.shape[0], dtype=np.int64)
    _masks.popcount_rows(flat, out)
    if arr.ndim == 1:
        return int(out[0])
    return out.reshape(arr.shape[:-1])


def xor_diff(old_words, new_words) -> tuple[np.ndarray, np.ndarray]:
    """Neurons entering and leaving between two masks, as sorted int64 index arrays.

        >>> added, removed = xor_diff(pack(np.array([1, 1, 0], bool)), pack(np.array([0, 1, 1], bool)))
        >>> added.tolist(), removed.tolist()
        ([2], [0])
    """
    fast = _masks.xor_diff_fast(old_words, new_words)
    if fast is not None:
        return fast
    old = _word_array(old_words, "old_words", (1,))
    new = _word_array(new_words, "new_words", (1,))
    if old.shape != new.shape:
        raise ValueError(f"old_words has {old.shape[0]} words, new_words has {new.shape[0]}")
    na, nr = _masks.diff_counts(old, new)
    added = np.empty(na, dtype=np.int64)
    removed = np.empty(nr, dtype=np.int64)
    _masks.diff_fill(old, new, added, removed)
    return added, removed


def union(words_2d) -> np.ndarray:
    """OR over the rows of ``[rows, w]``: the one mask a batch shares.

        >>> union(pack(np.array([[1, 0, 0], [0, 0, 1]], bool))).tolist()
        [5]
    """
    fast = _masks.union_fast(words_2d)
    if fast is not None:
        return fast
    arr = _word_array(words_2d, "words_2d", (2,))
    out = np.empty(arr.shape[1], dtype=np.uint64)
    _masks.union_into(arr, out)
    return out


def indices(words, n_neurons) -> np.ndarray:
    """Sorted int64 indices of the set bits of a 1-D mask.

        >>> indices(pack(np.array([0, 1, 1], bool)), 3).tolist()
        [1, 2]
    """
    n = _check_n_neurons(n_neurons)
    arr = _word_array(words, "words", (1,))
    if arr.shape[0] != _n_words(n):
        raise ValueError(f"words has {arr.shape[0]} words; {n} neurons need {_n_words(n)}")
    _check_tail(arr[None], n, "words")
    out = np.empty(popcount(arr), dtype=np.int64)
    _masks.indices_fill(arr, out)
    return out


# ------------------------------------------------------------------------------ the cache


@dataclass(frozen=True)
class UpdateStats:
    """What one :meth:`WeightCache.update` did.

        >>> s = cache.update(mask); (s.added, s.removed, s.rows_copied, s.n_active)

    ``rows_copied`` counts neurons whose rows (gate + up + down, i.e. three weight rows)
    were written into a slot: every entering neuron plus every tail slot moved into a hole.
    ``bytes_moved`` is the bytes those copies wrote plus, when the buffers had to grow,
    the bytes of the active prefix carried over (``grew`` is then True).
    """

    added: int
    removed: int
    rows_copied: int
    bytes_moved: int
    n_active: int
    moved: int = 0
    grew: bool = False


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
        gate, gate_np = _weight(gate_weight, "gate_weight")
        dtype = gate.dtype
        up, up_np = _weight(up_weight, "up_weight", dtype)
        n_neurons, hidden = gate.shape
        if tuple(up.shape) != (n_neurons, hidden):
            raise ValueError(f"up_weight has shape {tuple(up.shape)}, gate_weight "
                             f"{tuple(gate.shape)}: they must match")
        if (down_weight is None) == (down_t is None):
            raise ValueError("pass exactly one of down_weight [H, I] or down_t= [I, H]")
        if down_mode not in ("transpose", "columns"):
            raise ValueError(f"down_mode must be 'transpose' or 'columns', got {down_mode!r}")
        self._n_threads = _n_threads(n_threads)
        self._columns = False
        self._owned_down_bytes = 0
        if down_t is not None:
            dt, dt_np = _weight(down_t, "down_t", dtype)
            if tuple(dt.shape) != (n_neurons, hidden):
                raise ValueError(f"down_t has shape {tuple(dt.shape)}; expected "
                                 f"[I, H] = {(n_neurons, hidden)}")
        else:
            down, down_np = _weight(down_weight, "down_weight", dtype)
            if tuple(down.shape) != (hidden, n_neurons):
                raise ValueError(f"down_weight has shape {tuple(down.shape)}; expected "
                                 f"[H, I] = {(hidden, n_neurons)}")
            if down_mode == "columns":
                dt, dt_np = down, down_np
                self._columns = True
            else:
                dt = down.t().contiguous()
                dt_np = _bits_view(dt)
                self._owned_down_bytes = dt.numel() * dt.element_size()
        if capacity is None:
            capacity = 0
        elif isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) \
                or not 0 <= capacity <= n_neurons:
            raise ValueError(f"capacity must be an int in [0, {n_neurons}], got {capacity!r}")

        self._weights = (gate, up, dt)  # references keep the numpy views below valid
        self._src = (gate_np, up_np, dt_np)
        self._dtype = dtype
        self._n_neurons = int(n_neurons)
        self._hidden = int(hidden)
        self._itemsize = gate.element_size()
        self._mask = np.zeros(_n_words(self._n_neurons), dtype=np.uint64)
        self._slot_of = np.full(self._n_neurons, -1, dtype=np.int64)
        self._n = 0
        self._totals = {"updates": 0, "rows_copied": 0, "bytes_moved": 0, "grows": 0}
        self._alloc(int(capacity))

    # -- buffers

    def _alloc(self, capacity: int) -> None:
        self._gu = torch.empty((capacity, 2, self._hidden), dtype=self._dtype)
        self._dt = torch.empty((capacity, self._hidden), dtype=self._dtype)
        self._gu_np = _bits_view(self._gu)
        self._dt_np = _bits_view(self._dt)
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
            arr = _bool_array(mask, "mask")
            if arr.shape != (self._n_neurons,):
                raise ValueError(f"mask has shape {arr.shape}; this cache has "
                                 f"{self._n_neurons} neurons")
            return pack(arr)
        words = _word_array(mask, "mask", (1,))
        if words.shape != self._mask.shape:
            raise ValueError(f"mask has {words.shape[0]} words; {self._n_neurons} neurons "
                             f"need {self._mask.shape[0]}")
        _check_tail(words[None], self._n_neurons, "mask")
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
        nt = _n_threads(n_threads) if n_threads is not None else self._n_threads
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
            new_cap = min(self._n_neurons, max(n_new, self.capacity + self.capacity // 4))
            old_gu_np, old_dt_np = self._gu_np, self._dt_np
            gu = torch.empty((new_cap, 2, self._hidden), dtype=self._dtype)
            dt = torch.empty((new_cap, self._hidden), dtype=self._dtype)
            order = np.full(new_cap, -1, dtype=np.int64)
            gu_np, dt_np = _bits_view(gu), _bits_view(dt)
            _cache.copy_prefix(old_gu_np, old_dt_np, gu_np, dt_np, n_old)
            order[:n_old] = self._order[:n_old]
            self._gu, self._dt, self._gu_np, self._dt_np, self._order = gu, dt, gu_np, dt_np, order
            grow_bytes = n_old * self._slot_bytes
            self._totals["grows"] += 1

        # commit: copies, then bookkeeping
        gate_np, up_np, dt_src = self._src
        copy = _cache.copy_in_columns if self._columns else _cache.copy_in
        copy(gate_np, up_np, dt_src, self._gu_np, self._dt_np, added, in_slots, nt)
        if mv_src.size:
            _cache.move_slots(self._gu_np, self._dt_np, mv_src, mv_dst)
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

    def forward(self, x, activation: str, n_threads=None, out_dtype=None) -> torch.Tensor:
        """Kernel (1): the sparse MLP over the cache's contiguous active rows.

            >>> y = cache.forward(x, "silu")      # x [B, H] or [H] in the weights' dtype

        Returns ``sum_s down_t[s] * act(gate[s] . x) * (up[s] . x)`` in ``out_dtype``
        (default: the weights' dtype), float32 accumulation. An empty cache returns zeros.
        """
        code = _activation_code(activation)
        nt = _n_threads(n_threads)
        od = _out_dtype(out_dtype, self._dtype)
        x32, was_1d = _prep_x(x, self._hidden, self._dtype)
        y = torch.empty(x32.shape, dtype=torch.float32)
        if x32.shape[0]:
            _mlp.cache_forward(self._gu_np, self._dt_np, self._n, x32, y.numpy(), code, nt)
        return _finish(y, was_1d, od)

    __call__ = forward


# -------------------------------------------------------------------------------- kernels


def _index_array(active_idx, n_neurons: int) -> np.ndarray:
    arr = _as_numpy(active_idx, "active_idx")
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
    """Kernel (2): the sparse MLP straight from the full weights, by index list, no copy.

        >>> y = sparse_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, down_t, idx, "silu")

    ``gate_weight``/``up_weight``/``down_t`` are ``[I, H]`` contiguous (``down_t`` is
    ``down_proj.weight.t().contiguous()``), float32 or bfloat16. ``active_idx`` is 1-D
    integer, unique, in ``[0, I)``, any order (sorted is friendlier to the prefetcher).
    """
    return IndexedMLP(gate_weight, up_weight, down_t, activation, n_threads)(x, active_idx, out_dtype)


class IndexedMLP:
    """Kernel (2) bound to one layer's weights, checked once: per call only ``x`` and the
    index list are checked (what a decode step changes).

        >>> mlp = IndexedMLP(gate_w, up_w, down_t, "silu")
        >>> y = mlp(x, idx)            # == sparse_mlp(x, gate_w, up_w, down_t, idx, "silu")

    Holds references to the weights (no copy). ``n_threads`` defaults to
    ``torch.get_num_threads()`` at each call.
    """

    def __init__(self, gate_weight, up_weight, down_t, activation: str, n_threads=None) -> None:
        self._code = _activation_code(activation)
        self._n_threads = None if n_threads is None else _n_threads(n_threads)
        gate, self._gate_np = _weight(gate_weight, "gate_weight")
        up, self._up_np = _weight(up_weight, "up_weight", gate.dtype)
        dt, self._dt_np = _weight(down_t, "down_t", gate.dtype)
        if up.shape != gate.shape:
            raise ValueError(f"up_weight has shape {tuple(up.shape)}, gate_weight "
                             f"{tuple(gate.shape)}: they must match")
        if dt.shape != gate.shape:
            raise ValueError(f"down_t has shape {tuple(dt.shape)}; expected [I, H] = "
                             f"{tuple(gate.shape)} (transpose down_proj.weight)")
        self._weights = (gate, up, dt)  # keep the tensors the numpy views point into alive
        self.dtype = gate.dtype
        self.n_neurons, self.hidden = int(gate.shape[0]), int(gate.shape[1])

    def __call__(self, x, active_idx, out_dtype=None) -> torch.Tensor:
        idx = _index_array(active_idx, self.n_neurons)
        od = _out_dtype(out_dtype, self.dtype)
        x32, was_1d = _prep_x(x, self.hidden, self.dtype)
        return _finish(self.run_checked(x32, idx), was_1d, od)

    def run_checked(self, x32: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        """The kernel on arguments the caller has already checked: ``x32`` float32
        C-contiguous ``[B, H]``, ``idx`` int64 C-contiguous, unique, in range (as
        :class:`LowRankSelector` returns them). Returns float32 ``[B, H]``. For the decode
        loop, where every microsecond of Python is a share of a 135M model's step."""
        y = torch.empty(x32.shape, dtype=torch.float32)
        if x32.shape[0]:
            nt = self._n_threads if self._n_threads is not None else max(1, torch.get_num_threads())
            _mlp.index_forward(self._gate_np, self._up_np, self._dt_np, idx, x32, y.numpy(),
                               self._code, nt)
        return y


class LowRankSelector:
    """A low-rank predictor's decode-step selection, fused: scores, threshold and the
    union over the batch rows, returning the active neuron ids without materialising the
    scores.

        >>> sel = LowRankSelector(first, second, bias)          # [R, H], [N, R], [N]
        >>> idx, mask = sel(x, threshold)    # == nonzero((bias + x @ first.T @ second.T > t).any(0))

    ``idx`` is int64 ascending, ``mask`` bool ``[N]`` (a fresh array per call). float32
    weights only (a copy is not made: they are referenced). ``x`` is ``[B, H]`` or ``[H]``
    of any float dtype. Scores are summed in float32 in a fixed order, so a neuron whose
    score lies within rounding of the threshold may differ from a torch matmul's choice.
    """

    def __init__(self, first, second, bias, n_threads=None) -> None:
        for name, t, ndim in (("first", first, 2), ("second", second, 2), ("bias", bias, 1)):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                raise ValueError(f"{name} must be a CPU torch tensor, got {type(t).__name__}")
            if t.dtype != torch.float32:
                raise ValueError(f"{name} must be float32, got {t.dtype}")
            if t.dim() != ndim:
                raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
        rank, hidden = first.shape
        if second.shape[1] != rank:
            raise ValueError(f"second has shape {tuple(second.shape)}; expected [N, {rank}] "
                             f"for first of shape {tuple(first.shape)}")
        if bias.shape[0] != second.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries, second has {second.shape[0]} rows")
        self._n_threads = None if n_threads is None else _n_threads(n_threads)
        self._tensors = tuple(t.detach().contiguous() for t in (first, second, bias))
        self._bound = _predict.BoundSelector(*(t.numpy() for t in self._tensors))
        self.rank, self.hidden, self.n_neurons = int(rank), int(hidden), int(second.shape[0])

    def __call__(self, x, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
            raise ValueError(f"x must be a CPU torch tensor, got {type(x).__name__}")
        if x.dim() not in (1, 2) or x.shape[-1] != self.hidden:
            raise ValueError(f"x must be [batch, {self.hidden}] or [{self.hidden}], "
                             f"got shape {tuple(x.shape)}")
        threshold = float(threshold)
        if math.isnan(threshold):
            raise ValueError("threshold is NaN")
        x32 = x.detach().reshape(-1, self.hidden).to(torch.float32).contiguous().numpy()
        return self.select_checked(x32, threshold)

    def select_checked(self, x32: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """``self(x, threshold)`` for a caller that has checked its arguments: ``x32``
        float32 C-contiguous ``[B, H]``, ``threshold`` a float that is not NaN."""
        nt = self._n_threads if self._n_threads is not None else max(1, torch.get_num_threads())
        return self._bound.select(x32, threshold, nt)


def _act64(v: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return v * torch.sigmoid(v)
    if activation == "gelu_tanh":
        return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    return torch.clamp_min(v, 0.0)


def dense_reference(x, gate, up, down, activation: str, mask_bool=None) -> torch.Tensor:
    """``down(act(gate x) * up x)`` in float64 with inactive neurons zeroed: the test oracle.

        >>> ref = dense_reference(x, gate, up, down, "silu", mask_bool=m)   # float64

    ``gate``/``up`` are ``[I, H]``, ``down`` is ``[H, I]`` (``nn.Linear`` layouts). Written
    with plain torch ops, independent of the Cython kernels. Returns float64, shaped like x.
    """
    _activation_code(activation)
    x64 = torch.as_tensor(x).to(torch.float64)
    g = torch.as_tensor(gate).to(torch.float64)
    u = torch.as_tensor(up).to(torch.float64)
    d = torch.as_tensor(down).to(torch.float64)
    h = _act64(x64 @ g.T, activation) * (x64 @ u.T)
    if mask_bool is not None:
        m = torch.as_tensor(np.asarray(mask_bool, dtype=bool) if not isinstance(
            mask_bool, torch.Tensor) else mask_bool).to(torch.bool)
        if m.shape != (g.shape[0],):
            raise ValueError(f"mask_bool has shape {tuple(m.shape)}; expected ({g.shape[0]},)")
        h = h * m.to(torch.float64)
    return h @ d.T


def info() -> dict:
    """How this build runs: OpenMP, SIMD extensions compiled in, threads.

        >>> _fast.info()["openmp"]
        True
    """
    b = _mlp.build_info()
    return {"openmp": b["openmp"], "simd": b["simd"], "omp_max_threads": b["omp_max_threads"],
            "max_threads": torch.get_num_threads()}
