/* Inner loops of the sparse MLP kernels, one version per instruction set, chosen at run
 * time.
 *
 *     sl_isa_init();                          // best path this CPU runs (or $SPARSELAB_ISA)
 *     sl_dot4_f32(w0, w1, w2, w3, x, h, out, nx);      // four dot products with x
 *     sl_axpy4_f32(y, d0, d1, d2, d3, a, k0, k1, nx);  // y[k] += sum_i a[i] * d_i[k]
 *
 * `nx`: the next four rows to prefetch while these stream (SL_PF4 below), or NULL.
 *
 * Nothing here is compiled for the build machine's instruction set: each vector version
 * carries its own `target` attribute and runs only if the CPU reports the features
 * (`__builtin_cpu_supports`), so one .so runs on any x86-64 (and the portable C version
 * on anything else). Paths, in order: portable < avx2 (+fma, f16c) < avx512 (f, bw, vl) <
 * avx512bf16 (the bf16 dot products use vdpbf16ps; everything else as avx512).
 *
 * Weights: float32, bfloat16 (raw uint16 bits; widening is exact: the bits are the high
 * half of a float32) or int8 (the caller applies the per-row scales). x is float32;
 * accumulation is float32. The dpbf16 path reads x rounded to bf16 (round to nearest even,
 * exact when x came from a bf16 model) from `xp`, which sl_prep_x fills once per call. With
 * bf16 weights the caller rounds h, the down pass's input, to bf16 on every path (what a
 * bf16 model feeds its down projection), which lets the dpbf16 path run that pass in
 * vdpbf16ps too (sl_axpy4_bf16_dp).
 *
 * Determinism: an axpy computes each y element with the same sequence of fused
 * multiply-adds in the vector body and in the tail, so y does not depend on where a
 * thread's chunk starts (results are bitwise independent of the thread count).
 */
#ifndef SL_KERNELS_H
#define SL_KERNELS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { SL_PORTABLE = 0, SL_AVX2 = 1, SL_AVX512 = 2, SL_AVX512BF16 = 3, SL_N_ISA = 4 };
static const char* const sl_isa_names[SL_N_ISA] = {"portable", "avx2", "avx512", "avx512bf16"};
static int sl_isa = SL_PORTABLE;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SL_X86 1
#include <immintrin.h>
#else
#define SL_X86 0
#endif

static int sl_isa_supported(int isa) {
    if (isa == SL_PORTABLE) return 1;
#if SL_X86
    __builtin_cpu_init();
    if (isa >= SL_AVX2 && !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("f16c")))
        return 0;
    if (isa >= SL_AVX512 && !(__builtin_cpu_supports("avx512f") &&
                              __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl")))
        return 0;
    if (isa >= SL_AVX512BF16 && !__builtin_cpu_supports("avx512bf16")) return 0;
    return isa < SL_N_ISA;
#else
    return 0;
#endif
}

__attribute__((unused)) static int sl_isa_best(void) {
    int best = SL_PORTABLE;
    for (int i = 1; i < SL_N_ISA; i++)
        if (sl_isa_supported(i)) best = i;
    return best;
}

static inline float sl_bf16(uint16_t v) {
    uint32_t u = ((uint32_t)v) << 16; float f; memcpy(&f, &u, sizeof f); return f;
}

/* fp32 -> bf16 bits, round to nearest even (NaN kept a quiet NaN), as torch's .to(bf16) */
static inline uint16_t sl_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Prefetch of the rows that come next. A kernel that streams rows picked by index starts
 * a new memory stream at every row, and the hardware prefetcher needs several lines of a
 * stream before it runs ahead, so short rows (bf16, int8) wait on memory at every row
 * start. The loops below therefore take `nx`, the next group's rows (four byte pointers,
 * or NULL), and for every 64 bytes they consume of their own rows they prefetch the same
 * line of the next rows into L2: the next group is in cache when it starts, and there is
 * never a burst of prefetches that would crowd out the loads of the current rows (one
 * whole row at a time measured slower). */
#define SL_PF4(nx, off) do {                                                          \
        __builtin_prefetch((nx)[0] + (off), 0, 2); __builtin_prefetch((nx)[1] + (off), 0, 2); \
        __builtin_prefetch((nx)[2] + (off), 0, 2); __builtin_prefetch((nx)[3] + (off), 0, 2); \
    } while (0)
/* once per cache line of the current rows: element k of a row of T */
#define SL_PF4_AT(nx, T, k) do {                                                       \
        long o_ = (long)(k) * (long)sizeof(T);                                         \
        if ((nx) && (o_ & 63) == 0) SL_PF4(nx, o_);                                    \
    } while (0)
/* every line of elements [k0, k1) at once (the portable loops, which must stay free of
 * branches in their inner loop to vectorise) */
#define SL_PF4_RANGE(nx, T, k0, k1) do {                                               \
        if (nx) for (long o_ = (long)(k0) * (long)sizeof(T) & ~63L;                    \
                     o_ < (long)(k1) * (long)sizeof(T); o_ += 64) SL_PF4(nx, o_);      \
    } while (0)
typedef const char* const* sl_next;

/* ---------------------------------------------------------------- portable C ------ */
/* dot products: reassociation (-ffast-math) lets the compiler vectorise for the baseline
 * (SSE2 on x86-64). axpy: reassociation off, so vector body and tail round alike. */
