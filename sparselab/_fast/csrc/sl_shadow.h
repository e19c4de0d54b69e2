/* The shadow score of a gated MLP: approximate h = act(gate . x) * (up . x) from 4-bit
 * group-quantized copies of gate and up, one compiled pass per decode step.
 *
 *     sl_shadow_prep_x(x, h, group, xq, sx, corr);      // x -> int8 per group, once per row
 *     sl_shadow_block(codes, scales, xq, sx, corr, h / 64, g, u);    // 8 neurons' pairs
 *
 * Layout (``sparselab._fast.shadow.pack_shadow`` writes it), group 64, neurons in
 * blocks of 8 (the last block padded with zero weights): per block the gate rows, then
 * the up rows, each ``[h/64 groups][8 chunks][8 neurons][4 bytes]``: byte ``t`` of chunk
 * ``c`` of neuron ``j`` holds weight ``4c + t`` of the group in its low nibble and weight
 * ``32 + 4c + t`` in its high nibble, each as ``code + 8`` (codes are in [-8, 7]); then
 * float16 scales ``[2][h/64][8 neurons]``. So one 32-byte load gives 4 weights of each of
 * 8 neurons, and lane j of a vector accumulates neuron j.
 *
 * x is quantized per group of ``group`` channels: ``sx[g] = max |x| / 127``,
 * ``xq = round(x / sx)`` (int8, |xq| <= 127). A row's score is then
 * ``sum_g scale[g] * sx[g] * sum_k code_k * xq_k``, the inner sum exact in int32
 * (``sum_k (code_k + 8) * xq_k - 8 * sum_k xq_k``; ``corr[g]`` holds ``8 * sum_k xq_k``),
 * the outer in float32: the float64 reference is the same formula over the dequantized
 * weights and the dequantized x.
 *
 * Paths: portable C (any CPU); avx2 (u8 x s8 ``vpmaddubsw`` dot products); the avx512
 * paths: ``vpdpbusd`` (256-bit) where the CPU has AVX512-VNNI, else as avx2. F16C
 * converts the scales; every AVX2 CPU has it (sl_isa_supported checks it too).
 */
#ifndef SL_SHADOW_H
#define SL_SHADOW_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "sl_kernels.h"
#include "sl_qdot.h"

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

/* x [h] -> xq [h] int8, sx [h/group] scales (sl_quant_x_i8, as the int8 MLP kernels), and
 * corr [h/group] = 8 * sum of the group's xq. A group of zeros gets sx = 0 and xq = 0. */
static inline void sl_shadow_prep_x(const float* x, long h, long group, int8_t* xq,
                                    float* sx, int32_t* corr) {
    sl_quant_x_i8(x, h, group, xq, sx);
    for (long g0 = 0, gi = 0; g0 < h; g0 += group, gi++) {
        int32_t sum = 0;
        for (long k = g0; k < g0 + group; k++) sum += (int32_t)xq[k];
        corr[gi] = 8 * sum;
    }
}

