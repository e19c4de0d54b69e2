# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Sparse gated-MLP kernels: ``y[b] = sum_j down_t[j] * act(gate[j] . x[b]) * (up[j] . x[b])``.

    >>> y = np.empty((1, H), np.float32)
    >>> index_forward(gate, up, down_t, idx, x, y, ACT_SILU, 1)      # by index
    >>> cache_forward(gate_up_buf, down_t_buf, n_active, x, y, ACT_SILU, 1)   # over the cache

Both kernels run the same two passes over memory, and each byte of weights is read once:

1. gate/up pass, parallel over pairs of active rows: for two rows at a time, the gate and
   up dot products with every batch row are computed together while the four weight rows
   stream through cache; the result ``h[row, b] = act(g) * u`` is tiny (n_active x B floats);
2. down pass, parallel over column chunks of ``y``: every thread streams its chunk of the
   active ``down_t`` rows, four at a time, and accumulates ``h * row`` into its own chunk
   of ``y``. Chunking
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
    /* y[k] += a0*d0[k] + a1*d1[k] + a2*d2[k] + a3*d3[k], summed strictly left to right.
       The module is built with -ffast-math (the dot products need reassociation to
       vectorise); here reassociation is turned off so that the vector body and the scalar
       tail round alike and y does not depend on where a thread's chunk starts. Each
       element is independent, so the loop still vectorises. */
    #pragma GCC push_options
    #pragma GCC optimize ("no-associative-math")
    static void sl_axpy4_f32(float* y, const float* d0, const float* d1, const float* d2,
                             const float* d3, float a0, float a1, float a2, float a3,
                             long k0, long k1) {
        for (long k = k0; k < k1; k++) {
            float acc = y[k];
            acc += a0 * d0[k]; acc += a1 * d1[k]; acc += a2 * d2[k]; acc += a3 * d3[k];
            y[k] = acc;
        }
    }
    /* gcc does not inline across different optimize options, so sl_bf16_to_f32 is
       spelled out here as a macro (a call per element is 4x slower, measured) */
    #define SL_BF16(v) __extension__ ({ uint32_t u_ = ((uint32_t)(v)) << 16; float f_; \
                                        memcpy(&f_, &u_, sizeof f_); f_; })
    static void sl_axpy4_bf16(float* y, const uint16_t* d0, const uint16_t* d1,
                              const uint16_t* d2, const uint16_t* d3, float a0, float a1,
                              float a2, float a3, long k0, long k1) {
        for (long k = k0; k < k1; k++) {
            float acc = y[k];
            acc += a0 * SL_BF16(d0[k]); acc += a1 * SL_BF16(d1[k]);
            acc += a2 * SL_BF16(d2[k]); acc += a3 * SL_BF16(d3[k]);
            y[k] = acc;
        }
    }
    #pragma GCC pop_options
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
    void sl_axpy4_f32(float* y, const float* d0, const float* d1, const float* d2,
                      const float* d3, float a0, float a1, float a2, float a3,
                      long k0, long k1) noexcept nogil
    void sl_axpy4_bf16(float* y, const uint16_t* d0, const uint16_t* d1, const uint16_t* d2,
                       const uint16_t* d3, float a0, float a1, float a2, float a3,
                       long k0, long k1) noexcept nogil

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


