/* The vector layer of decode.c on aarch64 (AdvSIMD / NEON, 128-bit): VW = 4 fp32 lanes, `vi` = 4 int32 lanes fed
 * by 8 int16 (pairwise int16 multiply-add, as VPMADDWD). Included by decode.c in place of its x86 layers; every
 * kernel above the layer is the same source, so the NEON kernels compute what the AVX2 ones compute, with a
 * narrower vector (the summation trees differ in width only).
 *
 * Semantics kept from x86 where results depend on them:
 * - vmax / vmin return the second operand when either is NaN (MAXPS / MINPS), not NaN (FMAX);
 * - vround and the int16 conversion round to nearest, ties to even (FRINTN / FCVTNS);
 * - the exact int16 dot products use SMULL + SMULL2 + ADDP: lane i is the sum of products 2i and 2i+1;
 * - int4 rows against int8 x: lane i sums bytes 4i .. 4i+3 (VPDPBUSD's lanes), by SDOT where the compiler targets
 *   `dotprod`, else SMULL + SMLAL + two pairwise adds (exact integers either way).
 * int8 rows keep x in int16 (finer than x's own bf16 rounding), which SDOT / SMMLA cannot take. bf16 weights are widened by a shift (exact) and multiplied in
 * fp32; where the compiler targets the bf16 extension (`__ARM_FEATURE_BF16_VECTOR_ARITHMETIC`: -mcpu=native on a
 * CPU with it, or +bf16) the bf16 GEMVs multiply bf16 pairs with BFDOT instead (VEC_BFDOT), as AVX512-BF16's
 * VDPBF16PS does on x86: the products are exact, the pair sums are rounded by the instruction's own rules
 * (round-to-odd, denormals flushed), so within the bf16 tolerances, not bitwise the fp32 FMAs. */
#ifndef ERNIE45_VEC_NEON_H
#define ERNIE45_VEC_NEON_H
#include <arm_neon.h>

#define VW 4
typedef float32x4_t vf;
static inline vf vzero(void) { return vdupq_n_f32(0.f); }
#define vset1 vdupq_n_f32
#define vload vld1q_f32
#define vstore vst1q_f32
static inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }  /* a * b + c, one rounding */
static inline vf vfnma(vf a, vf b, vf c) { return vfmsq_f32(c, a, b); } /* c - a * b, one rounding */
#define vadd vaddq_f32
#define vsub vsubq_f32
#define vmul vmulq_f32
#define vdiv vdivq_f32
static inline vf vmax(vf a, vf b) { return vbslq_f32(vcgtq_f32(a, b), a, b); } /* a > b ? a : b (MAXPS) */
static inline vf vmin(vf a, vf b) { return vbslq_f32(vcltq_f32(a, b), a, b); } /* a < b ? a : b (MINPS) */

/* the sum of v's lanes as (x0 + x1) + (x2 + x3): the tree of vsum_lanes, so vsum1 is bitwise one of its lanes */
static inline float vsum1(vf v) {
    float32x2_t p = vpadd_f32(vget_low_f32(v), vget_high_f32(v)); /* x0 + x1, x2 + x3 */
    return vget_lane_f32(p, 0) + vget_lane_f32(p, 1);
}
static inline float vhsum(vf a) { return vsum1(a); }
/* lane i of the result = the sum of the lanes of v[i], by vsum1's tree */
static inline vf vsum_lanes(const vf *v) {
    return vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3]));
}

static inline vf vload_bf16(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
/* 4 bytes, read as one 32-bit word (never past the 4: the last row of a tensor ends there) */
static inline uint8x8_t vload4_u8(const void *p) {
    uint32_t u;
    memcpy(&u, p, 4);
    return vreinterpret_u8_u32(vdup_n_u32(u));
}
static inline vf vload_i8(const int8_t *p) {
    int16x8_t h = vmovl_s8(vreinterpret_s8_u8(vload4_u8(p)));
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
}
static inline void vload_nibbles(const uint8_t *p, vf *lo, vf *hi) {
    uint32x4_t b = vmovl_u16(vget_low_u16(vmovl_u8(vload4_u8(p))));
    *lo = vcvtq_f32_u32(vandq_u32(b, vdupq_n_u32(15)));
    *hi = vcvtq_f32_u32(vshrq_n_u32(b, 4));
}
/* round 4 fp32 lanes to bf16 precision (nearest even), kept as fp32 */
static inline vf vrb(vf v) {
    uint32x4_t u = vreinterpretq_u32_f32(v);
    uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    u = vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7fff)));
    return vreinterpretq_f32_u32(vandq_u32(u, vdupq_n_u32(0xffff0000u)));
}
/* 2^n built in the exponent field (as the AVX2 layer), so n must stay in [-126, 127] */
#define EXP_LO -87.0f
#define EXP_HI 88.0f
static inline vf vpow2n(vf p, vf n) {
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}
static inline vf vround(vf x) { return vrndnq_f32(x); }

