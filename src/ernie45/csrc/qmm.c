/* Prefill products with weight-only int4 / int8 weights and integer activations: y (M x N) = x (M x K) W^T.
 *
 * Why: on a CPU without fast bf16 (AVX2 only: AMD Zen 1-3, Intel client cores) prefill otherwise dequantises every
 * weight tile to fp32 and runs an fp32 GEMM, which is compute-bound at 8 multiply-adds per instruction and then pays
 * the dequantisation on top. Multiplying the quantized weights in integers skips the dequantisation and, for int4,
 * doubles the arithmetic per instruction: llama.cpp's CPU prefill does the same (activations to 8 bits per block of
 * 32). No library offers it: oneDNN's int8 GEMM (torch._int_mm) takes one scale per row, not per group of columns,
 * and PyTorch's int4 CPU kernel needs AVX-512.
 *
 * Numerics (tests/test_qmm.py reproduces them in PyTorch):
 * - int4 (w = (q - 8) * scale + zero, q in [0, 15], one scale/zero per group of G columns): each activation row is
 *   quantized per group to int8, a = round(x * 127 / amax) (amax of the group; d = amax / 127), and
 *   y = sum over groups of scale * d * (sum(q * a) - 8 * sum(a)) + zero * sum(x), sum(x) in fp32. Centring q on 8
 *   (the term -8 * d * sum(a), folded in with the zeros) keeps the activations' rounding error from meeting the
 *   mean of q: about half the error of multiplying by q alone. The integer sums are exact (VPMADDUBSW pairs stay
 *   below 2 * 15 * 127, and at most 8 of them meet in an int16 lane before widening); per group they are converted
 *   to fp32 and multiplied in.
 * - int8 (w = q * scale, one scale per row, or per group of 32 columns: GGUF Q8_0): each activation row is
 *   quantized to int16 with one scale (x ~= xq * xs, xs = amax / 32767), as the decode step does; sums are exact
 *   in int32 over blocks of 4096 columns (per group of 32 with group scales).
 * The vector code and the plain C reference share one lane structure (QW int32 lanes of 4 bytes / 2 int16 each,
 * one summation tree), so every ISA level gives the same bits (tested).
 *
 * ISA: AVX2 (VPMADDUBSW / VPMADDWD), + AVX-VNNI or AVX512-VNNI (VPDPBUSD / VPDPWSSD, 256-bit), else the plain C
 * loops, which PyTorch-side callers do not use (`ernie_qmm_simd` says which).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(_OPENMP)
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(ERNIE45_PLAIN_C)
#include <immintrin.h>
#define QMM_AVX2 1
#endif

enum { W_I8 = 2, W_I4 = 3 }; /* ernie45.native_abi's Linear kinds */
#define QW 8                 /* int32 lanes per vector (256 bits) */
#define QCH 32               /* bytes (int8) per chunk: one vector */
#define I16CH 16             /* int16 per chunk */
#define I8_BLOCK 4096        /* int8 x int16 columns summed in int32 before converting: 2 * 127 * 32767 * 256 < 2^31 */
#define NB 48                /* weight rows per panel (a multiple of QR) */
#define MB 256               /* activation rows quantized at a time */
/* tiles of QR weight rows x QC activation rows: 2 x 4 measured fastest of 1-4 x 2-8 on AVX2 (int4: 8 int16 sums, one
 * weight vector and the activation vectors in 16 registers; the fp32 accumulators spill to L1 between groups) */
#define QR 2
#define QC 4

/* the lane sums of up to 8 accumulators (v[k] -> out[k]), each in one order: ((l0 + l1) + (l2 + l3)) + ((l4 + l5) +
 * (l6 + l7)), the order of the AVX2 transpose-and-add tree (VHADDPS) */
