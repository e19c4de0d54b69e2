# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Sparse gated-MLP kernels: ``y[b] = sum_j down_t[j] * act(gate[j] . x[b]) * (up[j] . x[b])``.

    >>> y = np.empty((1, H), np.float32)
    >>> index_forward(gate, up, down_t, idx, x, y, ACT_SILU, 1)      # kernel (2)
    >>> cache_forward(gate_up_buf, down_t_buf, n_active, x, y, ACT_SILU, 1)   # kernel (1)

Both kernels run the same two passes over memory, and each byte of weights is read once:

1. gate/up pass, parallel over active rows: for every row, the gate and up dot products
   with every batch row are computed together while the two rows stream through cache;
   the result ``h[row, b] = act(g) * u`` is tiny (n_active x B floats);
2. down pass, parallel over column chunks of ``y``: every thread streams its chunk of each
   active ``down_t`` row and accumulates ``h * row`` into its own chunk of ``y``. Chunking
   the output (instead of the rows) means no reduction of per-thread copies of ``y`` and a
   result that does not depend on the thread count.

Weights are float32 or bfloat16 stored as uint16 (fused type ``wtype``); bf16 is widened
on the fly (shift into the high half of a float32) and all accumulation is float32. ``x``
is always float32 (the wrapper converts it once: it is a few kB).
Arguments are validated by the Python layer; these functions trust them.
"""

from cython.parallel cimport prange
from libc.math cimport expf, tanhf
from libc.stdint cimport int64_t, uint16_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits.
       memcpy is the portable bit cast; compilers turn it into a register move and
       vectorise loops around it (vpmovzxwd + vpslld on AVX2). */
    static inline float sl_bf16_to_f32(uint16_t v) {
        uint32_t u = ((uint32_t)v) << 16; float f; memcpy(&f, &u, sizeof f); return f;
    }
    #ifdef _OPENMP
    #include <omp.h>
    static int sl_have_openmp(void) { return 1; }
    static int sl_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int sl_have_openmp(void) { return 0; }
    static int sl_omp_max_threads(void) { return 1; }
    #endif
    #define sl_prefetch(p) __builtin_prefetch((p), 0, 3)
    static int sl_simd_flags(void) {
        int f = 0;
    #ifdef __SSE4_2__
        f |= 1;
    #endif
    #ifdef __AVX2__
        f |= 2;
    #endif
    #ifdef __FMA__
        f |= 4;
    #endif
    #ifdef __AVX512F__
        f |= 8;
    #endif
    #ifdef __ARM_NEON
        f |= 16;
    #endif
        return f;
    }
    """
    float sl_bf16_to_f32(uint16_t v) noexcept nogil
    int sl_have_openmp() noexcept nogil
    int sl_omp_max_threads() noexcept nogil
    int sl_simd_flags() noexcept nogil
    void sl_prefetch(const void* p) noexcept nogil

ctypedef fused wtype:
    float
    uint16_t

# activation codes; the Python layer maps names ("silu", "gelu_tanh", "relu") to these
ACT_SILU = 0
ACT_GELU_TANH = 1
ACT_RELU = 2

cdef inline float _ld(const wtype* p, Py_ssize_t k) noexcept nogil:
    if wtype is float:
        return p[k]
    else:
        return sl_bf16_to_f32(p[k])


