# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Packed-bit mask kernels (layout of ``sparselab.bits``: neuron i in word i//64, bit i%64).

    >>> from sparselab._fast import _masks as masks
    >>> out = np.zeros((1, 1), np.uint64); masks.pack_into(np.array([[1, 0, 1]], np.uint8), out)
    >>> int(out[0, 0])
    5

These functions trust their arguments: shapes, dtypes and sizes are checked by the
Python layer in ``sparselab/_fast/__init__.py`` before anything here runs.
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t

cdef extern from *:
    """
    /* Compiler builtins; with -march=native they become single popcnt / tzcnt
       instructions, which is what keeps a diff of 8192 neurons in the sub-microsecond range. */
    static inline int sl_popcount64(unsigned long long v) { return __builtin_popcountll(v); }
    static inline int sl_ctz64(unsigned long long v) { return __builtin_ctzll(v); }
    """
    int sl_popcount64(unsigned long long v) noexcept nogil
    int sl_ctz64(unsigned long long v) noexcept nogil


def pack_into(const uint8_t[:, ::1] bits, uint64_t[:, ::1] out):
    """Pack ``bits[rows, n]`` (0/1 bytes) into ``out[rows, ceil(n/64)]``; tail bits are zero."""
    cdef Py_ssize_t rows = bits.shape[0], n = bits.shape[1], w = out.shape[1]
    cdef Py_ssize_t r, i, k, lo, hi
    cdef uint64_t word
    with nogil:
        for r in range(rows):
            for i in range(w):
                lo = i * 64
                hi = lo + 64
                if hi > n:
                    hi = n
                word = 0
                for k in range(lo, hi):
                    # != 0 so that bytes other than 0/1 (a numpy bool view is 0/1 anyway)
                    # can never smear into neighbouring bits
                    word |= (<uint64_t>(bits[r, k] != 0)) << (k - lo)
                out[r, i] = word


def unpack_into(const uint64_t[:, ::1] words, uint8_t[:, ::1] out):
    """Inverse of :func:`pack_into`: ``out[rows, n]`` receives 0/1 bytes."""
    cdef Py_ssize_t rows = out.shape[0], n = out.shape[1]
    cdef Py_ssize_t r, k
    with nogil:
        for r in range(rows):
            for k in range(n):
                out[r, k] = <uint8_t>((words[r, k >> 6] >> (k & 63)) & 1)


def popcount_rows(const uint64_t[:, ::1] words, int64_t[::1] out):
    """``out[r]`` = number of set bits in row ``r``."""
    cdef Py_ssize_t rows = words.shape[0], w = words.shape[1]
    cdef Py_ssize_t r, i
    cdef int64_t s
    with nogil:
        for r in range(rows):
            s = 0
            for i in range(w):
                s += sl_popcount64(words[r, i])
            out[r] = s
    return None


cdef inline Py_ssize_t _emit(uint64_t word, Py_ssize_t base, int64_t* out, Py_ssize_t pos) noexcept nogil:
    # walk the set bits lowest first, so indices come out sorted without a sort
    while word:
        out[pos] = base + sl_ctz64(word)
        pos += 1
        word &= word - 1
    return pos


cdef void _fill_diff(const uint64_t* old, const uint64_t* new, Py_ssize_t w, int64_t* added,
                     int64_t* removed) noexcept nogil:
    """Sorted indices set only in ``new`` into ``added``, only in ``old`` into ``removed``."""
    cdef Py_ssize_t i, pa = 0, pr = 0
    cdef uint64_t a, b
    for i in range(w):
        a = new[i] & ~old[i]
        b = old[i] & ~new[i]
        if a:
            pa = _emit(a, i * 64, added, pa)
        if b:
            pr = _emit(b, i * 64, removed, pr)


def diff_counts(const uint64_t[::1] old, const uint64_t[::1] new):
    """Return ``(n_added, n_removed)`` between two masks of equal length."""
    cdef Py_ssize_t w = old.shape[0], i
    cdef int64_t na = 0, nr = 0
    with nogil:
        for i in range(w):
            na += sl_popcount64(new[i] & ~old[i])
            nr += sl_popcount64(old[i] & ~new[i])
    return na, nr


def diff_fill(const uint64_t[::1] old, const uint64_t[::1] new, int64_t[::1] added, int64_t[::1] removed):
    """Write the sorted indices set only in ``new`` into ``added`` and only in ``old`` into
    ``removed``; both arrays must have the sizes :func:`diff_counts` returned."""
    cdef int64_t* pad = &added[0] if added.shape[0] else NULL
    cdef int64_t* prm = &removed[0] if removed.shape[0] else NULL
    with nogil:
        _fill_diff(&old[0] if old.shape[0] else NULL, &new[0] if new.shape[0] else NULL,
                   old.shape[0], pad, prm)
    return None