#if QMM_AVX2
static inline void sum_lanes(const __m256 *v, int n, float *out) { /* out: room for n rounded up to 8 */
    for (int k0 = 0; k0 < n; k0 += 8) {
        __m256 x[8];
        for (int k = 0; k < 8; k++) x[k] = k0 + k < n ? v[k0 + k] : _mm256_setzero_ps();
        __m256 t0 = _mm256_hadd_ps(x[0], x[1]), t1 = _mm256_hadd_ps(x[2], x[3]);
        __m256 t2 = _mm256_hadd_ps(x[4], x[5]), t3 = _mm256_hadd_ps(x[6], x[7]);
        __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
        _mm256_storeu_ps(out + k0, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                                 _mm256_permute2f128_ps(u0, u1, 0x31)));
    }
}
#else
static inline void sum_lanes(const float *v, int n, float *out) {
    for (int k = 0; k < n; k++) {
        const float *l = v + k * QW;
        out[k] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    }
}
#endif

/* ---- activations -------------------------------------------------------------------------------------- */
/* max |x[i]| (NaN ignored) and, for `sum`, the sum of x in QW lanes (lane l: x[l], x[l + 8], ... in order) reduced
 * by the sum_lanes tree; n a multiple of QW */
static void absmax_sum(const float *x, int n, float *mx, float *sum) {
#if QMM_AVX2
    const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps(), s = _mm256_setzero_ps();
    for (int i = 0; i < n; i += QW) {
        __m256 v = _mm256_loadu_ps(x + i);
        m = _mm256_max_ps(_mm256_and_ps(v, nosign), m); /* NaN lanes keep m (the second operand) */
        s = _mm256_add_ps(s, v);
    }
    float ml[QW], sl[8];
    _mm256_storeu_ps(ml, m);
    sum_lanes(&s, 1, sl);
    *sum = sl[0];
#else
    float ml[QW] = {0}, s[QW] = {0};
    for (int i = 0; i < n; i += QW)
        for (int l = 0; l < QW; l++) {
            float a = fabsf(x[i + l]);
            ml[l] = a > ml[l] ? a : ml[l];
            s[l] += x[i + l];
        }
    sum_lanes(s, 1, sum);
#endif
    float r = 0.f;
    for (int l = 0; l < QW; l++) r = ml[l] > r ? ml[l] : r;
    *mx = r;
}

/* row x (K) -> int8 per group of G (a = round(x * 127 / amax)), d = amax / 127, xs = sums of x per group (absmax_sum),
 * t = -8 * d * (the group's sum of a), the centring term; d, xs and t zero up to ngp */
static void quant_i8_groups(const float *x, int K, int G, int ngp, int8_t *q, float *d, float *xs, float *t) {
    for (int g = K / G; g < ngp; g++) d[g] = xs[g] = t[g] = 0.f;
    for (int g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        float m;
        absmax_sum(x + g0, G, &m, xs + gi);
        const float inv = m > 0.f ? 127.f / m : 0.f;
        d[gi] = m / 127.f;
        int i = g0;
#if QMM_AVX2
        const __m256 vi = _mm256_set1_ps(inv);
        const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (; i < g0 + G; i += 32) { /* rounding as lrintf: the current mode, nearest even */
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vi));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vi));
            __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), vi));
            __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), vi));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, e));
            _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(p, perm));
        }
#endif
        for (; i < g0 + G; i++) q[i] = (int8_t)lrintf(x[i] * inv);
        int32_t qs = 0;
        for (i = g0; i < g0 + G; i++) qs += q[i];
        t[gi] = -8.f * (d[gi] * (float)qs);
    }
}

/* row x (K) -> int16 with one scale: xq = round(x * 32767 / amax), xs = amax / 32767 */
static void quant_i16(const float *x, int K, int16_t *q, float *xs) {
    float m, unused;
    absmax_sum(x, K, &m, &unused);
    const float inv = m > 0.f ? 32767.f / m : 0.f;
    *xs = m / 32767.f;
    int i = 0;
#if QMM_AVX2
    const __m256 vi = _mm256_set1_ps(inv);
    for (; i + 16 <= K; i += 16) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vi));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vi));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
#endif
    for (; i < K; i++) q[i] = (int16_t)lrintf(x[i] * inv);
}

