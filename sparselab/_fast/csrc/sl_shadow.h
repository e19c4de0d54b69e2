/* The shadow score of a gated MLP: approximate h = act(gate . x) * (up . x) from 4-bit
 * group-quantized copies of gate and up, one compiled pass per decode step.
 *
 *     sl_shadow_prep_x(x, h, group, xq, sx, corr);      // x -> int8 per group, once per row
 *     sl_shadow_dot2(codes, scales, xq, sx, corr, h, group, &g, &u);  // one neuron's pair
 *
 * Layout of one neuron (``sparselab._fast.shadow.pack_shadow`` writes it): ``codes``
 * uint8 ``[2, h/2]`` (the gate row, then the up row); in each group of ``group`` weights
 * (``group`` a multiple of 64 is not required, only even) byte ``k`` of the group holds
 * weight ``k`` in its low nibble and weight ``k + group/2`` in its high nibble, each as
 * ``code + 8`` (codes are in [-8, 7]); ``scales`` float16 bits ``[2, h/group]``.
 *
 * x is quantized per group of ``group`` channels: ``sx[g] = max |x| / 127``,
 * ``xq = round(x / sx)`` (int8, |xq| <= 127). A row's score is then
 * ``sum_g scale[g] * sx[g] * sum_k code_k * xq_k``, the inner sum exact in int32
 * (``sum_k (code_k + 8) * xq_k - 8 * sum_k xq_k``; ``corr[g]`` holds ``8 * sum_k xq_k``),
 * the outer in float32: the float64 reference is the same formula over the dequantized
 * weights and the dequantized x.
 *
 * Paths: portable C (any CPU); avx2 (u8 x s8 ``vpmaddubsw`` dot products, also run on
 * the avx512 paths: one group's 64 nibbles are one 256-bit load of 32 bytes). F16C
 * converts the scales; every AVX2 CPU has it (sl_isa_supported checks it too).
 */
#ifndef SL_SHADOW_H
#define SL_SHADOW_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "sl_kernels.h"

/* float16 bits -> float32 (exact; subnormals, inf and NaN kept) */
static inline float sl_half_to_float(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* x [h] -> xq [h] int8, sx [h/group] scales, corr [h/group] = 8 * sum of the group's xq.
 * A group of zeros gets sx = 0 and xq = 0. */
static inline void sl_shadow_prep_x(const float* x, long h, long group, int8_t* xq,
                                    float* sx, int32_t* corr) {
    for (long g0 = 0, gi = 0; g0 < h; g0 += group, gi++) {
        float m = 0.0f;
        for (long k = 0; k < group; k++) {
            float a = fabsf(x[g0 + k]);
            m = a > m ? a : m;
        }
        float s = m / 127.0f;
        float inv = s > 0.0f ? 1.0f / s : 0.0f;
        int32_t sum = 0;
        for (long k = 0; k < group; k++) {
            float v = nearbyintf(x[g0 + k] * inv);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            xq[g0 + k] = (int8_t)v;
            sum += (int32_t)xq[g0 + k];
        }
        sx[gi] = s;
        corr[gi] = 8 * sum;
    }
}

/* one row: sum_g scale[g] * sx[g] * (sum_k (nibble_k) * xq_k - corr[g]) */
static inline float sl_shadow_row_c(const uint8_t* codes, const uint16_t* scales,
                                    const int8_t* xq, const float* sx, const int32_t* corr,
                                    long h, long group) {
    long half = group / 2;
    float acc = 0.0f;
    for (long g0 = 0, gi = 0; g0 < h; g0 += group, gi++) {
        const uint8_t* c = codes + g0 / 2;
        int32_t d = 0;
        for (long k = 0; k < half; k++) {
            d += (int32_t)(c[k] & 0x0f) * xq[g0 + k];
            d += (int32_t)(c[k] >> 4) * xq[g0 + half + k];
        }
        acc += sl_half_to_float(scales[gi]) * sx[gi] * (float)(d - corr[gi]);
    }
    return acc;
}

static void sl_shadow_dot2_c(const uint8_t* codes, const uint16_t* scales, const int8_t* xq,
                             const float* sx, const int32_t* corr, long h, long group,
                             float* g, float* u) {
    long ng = h / group;
    *g = sl_shadow_row_c(codes, scales, xq, sx, corr, h, group);
    *u = sl_shadow_row_c(codes + h / 2, scales + ng, xq, sx, corr, h, group);
}

#if SL_X86
#define SL_T_AVX2_F16C __attribute__((target("avx2,fma,f16c")))

/* one group of 64 weights of one row: 8 int32 lanes whose sum is sum_k nibble_k * xq_k */
SL_T_AVX2_F16C static inline __m256i sl_shadow_g64_avx2(const uint8_t* c, __m256i x0,
                                                        __m256i x1, __m256i low,
                                                        __m256i ones) {
    __m256i v = _mm256_loadu_si256((const __m256i*)c);
    __m256i lo = _mm256_and_si256(v, low);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
    return _mm256_madd_epi16(p, ones);
}

/* gate and up of one neuron (group == 64: one 32-byte load per group and row) */
SL_T_AVX2_F16C static void sl_shadow_dot2_avx2(const uint8_t* codes, const uint16_t* scales,
                                               const int8_t* xq, const float* sx,
                                               const int32_t* corr, long h, float* g,
                                               float* u) {
    const long ng = h / 64;
    const uint8_t* cu = codes + h / 2;
    const uint16_t* su = scales + ng;
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 ag = _mm256_setzero_ps(), au = ag;
    float cg = 0.0f, cu_ = 0.0f;
    for (long gi = 0; gi < ng; gi++) {
        __m256i x0 = _mm256_loadu_si256((const __m256i*)(xq + gi * 64));
        __m256i x1 = _mm256_loadu_si256((const __m256i*)(xq + gi * 64 + 32));
        __m256i qg = sl_shadow_g64_avx2(codes + gi * 32, x0, x1, low, ones);
        __m256i qu = sl_shadow_g64_avx2(cu + gi * 32, x0, x1, low, ones);
        float wg = _cvtsh_ss(scales[gi]) * sx[gi], wu = _cvtsh_ss(su[gi]) * sx[gi];
        ag = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qg), _mm256_set1_ps(wg), ag);
        au = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qu), _mm256_set1_ps(wu), au);
        cg += wg * (float)corr[gi];
        cu_ += wu * (float)corr[gi];
    }
    *g = sl_hsum256(ag) - cg;
    *u = sl_hsum256(au) - cu_;
}
#endif

/* gate and up scores of one neuron on the current path; the vector path needs group 64 */
static inline void sl_shadow_dot2(const uint8_t* codes, const uint16_t* scales,
                                  const int8_t* xq, const float* sx, const int32_t* corr,
                                  long h, long group, float* g, float* u) {
#if SL_X86
    if (sl_isa >= SL_AVX2 && group == 64) {
        sl_shadow_dot2_avx2(codes, scales, xq, sx, corr, h, g, u);
        return;
    }
#endif
    sl_shadow_dot2_c(codes, scales, xq, sx, corr, h, group, g, u);
}

#endif /* SL_SHADOW_H */
