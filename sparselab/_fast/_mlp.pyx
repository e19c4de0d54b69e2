# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Sparse gated-MLP kernels: ``y[b] = sum_j down_t[j] * act(gate[j] . x[b]) * (up[j] . x[b])``.

    >>> y = np.empty((1, H), np.float32)
    >>> index_forward(gate, up, down_t, idx, x, y, ACT_SILU, 1)      # by index
    >>> cache_forward(gate_up_buf, down_t_buf, n_active, x, y, ACT_SILU, 1)   # over the cache

Both kernels run the same two passes over memory, and each byte of weights is read once:

1. gate/up pass, parallel over pairs of active rows: for two rows at a time, the gate and
   up dot products with every batch row are computed together while the four weight rows
   stream through cache; the result ``h[row, b] = act(g) * u`` is tiny (n_active x B floats;
   for bf16 weights rounded to bf16, the value a bf16 model feeds its down projection);
2. down pass, parallel over column chunks of ``y``: every thread streams its chunk of the
   active ``down_t`` rows, four at a time, and accumulates ``h * row`` into its own chunk
   of ``y``. Chunking
   the output (instead of the rows) means no reduction of per-thread copies of ``y`` and a
   result that does not depend on the thread count.

Both passes prefetch rows that come next (the pair, the group of four, about 192 KiB on)
into L2, one line per line they read, so a row's first bytes never wait on memory: rows
picked by index start a new memory stream at every row, and short rows start them often.
At 30-50 % on the 3B shapes that made bf16 1.01-1.35x, int8 1.17-1.99x and fp32 0.98-1.07x
faster than no prefetch (experiments/results/bench_prefetch.md).

Weights are float32, bfloat16 stored as uint16, or int8 with per-row or per-block scales (fused type
``wtype``); all accumulation is float32. ``x`` is always float32 (the wrapper converts it
once: it is a few kB). The inner loops (four dot products; four-row axpy) are the C
functions of ``csrc/sl_kernels.h``, one version per instruction set, chosen at run time
(:func:`set_isa_unchecked`; ``sparselab._fast.isa`` picks and checks the path).
Arguments are validated by the Python layer; these functions trust them.
"""

from cython.parallel cimport prange
from libc.math cimport expf, tanhf
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int sl_have_openmp(void) { return 1; }
    static int sl_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int sl_have_openmp(void) { return 0; }
    static int sl_omp_max_threads(void) { return 1; }
    #endif
    """
    int sl_have_openmp() noexcept nogil
    int sl_omp_max_threads() noexcept nogil

cdef extern from "csrc/sl_kernels.h":
    int sl_isa
    int SL_N_ISA
    const char* sl_isa_names[]
    int sl_isa_supported(int isa) noexcept nogil
    int sl_isa_best() noexcept nogil
    int sl_needs_xb(int is_bf16) noexcept nogil
    void sl_prefetch_row(const void* p, long nbytes) noexcept nogil
    void sl_prep_xb(const float* x, long n, uint16_t* xb) noexcept nogil
    int sl_bf16_down_dp
    int sl_f32_512
    void sl_bf16_down_finish(float* y, long k0, long k1) noexcept nogil
    float sl_round_bf16(float f) noexcept nogil
    void sl_dot4_f32(const float* w0, const float* w1, const float* w2, const float* w3,
                     const float* x, long h, float* out,
        const char** nx) noexcept nogil
    void sl_dot4_bf16(const uint16_t* w0, const uint16_t* w1, const uint16_t* w2,
                      const uint16_t* w3, const float* x, const uint16_t* xb, long h,
                      float* out,
        const char** nx) noexcept nogil
    void sl_dot4_i8(const int8_t* w0, const int8_t* w1, const int8_t* w2, const int8_t* w3,
                    const float* x, long h, float* out,
        const char** nx) noexcept nogil
    void sl_axpy4_f32(float* y, const float* d0, const float* d1, const float* d2,
                      const float* d3, const float* a, long k0, long k1,
        const char** nx) noexcept nogil
    void sl_axpy4_bf16(float* y, const uint16_t* d0, const uint16_t* d1, const uint16_t* d2,
                       const uint16_t* d3, const float* a, long k0, long k1,
        const char** nx) noexcept nogil
    void sl_axpy4_i8(float* y, const int8_t* d0, const int8_t* d1, const int8_t* d2,
                     const int8_t* d3, const float* a, long k0, long k1,
        const char** nx) noexcept nogil
    void sl_dot4_i8b(const int8_t* w0, const int8_t* w1, const int8_t* w2, const int8_t* w3,
                     const float* c0, const float* c1, const float* c2, const float* c3,
                     const float* x, long h, long qb, float* out,
        const char** nx) noexcept nogil
    void sl_axpy4_i8b(float* y, const int8_t* d0, const int8_t* d1, const int8_t* d2,
                      const int8_t* d3, const float* c0, const float* c1, const float* c2,
                      const float* c3, const float* a, long k0, long k1, long qb,
        const char** nx) noexcept nogil