/* ---- int4 weights: rows unpacked to one byte per column (a panel reused by every activation tile) ---------- */
/* packed row (byte j: column 2j low nibble, 2j + 1 high) -> K bytes in column order */
static void unpack_i4(const uint8_t *p, int K, uint8_t *out) {
    int j = 0;
#if QMM_AVX2
    const __m128i m4 = _mm_set1_epi8(15);
    for (; j + 16 <= K / 2; j += 16) {
        __m128i b = _mm_loadu_si128((const __m128i *)(p + j));
        __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
        _mm_storeu_si128((__m128i *)(out + 2 * j), _mm_unpacklo_epi8(lo, hi));
        _mm_storeu_si128((__m128i *)(out + 2 * j + 16), _mm_unpackhi_epi8(lo, hi));
    }
#endif
    for (; j < K / 2; j++) out[2 * j] = p[j] & 15, out[2 * j + 1] = p[j] >> 4;
}

/* one tile: R weight rows (panel bytes w, K apart) x C activation rows (xq, K apart), groups of G columns; out[c * R
 * + r] = the sum over groups of (sc[r] * d[c]) * (int32 sums of q * a) plus sum(zr[r] * xs[c] + sc[r] * t[c]) (the zero
 * point and the centring of q - 8: w = (q - 8) * scale + zero), accumulated in QW lanes; sc, zr (R rows) and d, xs, t
 * (C rows) ngp apart, zero-padded to whole vectors */
#define INL static inline __attribute__((always_inline))
INL void tile_i4(const int R, const int C, const uint8_t *w, const int8_t *xq, int K, int G, const float *sc,
                 const float *zr, int ngp, const float *d, const float *xs, const float *t, float *out) {
#if QMM_AVX2
    __m256 acc[QR * QC];
    for (int k = 0; k < R * C; k++) acc[k] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    (void)ones;
    for (int g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        __m256i s[QR * QC];
        for (int k = 0; k < R * C; k++) s[k] = _mm256_setzero_si256();
        for (int k = g0; k < g0 + G; k += QCH) {
            __m256i a[QC];
            for (int c = 0; c < C; c++) a[c] = _mm256_loadu_si256((const __m256i *)(xq + (size_t)c * K + k));
            for (int r = 0; r < R; r++) {
                __m256i b = _mm256_loadu_si256((const __m256i *)(w + (size_t)r * K + k));
                for (int c = 0; c < C; c++)
#if defined(__AVXVNNI__)
                    s[c * R + r] = _mm256_dpbusd_avx_epi32(s[c * R + r], b, a[c]);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
                    s[c * R + r] = _mm256_dpbusd_epi32(s[c * R + r], b, a[c]);
#else
                    s[c * R + r] = _mm256_add_epi16(s[c * R + r], _mm256_maddubs_epi16(b, a[c]));
#endif
            }
        }
        __m256 dc[QC];
        for (int c = 0; c < C; c++) dc[c] = _mm256_broadcast_ss(d + (size_t)c * ngp + gi);
        for (int r = 0; r < R; r++) {
            __m256 sw = _mm256_broadcast_ss(sc + (size_t)r * ngp + gi);
            for (int c = 0; c < C; c++) {
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
                __m256i i32 = s[c * R + r];
#else
                __m256i i32 = _mm256_madd_epi16(s[c * R + r], ones);
#endif
                acc[c * R + r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_mul_ps(sw, dc[c]), acc[c * R + r]);
            }
        }
    }
    for (int g = 0; g < ngp; g += QW)
        for (int r = 0; r < R; r++) {
            __m256 z = _mm256_loadu_ps(zr + (size_t)r * ngp + g), sv = _mm256_loadu_ps(sc + (size_t)r * ngp + g);
            for (int c = 0; c < C; c++) {
                acc[c * R + r] = _mm256_fmadd_ps(z, _mm256_loadu_ps(xs + (size_t)c * ngp + g), acc[c * R + r]);
                acc[c * R + r] = _mm256_fmadd_ps(sv, _mm256_loadu_ps(t + (size_t)c * ngp + g), acc[c * R + r]);
            }
        }
    sum_lanes(acc, R * C, out);
#else
    float acc[QR * QC * QW];
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) {
            float *f = acc + (c * R + r) * QW;
            for (int l = 0; l < QW; l++) f[l] = 0.f;
            for (int g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
                int32_t s[QW] = {0};
                for (int k = g0; k < g0 + G; k += QCH)
                    for (int l = 0; l < QW; l++)
                        for (int b = 4 * l; b < 4 * l + 4; b++)
                            s[l] += (int32_t)w[(size_t)r * K + k + b] * xq[(size_t)c * K + k + b];
                float p = sc[(size_t)r * ngp + gi] * d[(size_t)c * ngp + gi];
                for (int l = 0; l < QW; l++) f[l] = fmaf((float)s[l], p, f[l]);
            }
            for (int g = 0; g < ngp; g += QW)
                for (int l = 0; l < QW; l++) {
                    f[l] = fmaf(zr[(size_t)r * ngp + g + l], xs[(size_t)c * ngp + g + l], f[l]);
                    f[l] = fmaf(sc[(size_t)r * ngp + g + l], t[(size_t)c * ngp + g + l], f[l]);
                }
        }
    sum_lanes(acc, R * C, out);
