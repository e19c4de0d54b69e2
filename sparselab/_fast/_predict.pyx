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


# ------------------------------------------------------------------------------------
# shadow scores: 4-bit group-quantized gate and up (see csrc/sl_shadow.h for the layout)
# ------------------------------------------------------------------------------------

from libc.stdint cimport int8_t, int32_t, uint16_t
from libc.math cimport expf, tanhf, fabsf

cdef extern from "csrc/sl_shadow.h":
    void sl_shadow_prep_x(const float* x, long h, long group, int8_t* xq, float* sx,
                          int32_t* corr) noexcept nogil
    void sl_shadow_block(const uint8_t* codes, const uint16_t* scales, const int8_t* xq,
                         const float* sx, const int32_t* corr, long ng, float* g,
                         float* u) noexcept nogil


cdef extern from "csrc/sl_act.h":
    float _shadow_act "sl_act"(float v, int act) noexcept nogil  # codes as in _mlp


def shadow_prep_x(const float[:, ::1] x, long group):
    """``(xq int8 [B, H], sx float32 [B, H/group], corr int32 [B, H/group])``: the kernel's
    quantization of ``x`` (for the reference in tests)."""
    cdef Py_ssize_t b, nb = x.shape[0], h = x.shape[1]
    xq_a = np.empty((nb, h), np.int8)
    sx_a = np.empty((nb, h // group), np.float32)
    corr_a = np.empty((nb, h // group), np.int32)
    cdef int8_t[:, ::1] xq = xq_a
    cdef float[:, ::1] sx = sx_a
    cdef int32_t[:, ::1] corr = corr_a
    with nogil:
        for b in range(nb):
            sl_shadow_prep_x(&x[b, 0], h, group, &xq[b, 0], &sx[b, 0], &corr[b, 0])
    return xq_a, sx_a, corr_a


cdef class ShadowScorer:
    """Approximate ``h`` of every neuron from the packed 4-bit gate and up (group 64).

        >>> sc = ShadowScorer(codes, scales, n, act)   # uint8 [N/8, ...], uint16 [N/8, ...]
        >>> idx, mask = sc.select(x, threshold, n_threads)   # |h~| > threshold in any row
        >>> s = sc.scores(x, n_threads)                       # float32 |h~| [B, N]
        >>> gu = sc.gate_up(x, n_threads)                     # float32 [B, N, 2]

    Blocks of 8 neurons are split over the threads; each block runs the same code on any
    thread, so results do not depend on the thread count. NaN scores are never above the
    threshold.
    """

    cdef const uint8_t[:, ::1] codes
    cdef const uint16_t[:, ::1] scales
    cdef Py_ssize_t n
    cdef int act

    def __init__(self, const uint8_t[:, ::1] codes, const uint16_t[:, ::1] scales, Py_ssize_t n, int act):
        self.codes, self.scales, self.n, self.act = codes, scales, n, act

    cdef void _run(self, const float[:, ::1] x, int8_t[:, ::1] xq, float[:, ::1] sx,
                   int32_t[:, ::1] corr, float[:, ::1] gb, float[:, ::1] ub, float threshold,
                   uint8_t[::1] mask, float[:, ::1] scores, int what,
                   int n_threads) noexcept nogil:
        # what: 0 threshold -> mask, 1 |h~| -> scores, 2 (g, u) left in gb / ub
        cdef Py_ssize_t nb = x.shape[0], h = x.shape[1], n_blocks = self.codes.shape[0]
        cdef Py_ssize_t b, blk, j, i
        cdef float s
        cdef uint8_t hit
        for b in range(nb):
            sl_shadow_prep_x(&x[b, 0], h, 64, &xq[b, 0], &sx[b, 0], &corr[b, 0])
        with parallel(num_threads=n_threads):
            for blk in prange(n_blocks, schedule="static"):
                for b in range(nb):
                    sl_shadow_block(&self.codes[blk, 0], &self.scales[blk, 0], &xq[b, 0],
                                    &sx[b, 0], &corr[b, 0], h // 64, &gb[b, blk * 8],
                                    &ub[b, blk * 8])
                if what != 2:
                    for j in range(8):
                        i = blk * 8 + j
                        if i < self.n:
                            hit = 0
                            for b in range(nb):
                                s = fabsf(_shadow_act(gb[b, i], self.act) * ub[b, i])
                                if what == 1:
                                    scores[b, i] = s
                                elif s > threshold:
                                    hit = 1
                            if what == 0:
                                mask[i] = hit

    cdef void _call(self, const float[:, ::1] x, float threshold, uint8_t[::1] mask,
                    float[:, ::1] scores, float[:, ::1] gb, float[:, ::1] ub, int what,
                    int n_threads):
        """Scratch typed outside the nogil block, then the pass."""
        cdef Py_ssize_t nb = x.shape[0], h = x.shape[1]
        cdef int8_t[:, ::1] xq = np.empty((nb, h), np.int8)
        cdef float[:, ::1] sx = np.empty((nb, h // 64), np.float32)
        cdef int32_t[:, ::1] corr = np.empty((nb, h // 64), np.int32)
        with nogil:
            self._run(x, xq, sx, corr, gb, ub, threshold, mask, scores, what, n_threads)

    def _buffers(self, Py_ssize_t nb):
        cdef Py_ssize_t padded = self.codes.shape[0] * 8
        return np.empty((nb, padded), np.float32), np.empty((nb, padded), np.float32)

    def select(self, const float[:, ::1] x, float threshold, int n_threads):
        """``(idx int64 ascending, mask bool [N])`` of the neurons whose ``|h~|`` is above
        ``threshold`` in any row of ``x``."""
        cdef Py_ssize_t k, j, n = self.n
        mask = np.empty(n, np.bool_)
        idx = np.empty(n, np.int64)
        gb, ub = self._buffers(x.shape[0])
        cdef uint8_t[::1] m = mask.view(np.uint8)
        cdef int64_t[::1] out = idx
        self._call(x, threshold, m, gb, gb, ub, 0, n_threads)
        with nogil:
            k = 0
            for j in range(n):
                if m[j]:
                    out[k] = j
                    k = k + 1
        return idx[:k], mask

    def scores(self, const float[:, ::1] x, int n_threads):
        """float32 ``[B, N]``: ``|act(g~) * u~|`` of every neuron for every row."""
        out_a = np.empty((x.shape[0], self.n), np.float32)
        gb, ub = self._buffers(x.shape[0])
        cdef uint8_t[::1] no_mask = np.empty(1, np.uint8)
        self._call(x, 0.0, no_mask, out_a, gb, ub, 1, n_threads)
        return out_a

    def gate_up(self, const float[:, ::1] x, int n_threads):
        """float32 ``[B, N, 2]``: the approximate gate and up dot products."""
        gb, ub = self._buffers(x.shape[0])
        cdef uint8_t[::1] no_mask = np.empty(1, np.uint8)
        self._call(x, 0.0, no_mask, gb, gb, ub, 2, n_threads)
        return np.stack([gb[:, :self.n], ub[:, :self.n]], axis=-1)