ctypedef fused wtype:
    float
    uint16_t
    int8_t

# activation codes; the Python layer maps names ("silu", "gelu_tanh", "relu") to these
ACT_SILU = 0
ACT_GELU_TANH = 1
ACT_RELU = 2

cdef extern from "csrc/sl_qdot.h":
    void sl_quant_x_i8(const float* x, long h, long group, int8_t* xq, float* sx) noexcept nogil
    void sl_abs_i8(const int8_t* xq, long n, uint8_t* xa) noexcept nogil
    void sl_dot4_i8q(const int8_t* w0, const int8_t* w1, const int8_t* w2, const int8_t* w3,
                     const float* c0, const float* c1, const float* c2, const float* c3,
                     const int8_t* xq, const uint8_t* xa, const float* sx, long h, long qb,
                     float* out, const char** nx) noexcept nogil
    const char* sl_qdot_path() noexcept nogil


cdef struct QuantX:
    # x rounded to int8 per group of 64 (csrc/sl_qdot.h), every batch row: [bsz, h64]
    int8_t* xq
    uint8_t* xa
    float* sx      # [bsz, ng]
    Py_ssize_t h64
    Py_ssize_t ng


cdef extern from "csrc/sl_act.h":
    float _act "sl_act"(float v, int act) noexcept nogil


# How far ahead the kernels prefetch: the gate/up pass the pair of rows this many pairs on,
# the down pass the group of four rows this many groups on (see SL_PF4 in
# csrc/sl_kernels.h). Both are four rows, so the distance is set in bytes: about PF_BYTES
# ahead, at least one and at most PF_MAX_AHEAD pairs; on 3B shapes 4 pairs of fp32 rows
# (48 KiB a pair), 8 of bf16, 16 of int8. experiments/bench_prefetch.py with the weights on
# 2 MiB pages (3B shapes, every format, 1 and 2 threads, settings in a new random order
# every repeat): each fixed distance from 1 to 16 pairs times 0.98-1.00x of this one at
# the median of the cells (single cells 0.85-1.09x), 32 pairs a little slower; against no
# prefetch it gains most for int8 (1.06-1.99x) and bf16 (1.01-1.35x), fp32 0.98-1.12x.
cdef enum:
    PF_BYTES = 192 * 1024
    PF_MAX_AHEAD = 16
# benchmarks only (_set_prefetch): a fixed number of pairs ahead, 0 = off; -1 = by bytes
cdef long PF_FIXED = -1


def _set_prefetch(long ahead):
    """Benchmarks only: prefetch this many pairs (groups) ahead, 0 = off, -1 = the default
    (about ``PF_BYTES`` ahead)."""
    global PF_FIXED
    PF_FIXED = ahead


def _set_f32_512(bint on):
    """Benchmarks only: fp32 on AVX-512 CPUs in the 512-bit loops (on, the default) or in
    the 256-bit ones of the avx2 path (off)."""
    global sl_f32_512
    sl_f32_512 = on


def _set_bf16_down_dp(bint on):
    """Benchmarks only: the bf16 down pass on the avx512bf16 path with ``vdpbf16ps`` (on,
    the default) or with the widening loop of the avx512 path (off)."""
    global sl_bf16_down_dp
    sl_bf16_down_dp = on