#endif
}

/* ---- int8 weights against int16 activations ------------------------------------------------------------ */
/* R weight rows (int8, K apart) x C activation rows (int16, K apart) into out[c * R + r]: with group 32 (sc: the
 * rows' group scales, ng per row) the int32 sum of each group times its scale, else the int32 sums of each block of
 * I8_BLOCK columns added */
INL void tile_i8(const int R, const int C, const int8_t *w, const int16_t *xq, int K, int G, const float *sc,
                 int ng, float *out) {
    const int blk = G ? G : I8_BLOCK;
#if QMM_AVX2
    __m256 acc[QR * QC];
    for (int k = 0; k < R * C; k++) acc[k] = _mm256_setzero_ps();
    for (int g0 = 0, gi = 0; g0 < K; g0 += blk, gi++) {
        const int end = g0 + blk < K ? g0 + blk : K;
        __m256i s[QR * QC];
        for (int k = 0; k < R * C; k++) s[k] = _mm256_setzero_si256();
        for (int k = g0; k < end; k += I16CH) {
            __m256i b[QR];
            for (int r = 0; r < R; r++)
                b[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + (size_t)r * K + k)));
            for (int c = 0; c < C; c++) {
                __m256i a = _mm256_loadu_si256((const __m256i *)(xq + (size_t)c * K + k));
                for (int r = 0; r < R; r++)
#if defined(__AVXVNNI__)
                    s[c * R + r] = _mm256_dpwssd_avx_epi32(s[c * R + r], b[r], a);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
                    s[c * R + r] = _mm256_dpwssd_epi32(s[c * R + r], b[r], a);
#else
                    s[c * R + r] = _mm256_add_epi32(s[c * R + r], _mm256_madd_epi16(b[r], a));
#endif
            }
        }
        for (int r = 0; r < R; r++) {
            __m256 sw = G ? _mm256_broadcast_ss(sc + (size_t)r * ng + gi) : _mm256_set1_ps(1.f);
            for (int c = 0; c < C; c++)
                acc[c * R + r] = G ? _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[c * R + r]), sw, acc[c * R + r])
                                   : _mm256_add_ps(_mm256_cvtepi32_ps(s[c * R + r]), acc[c * R + r]);
        }
    }
    sum_lanes(acc, R * C, out);
#else
    float acc[QR * QC * QW];
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) {
            float *f = acc + (c * R + r) * QW;
            for (int l = 0; l < QW; l++) f[l] = 0.f;
            for (int g0 = 0, gi = 0; g0 < K; g0 += blk, gi++) {
                const int end = g0 + blk < K ? g0 + blk : K;
                int32_t s[QW] = {0};
                for (int k = g0; k < end; k += I16CH)
                    for (int l = 0; l < QW; l++)
                        for (int b = 2 * l; b < 2 * l + 2; b++)
                            s[l] += (int32_t)w[(size_t)r * K + k + b] * xq[(size_t)c * K + k + b];
                for (int l = 0; l < QW; l++)
                    f[l] = G ? fmaf((float)s[l], sc[(size_t)r * ng + gi], f[l]) : (float)s[l] + f[l];
            }
        }
    sum_lanes(acc, R * C, out);