#define SL_DOT4_PORTABLE(NAME, T, LD)                                                     \
    static void NAME(const T* w0, const T* w1, const T* w2, const T* w3, const float* x,  \
                     long h, float* out, sl_next nx) {                                    \
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                             \
        for (long k0 = 0; k0 < h; k0 += 256) {                                            \
            long k1 = k0 + 256 < h ? k0 + 256 : h;                                        \
            SL_PF4_RANGE(nx, T, k0, k1);                                                  \
            float b0 = 0, b1 = 0, b2 = 0, b3 = 0;                                         \
            for (long k = k0; k < k1; k++) {                                              \
                float xv = x[k];                                                          \
                b0 += LD(w0[k]) * xv; b1 += LD(w1[k]) * xv;                               \
                b2 += LD(w2[k]) * xv; b3 += LD(w3[k]) * xv;                               \
            }                                                                             \
            s0 += b0; s1 += b1; s2 += b2; s3 += b3;                                       \
        }                                                                                 \
        out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;                               \
    }
#define SL_LD_F32(v) (v)
#define SL_LD_I8(v) ((float)(v))
#define SL_LD_BF16(v) __extension__ ({ uint32_t u_ = ((uint32_t)(v)) << 16; float f_; \
                                       memcpy(&f_, &u_, sizeof f_); f_; })
SL_DOT4_PORTABLE(sl_dot4_f32_c, float, SL_LD_F32)
SL_DOT4_PORTABLE(sl_dot4_bf16_c, uint16_t, SL_LD_BF16)
SL_DOT4_PORTABLE(sl_dot4_i8_c, int8_t, SL_LD_I8)

#pragma GCC push_options
#pragma GCC optimize ("no-associative-math")
#define SL_AXPY4_PORTABLE(NAME, T, LD)                                                    \
    static void NAME(float* y, const T* d0, const T* d1, const T* d2, const T* d3,        \
                     const float* a, long k0, long k1, sl_next nx) {                      \
        float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];                                 \
        SL_PF4_RANGE(nx, T, k0, k1);                                                      \
        for (long k = k0; k < k1; k++) {                                                  \
            float acc = y[k];                                                             \
            acc += a0 * LD(d0[k]); acc += a1 * LD(d1[k]);                                 \
            acc += a2 * LD(d2[k]); acc += a3 * LD(d3[k]);                                 \
            y[k] = acc;                                                                   \
        }                                                                                 \
    }
SL_AXPY4_PORTABLE(sl_axpy4_f32_c, float, SL_LD_F32)
SL_AXPY4_PORTABLE(sl_axpy4_bf16_c, uint16_t, SL_LD_BF16)
SL_AXPY4_PORTABLE(sl_axpy4_i8_c, int8_t, SL_LD_I8)
/* int8 with one scale per block of qb weights (qb a multiple of 32 that divides 256: the
 * format's blocks of 32, 64, 128 or 256); k0, k1 multiples of qb */
static void sl_axpy4_i8b_c(float* y, const int8_t* d0, const int8_t* d1, const int8_t* d2,
                           const int8_t* d3, const float* c0, const float* c1, const float* c2,
                           const float* c3, const float* a, long k0, long k1, long qb,
                           sl_next nx) {
    SL_PF4_RANGE(nx, int8_t, k0, k1);
    for (long kb = k0; kb < k1; kb += qb) {
        long b = kb / qb;
        float a0 = a[0] * c0[b], a1 = a[1] * c1[b], a2 = a[2] * c2[b], a3 = a[3] * c3[b];
        for (long k = kb; k < kb + qb; k++) {
            float acc = y[k];
            acc += a0 * (float)d0[k]; acc += a1 * (float)d1[k];
            acc += a2 * (float)d2[k]; acc += a3 * (float)d3[k];
            y[k] = acc;
        }
    }
}
#pragma GCC pop_options