cdef inline void _gate_up_pair(const wtype* g0, const wtype* u0, const wtype* g1,
                               const wtype* u1, const float* x, Py_ssize_t bsz, Py_ssize_t h, int act,
                               float* out0, float* out1) noexcept nogil:
    """out0[b] = act(g0 . x[b]) * (u0 . x[b]) and the same for row 1, every batch row b.

    Two neuron rows at a time: four weight streams share each load of ``x`` and give four
    independent FMA chains, which keeps more cache-line fills in flight than one row's two
    streams (measured ~25 % more bandwidth on one core at 3B shapes). ``g1``/``u1`` may be
    NULL (an odd row count): then only row 0 is computed. No software prefetch: with four
    streams the hardware prefetchers keep up, and prefetching the next rows' blocks made
    both kernels 20-30 % slower (measured at 3B shapes, fp32, one thread).
    """
    cdef float s0, s1, s2, s3, b0, b1, b2, b3, xv
    cdef Py_ssize_t b, k, k0, k1
    cdef const float* xb
    cdef bint two = g1 != NULL
    for b in range(bsz):
        xb = x + b * h
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        k0 = 0
        while k0 < h:
            k1 = k0 + BLOCK
            if k1 > h:
                k1 = h
            b0 = 0.0
            b1 = 0.0
            b2 = 0.0
            b3 = 0.0
            # Plain reductions: under -ffast-math gcc/clang vectorise each with its own
            # vector accumulator. Hand-written lane arrays made gcc vectorise the *outer*
            # loop instead, with hundreds of permutes (4x slower, measured).
            if two:
                for k in range(k0, k1):
                    xv = xb[k]
                    b0 += _ld(g0, k) * xv
                    b1 += _ld(u0, k) * xv
                    b2 += _ld(g1, k) * xv
                    b3 += _ld(u1, k) * xv
            else:
                for k in range(k0, k1):
                    xv = xb[k]
                    b0 += _ld(g0, k) * xv
                    b1 += _ld(u0, k) * xv
            s0 += b0
            s1 += b1
            s2 += b2
            s3 += b3
            k0 = k1
        out0[b] = _act(s0, act) * s1
        if two:
            out1[b] = _act(s2, act) * s3


cdef inline const wtype* _row(const wtype* base, Py_ssize_t stride, const int64_t* idx,
                              Py_ssize_t r) noexcept nogil:
    return base + (idx[r] if idx != NULL else r) * stride