#endif
}

/* ---- the product -------------------------------------------------------------------------------------- */
typedef struct {
    int kind, N, K, G, ng, ngp, M;
    const void *w;
    const float *scale, *zero;
    const void *xq;      /* (M, K) int8 (int4 weights) or int16 (int8 weights) */
    const float *d, *xs, *t; /* int4: (M, ngp) activation steps, group sums of x, centring terms; int8: xs (M,) */
    float *y;            /* (M, N) */
} Qmm;

static void *grow(void **buf, size_t *cap, size_t need) {
    if (need > *cap) {
        free(*buf);
        *buf = aligned_alloc(64, (need + 63) & ~(size_t)63);
        *cap = *buf ? need : 0;
    }
    return *buf;
}


/* a panel's outputs y[m, n0 + r] for activation rows m0.. (C of them) and panel rows r0.. (R of them); int4: sc, zr
 * the panel's scales and zeros (ngp apart), int8: sc the rows' scales in place (ng apart) */
INL void tile_out(const int R, const int C, const Qmm *q, const void *panel, const float *sc, const float *zr,
                  int n0, int r0, int m0) {
    float s[QR * QC] __attribute__((aligned(32)));
    const int K = q->K;
    if (q->kind == W_I4)
        tile_i4(R, C, (const uint8_t *)panel + (size_t)r0 * K, (const int8_t *)q->xq + (size_t)m0 * K, K, q->G,
                sc + (size_t)r0 * q->ngp, zr + (size_t)r0 * q->ngp, q->ngp, q->d + (size_t)m0 * q->ngp,
                q->xs + (size_t)m0 * q->ngp, q->t + (size_t)m0 * q->ngp, s);
    else
        tile_i8(R, C, (const int8_t *)panel + (size_t)r0 * K, (const int16_t *)q->xq + (size_t)m0 * K, K, q->G,
                sc + (size_t)r0 * q->ng, q->ng, s);
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) {
            const int m = m0 + c, n = n0 + r0 + r;
            float v = s[c * R + r];
            if (q->kind == W_I8) v = q->G ? v * q->xs[m] : (v * q->scale[n]) * q->xs[m];
            q->y[(size_t)m * q->N + n] = v;
        }
}

#define TILE(R, C) tile_out(R, C, q, panel, sc, zr, n0, r0, m0)
#define TILE_C(R)                                                                                               \
    switch (C) {                                                                                               \
    case 4: TILE(R, 4); break;                                                                                 \
    case 3: TILE(R, 3); break;                                                                                 \
    case 2: TILE(R, 2); break;                                                                                 \
    default: TILE(R, 1);                                                                                       \
    }
static void panel_tiles(const Qmm *q, const void *panel, const float *sc, const float *zr, int n0, int rows) {
    for (int m0 = 0; m0 < q->M;) {
        const int C = q->M - m0 < QC ? q->M - m0 : QC;
        int r0 = 0;
        for (; r0 + QR <= rows; r0 += QR) {
            TILE_C(QR)
        }
        for (; r0 < rows; r0++) {
            TILE_C(1)
        }
        m0 += C;
    }
}

/* rows [n0, n0 + rows) of the weight: int4 unpacked into this thread's panel (NB rows of K bytes, then the rows'
 * scales and zeros, ngp apart and zero-padded), int8 read in place */