/* int8 with one scale per block of qb weights (h a multiple of qb): c_i[k / qb] */
static void sl_dot4_i8b_c(const int8_t* w0, const int8_t* w1, const int8_t* w2,
                          const int8_t* w3, const float* c0, const float* c1, const float* c2,
                          const float* c3, const float* x, long h, long qb, float* out,
                          sl_next nx) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (long k0 = 0; k0 < h; k0 += qb) {
        SL_PF4_AT(nx, int8_t, k0);
        float b0 = 0, b1 = 0, b2 = 0, b3 = 0;
        for (long k = k0; k < k0 + qb; k++) {
            float xv = x[k];
            b0 += (float)w0[k] * xv; b1 += (float)w1[k] * xv;
            b2 += (float)w2[k] * xv; b3 += (float)w3[k] * xv;
        }
        long b = k0 / qb;
        s0 += b0 * c0[b]; s1 += b1 * c1[b]; s2 += b2 * c2[b]; s3 += b3 * c3[b];
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

static float sl_dot1_f32_c(const float* a, const float* b, long n) {
    float s = 0;
    for (long k = 0; k < n; k++) s += a[k] * b[k];
    return s;
}

#if SL_X86
/* ---------------------------------------------------------------- AVX2 + FMA ------ */
#define SL_T_AVX2 __attribute__((target("avx2,fma")))

SL_T_AVX2 static inline float sl_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
SL_T_AVX2 static inline __m256 sl_ld8_f32(const float* p) { return _mm256_loadu_ps(p); }
SL_T_AVX2 static inline __m256 sl_ld8_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
SL_T_AVX2 static inline __m256 sl_ld8_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

#define SL_DOT4_AVX2(NAME, T, LD8, LD)                                                    \
    SL_T_AVX2 static void NAME(const T* w0, const T* w1, const T* w2, const T* w3,        \
                               const float* x, long h, float* out, sl_next nx) {          \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                       \
        long k = 0;                                                                       \
        for (; k + 8 <= h; k += 8) {                                                      \
            SL_PF4_AT(nx, T, k);                                                          \
            __m256 xv = _mm256_loadu_ps(x + k);                                           \
            a0 = _mm256_fmadd_ps(LD8(w0 + k), xv, a0);                                    \
            a1 = _mm256_fmadd_ps(LD8(w1 + k), xv, a1);                                    \
            a2 = _mm256_fmadd_ps(LD8(w2 + k), xv, a2);                                    \
            a3 = _mm256_fmadd_ps(LD8(w3 + k), xv, a3);                                    \
        }                                                                                 \
        float s0 = sl_hsum256(a0), s1 = sl_hsum256(a1), s2 = sl_hsum256(a2),              \
              s3 = sl_hsum256(a3);                                                        \
        for (; k < h; k++) {                                                              \
            float xv = x[k];                                                              \
            s0 += LD(w0[k]) * xv; s1 += LD(w1[k]) * xv;                                   \
            s2 += LD(w2[k]) * xv; s3 += LD(w3[k]) * xv;                                   \
        }                                                                                 \
        out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;                               \
    }
SL_DOT4_AVX2(sl_dot4_f32_avx2, float, sl_ld8_f32, SL_LD_F32)
SL_DOT4_AVX2(sl_dot4_bf16_avx2, uint16_t, sl_ld8_bf16, SL_LD_BF16)
SL_DOT4_AVX2(sl_dot4_i8_avx2, int8_t, sl_ld8_i8, SL_LD_I8)

/* tail: the same fused multiply-adds, one element at a time */
#define SL_AXPY4_AVX2(NAME, T, LD8, LD)                                                   \
    SL_T_AVX2 static void NAME(float* y, const T* d0, const T* d1, const T* d2,           \
                               const T* d3, const float* a, long k0, long k1,             \
                               sl_next nx) {                                              \
        __m256 a0 = _mm256_set1_ps(a[0]), a1 = _mm256_set1_ps(a[1]),                      \
               a2 = _mm256_set1_ps(a[2]), a3 = _mm256_set1_ps(a[3]);                      \
        long k = k0;                                                                      \
        for (; k + 8 <= k1; k += 8) {                                                     \
            SL_PF4_AT(nx, T, k);                                                          \
            __m256 acc = _mm256_loadu_ps(y + k);                                          \
            acc = _mm256_fmadd_ps(LD8(d0 + k), a0, acc);                                  \
            acc = _mm256_fmadd_ps(LD8(d1 + k), a1, acc);                                  \
            acc = _mm256_fmadd_ps(LD8(d2 + k), a2, acc);                                  \
            acc = _mm256_fmadd_ps(LD8(d3 + k), a3, acc);                                  \
            _mm256_storeu_ps(y + k, acc);                                                 \
        }                                                                                 \
        for (; k < k1; k++) {                                                             \
            float acc = y[k];                                                             \
            acc = __builtin_fmaf(LD(d0[k]), a[0], acc);                                   \
            acc = __builtin_fmaf(LD(d1[k]), a[1], acc);                                   \
            acc = __builtin_fmaf(LD(d2[k]), a[2], acc);                                   \
            acc = __builtin_fmaf(LD(d3[k]), a[3], acc);                                   \
            y[k] = acc;                                                                   \
        }                                                                                 \
    }
SL_AXPY4_AVX2(sl_axpy4_f32_avx2, float, sl_ld8_f32, SL_LD_F32)
SL_AXPY4_AVX2(sl_axpy4_bf16_avx2, uint16_t, sl_ld8_bf16, SL_LD_BF16)
SL_AXPY4_AVX2(sl_axpy4_i8_avx2, int8_t, sl_ld8_i8, SL_LD_I8)

SL_T_AVX2 static float sl_dot1_f32_avx2(const float* a, const float* b, long n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    long k = 0;
    for (; k + 16 <= n; k += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
    }
    float s = sl_hsum256(_mm256_add_ps(s0, s1));
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}

SL_T_AVX2 static void sl_dot4_i8b_avx2(const int8_t* w0, const int8_t* w1, const int8_t* w2,
                                       const int8_t* w3, const float* c0, const float* c1,
                                       const float* c2, const float* c3, const float* x,
                                       long h, long qb, float* out, sl_next nx) {
    __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
    for (long k0 = 0; k0 < h; k0 += qb) {
        __m256 b0 = _mm256_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
        for (long k = k0; k < k0 + qb; k += 8) {
            SL_PF4_AT(nx, int8_t, k);
            __m256 xv = _mm256_loadu_ps(x + k);
            b0 = _mm256_fmadd_ps(sl_ld8_i8(w0 + k), xv, b0);
            b1 = _mm256_fmadd_ps(sl_ld8_i8(w1 + k), xv, b1);
            b2 = _mm256_fmadd_ps(sl_ld8_i8(w2 + k), xv, b2);
            b3 = _mm256_fmadd_ps(sl_ld8_i8(w3 + k), xv, b3);
        }
        long b = k0 / qb;
        t0 = _mm256_fmadd_ps(b0, _mm256_set1_ps(c0[b]), t0);
        t1 = _mm256_fmadd_ps(b1, _mm256_set1_ps(c1[b]), t1);
        t2 = _mm256_fmadd_ps(b2, _mm256_set1_ps(c2[b]), t2);
        t3 = _mm256_fmadd_ps(b3, _mm256_set1_ps(c3[b]), t3);
    }
    out[0] = sl_hsum256(t0); out[1] = sl_hsum256(t1);
    out[2] = sl_hsum256(t2); out[3] = sl_hsum256(t3);
}

SL_T_AVX2 static void sl_axpy4_i8b_avx2(float* y, const int8_t* d0, const int8_t* d1,
                                        const int8_t* d2, const int8_t* d3, const float* c0,
                                        const float* c1, const float* c2, const float* c3,
                                        const float* a, long k0, long k1, long qb,
                                        sl_next nx) {
    for (long kb = k0; kb < k1; kb += qb) {
        long b = kb / qb;
        __m256 a0 = _mm256_set1_ps(a[0] * c0[b]), a1 = _mm256_set1_ps(a[1] * c1[b]),
               a2 = _mm256_set1_ps(a[2] * c2[b]), a3 = _mm256_set1_ps(a[3] * c3[b]);
        for (long k = kb; k < kb + qb; k += 8) {
            SL_PF4_AT(nx, int8_t, k);
            __m256 acc = _mm256_loadu_ps(y + k);
            acc = _mm256_fmadd_ps(sl_ld8_i8(d0 + k), a0, acc);
            acc = _mm256_fmadd_ps(sl_ld8_i8(d1 + k), a1, acc);
            acc = _mm256_fmadd_ps(sl_ld8_i8(d2 + k), a2, acc);
            acc = _mm256_fmadd_ps(sl_ld8_i8(d3 + k), a3, acc);
            _mm256_storeu_ps(y + k, acc);
        }
    }
}

/* ---------------------------------------------------------------- AVX-512 --------- */
#define SL_T_512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))
#define SL_T_BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))

/* masked loads: lanes past the mask read as 0 and touch no memory */
SL_T_512 static inline __m512 sl_ld16_f32(const float* p, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, p);
}
SL_T_512 static inline __m512 sl_ld16_bf16(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
SL_T_512 static inline __m512 sl_ld16_i8(const int8_t* p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

#define SL_DOT4_512(NAME, T, LD16)                                                        \
    SL_T_512 static void NAME(const T* w0, const T* w1, const T* w2, const T* w3,         \
                              const float* x, long h, float* out, sl_next nx) {           \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                       \
        for (long k = 0; k < h; k += 16) {                                                \
            SL_PF4_AT(nx, T, k);                                                          \
            __mmask16 m = h - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (h - k)) - 1); \
            __m512 xv = _mm512_maskz_loadu_ps(m, x + k);                                  \
            a0 = _mm512_fmadd_ps(LD16(w0 + k, m), xv, a0);                                \
            a1 = _mm512_fmadd_ps(LD16(w1 + k, m), xv, a1);                                \
            a2 = _mm512_fmadd_ps(LD16(w2 + k, m), xv, a2);                                \
            a3 = _mm512_fmadd_ps(LD16(w3 + k, m), xv, a3);                                \
        }                                                                                 \
        out[0] = _mm512_reduce_add_ps(a0); out[1] = _mm512_reduce_add_ps(a1);             \
        out[2] = _mm512_reduce_add_ps(a2); out[3] = _mm512_reduce_add_ps(a3);             \
    }
