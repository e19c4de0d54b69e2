# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Low-rank predictor scores, threshold and union over the batch in one pass.

    >>> sel = BoundSelector(first, second, bias)
    >>> idx, mask = sel.select(x, threshold, 1)   # ascending ids scoring > threshold in any row

``scores[b, j] = bias[j] + second[j] . (first @ x[b])``: first ``[R, H]``, second
``[N, R]``, float32. The decode step needs only the neuron ids, so the scores are never
written out: each neuron's score for every batch row is compared with the threshold as
it is computed. Done with torch this is five ops per layer and token (two matmuls, a
compare, an any, a nonzero), each with its own dispatch and temporary; at batch 1 the
dispatch costs more than the arithmetic.

Every neuron's dot product runs the same code whatever thread gets it, so the result
does not depend on the thread count. NaN scores are never above the threshold.
Arguments are validated by the Python layer; these functions trust them.
"""

from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t, uint8_t

import numpy as np

cdef extern from "csrc/sl_kernels.h":
    int sl_isa
    const char* sl_isa_names[]
    float sl_dot1_f32(const float* a, const float* b, long n) noexcept nogil


def set_isa_unchecked(str name):
    """Switch this module's dot products to path ``name`` (``sparselab._fast.isa`` checks it)."""
    global sl_isa
    sl_isa = [sl_isa_names[i].decode() for i in range(4)].index(name)


cdef void _pass(const float[:, ::1] first, const float[:, ::1] second,
                const float[::1] bias, const float[:, ::1] x, float[:, ::1] z,
                float threshold, uint8_t[::1] mask, float[:, ::1] scores,
                bint keep_scores, int n_threads) noexcept nogil:
    """Scores of every neuron for every row: each neuron's compared with ``threshold``
    (``mask[j]``: above it in any row), or, with ``keep_scores``, written to ``scores``."""
    cdef Py_ssize_t n_rows = x.shape[0], hidden = x.shape[1]
    cdef Py_ssize_t rank = first.shape[0], n_neurons = second.shape[0]
    cdef Py_ssize_t b, r, j
    cdef float acc
    cdef uint8_t hit
    # one parallel region (one fork/join per call): the rank-space projection split by
    # rank row, then (after prange's implicit barrier) the scores split by neuron. Every
    # dot product runs the same code on any thread, so results do not depend on the count.
    with parallel(num_threads=n_threads):
        for r in prange(rank, schedule="static"):
            for b in range(n_rows):
                z[b, r] = sl_dot1_f32(&first[r, 0], &x[b, 0], hidden)
        for j in prange(n_neurons, schedule="static"):
            hit = 0
            for b in range(n_rows):
                acc = bias[j] + sl_dot1_f32(&second[j, 0], &z[b, 0], rank)
                if keep_scores:
                    scores[b, j] = acc
                elif acc > threshold:
                    hit = 1
            if not keep_scores:
                mask[j] = hit


cdef class BoundSelector:
    """The selection with the weights bound once: a decode step then pays for one buffer
    acquisition (``x``) instead of eight.

        >>> sel = BoundSelector(first, second, bias)
        >>> idx, mask = sel.select(x, threshold, n_threads)    # int64 [n], bool [N] (fresh)

    Scratch and outputs are allocated per call (well under a microsecond), so concurrent
    calls from several Python threads (the GIL is released) never share a buffer.
    """

    cdef const float[:, ::1] first
    cdef const float[:, ::1] second
    cdef const float[::1] bias

    def __init__(self, const float[:, ::1] first, const float[:, ::1] second, const float[::1] bias):
        self.first, self.second, self.bias = first, second, bias

    def select(self, const float[:, ::1] x, float threshold, int n_threads):
        cdef Py_ssize_t n, j
        z_arr = np.empty((x.shape[0], self.first.shape[0]), np.float32)
        mask = np.empty(self.second.shape[0], np.bool_)
        idx = np.empty(self.second.shape[0], np.int64)
        cdef float[:, ::1] z = z_arr
        cdef uint8_t[::1] m = mask.view(np.uint8)
        cdef int64_t[::1] out = idx
        with nogil:
            _pass(self.first, self.second, self.bias, x, z, threshold, m, z, False, n_threads)
            n = 0
            for j in range(m.shape[0]):
                if m[j]:
                    out[n] = j
                    n = n + 1
        return idx[:n], mask

    def scores(self, const float[:, ::1] x, int n_threads):
        """float32 ``[B, N]`` scores (for a top-k policy, which needs them all)."""
        z_arr = np.empty((x.shape[0], self.first.shape[0]), np.float32)
        out_arr = np.empty((x.shape[0], self.second.shape[0]), np.float32)
        no_mask = np.empty(0, np.uint8)
        cdef float[:, ::1] z = z_arr
        cdef float[:, ::1] out = out_arr
        cdef uint8_t[::1] m = no_mask
        with nogil:
            _pass(self.first, self.second, self.bias, x, z, 0.0, m, out, True, n_threads)
        return out_arr