static void do_panel(const Qmm *q, char *pbuf, int n0, int rows) {
    const int K = q->K, ng = q->ng, ngp = q->ngp;
    if (q->kind == W_I8) {
        panel_tiles(q, (const int8_t *)q->w + (size_t)n0 * K, q->scale + (size_t)n0 * ng, NULL, n0, rows);
        return;
    }
    uint8_t *panel = (uint8_t *)pbuf;
    float *sc = (float *)(pbuf + (size_t)NB * K), *zr = sc + (size_t)NB * ngp;
    for (int r = 0; r < rows; r++) {
        unpack_i4((const uint8_t *)q->w + (size_t)(n0 + r) * (K / 2), K, panel + (size_t)r * K);
        for (int g = 0; g < ngp; g++) {
            size_t i = (size_t)(n0 + r) * ng + g;
            sc[(size_t)r * ngp + g] = g < ng ? q->scale[i] : 0.f;
            zr[(size_t)r * ngp + g] = g < ng ? q->zero[i] : 0.f;
        }
    }
    panel_tiles(q, panel, sc, zr, n0, rows);
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* y (M, N) fp32 = x (M, K) fp32 times the (N, K) weight: kind W_I4 (w (N, K/2) packed row-major, scale/zero
 * (N, K/group) fp32) or W_I8 (w (N, K) int8, scale (N,) fp32 with group 0, (N, K/32) with group 32). Scratch: one
 * buffer per calling thread, grown to the largest call and kept (no allocation per call, no heap fragments).
 * 0 on success, -1 out of memory, -2 bad arguments. */
int ernie_qmm(int kind, const void *w, const float *scale, const float *zero, int N, int K, int group,
              const float *x, int M, float *y, int n_threads) {
    if (N <= 0 || K <= 0 || M < 0 || !w || !scale || !x || !y || n_threads < 1) return -2;
    if (kind == W_I4 && (!zero || group <= 0 || group % QCH || group > 8 * QCH || K % group))
        return -2; /* group <= 256: at most 8 VPMADDUBSW pairs meet in an int16 lane */
    if (kind == W_I8 && ((group && (group != 32 || K % group)) || K % I16CH)) return -2;
    if (kind != W_I4 && kind != W_I8) return -2;
    if (M == 0) return 0;
    static __thread void *abuf;
    static __thread size_t acap;
    const int ng = kind == W_I4 ? K / group : group ? K / group : 1, ngp = (ng + QW - 1) / QW * QW;
    const int mb = M < MB ? M : MB;
    const size_t qb = align64((size_t)mb * K * (kind == W_I4 ? 1 : 2)), fb = align64(sizeof(float) * mb * ngp);
    const size_t pb = kind == W_I4 ? align64((size_t)NB * K + 2 * sizeof(float) * NB * ngp) : 0;
    char *buf = grow(&abuf, &acap, qb + 3 * fb + pb * n_threads);
    if (!buf) return -1;
    for (int m0 = 0; m0 < M; m0 += MB) {
        const int rows = M - m0 < MB ? M - m0 : MB;
        Qmm q = {kind, N, K, group, ng, ngp, rows, w, scale, zero, buf, (float *)(buf + qb), (float *)(buf + qb + fb),
                 (float *)(buf + qb + 2 * fb), y + (size_t)m0 * N};
        const int np = (N + NB - 1) / NB;
#pragma omp parallel num_threads(n_threads)
        {
#pragma omp for schedule(static)
            for (int m = 0; m < rows; m++) {
                const float *xr = x + (size_t)(m0 + m) * K;
                if (kind == W_I4)
                    quant_i8_groups(xr, K, group, ngp, (int8_t *)buf + (size_t)m * K, (float *)q.d + (size_t)m * ngp,
                                    (float *)q.xs + (size_t)m * ngp, (float *)q.t + (size_t)m * ngp);
                else
                    quant_i16(xr, K, (int16_t *)buf + (size_t)m * K, (float *)q.xs + m);
            }
            char *pbuf = buf + qb + 3 * fb + pb * omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
            for (int p = 0; p < np; p++) {
                const int n0 = p * NB;
                do_panel(&q, pbuf, n0, N - n0 < NB ? N - n0 : NB);
            }
        }
    }
    return 0;
}

/* what the kernels above were built with: 2 = AVX2 + VNNI, 1 = AVX2, 0 = the plain C loops (correct, slow) */
int ernie_qmm_simd(void) {
#if QMM_AVX2 && (defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)))
    return 2;
#elif QMM_AVX2
    return 1;
#else
    return 0;
#endif
}