SL_DOT4_512(sl_dot4_f32_512, float, sl_ld16_f32)
SL_DOT4_512(sl_dot4_bf16_512, uint16_t, sl_ld16_bf16)

#define SL_AXPY4_512(NAME, T, LD16)                                                       \
    SL_T_512 static void NAME(float* y, const T* d0, const T* d1, const T* d2,            \
                              const T* d3, const float* a, long k0, long k1,              \
                              sl_next nx) {                                               \
        __m512 a0 = _mm512_set1_ps(a[0]), a1 = _mm512_set1_ps(a[1]),                      \
               a2 = _mm512_set1_ps(a[2]), a3 = _mm512_set1_ps(a[3]);                      \
        for (long k = k0; k < k1; k += 16) {                                              \
            SL_PF4_AT(nx, T, k);                                                          \
            __mmask16 m = k1 - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k1 - k)) - 1); \
            __m512 acc = _mm512_maskz_loadu_ps(m, y + k);                                 \
            acc = _mm512_fmadd_ps(LD16(d0 + k, m), a0, acc);                              \
            acc = _mm512_fmadd_ps(LD16(d1 + k, m), a1, acc);                              \
            acc = _mm512_fmadd_ps(LD16(d2 + k, m), a2, acc);                              \
            acc = _mm512_fmadd_ps(LD16(d3 + k, m), a3, acc);                              \
            _mm512_mask_storeu_ps(y + k, m, acc);                                         \
        }                                                                                 \
    }
