/* Integer dot products of int8 weight rows with x rounded to int8, four rows at a time.
 *
 *     sl_quant_x_i8(x, h, 64, xq, sx);              // once per call and batch row
 *     sl_abs_i8(xq, h64, xa);                        // |xq| as u8 (the u8 operand)
 *     sl_dot4_i8q(w0, w1, w2, w3, c0, c1, c2, c3, xq, xa, sx, h, qb, out, nx);
 *
 * x is quantized per group of 64 channels: ``sx[g] = max |x| / 127`` and
 * ``xq = round(x / sx[g])`` (|xq| <= 127; a group of zeros gets sx = 0, xq = 0); the
 * buffers are padded with zeros to a whole group. Row r's result is
 *
 *     per-row weights (c0 == NULL):  sum_g sx[g] * D_g            (the caller applies the row scale)
 *     blocks of qb (c_i[b] scales):  sum_g sx[g] * (c[64g / qb] * D_g,lo + c[(64g + 32) / qb] * D_g,hi)
 *
 * (qb = 32, 64, 128 or 256; from 64 on both halves share a scale) with
 * ``D = sum_k xq[k] * w[k]`` over the group (lo / hi: its two halves of 32), exact in
 * int32; the sums over groups are float32. The float64 reference is the same formula over
 * the dequantized weights and the dequantized x.
 *
 * Why: widening int8 weights to float costs three vector operations per 16 weights, which
 * made the int8 kernels compute-bound at about a quarter of the memory bandwidth; an
 * integer dot product takes 64 weights per instruction. The u8 x s8 instructions
 * (vpdpbusd, vpmaddubsw) want one unsigned operand: that is |xq|, and the sign of xq moves
 * onto w (|w| <= 127 as quantize_int8 writes it, so negating never overflows, and
 * vpmaddubsw's pair sums, at most 2 * 127 * 127, never saturate).
 *
 * Paths: vpdpbusd on 512-bit vectors (the avx512 paths of a CPU with AVX512-VNNI),
 * vpmaddubsw + vpmaddwd on 256-bit (avx2, and avx512 without VNNI), portable C.
 * Each row's sum is one thread's, so results do not depend on the thread count.
 */
#ifndef SL_QDOT_H
#define SL_QDOT_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "sl_kernels.h"

#define SL_QG 64

/* x [h] -> xq [h] int8 and sx [ceil(h / group)] scales, per group of `group` channels (the
 * last group may be short). Compiled without fast-math (the extension has it): 1 / (m / 127)
 * must not become 127 / m, or a value on a rounding tie rounds otherwise than
 * quant.round_x_int8 says (seen with bf16 x, whose few mantissa bits make ties common). */
#pragma GCC push_options
#pragma GCC optimize ("no-fast-math")
static void sl_quant_x_i8(const float* x, long h, long group, int8_t* xq, float* sx) {
    for (long g0 = 0, gi = 0; g0 < h; g0 += group, gi++) {
        long g1 = g0 + group < h ? g0 + group : h;
        float m = 0.0f;
        for (long k = g0; k < g1; k++) {
            float a = fabsf(x[k]);
            m = a > m ? a : m;
        }
        float s = m / 127.0f;
        float inv = s > 0.0f ? 1.0f / s : 0.0f;
        for (long k = g0; k < g1; k++) {
            float v = nearbyintf(x[k] * inv);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            xq[k] = (int8_t)v;
        }
        sx[gi] = s;
    }
}
#pragma GCC pop_options

static inline void sl_abs_i8(const int8_t* xq, long n, uint8_t* xa) {
    for (long k = 0; k < n; k++) xa[k] = (uint8_t)(xq[k] < 0 ? -xq[k] : xq[k]);
}

/* ---------------------------------------------------------------- portable C ------ */
static void sl_dot4_i8q_c(const int8_t* const* w, const float* const* c, const int8_t* xq,
                          const float* sx, long h, long qb, float* out, sl_next nx) {
    for (int r = 0; r < 4; r++) {
        float acc = 0.0f;
        for (long g0 = 0, gi = 0; g0 < h; g0 += SL_QG, gi++) {
            if (r == 0) SL_PF4_RANGE(nx, int8_t, g0, g0 + SL_QG < h ? g0 + SL_QG : h);
            int32_t d[2] = {0, 0};
            for (long k = g0; k < g0 + SL_QG && k < h; k++)
                d[(k - g0) >= 32] += (int32_t)w[r][k] * (int32_t)xq[k];
            if (c[0] == NULL) {
                acc += sx[gi] * (float)(d[0] + d[1]);
            } else {
                float part = c[r][g0 / qb] * (float)d[0];
                if (g0 + 32 < h) part += c[r][(g0 + 32) / qb] * (float)d[1];
                acc += sx[gi] * part;
            }
        }
        out[r] = acc;
    }
}

#if SL_X86
#define SL_T_VNNI512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))

/* ---------------------------------------------------------------- AVX2 ------------ */
/* 32 weights per step (half a group, or one block of 32): vpsignb moves x's sign onto w,
 * vpmaddubsw + vpmaddwd give 8 int32 lanes of 4-weight sums, converted and scaled. */
SL_T_AVX2 static inline __m256i sl_qdot32_avx2(const int8_t* w, __m256i xs, __m256i xa,
                                               __m256i ones) {
    __m256i ws = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)w), xs);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(xa, ws), ones);
}