cdef inline void _down_chunk(const wtype* down, Py_ssize_t d_stride, const int64_t* idx,
                             Py_ssize_t n, const float* hb, Py_ssize_t bsz, Py_ssize_t h,
                             float* y, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """y[b, c0:c1] += sum_r hb[r, b] * down[row(r), c0:c1], four rows at a time.

    Four rows per pass over the chunk of ``y`` read and write ``y`` a quarter as often and
    keep four weight streams in flight (measured ~10 % faster than one row at a time).
    """
    cdef Py_ssize_t r, b, k0, k1, m
    cdef const wtype* d0
    cdef const wtype* d1
    cdef const wtype* d2
    cdef const wtype* d3
    cdef float* yb
    cdef float a0, a1, a2, a3
    r = 0
    while r < n:
        m = n - r
        if m > 4:
            m = 4
        d0 = _row(down, d_stride, idx, r)
        # a short group repeats row r with weight 0 (branch-free inner loop)
        d1 = _row(down, d_stride, idx, r + 1) if m > 1 else d0
        d2 = _row(down, d_stride, idx, r + 2) if m > 2 else d0
        d3 = _row(down, d_stride, idx, r + 3) if m > 3 else d0
        k0 = c0
        while k0 < c1:
            k1 = k0 + BLOCK
            if k1 > c1:
                k1 = c1
            for b in range(bsz):
                a0 = hb[r * bsz + b]
                a1 = hb[(r + 1) * bsz + b] if m > 1 else 0.0
                a2 = hb[(r + 2) * bsz + b] if m > 2 else 0.0
                a3 = hb[(r + 3) * bsz + b] if m > 3 else 0.0
                # exact zeros (ReLU, or a zero gate) add nothing; skip the pass
                if a0 == 0.0 and a1 == 0.0 and a2 == 0.0 and a3 == 0.0:
                    continue
                yb = y + b * h
                if wtype is float:
                    sl_axpy4_f32(yb, d0, d1, d2, d3, a0, a1, a2, a3, k0, k1)
                else:
                    sl_axpy4_bf16(yb, d0, d1, d2, d3, a0, a1, a2, a3, k0, k1)
            k0 = k1
        r += 4


cdef int _run(const wtype* gate, const wtype* up, Py_ssize_t gu_stride,
              const wtype* down, Py_ssize_t d_stride, const int64_t* idx, Py_ssize_t n,
              const float* x, Py_ssize_t bsz, Py_ssize_t h, float* y, int act,
              int n_threads) except -1:
    cdef float* hb
    cdef Py_ssize_t p, r, c, c0, c1, nchunks, chunk, npairs
    cdef const wtype* g1
    cdef const wtype* u1
    cdef Py_ssize_t up_offset = up - gate
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
    npairs = (n + 1) // 2
    with nogil:
        for p in prange(npairs, num_threads=n_threads, schedule='static'):
            r = 2 * p
            g1 = NULL
            u1 = NULL
            if r + 1 < n:
                g1 = _row(gate, gu_stride, idx, r + 1)
                u1 = g1 + up_offset
            _gate_up_pair(_row(gate, gu_stride, idx, r), _row(gate, gu_stride, idx, r) + up_offset,
                          g1, u1, x, bsz, h, act, hb + r * bsz, hb + (r + 1) * bsz)
        for c in prange(nchunks, num_threads=n_threads, schedule='static'):
            c0 = c * chunk
            c1 = c0 + chunk
            if c1 > h:
                c1 = h
            if c0 < c1:
                _down_chunk(down, d_stride, idx, n, hb, bsz, h, y, c0, c1)
    free(hb)
    return 0


def index_forward(const wtype[:, ::1] gate, const wtype[:, ::1] up, const wtype[:, ::1] down_t,
                  const int64_t[::1] idx, const float[:, ::1] x, float[:, ::1] y, int act,
                  int n_threads):
    """By index: rows ``idx`` of the full ``gate``/``up``/``down_t`` ``[I, H]``, in place."""
    cdef Py_ssize_t n = idx.shape[0], bsz = x.shape[0], h = x.shape[1]
    if n == 0:
        y[:, :] = 0.0
        return None
    _run(&gate[0, 0], &up[0, 0], h, &down_t[0, 0], h, &idx[0], n, &x[0, 0], bsz, h,
         &y[0, 0], act, n_threads)
    return None


def cache_forward(const wtype[:, :, ::1] gate_up, const wtype[:, ::1] down_t, Py_ssize_t n,
                  const float[:, ::1] x, float[:, ::1] y, int act, int n_threads):
    """Over the cache: the first ``n`` slots of a cache's ``gate_up [cap, 2, H]`` and
    ``down_t [cap, H]`` buffers, which are contiguous, so no index indirection."""
    cdef Py_ssize_t bsz = x.shape[0], h = x.shape[1]
    if n == 0:
        y[:, :] = 0.0
        return None
    _run(&gate_up[0, 0, 0], &gate_up[0, 1, 0], 2 * h, &down_t[0, 0], h, NULL, n, &x[0, 0],
         bsz, h, &y[0, 0], act, n_threads)
    return None


def bundle_forward(const wtype[:, :, ::1] bundle, const int64_t[::1] idx, const float[:, ::1] x,
                   float[:, ::1] y, int act, int n_threads):
    """By index over a bundled ``[I, 3, H]`` array (a neuron's gate row, up row and down
    column stored together, e.g. a memory-mapped weight file), read in place."""
    cdef Py_ssize_t n = idx.shape[0], bsz = x.shape[0], h = x.shape[1]
    if n == 0:
        y[:, :] = 0.0
        return None
    _run(&bundle[0, 0, 0], &bundle[0, 1, 0], 3 * h, &bundle[0, 2, 0], 3 * h, &idx[0], n,
         &x[0, 0], bsz, h, &y[0, 0], act, n_threads)
    return None


def slots_forward(const wtype[:, :, ::1] gate_up, const wtype[:, ::1] down_t,
                  const int64_t[::1] slots, const float[:, ::1] x, float[:, ::1] y, int act,
                  int n_threads):
    """By index over a cache's buffers: only the slots ``slots`` (a windowed cache holds
    more rows than the step computes)."""
    cdef Py_ssize_t n = slots.shape[0], bsz = x.shape[0], h = x.shape[1]
    if n == 0:
        y[:, :] = 0.0
        return None
    _run(&gate_up[0, 0, 0], &gate_up[0, 1, 0], 2 * h, &down_t[0, 0], h, &slots[0], n,
         &x[0, 0], bsz, h, &y[0, 0], act, n_threads)
    return None


def build_info():
    """Facts about this build: OpenMP, OpenMP's default thread count, SIMD macros."""
    cdef int f = sl_simd_flags()
    simd = [name for bit, name in ((1, "sse4.2"), (2, "avx2"), (4, "fma"), (8, "avx512f"),
                                   (16, "neon")) if f & bit]
    return {"openmp": bool(sl_have_openmp()), "omp_max_threads": sl_omp_max_threads(),
            "simd": simd}