SL_AXPY4_512(sl_axpy4_f32_512, float, sl_ld16_f32)
SL_AXPY4_512(sl_axpy4_bf16_512, uint16_t, sl_ld16_bf16)

SL_T_512 static float sl_dot1_f32_512(const float* a, const float* b, long n) {
    __m512 s = _mm512_setzero_ps();
    for (long k = 0; k < n; k += 16) {
        __mmask16 m = n - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - k)) - 1);
        s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), s);
    }
    return _mm512_reduce_add_ps(s);
}

SL_T_512 static inline __m512 sl_ld16_i8u(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
/* int8 rows, per-row scales (applied by the caller). The body takes 32 weights of each
 * row per step with plain loads; the tail is scalar. On Zen 4 the loop with a masked
 * load in every step (SL_DOT4_512 / SL_AXPY4_512) was the slower one: this way is
 * 1.18-1.27x faster over the cache at 30-50 % density on 3B shapes, 1.02-1.18x by index
 * (experiments/ab_builds.py --weights int8_row, two runs). */
SL_T_512 static void sl_dot4_i8_512(const int8_t* w0, const int8_t* w1, const int8_t* w2,
                                    const int8_t* w3, const float* x, long h, float* out,
                                    sl_next nx) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long k = 0;
    for (; k + 32 <= h; k += 32) {
        SL_PF4_AT(nx, int8_t, k);
        __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        a0 = _mm512_fmadd_ps(sl_ld16_i8u(w0 + k + 16), x1, _mm512_fmadd_ps(sl_ld16_i8u(w0 + k), x0, a0));
        a1 = _mm512_fmadd_ps(sl_ld16_i8u(w1 + k + 16), x1, _mm512_fmadd_ps(sl_ld16_i8u(w1 + k), x0, a1));
        a2 = _mm512_fmadd_ps(sl_ld16_i8u(w2 + k + 16), x1, _mm512_fmadd_ps(sl_ld16_i8u(w2 + k), x0, a2));
        a3 = _mm512_fmadd_ps(sl_ld16_i8u(w3 + k + 16), x1, _mm512_fmadd_ps(sl_ld16_i8u(w3 + k), x0, a3));
    }
    float s0 = _mm512_reduce_add_ps(a0), s1 = _mm512_reduce_add_ps(a1),
          s2 = _mm512_reduce_add_ps(a2), s3 = _mm512_reduce_add_ps(a3);
    for (; k < h; k++) { /* rows whose length is not a multiple of 32 */
        float xv = x[k];
        s0 += (float)w0[k] * xv; s1 += (float)w1[k] * xv;
        s2 += (float)w2[k] * xv; s3 += (float)w3[k] * xv;
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

/* per-row scales: each y element gets the same four fused multiply-adds in body and tail */
SL_T_512 static void sl_axpy4_i8_512(float* y, const int8_t* d0, const int8_t* d1,
                                     const int8_t* d2, const int8_t* d3, const float* a,
                                     long k0, long k1, sl_next nx) {
    __m512 a0 = _mm512_set1_ps(a[0]), a1 = _mm512_set1_ps(a[1]),
           a2 = _mm512_set1_ps(a[2]), a3 = _mm512_set1_ps(a[3]);
    long k = k0;
    for (; k + 16 <= k1; k += 16) {
        SL_PF4_AT(nx, int8_t, k);
        __m512 acc = _mm512_loadu_ps(y + k);
        acc = _mm512_fmadd_ps(sl_ld16_i8u(d0 + k), a0, acc);
        acc = _mm512_fmadd_ps(sl_ld16_i8u(d1 + k), a1, acc);
        acc = _mm512_fmadd_ps(sl_ld16_i8u(d2 + k), a2, acc);
        acc = _mm512_fmadd_ps(sl_ld16_i8u(d3 + k), a3, acc);
        _mm512_storeu_ps(y + k, acc);
    }
    for (; k < k1; k++) { /* the same fused multiply-adds, one element at a time */
        float acc = y[k];
        acc = __builtin_fmaf((float)d0[k], a[0], acc);
        acc = __builtin_fmaf((float)d1[k], a[1], acc);
        acc = __builtin_fmaf((float)d2[k], a[2], acc);
        acc = __builtin_fmaf((float)d3[k], a[3], acc);
        y[k] = acc;
    }
}

SL_T_512 static void sl_dot4_i8b_512(const int8_t* w0, const int8_t* w1, const int8_t* w2,
                                     const int8_t* w3, const float* c0, const float* c1,
                                     const float* c2, const float* c3, const float* x,
                                     long h, long qb, float* out, sl_next nx) {
    __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
    for (long kb = 0; kb < h; kb += qb) {
        __m512 b0 = _mm512_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
        for (long k = kb; k < kb + qb; k += 32) {
            SL_PF4_AT(nx, int8_t, k);
            __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
            b0 = _mm512_fmadd_ps(sl_ld16_i8u(w0 + k + 16), x1, _mm512_fmadd_ps(sl_ld16_i8u(w0 + k), x0, b0));
            b1 = _mm512_fmadd_ps(sl_ld16_i8u(w1 + k + 16), x1, _mm512_fmadd_ps(sl_ld16_i8u(w1 + k), x0, b1));
            b2 = _mm512_fmadd_ps(sl_ld16_i8u(w2 + k + 16), x1, _mm512_fmadd_ps(sl_ld16_i8u(w2 + k), x0, b2));
            b3 = _mm512_fmadd_ps(sl_ld16_i8u(w3 + k + 16), x1, _mm512_fmadd_ps(sl_ld16_i8u(w3 + k), x0, b3));
        }
        long b = kb / qb;
        t0 = _mm512_fmadd_ps(b0, _mm512_set1_ps(c0[b]), t0);
        t1 = _mm512_fmadd_ps(b1, _mm512_set1_ps(c1[b]), t1);
        t2 = _mm512_fmadd_ps(b2, _mm512_set1_ps(c2[b]), t2);
        t3 = _mm512_fmadd_ps(b3, _mm512_set1_ps(c3[b]), t3);
    }
    out[0] = _mm512_reduce_add_ps(t0); out[1] = _mm512_reduce_add_ps(t1);
    out[2] = _mm512_reduce_add_ps(t2); out[3] = _mm512_reduce_add_ps(t3);
}
SL_T_512 static void sl_axpy4_i8b_512(float* y, const int8_t* d0, const int8_t* d1,
                                      const int8_t* d2, const int8_t* d3, const float* c0,
                                      const float* c1, const float* c2, const float* c3,
                                      const float* a, long k0, long k1, long qb,
                                      sl_next nx) {
    for (long kb = k0; kb < k1; kb += qb) {
        long b = kb / qb;
        __m512 a0 = _mm512_set1_ps(a[0] * c0[b]), a1 = _mm512_set1_ps(a[1] * c1[b]),
               a2 = _mm512_set1_ps(a[2] * c2[b]), a3 = _mm512_set1_ps(a[3] * c3[b]);
        for (long k = kb; k < kb + qb; k += 16) {
            SL_PF4_AT(nx, int8_t, k);
            __m512 acc = _mm512_loadu_ps(y + k);
            acc = _mm512_fmadd_ps(sl_ld16_i8u(d0 + k), a0, acc);
            acc = _mm512_fmadd_ps(sl_ld16_i8u(d1 + k), a1, acc);
            acc = _mm512_fmadd_ps(sl_ld16_i8u(d2 + k), a2, acc);
            acc = _mm512_fmadd_ps(sl_ld16_i8u(d3 + k), a3, acc);
            _mm512_storeu_ps(y + k, acc);
        }
    }
}

/* bf16 dot products with vdpbf16ps: 32 weights of a row per instruction, x as bf16 pairs.
 * (The instruction treats bf16 subnormals as zero and rounds its fp32 sums to nearest.) */
SL_T_BF16 static void sl_dot4_bf16_dp(const uint16_t* w0, const uint16_t* w1,
                                      const uint16_t* w2, const uint16_t* w3,
                                      const uint16_t* xb, long h, float* out, sl_next nx) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long k = 0; k < h; k += 32) {
        SL_PF4_AT(nx, uint16_t, k);
        __mmask32 m = h - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (h - k)) - 1);
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xb + k);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w0 + k), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(m, w1 + k), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_loadu_epi16(m, w2 + k), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_loadu_epi16(m, w3 + k), xv);
    }
    out[0] = _mm512_reduce_add_ps(a0); out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2); out[3] = _mm512_reduce_add_ps(a3);
}