cdef inline float _act(float v, int act) noexcept nogil:
    if act == 0:
        # silu; for very negative v expf(-v) is +inf and the result is -0.0, not NaN
        return v / (1.0 + expf(-v))
    elif act == 1:
        return 0.5 * v * (1.0 + tanhf(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    else:
        return v if v > 0 else 0.0


cdef enum:
    # elements per block of the dot/axpy loops: 1 KiB of fp32, 512 B of bf16
    BLOCK = 256


cdef inline void _prefetch_block(const wtype* p, Py_ssize_t k0, Py_ssize_t k1) noexcept nogil:
    cdef Py_ssize_t k
    cdef Py_ssize_t step = 64 // sizeof(wtype)
    k = k0
    while k < k1:
        sl_prefetch(p + k)
        k += step


cdef inline void _gate_up_row(const wtype* g, const wtype* u, const wtype* ng, const wtype* nu,
                              const float* x, Py_ssize_t bsz, Py_ssize_t h, int act,
                              float* out) noexcept nogil:
    """out[b] = act(g . x[b]) * (u . x[b]) for every batch row b.

    ``ng``/``nu`` are the rows processed next (or NULL). Rows of kernel (2) sit at random
    places, and a hardware prefetcher only locks onto a new stream after a few misses; so
    while block k of this row is summed, block k of the next row is prefetched, which
    keeps memory busy across the jump from one row to the next.
    """
    cdef float sg, su, bg, bu, xv
    cdef Py_ssize_t b, k, k0, k1
    cdef const float* xb
    for b in range(bsz):
        xb = x + b * h
        sg = 0.0
        su = 0.0
        k0 = 0
        while k0 < h:
            k1 = k0 + BLOCK
            if k1 > h:
                k1 = h
            if b == 0 and ng != NULL:
                _prefetch_block(ng, k0, k1)
                _prefetch_block(nu, k0, k1)
            bg = 0.0
            bu = 0.0
            # A plain reduction: under -ffast-math gcc/clang vectorise it with one vector
            # accumulator per sum (gate and up: two independent FMA chains), which is above
            # what one core pulls from DRAM. Hand-written lane arrays made gcc vectorise the
            # *outer* loop instead, with hundreds of permutes (4x slower, measured).
            for k in range(k0, k1):
                xv = xb[k]
                bg += _ld(g, k) * xv
                bu += _ld(u, k) * xv
            sg += bg
            su += bu
            k0 = k1
        out[b] = _act(sg, act) * su


cdef inline void _down_chunk(const wtype* down, Py_ssize_t d_stride, const int64_t* idx,
                             Py_ssize_t n, const float* hb, Py_ssize_t bsz, Py_ssize_t h,
                             float* y, Py_ssize_t c0, Py_ssize_t c1, int prefetch) noexcept nogil:
    """y[b, c0:c1] += sum_r hb[r, b] * down[row(r), c0:c1]."""
    cdef Py_ssize_t r, b, k, k0, k1, row, nrow
    cdef const wtype* d
    cdef const wtype* nd
    cdef float* yb
    cdef float a
    for r in range(n):
        row = idx[r] if idx != NULL else r
        d = down + row * d_stride
        nd = NULL
        if prefetch and r + 1 < n:
            nrow = idx[r + 1] if idx != NULL else r + 1
            nd = down + nrow * d_stride
        k0 = c0
        while k0 < c1:
            k1 = k0 + BLOCK
            if k1 > c1:
                k1 = c1
            if nd != NULL:
                _prefetch_block(nd, k0, k1)
            for b in range(bsz):
                a = hb[r * bsz + b]
                # exact zeros (ReLU, or a zero gate) add nothing; skip the multiply
                if a == 0.0:
                    continue
                yb = y + b * h
                for k in range(k0, k1):
                    yb[k] += a * _ld(d, k)
            k0 = k1


cdef int _run(const wtype* gate, const wtype* up, Py_ssize_t gu_stride,
              const wtype* down, Py_ssize_t d_stride, const int64_t* idx, Py_ssize_t n,
              const float* x, Py_ssize_t bsz, Py_ssize_t h, float* y, int act,
              int n_threads, int prefetch) except -1:
    cdef float* hb
    cdef Py_ssize_t r, c, row, nrow, c0, c1, nchunks, chunk
    cdef const wtype* ng
    cdef const wtype* nu
    memset(y, 0, bsz * h * sizeof(float))
    if n == 0:
        return 0
    if n_threads < 1:
        n_threads = 1
    hb = <float*>malloc(n * bsz * sizeof(float))
    if hb == NULL:
        raise MemoryError("sparse MLP scratch buffer")
    # one chunk per thread, 16-float aligned so chunks never share a cache line of y
    nchunks = n_threads if h >= 64 * n_threads else 1
    chunk = ((h + nchunks - 1) // nchunks + 15) // 16 * 16
    with nogil:
        for r in prange(n, num_threads=n_threads, schedule='static'):
            row = idx[r] if idx != NULL else r
            ng = NULL
            nu = NULL
            if prefetch and r + 1 < n:
                nrow = idx[r + 1] if idx != NULL else r + 1
                ng = gate + nrow * gu_stride
                nu = up + nrow * gu_stride
            _gate_up_row(gate + row * gu_stride, up + row * gu_stride, ng, nu, x, bsz, h, act,
                         hb + r * bsz)
        for c in prange(nchunks, num_threads=n_threads, schedule='static'):
            c0 = c * chunk
            c1 = c0 + chunk
            if c1 > h:
                c1 = h
            if c0 < c1:
                _down_chunk(down, d_stride, idx, n, hb, bsz, h, y, c0, c1, prefetch)
    free(hb)
    return 0


def index_forward(const wtype[:, ::1] gate, const wtype[:, ::1] up, const wtype[:, ::1] down_t,
                  const int64_t[::1] idx, const float[:, ::1] x, float[:, ::1] y, int act,
                  int n_threads, int prefetch=1):
    """Kernel (2): rows ``idx`` of the full ``gate``/``up``/``down_t`` ``[I, H]``, in place."""
    cdef Py_ssize_t n = idx.shape[0], bsz = x.shape[0], h = x.shape[1]
    if n == 0:
        y[:, :] = 0.0
        return None
    _run(&gate[0, 0], &up[0, 0], h, &down_t[0, 0], h, &idx[0], n, &x[0, 0], bsz, h,
         &y[0, 0], act, n_threads, prefetch)
    return None


def cache_forward(const wtype[:, :, ::1] gate_up, const wtype[:, ::1] down_t, Py_ssize_t n,
                  const float[:, ::1] x, float[:, ::1] y, int act, int n_threads,
                  int prefetch=1):
    """Kernel (1): the first ``n`` slots of a cache's ``gate_up [cap, 2, H]`` and
    ``down_t [cap, H]`` buffers, which are contiguous, so no index indirection."""
    cdef Py_ssize_t bsz = x.shape[0], h = x.shape[1]
    if n == 0:
        y[:, :] = 0.0
        return None
    _run(&gate_up[0, 0, 0], &gate_up[0, 1, 0], 2 * h, &down_t[0, 0], h, NULL, n, &x[0, 0],
         bsz, h, &y[0, 0], act, n_threads, prefetch)
    return None


def build_info():
    """Facts about this build: OpenMP, OpenMP's default thread count, SIMD macros."""
    cdef int f = sl_simd_flags()
    simd = [name for bit, name in ((1, "sse4.2"), (2, "avx2"), (4, "fma"), (8, "avx512f"),
                                   (16, "neon")) if f & bit]
    return {"openmp": bool(sl_have_openmp()), "omp_max_threads": sl_omp_max_threads(),
            "simd": simd}