/* one block of 8 neurons on the portable path: g[j], u[j] of neuron j of the block */
static void sl_shadow_block_c(const uint8_t* codes, const uint16_t* scales, const int8_t* xq,
                              const float* sx, const int32_t* corr, long ng, float* g,
                              float* u) {
    for (int r = 0; r < 2; r++) {
        const uint8_t* c = codes + r * ng * 256;
        const uint16_t* s = scales + r * ng * 8;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (long gi = 0; gi < ng; gi++) {
            int32_t d[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            const uint8_t* cg = c + gi * 256;
            const int8_t* xg = xq + gi * 64;
            for (int ch = 0; ch < 8; ch++)
                for (int j = 0; j < 8; j++)
                    for (int t = 0; t < 4; t++) {
                        uint8_t b = cg[ch * 32 + j * 4 + t];
                        d[j] += (int32_t)(b & 0x0f) * xg[ch * 4 + t] +
                                (int32_t)(b >> 4) * xg[32 + ch * 4 + t];
                    }
            for (int j = 0; j < 8; j++)
                acc[j] += sl_half_to_float(s[gi * 8 + j]) * sx[gi] * (float)(d[j] - corr[gi]);
        }
        float* out = r ? u : g;
        for (int j = 0; j < 8; j++) out[j] = acc[j];
    }
}

#if SL_X86
#define SL_T_AVX2_F16C __attribute__((target("avx2,fma,f16c")))
#define SL_T_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))

static inline int32_t sl_ld_i32(const int8_t* p) { int32_t v; memcpy(&v, p, sizeof v); return v; }

/* the block on 256-bit vectors: lane j accumulates neuron j. DOT(acc, u8 weights, s8 x
 * broadcast) adds 4-element dot products per lane: vpmaddubsw + vpmaddwd on AVX2,
 * vpdpbusd with VNNI. Four independent integer chains per group (gate / up x low / high
 * nibbles), one float FMA per row and group. */
#define SL_SHADOW_BLOCK(NAME, TARGET, DOT)                                                  \
    TARGET static void NAME(const uint8_t* codes, const uint16_t* scales, const int8_t* xq, \
                            const float* sx, const int32_t* corr, long ng, float* g,         \
                            float* u) {                                                     \
        const __m256i low = _mm256_set1_epi8(0x0f);                                         \
        const __m256i ones = _mm256_set1_epi16(1);                                          \
        (void)ones;                                                                         \
        const uint8_t* cu = codes + ng * 256;                                               \
        const uint16_t* su = scales + ng * 8;                                               \
        __m256 ag = _mm256_setzero_ps(), au = ag;                                           \
        for (long gi = 0; gi < ng; gi++) {                                                  \
            __m256i g0 = _mm256_setzero_si256(), g1 = g0, u0 = g0, u1 = g0;                 \
            const uint8_t* cg = codes + gi * 256;                                           \
            const uint8_t* cv = cu + gi * 256;                                              \
            const int8_t* xg = xq + gi * 64;                                                \
            /* the next block's lines at this group (it is 2 * ng * 256 bytes on): the     \
               shadow weights come from DRAM, evicted by the exact rows of every layer */  \
            for (int l = 0; l < 256; l += 64) {                                             \
                _mm_prefetch((const char*)(cg + 4 * ng * 256 + l), _MM_HINT_T0);            \
                _mm_prefetch((const char*)(cv + 4 * ng * 256 + l), _MM_HINT_T0);            \
            }                                                                               \
            for (int ch = 0; ch < 8; ch++) {                                                \
                __m256i xl = _mm256_set1_epi32(sl_ld_i32(xg + ch * 4));                     \
                __m256i xh = _mm256_set1_epi32(sl_ld_i32(xg + 32 + ch * 4));                \
                __m256i vg = _mm256_loadu_si256((const __m256i*)(cg + ch * 32));            \
                __m256i vu = _mm256_loadu_si256((const __m256i*)(cv + ch * 32));            \
                g0 = DOT(g0, _mm256_and_si256(vg, low), xl);                                \
                g1 = DOT(g1, _mm256_and_si256(_mm256_srli_epi16(vg, 4), low), xh);          \
                u0 = DOT(u0, _mm256_and_si256(vu, low), xl);                                \
                u1 = DOT(u1, _mm256_and_si256(_mm256_srli_epi16(vu, 4), low), xh);          \
            }                                                                               \
            __m256 s = _mm256_set1_ps(sx[gi]);                                              \
            __m256i c = _mm256_set1_epi32(corr[gi]);                                        \
            __m256 wg = _mm256_mul_ps(                                                      \
                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(scales + gi * 8))), s);    \
            __m256 wu = _mm256_mul_ps(                                                      \
                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(su + gi * 8))), s);        \
            ag = _mm256_fmadd_ps(                                                           \
                _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_add_epi32(g0, g1), c)), wg, ag); \
            au = _mm256_fmadd_ps(                                                           \
                _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_add_epi32(u0, u1), c)), wu, au); \
        }                                                                                   \
        _mm256_storeu_ps(g, ag);                                                            \
        _mm256_storeu_ps(u, au);                                                            \
    }

#define SL_DOT_AVX2(acc, w, x) \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones))
#define SL_DOT_VNNI(acc, w, x) _mm256_dpbusd_epi32(acc, w, x)

SL_SHADOW_BLOCK(sl_shadow_block_avx2, SL_T_AVX2_F16C, SL_DOT_AVX2)
SL_SHADOW_BLOCK(sl_shadow_block_vnni, SL_T_VNNI, SL_DOT_VNNI)
#endif

/* g[8], u[8] of one block of 8 neurons on the current path (vpdpbusd on the avx512 paths
 * of a CPU with AVX512-VNNI, vpmaddubsw on avx2, plain C on portable) */
static inline void sl_shadow_block(const uint8_t* codes, const uint16_t* scales,
                                   const int8_t* xq, const float* sx, const int32_t* corr,
                                   long ng, float* g, float* u) {
#if SL_X86
    if (sl_isa >= SL_AVX512) {
        if (sl_has_avx512vnni()) { sl_shadow_block_vnni(codes, scales, xq, sx, corr, ng, g, u); return; }
    }
    if (sl_isa >= SL_AVX2) { sl_shadow_block_avx2(codes, scales, xq, sx, corr, ng, g, u); return; }
#endif
    sl_shadow_block_c(codes, scales, xq, sx, corr, ng, g, u);
}

#endif /* SL_SHADOW_H */