/* The bf16 down pass with vdpbf16ps. Two rows interleaved word by word (vpunpck{l,h}wd)
 * pair up with (a0, a1) as one bf16 pair, so one instruction adds both rows' terms to 16
 * outputs and no weight is widened: half the instructions per byte of weights.
 * In the kernels, against the widening loop (experiments/bench_loops.py --knob
 * bf16_down): 1.02-1.10x at 10 % density, where the rows come from L3, 0.97-1.02x at
 * 30-50 %, where the pass waits on memory, not on the widening.
 *
 * The unpacks work within 128-bit lanes, so each whole group of 32 columns (starting at
 * a multiple of 32 of the row) is kept in y permuted: slots 0-15 hold columns 0-3, 8-11,
 * 16-19, 24-27 of the group, slots 16-31 columns 4-7, 12-15, 20-23, 28-31.
 * sl_unpermute_bf16_dp puts them back once the pass is done. The caller's passes start at
 * multiples of 32; a last partial group (h not a multiple of 32) runs in natural order
 * with the widening loop's fused multiply-adds. a[] must hold bf16 values (the caller
 * rounds h), which makes taking their high halves exact. */
SL_T_BF16 static void sl_axpy4_bf16_dp(float* y, const uint16_t* d0, const uint16_t* d1,
                                       const uint16_t* d2, const uint16_t* d3, const float* a,
                                       long k0, long k1, sl_next nx) {
    uint32_t b[4];
    memcpy(b, a, sizeof b);
    __m512bh h01 = (__m512bh)_mm512_set1_epi32((int)((b[0] >> 16) | (b[1] & 0xffff0000u)));
    __m512bh h23 = (__m512bh)_mm512_set1_epi32((int)((b[2] >> 16) | (b[3] & 0xffff0000u)));
    long k = k0;
    for (; k + 32 <= k1; k += 32) {
        SL_PF4_AT(nx, uint16_t, k);
        __m512i r0 = _mm512_loadu_si512(d0 + k), r1 = _mm512_loadu_si512(d1 + k);
        __m512i r2 = _mm512_loadu_si512(d2 + k), r3 = _mm512_loadu_si512(d3 + k);
        __m512 lo = _mm512_loadu_ps(y + k), hi = _mm512_loadu_ps(y + k + 16);
        lo = _mm512_dpbf16_ps(lo, (__m512bh)_mm512_unpacklo_epi16(r0, r1), h01);
        hi = _mm512_dpbf16_ps(hi, (__m512bh)_mm512_unpackhi_epi16(r0, r1), h01);
        lo = _mm512_dpbf16_ps(lo, (__m512bh)_mm512_unpacklo_epi16(r2, r3), h23);
        hi = _mm512_dpbf16_ps(hi, (__m512bh)_mm512_unpackhi_epi16(r2, r3), h23);
        _mm512_storeu_ps(y + k, lo);
        _mm512_storeu_ps(y + k + 16, hi);
    }
    if (k < k1) sl_axpy4_bf16_512(y, d0, d1, d2, d3, a, k, k1, nx);
}