/* int16 dot products: a vi holds 4 int32 sums, each of two int16 x int16 products (8 int16 per operand) */
#define HAVE_XQ16 1
typedef int32x4_t vi;
static inline vi vi_zero(void) { return vdupq_n_s32(0); }
#define vi_add vaddq_s32
static inline vi vi_load16(const int16_t *p) { return vreinterpretq_s32_s16(vld1q_s16(p)); }
static inline vi vi_i8to16(const int8_t *p) { return vreinterpretq_s32_s16(vmovl_s8(vld1_s8(p))); }
static inline vf vi_tof(vi a) { return vcvtq_f32_s32(a); }
static inline vi vi_dp(vi acc, vi a, vi b) {
    int16x8_t x = vreinterpretq_s16_s32(a), y = vreinterpretq_s16_s32(b);
    int32x4_t lo = vmull_s16(vget_low_s16(x), vget_low_s16(y)), hi = vmull_high_s16(x, y);
    return vaddq_s32(acc, vpaddq_s32(lo, hi));
}

/* int4 x int8 (decode.c's HAVE_XQ8): a vq holds 16 bytes (nibbles 0..15 are valid signed bytes); vq_dp2 adds
 * a . x + b . y per int32 lane of 4 bytes: SDOT with dotprod, else SMULL + SMLAL (pairs of products in int16:
 * 2 * 15 * 127, far from 2^15) and two pairwise widening adds, the same exact sums */
typedef int8x16_t vq;
static inline vq vq_load(const void *p) { return vld1q_s8((const int8_t *)p); }
static inline vq vq_lo(vq b) { return vandq_s8(b, vdupq_n_s8(15)); }
static inline vq vq_hi(vq b) { return vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8(b), 4)); }
#if defined(__ARM_FEATURE_DOTPROD)
static inline vi vq_dp2(vi acc, vq a, vq x, vq b, vq y) { return vdotq_s32(vdotq_s32(acc, a, x), b, y); }
#else
static inline vi vq_dp2(vi acc, vq a, vq x, vq b, vq y) {
    int16x8_t l = vmlal_s8(vmull_s8(vget_low_s8(a), vget_low_s8(x)), vget_low_s8(b), vget_low_s8(y));
    int16x8_t h = vmlal_high_s8(vmull_high_s8(a, x), b, y);
    return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(l), vpaddlq_s16(h)));
}
#endif
/* lane l of the result: p[idx[l]] (only reached with idx 0: a chunk is 32 columns, no group smaller) */
static inline vf vq_lanes(const float *p, vi idx) {
    float t[4] = {p[vgetq_lane_s32(idx, 0)], p[vgetq_lane_s32(idx, 1)], p[vgetq_lane_s32(idx, 2)],
                  p[vgetq_lane_s32(idx, 3)]};
    return vld1q_f32(t);
}
static inline vi vq_lane_groups(int group) { /* lane l -> 8 l / group (group a power of 2) */
    static const int32_t l8[4] = {0, 8, 16, 24};
    return vshlq_s32(vld1q_s32(l8), vdupq_n_s32(-__builtin_ctz(group)));
}
/* 4 int32 lanes (each within int8) -> 4 bytes at p */
static inline void vstore_i8(int8_t *p, vi v) {
    int8x8_t b = vmovn_s16(vcombine_s16(vmovn_s32(v), vdup_n_s16(0)));
    memcpy(p, &b, 4);
}
/* 32 bytes b -> their 16 even-indexed bytes to e, the 16 odd ones to o */
static inline void deinterleave32(const int8_t *b, int8_t *e, int8_t *o) {
    int8x16_t u = vld1q_s8(b), v = vld1q_s8(b + 16);
    vst1q_s8(e, vuzp1q_s8(u, v));
    vst1q_s8(o, vuzp2q_s8(u, v));
}

/* int32 lanes for the bf16 rounding of to_bf16 and the int16 stores of quant16 */
#define VI32 int32x4_t
#define vcast_i(v) vreinterpretq_s32_f32(v)
#define vi32_set1 vdupq_n_s32
#define vi32_and vandq_s32
#define vi32_or vorrq_s32
#define vi32_add vaddq_s32
#define vi32_srli(v, n) vreinterpretq_s32_u32(vshrq_n_u32(vreinterpretq_u32_s32(v), (n)))
#define vcvt_i32 vcvtnq_s32_f32 /* nearest even, as CVTPS2DQ in the default rounding mode */
static inline VI32 vi32_sel_gt(VI32 a, VI32 b, VI32 yes, VI32 no) { return vbslq_s32(vcgtq_s32(a, b), yes, no); }
/* 4 int32 lanes -> the low 16 bits of each, stored to p */
static inline void vstore_lo16(void *p, VI32 v) { vst1_s16((int16_t *)p, vmovn_s32(v)); }
/* ~a & b (ANDNPS): absmax clears the sign bit with it */
static inline vf vandn_f32(vf a, vf b) {
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(b), vreinterpretq_u32_f32(a)));
}

#if defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC) && !defined(ERNIE45_NO_BFDOT)
#define VEC_BFDOT 1
#define BF_PAIRS 8        /* bf16 per vbf (decode.c's bf16 pair dot products, as AVX512-BF16's) */
typedef bfloat16x8_t vbf; /* 8 bf16 */
static inline vbf vbf_load(const uint16_t *p) { return vreinterpretq_bf16_u16(vld1q_u16(p)); }
/* acc lane i += a[2i] b[2i] + a[2i+1] b[2i+1] */
static inline vf vbf_dot(vf acc, vbf a, vbf b) { return vbfdotq_f32(acc, a, b); }
#endif

/* an operand kept in a SIMD register (aarch64's constraint is "w", x86's "v") */
#define REG(v) __asm__("" : "+w"(v))

#endif
