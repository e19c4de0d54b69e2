# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Row-copy kernels behind ``WeightCache.update``: the only place cache bytes move.

    >>> copy_in(gate, up, down_t, gate_up_buf, down_t_buf, neurons, slots, 1)

``gate_up_buf`` is ``[capacity, 2, H]`` (gate row then up row of one neuron, adjacent so
the forward kernel streams both in one pass), ``down_t_buf`` is ``[capacity, H]``.
Weights are float32, bfloat16 stored as uint16, or int8 (the fused type ``wtype``): copies move
raw bits, so bf16 never round-trips through float. Arguments are validated by the Python
layer; these functions trust shapes and index ranges.
"""

from cython.parallel cimport prange
from libc.stdint cimport int8_t, int64_t, uint16_t
from libc.string cimport memcpy

ctypedef fused wtype:
    float
    uint16_t
    int8_t


cdef int _copy_rows(const wtype* gate, const wtype* up, const wtype* down_t, Py_ssize_t stride,
                    wtype* gate_up_buf, wtype* down_t_buf, const int64_t* neurons,
                    const int64_t* slots, Py_ssize_t m, Py_ssize_t h, int n_threads) except -1 nogil:
    """Rows ``neurons[p]`` of gate, up and down_t (``stride`` elements apart) into slot
    ``slots[p]``: one implementation for separate tensors and for a bundled file."""
    cdef size_t row_bytes = h * sizeof(wtype)
    cdef Py_ssize_t p
    cdef int64_t j, s
    # a handful of rows is latency-bound on one core; threads only pay off for large churn
    if m < 64:
        n_threads = 1
    for p in prange(m, num_threads=n_threads, schedule='static'):
        j = neurons[p] * stride
        s = slots[p]
        memcpy(gate_up_buf + s * 2 * h, gate + j, row_bytes)
        memcpy(gate_up_buf + s * 2 * h + h, up + j, row_bytes)
        memcpy(down_t_buf + s * h, down_t + j, row_bytes)
    return 0


def copy_in(const wtype[:, ::1] gate, const wtype[:, ::1] up, const wtype[:, ::1] down_t,
            wtype[:, :, ::1] gate_up_buf, wtype[:, ::1] down_t_buf,
            const int64_t[::1] neurons, const int64_t[::1] slots, int n_threads):
    """Copy the gate, up and down_t rows of ``neurons[p]`` into slot ``slots[p]``."""
    cdef Py_ssize_t m = neurons.shape[0], h = gate.shape[1]
    if m == 0:
        return None
    with nogil:
        _copy_rows(&gate[0, 0], &up[0, 0], &down_t[0, 0], h, &gate_up_buf[0, 0, 0],
                   &down_t_buf[0, 0], &neurons[0], &slots[0], m, h, n_threads)
    return None


def copy_in_bundle(const wtype[:, :, ::1] bundle, wtype[:, :, ::1] gate_up_buf,
                   wtype[:, ::1] down_t_buf, const int64_t[::1] neurons,
                   const int64_t[::1] slots, int n_threads):
    """Like :func:`copy_in` from a bundled ``[I, 3, H]`` source (gate row, up row, down
    column of a neuron adjacent, e.g. a memory-mapped weight file): one contiguous read
    of ``3 * H`` elements per neuron."""
    cdef Py_ssize_t m = neurons.shape[0], h = bundle.shape[2]
    if m == 0:
        return None
    with nogil:
        _copy_rows(&bundle[0, 0, 0], &bundle[0, 1, 0], &bundle[0, 2, 0], 3 * h,
                   &gate_up_buf[0, 0, 0], &down_t_buf[0, 0], &neurons[0], &slots[0], m, h,
                   n_threads)
    return None


def copy_in_columns(const wtype[:, ::1] gate, const wtype[:, ::1] up, const wtype[:, ::1] down,
                    wtype[:, :, ::1] gate_up_buf, wtype[:, ::1] down_t_buf,
                    const int64_t[::1] neurons, const int64_t[::1] slots, int n_threads):
    """Like :func:`copy_in` but reads down's *columns* in place from ``down[H, I]``.

    Column reads touch one cache line per element, so they are blocked: for each row of
    ``down`` all entering neurons are gathered together, which turns the access pattern into
    a sweep over ``down`` that the hardware prefetcher can follow.
    """
    cdef Py_ssize_t m = neurons.shape[0], h = gate.shape[1], p, q, k, p0, p1
    cdef Py_ssize_t block = 256, nblocks, bi
    cdef size_t row_bytes = h * sizeof(wtype)
    cdef int64_t j, s
    if m == 0:
        return None
    if m < 64:
        n_threads = 1
    nblocks = (m + block - 1) // block
    with nogil:
        for p in prange(m, num_threads=n_threads, schedule='static'):
            j = neurons[p]
            s = slots[p]
            memcpy(&gate_up_buf[s, 0, 0], &gate[j, 0], row_bytes)
            memcpy(&gate_up_buf[s, 1, 0], &up[j, 0], row_bytes)
        # blocks of 256 neurons keep the written destination lines resident in L1/L2
        for bi in range(nblocks):
            p0 = bi * block
            p1 = p0 + block
            if p1 > m:
                p1 = m
            for k in prange(h, num_threads=n_threads, schedule='static'):
                for q in range(p0, p1):
                    down_t_buf[slots[q], k] = down[k, neurons[q]]
    return None


def move_slots(wtype[:, :, ::1] gate_up_buf, wtype[:, ::1] down_t_buf,
               const int64_t[::1] src, const int64_t[::1] dst):
    """Move slot ``src[p]`` to slot ``dst[p]`` (tail slots filling holes; never overlapping)."""
    cdef Py_ssize_t m = src.shape[0], h = down_t_buf.shape[1], p
    cdef size_t row_bytes = h * sizeof(wtype)
    with nogil:
        for p in range(m):
            memcpy(&gate_up_buf[dst[p], 0, 0], &gate_up_buf[src[p], 0, 0], 2 * row_bytes)
            memcpy(&down_t_buf[dst[p], 0], &down_t_buf[src[p], 0], row_bytes)
    return None


def copy_prefix(wtype[:, :, ::1] gate_up_old, wtype[:, ::1] down_t_old,
                wtype[:, :, ::1] gate_up_new, wtype[:, ::1] down_t_new, Py_ssize_t n):
    """Copy the first ``n`` slots into freshly grown buffers (geometric growth)."""
    cdef Py_ssize_t h = down_t_old.shape[1]
    if n == 0:
        return None
    with nogil:
        memcpy(&gate_up_new[0, 0, 0], &gate_up_old[0, 0, 0], n * 2 * h * sizeof(wtype))
        memcpy(&down_t_new[0, 0], &down_t_old[0, 0], n * h * sizeof(wtype))
    return None