SL_T_AVX2 static void sl_dot4_i8q_avx2(const int8_t* const* w, const float* const* c,
                                       const int8_t* xq, const uint8_t* xa, const float* sx,
                                       long h, long qb, float* out, sl_next nx) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    long k = 0;
    for (; k + 32 <= h; k += 32) {
        SL_PF4_AT(nx, int8_t, k);
        __m256i xs = _mm256_loadu_si256((const __m256i*)(xq + k));
        __m256i xv = _mm256_loadu_si256((const __m256i*)(xa + k));
        long gi = k / SL_QG;
        for (int r = 0; r < 4; r++) {
            __m256i d = sl_qdot32_avx2(w[r] + k, xs, xv, ones);
            float s = c[0] == NULL ? sx[gi] : sx[gi] * c[r][k / qb];
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = sl_hsum256(acc[r]);
    if (k < h) { /* per-row weights of a length that is not a multiple of 32 */
        for (int r = 0; r < 4; r++) {
            int32_t d = 0;
            for (long j = k; j < h; j++) d += (int32_t)w[r][j] * (int32_t)xq[j];
            out[r] += sx[k / SL_QG] * (float)d;
        }
    }
}

/* ---------------------------------------------------------------- AVX-512 VNNI ---- */
/* 64 weights (one x group) per step: a masked subtract negates w where x < 0, one
 * vpdpbusd gives 16 int32 lanes of 4-weight sums; lanes 0-7 are the group's first half. */
SL_T_VNNI512 static void sl_dot4_i8q_vnni(const int8_t* const* w, const float* const* c,
                                          const int8_t* xq, const uint8_t* xa,
                                          const float* sx, long h, long qb, float* out,
                                          sl_next nx) {
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (long k = 0; k < h; k += SL_QG) {
        SL_PF4_AT(nx, int8_t, k);
        __mmask64 m = h - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (h - k)) - 1);
        __m512i xv = _mm512_loadu_si512((const void*)(xa + k)); /* padded to a whole group */
        __mmask64 neg = _mm512_movepi8_mask(_mm512_loadu_si512((const void*)(xq + k)));
        long gi = k / SL_QG;
        __m512 s = _mm512_set1_ps(sx[gi]);
        for (int r = 0; r < 4; r++) {
            __m512i wv = _mm512_maskz_loadu_epi8(m, w[r] + k);
            wv = _mm512_mask_sub_epi8(wv, neg, zero, wv);
            __m512 d = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, xv, wv));
            __m512 sc = s;
            if (c[0] != NULL && qb >= SL_QG) {
                /* blocks of 64 or more: one weight scale for the whole group */
                sc = _mm512_mul_ps(_mm512_set1_ps(c[r][k / qb]), s);
            } else if (c[0] != NULL) {
                /* blocks of 32: lanes 0-7 take the scale of block 2g, lanes 8-15 of 2g + 1 */
                float hi = k + 32 < h ? c[r][2 * gi + 1] : 0.0f;
                __m512d lo = _mm512_castps_pd(_mm512_set1_ps(c[r][2 * gi]));
                __m512 cb = _mm512_castpd_ps(
                    _mm512_insertf64x4(lo, _mm256_castps_pd(_mm256_set1_ps(hi)), 1));
                sc = _mm512_mul_ps(cb, s);
            }
            acc[r] = _mm512_fmadd_ps(d, sc, acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

static int sl_cpu_vnni = -1;
static inline int sl_has_avx512vnni(void) {
    if (sl_cpu_vnni < 0) {
        __builtin_cpu_init();
        sl_cpu_vnni = __builtin_cpu_supports("avx512vnni") ? 1 : 0;
    }
    return sl_cpu_vnni;
}
#endif /* SL_X86 */

/* ---------------------------------------------------------------- dispatch -------- */
/* Four rows' sums (see the top of this file). c0..c3: the rows' scales per block of 32, or
 * all NULL for per-row weights. xq, xa: padded to a whole group of 64. */
static inline void sl_dot4_i8q(const int8_t* w0, const int8_t* w1, const int8_t* w2,
                               const int8_t* w3, const float* c0, const float* c1,
                               const float* c2, const float* c3, const int8_t* xq,
                               const uint8_t* xa, const float* sx, long h, long qb,
                               float* out, sl_next nx) {
    const int8_t* w[4] = {w0, w1, w2, w3};
    const float* c[4] = {c0, c1, c2, c3};
#if SL_X86
    if (sl_isa >= SL_AVX512 && sl_has_avx512vnni()) {
        sl_dot4_i8q_vnni(w, c, xq, xa, sx, h, qb, out, nx);
        return;
    }
    /* blocks need h % qb == 0 (the format guarantees it) */
    if (sl_isa >= SL_AVX2) { sl_dot4_i8q_avx2(w, c, xq, xa, sx, h, qb, out, nx); return; }
#endif
    (void)xa;
    sl_dot4_i8q_c(w, c, xq, sx, h, qb, out, nx);
}

/* the name of the path sl_dot4_i8q takes on this CPU at the current ISA */
__attribute__((unused)) static const char* sl_qdot_path(void) {
#if SL_X86
    if (sl_isa >= SL_AVX512 && sl_has_avx512vnni()) return "vpdpbusd";
    if (sl_isa >= SL_AVX2) return "vpmaddubsw";
#endif
    return "portable";
}

#endif /* SL_QDOT_H */