def union_into(const uint64_t[:, ::1] words, uint64_t[::1] out):
    """``out`` = OR over the rows of ``words`` (the batch's shared mask)."""
    cdef Py_ssize_t rows = words.shape[0], w = words.shape[1], r, i
    cdef uint64_t acc
    with nogil:
        for i in range(w):
            acc = 0
            for r in range(rows):
                acc |= words[r, i]
            out[i] = acc
    return None


def indices_fill(const uint64_t[::1] words, int64_t[::1] out):
    """Write the sorted indices of the set bits of ``words`` into ``out`` (sized by popcount)."""
    cdef Py_ssize_t w = words.shape[0], i, pos = 0
    cdef int64_t* po = &out[0] if out.shape[0] else NULL
    with nogil:
        for i in range(w):
            if words[i]:
                pos = _emit(words[i], i * 64, po, pos)
    return None


def tail_is_clear(const uint64_t[::1] words, Py_ssize_t n_neurons):
    """True when no bit at or beyond ``n_neurons`` is set (the layout's invariant)."""
    cdef Py_ssize_t w = words.shape[0], i, first = n_neurons >> 6
    cdef int rem = n_neurons & 63
    if rem and first < w:
        if words[first] >> rem:
            return False
        first += 1
    for i in range(first, w):
        if words[i]:
            return False
    return True


def check_indices(const int64_t[::1] idx, Py_ssize_t n):
    """Return 0 when ``idx`` holds unique values in ``[0, n)``; 1 out of range; 2 duplicate.

    A bitmap of ``n`` bits makes this O(len(idx) + n/64) with no sort.
    """
    cdef Py_ssize_t m = idx.shape[0], i
    cdef int64_t v
    cdef int code = 0
    cdef uint64_t[::1] seen
    if m == 0:
        return 0
    import numpy as np
    seen = np.zeros((n + 63) // 64, dtype=np.uint64)
    with nogil:
        for i in range(m):
            v = idx[i]
            if v < 0 or v >= n:
                code = 1
                break
            if (seen[v >> 6] >> (v & 63)) & 1:
                code = 2
                break
            seen[v >> 6] |= (<uint64_t>1) << (v & 63)
    return code


# ---------------------------------------------------------------------------------------
# Fast paths for the per-token calls (xor_diff, union). A typed memoryview costs ~1 us to
# acquire per argument, which at 128 words is more than the work; these take ndarrays,
# check them with a few flag reads and run on raw pointers. They return None when an
# argument is not a plain C-contiguous uint64 ndarray, and the Python layer then takes the
# general path (which raises the descriptive error or converts).

cimport numpy as cnp

cnp.import_array()


cdef inline bint _plain_words(object a, int ndim):
    return (type(a) is cnp.ndarray and cnp.PyArray_NDIM(<cnp.ndarray>a) == ndim
            and cnp.PyArray_TYPE(<cnp.ndarray>a) == cnp.NPY_UINT64
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a))


def xor_diff_fast(object old, object new):
    """``(added, removed)`` for two plain 1-D uint64 arrays of equal length, else None."""
    if not (_plain_words(old, 1) and _plain_words(new, 1)):
        return None
    cdef Py_ssize_t w = cnp.PyArray_DIM(<cnp.ndarray>old, 0), i
    if cnp.PyArray_DIM(<cnp.ndarray>new, 0) != w:
        return None
    cdef const uint64_t* po = <const uint64_t*>cnp.PyArray_DATA(<cnp.ndarray>old)
    cdef const uint64_t* pn = <const uint64_t*>cnp.PyArray_DATA(<cnp.ndarray>new)
    cdef cnp.npy_intp na = 0, nr = 0
    with nogil:
        for i in range(w):
            na += sl_popcount64(pn[i] & ~po[i])
            nr += sl_popcount64(po[i] & ~pn[i])
    cdef cnp.ndarray added = cnp.PyArray_EMPTY(1, &na, cnp.NPY_INT64, 0)
    cdef cnp.ndarray removed = cnp.PyArray_EMPTY(1, &nr, cnp.NPY_INT64, 0)
    cdef int64_t* qa = <int64_t*>cnp.PyArray_DATA(added)
    cdef int64_t* qr = <int64_t*>cnp.PyArray_DATA(removed)
    with nogil:
        _fill_diff(po, pn, w, qa, qr)
    return added, removed


def union_fast(object words):
    """OR over the rows of a plain 2-D uint64 array, else None."""
    if not _plain_words(words, 2):
        return None
    cdef Py_ssize_t rows = cnp.PyArray_DIM(<cnp.ndarray>words, 0)
    cdef cnp.npy_intp w = cnp.PyArray_DIM(<cnp.ndarray>words, 1)
    cdef const uint64_t* p = <const uint64_t*>cnp.PyArray_DATA(<cnp.ndarray>words)
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, &w, cnp.NPY_UINT64, 0)
    cdef uint64_t* q = <uint64_t*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t r, i
    with nogil:
        for i in range(w):
            q[i] = 0
        for r in range(rows):
            for i in range(w):
                q[i] |= p[r * w + i]
    return out