cdef inline Py_ssize_t _prefetch_ahead(Py_ssize_t row_bytes) noexcept nogil:
    """Pairs (groups) ahead to prefetch for rows of ``row_bytes``."""
    cdef Py_ssize_t ahead
    if PF_FIXED >= 0:
        return PF_FIXED
    ahead = PF_BYTES // (4 * row_bytes) if row_bytes > 0 else PF_MAX_AHEAD
    if ahead < 1:
        return 1
    return ahead if ahead < PF_MAX_AHEAD else PF_MAX_AHEAD

cdef enum:
    # elements per block of the down pass: 1 KiB of fp32 y per row group
    BLOCK = 256


cdef inline void _gate_up_pair(const wtype* g0, const wtype* u0, const wtype* g1,
                               const wtype* u1, const float* sc0, const float* sc1,
                               Py_ssize_t nb, const float* x, const uint16_t* xb, Py_ssize_t bsz,
                               Py_ssize_t h, int act, float* out0, float* out1,
                               const wtype* ng0, const wtype* ng1, Py_ssize_t up_offset,
                               const QuantX* q) noexcept nogil:
    """out0[b] = act(g0 . x[b]) * (u0 . x[b]) and the same for row 1, every batch row b.

    Two neuron rows at a time: four weight streams share each load of ``x`` and give four
    independent FMA chains, which keeps more cache-line fills in flight than one row's two
    streams (measured ~25 % more bandwidth on one core at 3B shapes). ``g1``/``u1`` may be
    NULL (an odd row count): then row 0 is computed twice and row 1 not stored. ``ng0``/``ng1``:
    the gate rows of the next pair to prefetch (their up rows are ``up_offset`` on), or NULL.
    ``q``: int8 weights only, x as int8 (integer dot products), or NULL for float x. int8:
    ``sc0``/``sc1`` are the rows' ``[3, nb]`` (gate, up, down) scales. Per-row scales
    (``nb == 1``): the down scale is folded into ``h``; per-block scales: the down pass
    applies them.
    """
    cdef float s[4]
    cdef const char* nxa[4]
    cdef const char** nx = NULL
    cdef Py_ssize_t b
    cdef bint two = g1 != NULL
    if not two:
        g1 = g0
        u1 = u0
    if ng0 != NULL:
        if ng1 == NULL:
            ng1 = ng0
        nxa[0] = <const char*>ng0
        nxa[1] = <const char*>(ng0 + up_offset)
        nxa[2] = <const char*>ng1
        nxa[3] = <const char*>(ng1 + up_offset)
        nx = nxa
    for b in range(bsz):
        # the next rows are fetched once, during the first batch row
        if b == 1:
            nx = NULL
        if wtype is float:
            sl_dot4_f32(g0, u0, g1, u1, x + b * h, h, s, nx)
        elif wtype is uint16_t:
            sl_dot4_bf16(g0, u0, g1, u1, x + b * h, xb + b * h if xb != NULL else NULL, h, s,
                         nx)
        else:
            if q != NULL and nb > 1:
                sl_dot4_i8q(g0, u0, g1, u1, sc0, sc0 + nb, sc1, sc1 + nb, q.xq + b * q.h64,
                            q.xa + b * q.h64, q.sx + b * q.ng, h, h // nb, s, nx)
            elif q != NULL:
                sl_dot4_i8q(g0, u0, g1, u1, NULL, NULL, NULL, NULL, q.xq + b * q.h64,
                            q.xa + b * q.h64, q.sx + b * q.ng, h, h, s, nx)
            elif nb > 1:
                sl_dot4_i8b(g0, u0, g1, u1, sc0, sc0 + nb, sc1, sc1 + nb, x + b * h, h, h // nb,
                            s, nx)
            else:
                sl_dot4_i8(g0, u0, g1, u1, x + b * h, h, s, nx)
            if nb == 1:
                s[0] *= sc0[0]
                s[1] *= sc0[1]
                if two:
                    s[2] *= sc1[0]
                    s[3] *= sc1[1]
        out0[b] = _act(s[0], act) * s[1]
        if wtype is int8_t:
            if nb == 1:
                out0[b] *= sc0[2]
        elif wtype is uint16_t:
            out0[b] = sl_round_bf16(out0[b])
        if two:
            out1[b] = _act(s[2], act) * s[3]
            if wtype is int8_t:
                if nb == 1:
                    out1[b] *= sc1[2]
            elif wtype is uint16_t:
                out1[b] = sl_round_bf16(out1[b])


cdef inline const wtype* _row(const wtype* base, Py_ssize_t stride, const int64_t* idx,
                              Py_ssize_t r) noexcept nogil:
    return base + (idx[r] if idx != NULL else r) * stride


cdef inline const float* _dsc(const float* sc, Py_ssize_t nb, const int64_t* idx,
                             Py_ssize_t r) noexcept nogil:
    """Row ``r``'s per-block down scales in a ``[rows, 3, nb]`` scale array."""
    return sc + (3 * (idx[r] if idx != NULL else r) + 2) * nb


cdef inline void _down_chunk(const wtype* down, Py_ssize_t d_stride, const int64_t* idx,
                             Py_ssize_t n, const float* hb, Py_ssize_t bsz, Py_ssize_t h,
                             float* y, Py_ssize_t c0, Py_ssize_t c1, const float* sc,
                             Py_ssize_t nb, Py_ssize_t ahead) noexcept nogil:
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
    cdef float a[4]
    cdef const char* nxa[4]
    cdef const char** nx
    cdef Py_ssize_t rn
    cdef const float* e0 = NULL
    cdef const float* e1 = NULL
    cdef const float* e2 = NULL
    cdef const float* e3 = NULL
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
        if wtype is int8_t:
            if nb > 1:
                e0 = _dsc(sc, nb, idx, r)
                e1 = _dsc(sc, nb, idx, r + 1) if m > 1 else e0
                e2 = _dsc(sc, nb, idx, r + 2) if m > 2 else e0
                e3 = _dsc(sc, nb, idx, r + 3) if m > 3 else e0
        # the group ``ahead`` groups on, prefetched as this one streams (see _gate_up_pair)
        nx = NULL
        rn = r + 4 * ahead
        if ahead > 0 and rn < n:
            nxa[0] = <const char*>_row(down, d_stride, idx, rn)
            nxa[1] = <const char*>_row(down, d_stride, idx, rn + 1) if rn + 1 < n else nxa[0]
            nxa[2] = <const char*>_row(down, d_stride, idx, rn + 2) if rn + 2 < n else nxa[0]
            nxa[3] = <const char*>_row(down, d_stride, idx, rn + 3) if rn + 3 < n else nxa[0]
            nx = nxa
            if wtype is int8_t:
                if nb > 1:
                    for b in range(rn, rn + 4 if rn + 4 <= n else n):
                        sl_prefetch_row(_dsc(sc, nb, idx, b), nb * sizeof(float))
        k0 = c0
        while k0 < c1:
            k1 = k0 + BLOCK
            if k1 > c1:
                k1 = c1
            for b in range(bsz):
                a[0] = hb[r * bsz + b]
                a[1] = hb[(r + 1) * bsz + b] if m > 1 else 0.0
                a[2] = hb[(r + 2) * bsz + b] if m > 2 else 0.0
                a[3] = hb[(r + 3) * bsz + b] if m > 3 else 0.0
                # exact zeros (ReLU, or a zero gate) add nothing; skip the pass
                if a[0] == 0.0 and a[1] == 0.0 and a[2] == 0.0 and a[3] == 0.0:
                    continue
                yb = y + b * h
                # the next group is fetched once per block, with the first batch row that
                # makes a pass over it
                if wtype is float:
                    sl_axpy4_f32(yb, d0, d1, d2, d3, a, k0, k1, nx)
                elif wtype is uint16_t:
                    sl_axpy4_bf16(yb, d0, d1, d2, d3, a, k0, k1, nx)
                elif nb > 1:
                    sl_axpy4_i8b(yb, d0, d1, d2, d3, e0, e1, e2, e3, a, k0, k1, h // nb, nx)
                else:
                    sl_axpy4_i8(yb, d0, d1, d2, d3, a, k0, k1, nx)
                nx = NULL
            if ahead > 0 and rn < n:
                nx = nxa
            k0 = k1
        r += 4


cdef int _run(const wtype* gate, const wtype* up, Py_ssize_t gu_stride,
              const wtype* down, Py_ssize_t d_stride, const int64_t* idx, Py_ssize_t n,
              const float* sc, Py_ssize_t nb, const float* x, Py_ssize_t bsz, Py_ssize_t h,
              float* y, int act, int n_threads, bint x_int8=False,
              const float* oc=NULL) except -1:
    """``oc`` (int8 down_t with column scales, or NULL): y's per-output-channel scales,
    multiplied in by the thread that owns the channel once its down pass is done."""
    cdef float* hb
    cdef QuantX qx
    cdef QuantX* q = NULL
    cdef uint16_t* xb = NULL
    cdef const float* sc0
    cdef const float* sc1
    cdef Py_ssize_t p, r, c, c0, c1, nchunks, chunk, npairs, align
    cdef Py_ssize_t ahead = _prefetch_ahead(h * sizeof(wtype))
    cdef const wtype* g1
    cdef const wtype* u1
    cdef const wtype* ng0
    cdef const wtype* ng1
    cdef Py_ssize_t rn
    cdef Py_ssize_t up_offset = up - gate
    memset(y, 0, bsz * h * sizeof(float))
    if n == 0:
        return 0
    if n_threads < 1:
        n_threads = 1
    hb = <float*>malloc((n + 1) * bsz * sizeof(float))
    if hb == NULL:
        raise MemoryError("sparse MLP scratch buffer")
    if wtype is uint16_t:
        if sl_needs_xb(1):
            xb = <uint16_t*>malloc(bsz * h * sizeof(uint16_t))
            if xb == NULL:
                free(hb)
                raise MemoryError("sparse MLP scratch buffer")
            sl_prep_xb(x, bsz * h, xb)
    if wtype is int8_t:
        if x_int8:
            qx.h64 = (h + 63) // 64 * 64
            qx.ng = qx.h64 // 64
            # zeroed: the padding of the last group must read as 0
            qx.xq = <int8_t*>calloc(bsz * qx.h64, 1)
            qx.xa = <uint8_t*>calloc(bsz * qx.h64, 1)
            qx.sx = <float*>malloc(bsz * qx.ng * sizeof(float))
            if qx.xq == NULL or qx.xa == NULL or qx.sx == NULL:
                free(qx.xq)
                free(qx.xa)
                free(qx.sx)
                free(hb)
                raise MemoryError("sparse MLP scratch buffer")
            for c in range(bsz):
                sl_quant_x_i8(x + c * h, h, 64, qx.xq + c * qx.h64, qx.sx + c * qx.ng)
                sl_abs_i8(qx.xq + c * qx.h64, qx.h64, qx.xa + c * qx.h64)
            q = &qx
    # one chunk per thread, 32-float aligned so chunks never share a cache line of y, and
    # a whole number of int8 scale blocks (blocks divide BLOCK, so every pass starts on one)
    nchunks = n_threads if h >= 64 * n_threads else 1
    align = 32
    if nb > 1 and h // nb > 32:  # int8 blocks of 64 or more
        align = h // nb
    chunk = ((h + nchunks - 1) // nchunks + align - 1) // align * align
    npairs = (n + 1) // 2
    with nogil:
        for p in prange(npairs, num_threads=n_threads, schedule='static'):
            r = 2 * p
            g1 = NULL
            u1 = NULL
            sc0 = NULL
            sc1 = NULL
            if sc != NULL:
                sc0 = sc + 3 * nb * (idx[r] if idx != NULL else r)
                sc1 = sc0
            if r + 1 < n:
                g1 = _row(gate, gu_stride, idx, r + 1)
                u1 = g1 + up_offset
                if sc != NULL:
                    sc1 = sc + 3 * nb * (idx[r + 1] if idx != NULL else r + 1)
            ng0 = NULL
            ng1 = NULL
            rn = r + 2 * ahead
            if ahead > 0 and rn < n:
                ng0 = _row(gate, gu_stride, idx, rn)
                if rn + 1 < n:
                    ng1 = _row(gate, gu_stride, idx, rn + 1)
                if sc != NULL:
                    # int8: the next pair's gate and up scales (per row: one line that by
                    # index is a miss per neuron; blocks: a few lines), fetched at once
                    sl_prefetch_row(sc + 3 * nb * (idx[rn] if idx != NULL else rn),
                                    2 * nb * sizeof(float))
                    if rn + 1 < n:
                        sl_prefetch_row(sc + 3 * nb * (idx[rn + 1] if idx != NULL else rn + 1),
                                        2 * nb * sizeof(float))
            _gate_up_pair(_row(gate, gu_stride, idx, r), _row(gate, gu_stride, idx, r) + up_offset,
                          g1, u1, sc0, sc1, nb, x, xb, bsz, h, act, hb + r * bsz,
                          hb + (r + 1) * bsz, ng0, ng1, up_offset, q)
        for c in prange(nchunks, num_threads=n_threads, schedule='static'):
            c0 = c * chunk
            c1 = c0 + chunk
            if c1 > h:
                c1 = h
            if c0 < c1:
                _down_chunk(down, d_stride, idx, n, hb, bsz, h, y, c0, c1, sc, nb, ahead)
                if wtype is uint16_t:
                    for r in range(bsz):
                        sl_bf16_down_finish(y + r * h, c0, c1)
                if oc != NULL:
                    _scale_columns(y, bsz, h, oc, c0, c1)
    free(hb)
    if xb != NULL:
        free(xb)
    if q != NULL:
        free(qx.xq)
        free(qx.xa)
        free(qx.sx)
    return 0


cdef inline void _scale_columns(float* y, Py_ssize_t bsz, Py_ssize_t h, const float* oc,
                                Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    cdef Py_ssize_t b, k
    for b in range(bsz):
        for k in range(c0, c1):
            y[b * h + k] *= oc[k]


cdef const float* _out_scales(const float[::1] out_scale, Py_ssize_t h) except? NULL:
    if out_scale is None:
        return NULL
    if out_scale.shape[0] != h:
        raise ValueError(f"out_scale has {out_scale.shape[0]} entries, x has {h} channels")
    return &out_scale[0]


cdef const float* _int8_scales(const float[:, :, ::1] scales, Py_ssize_t* nb) except NULL:
    """The ``[*, 3, nb]`` scales int8 weights need (one per row, or per block of
    ``H / nb`` = 32, 64, 128 or 256 weights; the Python layer checks the block)."""
    if scales is None:
        raise ValueError("int8 weights need scales")
    nb[0] = scales.shape[2]
    return &scales[0, 0, 0]


def index_forward(const wtype[:, ::1] gate, const wtype[:, ::1] up, const wtype[:, ::1] down_t,
                  const int64_t[::1] idx, const float[:, ::1] x, float[:, ::1] y, int act,
                  int n_threads, const float[:, :, ::1] scales=None, bint x_int8=False,
                  const float[::1] out_scale=None):
    """By index: rows ``idx`` of the full ``gate``/``up``/``down_t`` ``[I, H]``, in place.
    int8 weights need ``scales [I, 3, nb]`` (gate, up, down scales of each neuron: one per
    row, ``nb == 1``, or one per block, ``nb == H / block``); ``x_int8``: the gate/up
    dot products round x to int8 per group of 64 and run on integers (csrc/sl_qdot.h);
    ``out_scale [H]`` (int8, per-row): down_t's column scales, multiplied into y."""
    cdef Py_ssize_t n = idx.shape[0], bsz = x.shape[0], h = x.shape[1]
    cdef const float* sc = NULL
    cdef const float* oc = NULL
    cdef Py_ssize_t nb = 1
    if wtype is int8_t:
        sc = _int8_scales(scales, &nb)
        oc = _out_scales(out_scale, h)
    elif x_int8 or out_scale is not None:
        raise ValueError("x_int8 and out_scale need int8 weights")
    if n == 0:
        y[:, :] = 0.0
        return None
    _run(&gate[0, 0], &up[0, 0], h, &down_t[0, 0], h, &idx[0], n, sc, nb, &x[0, 0], bsz, h,
         &y[0, 0], act, n_threads, x_int8, oc)
    return None


def cache_forward(const wtype[:, :, ::1] gate_up, const wtype[:, ::1] down_t, Py_ssize_t n,
                  const float[:, ::1] x, float[:, ::1] y, int act, int n_threads,
                  const float[:, :, ::1] scales=None, bint x_int8=False,
                  const float[::1] out_scale=None):
    """Over the cache: the first ``n`` slots of a cache's ``gate_up [cap, 2, H]`` and
    ``down_t [cap, H]`` buffers, which are contiguous, so no index indirection. int8
    weights need the slots' ``scales [cap, 3, nb]`` (``x_int8``, ``out_scale`` as in
    index_forward)."""
    cdef Py_ssize_t bsz = x.shape[0], h = x.shape[1]
    cdef const float* sc = NULL
    cdef const float* oc = NULL
    cdef Py_ssize_t nb = 1
    if wtype is int8_t:
        sc = _int8_scales(scales, &nb)
        oc = _out_scales(out_scale, h)
    elif x_int8 or out_scale is not None:
        raise ValueError("x_int8 and out_scale need int8 weights")
    if n == 0:
        y[:, :] = 0.0
        return None
    _run(&gate_up[0, 0, 0], &gate_up[0, 1, 0], 2 * h, &down_t[0, 0], h, NULL, n, sc, nb,
         &x[0, 0], bsz, h, &y[0, 0], act, n_threads, x_int8, oc)
    return None


def bundle_forward(const wtype[:, :, ::1] bundle, const int64_t[::1] idx, const float[:, ::1] x,
                   float[:, ::1] y, int act, int n_threads):
    """By index over a bundled ``[I, 3, H]`` array (a neuron's gate row, up row and down
    column stored together, e.g. a memory-mapped weight file), read in place."""
    cdef Py_ssize_t n = idx.shape[0], bsz = x.shape[0], h = x.shape[1]
    if n == 0:
        y[:, :] = 0.0
        return None
    if wtype is int8_t:
        raise ValueError("a weight bundle holds float weights (fp32 or bf16), not int8")
    else:  # the int8 specialization stops above
        _run(&bundle[0, 0, 0], &bundle[0, 1, 0], 3 * h, &bundle[0, 2, 0], 3 * h, &idx[0], n,
             NULL, 1, &x[0, 0], bsz, h, &y[0, 0], act, n_threads)


def slots_forward(const wtype[:, :, ::1] gate_up, const wtype[:, ::1] down_t,
                  const int64_t[::1] slots, const float[:, ::1] x, float[:, ::1] y, int act,
                  int n_threads):
    """By index over a cache's buffers: only the slots ``slots`` (a windowed cache holds
    more rows than the step computes)."""
    cdef Py_ssize_t n = slots.shape[0], bsz = x.shape[0], h = x.shape[1]
    if n == 0:
        y[:, :] = 0.0
        return None
    if wtype is int8_t:
        raise ValueError("slots_forward runs float caches (fp32 or bf16), not int8")
    else:  # the int8 specialization stops above
        _run(&gate_up[0, 0, 0], &gate_up[0, 1, 0], 2 * h, &down_t[0, 0], h, &slots[0], n,
             NULL, 1, &x[0, 0], bsz, h, &y[0, 0], act, n_threads)


ISA_NAMES = tuple(sl_isa_names[i].decode() for i in range(SL_N_ISA))


def supported_isas():
    """Names of the code paths this CPU runs, slowest first."""
    return tuple(ISA_NAMES[i] for i in range(SL_N_ISA) if sl_isa_supported(i))


def best_isa():
    return ISA_NAMES[sl_isa_best()]


def get_isa():
    return ISA_NAMES[sl_isa]


def set_isa_unchecked(str name):
    """Switch this module's kernels to path ``name`` (the caller checked the CPU runs it)."""
    global sl_isa
    sl_isa = ISA_NAMES.index(name)


def int8_dot_path():
    """The instructions the int8-x dot products use at the current path: "vpdpbusd",
    "vpmaddubsw" or "portable"."""
    return sl_qdot_path().decode()


def build_info():
    """Facts about this build: OpenMP, OpenMP's default thread count."""
    return {"openmp": bool(sl_have_openmp()), "omp_max_threads": sl_omp_max_threads()}