/* the natural column order of the whole 32-column groups in [k0, k1) (k0 a multiple of
 * 32) of a row that sl_axpy4_bf16_dp accumulated */
SL_T_BF16 static void sl_unpermute_bf16_dp(float* y, long k0, long k1) {
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29,
                                             30, 31);
    for (long k = k0; k + 32 <= k1; k += 32) {
        __m512 lo = _mm512_loadu_ps(y + k), hi = _mm512_loadu_ps(y + k + 16);
        _mm512_storeu_ps(y + k, _mm512_permutex2var_ps(lo, first, hi));
        _mm512_storeu_ps(y + k + 16, _mm512_permutex2var_ps(lo, second, hi));
    }
}
#endif /* SL_X86 */

/* ---------------------------------------------------------------- dispatch -------- */
/* xp: scratch of bsz*h uint16 (the dpbf16 path's x as bf16); NULL-safe for other paths */
/* warm the start of the next rows (the hardware prefetcher needs a few lines of a new
 * stream before it runs ahead) */
static inline void sl_prefetch_row(const void* p, long bytes) {
#if defined(__GNUC__) || defined(__clang__)
    const char* c = (const char*)p;
    for (long o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
#endif
}
__attribute__((unused)) static int sl_needs_xb(int is_bf16) { return is_bf16 && sl_isa == SL_AVX512BF16; }

__attribute__((unused)) static void sl_prep_xb(const float* x, long n, uint16_t* xb) {
    for (long k = 0; k < n; k++) xb[k] = sl_to_bf16(x[k]);
}

/* fp32 on AVX-512 CPUs: the 512-bit loops (1), or the 256-bit ones (0, benchmarks only:
 * _mlp._set_f32_512). On AMD EPYC (Zen 4, which splits 512-bit ops in two) the 512-bit
 * loops measured 0.99-1.08x, 1.04x at the median, against the 256-bit ones with the order
 * shuffled (experiments/bench_loops.py --knob f32_width); an earlier note here said the
 * 256-bit ones were 5-10 % faster, a measurement in a fixed order. */
static int sl_f32_512 = 1;
static inline void sl_dot4_f32(const float* w0, const float* w1, const float* w2,
                               const float* w3, const float* x, long h, float* out, sl_next nx) {
#if SL_X86
    if (sl_isa >= SL_AVX512 && sl_f32_512) { sl_dot4_f32_512(w0, w1, w2, w3, x, h, out, nx); return; }
    if (sl_isa >= SL_AVX2) { sl_dot4_f32_avx2(w0, w1, w2, w3, x, h, out, nx); return; }
#endif
    sl_dot4_f32_c(w0, w1, w2, w3, x, h, out, nx);
}
static inline void sl_dot4_bf16(const uint16_t* w0, const uint16_t* w1, const uint16_t* w2,
                                const uint16_t* w3, const float* x, const uint16_t* xb,
                                long h, float* out, sl_next nx) {
#if SL_X86
    if (sl_isa == SL_AVX512BF16) { sl_dot4_bf16_dp(w0, w1, w2, w3, xb, h, out, nx); return; }
    if (sl_isa == SL_AVX512) { sl_dot4_bf16_512(w0, w1, w2, w3, x, h, out, nx); return; }
    if (sl_isa == SL_AVX2) { sl_dot4_bf16_avx2(w0, w1, w2, w3, x, h, out, nx); return; }
#endif
    (void)xb;
    sl_dot4_bf16_c(w0, w1, w2, w3, x, h, out, nx);
}
static inline void sl_dot4_i8(const int8_t* w0, const int8_t* w1, const int8_t* w2,
                              const int8_t* w3, const float* x, long h, float* out, sl_next nx) {
#if SL_X86
    if (sl_isa >= SL_AVX512) { sl_dot4_i8_512(w0, w1, w2, w3, x, h, out, nx); return; }
    if (sl_isa == SL_AVX2) { sl_dot4_i8_avx2(w0, w1, w2, w3, x, h, out, nx); return; }
#endif
    sl_dot4_i8_c(w0, w1, w2, w3, x, h, out, nx);
}
static inline void sl_axpy4_f32(float* y, const float* d0, const float* d1, const float* d2,
                                const float* d3, const float* a, long k0, long k1, sl_next nx) {
#if SL_X86
    if (sl_isa >= SL_AVX512 && sl_f32_512) { sl_axpy4_f32_512(y, d0, d1, d2, d3, a, k0, k1, nx); return; }
    if (sl_isa >= SL_AVX2) { sl_axpy4_f32_avx2(y, d0, d1, d2, d3, a, k0, k1, nx); return; }
#endif
    sl_axpy4_f32_c(y, d0, d1, d2, d3, a, k0, k1, nx);
}
/* benchmarks only (_mlp._set_bf16_down_dp): 0 runs the bf16 down pass with widening FMAs
 * on the avx512bf16 path too */
static int sl_bf16_down_dp = 1;
/* whether the bf16 down pass leaves y's 32-column groups permuted (sl_axpy4_bf16_dp) */
__attribute__((unused)) static int sl_bf16_down_permutes(void) {
    return SL_X86 && sl_isa == SL_AVX512BF16 && sl_bf16_down_dp;
}
__attribute__((unused)) static void sl_bf16_down_finish(float* y, long k0, long k1) {
#if SL_X86
    if (sl_bf16_down_permutes()) sl_unpermute_bf16_dp(y, k0, k1);
#else
    (void)y; (void)k0; (void)k1;
#endif
}
/* h as the bf16 value a bf16 model would feed its down projection (round to nearest even) */
static inline float sl_round_bf16(float f) { return sl_bf16(sl_to_bf16(f)); }

static inline void sl_axpy4_bf16(float* y, const uint16_t* d0, const uint16_t* d1,
                                 const uint16_t* d2, const uint16_t* d3, const float* a,
                                 long k0, long k1, sl_next nx) {
#if SL_X86
    if (sl_bf16_down_permutes()) { sl_axpy4_bf16_dp(y, d0, d1, d2, d3, a, k0, k1, nx); return; }
    if (sl_isa >= SL_AVX512) { sl_axpy4_bf16_512(y, d0, d1, d2, d3, a, k0, k1, nx); return; }
    if (sl_isa == SL_AVX2) { sl_axpy4_bf16_avx2(y, d0, d1, d2, d3, a, k0, k1, nx); return; }
#endif
    sl_axpy4_bf16_c(y, d0, d1, d2, d3, a, k0, k1, nx);
}
static inline void sl_axpy4_i8(float* y, const int8_t* d0, const int8_t* d1, const int8_t* d2,
                               const int8_t* d3, const float* a, long k0, long k1, sl_next nx) {
#if SL_X86
    if (sl_isa >= SL_AVX512) { sl_axpy4_i8_512(y, d0, d1, d2, d3, a, k0, k1, nx); return; }
    if (sl_isa == SL_AVX2) { sl_axpy4_i8_avx2(y, d0, d1, d2, d3, a, k0, k1, nx); return; }
#endif
    sl_axpy4_i8_c(y, d0, d1, d2, d3, a, k0, k1, nx);
}
static inline void sl_dot4_i8b(const int8_t* w0, const int8_t* w1, const int8_t* w2,
                               const int8_t* w3, const float* c0, const float* c1,
                               const float* c2, const float* c3, const float* x, long h,
                               long qb, float* out, sl_next nx) {
#if SL_X86
    if (sl_isa >= SL_AVX512) { sl_dot4_i8b_512(w0, w1, w2, w3, c0, c1, c2, c3, x, h, qb, out, nx); return; }
    if (sl_isa == SL_AVX2) { sl_dot4_i8b_avx2(w0, w1, w2, w3, c0, c1, c2, c3, x, h, qb, out, nx); return; }
#endif
    sl_dot4_i8b_c(w0, w1, w2, w3, c0, c1, c2, c3, x, h, qb, out, nx);
}
static inline void sl_axpy4_i8b(float* y, const int8_t* d0, const int8_t* d1, const int8_t* d2,
                                const int8_t* d3, const float* c0, const float* c1,
                                const float* c2, const float* c3, const float* a, long k0,
                                long k1, long qb, sl_next nx) {
#if SL_X86
    if (sl_isa >= SL_AVX512) { sl_axpy4_i8b_512(y, d0, d1, d2, d3, c0, c1, c2, c3, a, k0, k1, qb, nx); return; }
    if (sl_isa == SL_AVX2) { sl_axpy4_i8b_avx2(y, d0, d1, d2, d3, c0, c1, c2, c3, a, k0, k1, qb, nx); return; }
#endif
    sl_axpy4_i8b_c(y, d0, d1, d2, d3, c0, c1, c2, c3, a, k0, k1, qb, nx);
}
static inline float sl_dot1_f32(const float* a, const float* b, long n) {
#if SL_X86
    if (sl_isa >= SL_AVX512) return sl_dot1_f32_512(a, b, n);
    if (sl_isa == SL_AVX2) return sl_dot1_f32_avx2(a, b, n);
#endif
    return sl_dot1_f32_c(a, b, n);
}

#endif /* SL_KERNELS_H */
