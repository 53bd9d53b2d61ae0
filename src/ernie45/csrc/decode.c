/* One batch-1 decode step of ERNIE 4.5 (dense and MoE) on CPU, in one call.
 *
 * Why C: at batch 1 every token streams every weight once, so a step is a chain of GEMVs bound by memory
 * bandwidth, plus ~25 small element-wise ops per layer. In PyTorch each of those ops costs framework overhead,
 * and PyTorch has no bandwidth-bound bf16 / int8 / int4 GEMV on CPU (see bench/PROFILE.md). Here the whole
 * step runs without returning to Python, with fused dequantising GEMVs that read each weight byte once.
 *
 * Numerics follow ernie45.model exactly, op by op: activations are computed in fp32 and, for a bf16 model,
 * rounded to bf16 wherever the PyTorch forward materialises a bf16 tensor (so greedy tokens match it).
 * Threads: OpenMP from the same libgomp that PyTorch loads (one thread pool in the process).
 * Weights are read in place from the PyTorch tensors (pointers set up by ernie45/fast.py).
 *
 * ISA levels (ernie45/native.py builds one library per level): AVX-512 (+BF16, +VNNI where present), AVX2 + FMA
 * (x86-64-v3, + AVX-VNNI where present) and the plain C loops (x86-64-v2 or any other CPU), which are also the
 * scalar reference of every vector kernel. The AVX-512 and AVX2 kernels are one source over a thin vector
 * layer (`vf`: VW fp32 lanes, `vi`: int32 lanes fed by int16 pairs) below.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2, W_I4 = 3 };
#define MAX_HEAD_DIM 512

typedef struct {
    int kind, out, in, group; /* group: int4 group size (columns) */
    int sdt;                  /* dtype of scale and zero: 0 fp32, 1 bf16 (the quantized module's own tensors) */
    const void *w;            /* F32 float[out][in]; BF16 uint16[out][in]; I8 int8[out][in]; I4 uint8[out][in/2] */
    const void *scale;        /* I8 [out]; I4 [out][in/group] */
    const void *zero;         /* I4 [out][in/group]: w = (q - 8) * scale + zero = q * scale + zb, zb per group below */
    const float *bias;        /* [out] or NULL */
} Linear;

typedef struct {
    const float *ln1, *ln2;
    Linear q, k, v, o;
    int is_moe;
    Linear gate, up, down;                    /* dense MLP */
    int n_experts, top_k;
    float norm_min;
    const float *router, *corr;               /* [E][H] fp32, [E] fp32 */
    const Linear *experts;                    /* [E][3]: gate, up, down */
    int has_shared;
    Linear sgate, sup, sdown;
} Layer;

typedef struct {
    int hidden, n_layers, n_heads, n_kv, head_dim, vocab, bf16, n_threads;
    float eps, theta;
    const void *embed; /* [vocab][hidden]: the model dtype (bf16 when bf16 != 0), or int8 when embed_kind is W_I8 */
    int embed_kind;    /* 0: a float table in the model dtype; W_I8: int8 rows, one scale per row (Int8Embedding) */
    int embed_sdt;     /* dtype of embed_scale: 0 fp32, 1 bf16 (the module's own tensor, read in place) */
    const void *embed_scale; /* W_I8: [vocab]; row t = q[t] * scale[t] in fp32, rounded to bf16 in a bf16 model */
    const float *norm;
    Linear head;
    const Layer *layers;
    int max_width;     /* widest Linear input or output (scratch sizing) */
    int max_experts;   /* top_k + shared slots */
    void *scratch;     /* owned, from ernie_prepare */
    int scratch_len;   /* attention scores capacity per head */
    float *scores;
} Model;

/* The KV layout every attention kernel reads: per layer a pool of pages (num_blocks, n_kv, block_size, head_dim)
 * in the model dtype and a block table; position t of kv head h lives in page table[t / block_size], row
 * t % block_size. The contiguous cache (n_kv, max_len, head_dim) is the one-page case: block_size = max_len,
 * table = {0}. */
typedef struct {
    void *base;
    const int32_t *table;
    int block_size;
} KV;

static inline size_t kv_row(const Model *m, const KV *c, int kvh, int t) {
    return (((size_t)c->table[t / c->block_size] * m->n_kv + kvh) * c->block_size + t % c->block_size) *
           m->head_dim;
}

/* ---- per-part wall time, for `ernie45 bench` and bench/PROFILE.md ---------------------------------- */
enum { P_ATTN_PROJ, P_ATTN, P_MLP, P_ROUTER, P_HEAD, P_OTHER, P_N };
static double prof[P_N];
static double tick(double *t0, int part) {
    double t = omp_get_wtime();
    prof[part] += t - *t0;
    return *t0 = t;
}

/* seconds spent per part since the last reset: attention projections, attention (RoPE, cache, softmax),
 * MLP / expert GEMVs, router (MoE gate + top-k), lm_head, everything else */
void ernie_profile(double *out, int reset) {
    for (int i = 0; i < P_N; i++) {
        out[i] = prof[i];
        if (reset) prof[i] = 0.0;
    }
}

/* ---- bf16 helpers ------------------------------------------------------------------------------ */
static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f2bf(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float rb(float f) { return bf2f(f2bf(f)); }

/* element i of a scale / zero tensor (the quantized module's own, fp32 or bf16) in fp32: bf16 widens exactly */
static inline float sz_at(const void *p, size_t i, int sdt) {
    return sdt ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
/* int4's zero-point term zb = zero - 8 * scale, rounded as PyTorch's `zero.float() - 8 * scale.float()`: one fp32
 * multiply (exact: a power of two) and one fp32 subtract, kept as separate statements so no compiler fuses them */
static inline float zb_at(const Linear *L, size_t i) {
    float t = 8.0f * sz_at(L->scale, i, L->sdt);
    float zb = sz_at(L->zero, i, L->sdt) - t;
    return zb;
}

/* ---- the vector layer ------------------------------------------------------------------------------ */
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vfma _mm512_fmadd_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vdiv _mm512_div_ps
#define vmin _mm512_min_ps
#define vmax _mm512_max_ps
#define vfnma _mm512_fnmadd_ps
static inline float vhsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf vload_bf16(const uint16_t *p) { /* VW bf16 -> fp32 (exact) */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vf vload_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
/* VW bytes -> low and high nibbles as fp32 */
static inline void vload_nibbles(const uint8_t *p, vf *lo, vf *hi) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
/* round VW fp32 lanes to bf16 precision (nearest even), kept as fp32 */
static inline vf vrb(vf v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}
/* exp of VW lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial), within ~1 ulp of
 * libm on the ranges used here (softmax inputs <= 0, SiLU); scalar expf per element cost ~15 % of a decode step */
#define EXP_LO -87.33654f
#define EXP_HI 88.72283f
static inline vf vpow2n(vf p, vf n) { return _mm512_scalef_ps(p, n); } /* p * 2^n */
static inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* lane i of the result = the sum of the VW lanes of v[i] (a transpose-and-add tree: 45 instructions instead of
 * 16 separate horizontal sums) */
static inline vf vsum_lanes(const vf *v) {
    __m512 w[8], u[4];
    for (int k = 0; k < 8; k++)
        w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++)
        u[k] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}
#if defined(__AVX512BW__)
/* int16 dot products: a vi holds VW int32 sums, each of two int16 x int16 products (2 * VW int16 per operand) */
#define HAVE_XQ16 1
typedef __m512i vi;
#define vi_zero _mm512_setzero_si512
#define vi_add _mm512_add_epi32
static inline vi vi_load16(const int16_t *p) { return _mm512_loadu_si512(p); }
static inline vi vi_i8to16(const int8_t *p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
static inline vi vi_u8to16(const uint8_t *p) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
static inline vi vi_lo4(vi b) { return _mm512_and_si512(b, _mm512_set1_epi16(15)); }
static inline vi vi_hi4(vi b) { return _mm512_srli_epi16(b, 4); }
static inline vf vi_tof(vi a) { return _mm512_cvtepi32_ps(a); }
#if defined(__AVX512VNNI__)
static inline vi vi_dp(vi acc, vi a, vi b) { return _mm512_dpwssd_epi32(acc, a, b); }
#else
static inline vi vi_dp(vi acc, vi a, vi b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
#endif
#endif

#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vfma _mm256_fmadd_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vdiv _mm256_div_ps
#define vmin _mm256_min_ps
#define vmax _mm256_max_ps
#define vfnma _mm256_fnmadd_ps
static inline float vhsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vf vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vf vload_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline void vload_nibbles(const uint8_t *p, vf *lo, vf *hi) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
static inline vf vrb(vf v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}
/* no scalef: 2^n is built in the exponent field, so n must stay in [-126, 127] */
#define EXP_LO -87.0f
#define EXP_HI 88.0f
static inline vf vpow2n(vf p, vf n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vsum_lanes(const vf *v) {
    __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3])); /* [v0..v3 | v0..v3] halves */
    __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}
#define HAVE_XQ16 1
typedef __m256i vi;
#define vi_zero _mm256_setzero_si256
#define vi_add _mm256_add_epi32
static inline vi vi_load16(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vi vi_i8to16(const int8_t *p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }
static inline vi vi_u8to16(const uint8_t *p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)); }
static inline vi vi_lo4(vi b) { return _mm256_and_si256(b, _mm256_set1_epi16(15)); }
static inline vi vi_hi4(vi b) { return _mm256_srli_epi16(b, 4); }
static inline vf vi_tof(vi a) { return _mm256_cvtepi32_ps(a); }
#if defined(__AVXVNNI__)
static inline vi vi_dp(vi acc, vi a, vi b) { return _mm256_dpwssd_avx_epi32(acc, a, b); }
#else
static inline vi vi_dp(vi acc, vi a, vi b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
#endif
#endif

#if defined(VW)
static inline vf vexp(vf x) {
    x = vmin(vmax(x, vset1(EXP_LO)), vset1(EXP_HI));
    vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfnma(n, vset1(0.693359375f), x);
    r = vfnma(n, vset1(-2.12194440e-4f), r);
    vf p = vset1(1.9875691500E-4f);
    p = vfma(p, r, vset1(1.3981999507E-3f));
    p = vfma(p, r, vset1(8.3334519073E-3f));
    p = vfma(p, r, vset1(4.1665795894E-2f));
    p = vfma(p, r, vset1(1.6666665459E-1f));
    p = vfma(p, r, vset1(5.0000001201E-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
    return vpow2n(p, n);
}
#endif

static void round_vec(float *x, int n, int on) {
    if (!on) return;
    int i = 0;
#if defined(VW)
    for (; i + VW <= n; i += VW) vstore(x + i, vrb(vload(x + i)));
#endif
    for (; i < n; i++) x[i] = rb(x[i]);
}

/* ---- dot products: one weight row against an fp32 vector ------------------------------------------ */
static float dot_f32(const float *w, const float *x, int n) {
    int i = 0;
    float s = 0.f;
#if defined(VW)
    vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 4 * VW <= n; i += 4 * VW) {
        a0 = vfma(vload(w + i), vload(x + i), a0);
        a1 = vfma(vload(w + i + VW), vload(x + i + VW), a1);
        a2 = vfma(vload(w + i + 2 * VW), vload(x + i + 2 * VW), a2);
        a3 = vfma(vload(w + i + 3 * VW), vload(x + i + 3 * VW), a3);
    }
    for (; i + VW <= n; i += VW) a0 = vfma(vload(w + i), vload(x + i), a0);
    s = vhsum(vadd(vadd(a0, a1), vadd(a2, a3)));
#endif
#pragma omp simd reduction(+ : s)
    for (int j = i; j < n; j++) s += w[j] * x[j];
    return s;
}

/* bf16 row against fp32 x: widen each weight to fp32 (exact) and FMA */
static float dot_bf16x(const uint16_t *w, const float *x, int n) {
    int i = 0;
    float s = 0.f;
#if defined(VW)
    vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 4 * VW <= n; i += 4 * VW) {
        a0 = vfma(vload_bf16(w + i), vload(x + i), a0);
        a1 = vfma(vload_bf16(w + i + VW), vload(x + i + VW), a1);
        a2 = vfma(vload_bf16(w + i + 2 * VW), vload(x + i + 2 * VW), a2);
        a3 = vfma(vload_bf16(w + i + 3 * VW), vload(x + i + 3 * VW), a3);
    }
    for (; i + VW <= n; i += VW) a0 = vfma(vload_bf16(w + i), vload(x + i), a0);
    s = vhsum(vadd(vadd(a0, a1), vadd(a2, a3)));
#endif
#pragma omp simd reduction(+ : s)
    for (int j = i; j < n; j++) s += bf2f(w[j]) * x[j];
    return s;
}

/* bf16 weight row; xb = x in bf16 (exact: in a bf16 model x holds bf16 values). AVX512-BF16 multiplies
 * bf16 pairs directly (products are exact in fp32, like the widening path). */
static float dot_bf16(const uint16_t *w, const float *x, const uint16_t *xb, int n) {
#if defined(__AVX512BF16__)
    int i = 0;
    float s = 0.f;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 128 <= n; i += 128) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(xb + i));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + i + 32), (__m512bh)_mm512_loadu_si512(xb + i + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + i + 64), (__m512bh)_mm512_loadu_si512(xb + i + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + i + 96), (__m512bh)_mm512_loadu_si512(xb + i + 96));
    }
    for (; i + 32 <= n; i += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(xb + i));
    s = vhsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    return s + (i < n ? dot_bf16x(w + i, x + i, n - i) : 0.f);
#else
    (void)xb;
    return dot_bf16x(w, x, n);
#endif
}

static float dot_i8(const int8_t *w, const float *x, int n) {
    int i = 0;
    float s = 0.f;
#if defined(VW)
    vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 4 * VW <= n; i += 4 * VW) {
        a0 = vfma(vload_i8(w + i), vload(x + i), a0);
        a1 = vfma(vload_i8(w + i + VW), vload(x + i + VW), a1);
        a2 = vfma(vload_i8(w + i + 2 * VW), vload(x + i + 2 * VW), a2);
        a3 = vfma(vload_i8(w + i + 3 * VW), vload(x + i + 3 * VW), a3);
    }
    for (; i + VW <= n; i += VW) a0 = vfma(vload_i8(w + i), vload(x + i), a0);
    s = vhsum(vadd(vadd(a0, a1), vadd(a2, a3)));
#endif
#pragma omp simd reduction(+ : s)
    for (int j = i; j < n; j++) s += (float)w[j] * x[j];
    return s;
}

/* int4 row: byte j of a 32-column chunk holds column 2j (low nibble) and 2j+1 (high nibble). xp is x with each
 * 32-column chunk reordered as [even columns, odd columns]; xg holds the per-group sums of x. The row's scales and
 * zeros are L's, from element g0 (read in place, in their own dtype). */
static float dot_i4(const uint8_t *w, const float *xp, const float *xg, const Linear *L, size_t g0, int n,
                    int group) {
    int ng = n / group;
    float extra = 0.f, s = 0.f;
#if defined(VW)
    if (group % 32 == 0) {
        vf acc = vzero();
        for (int gi = 0; gi < ng; gi++) {
            const uint8_t *p = w + (size_t)gi * group / 2;
            const float *xq = xp + (size_t)gi * group;
            vf ga = vzero(), gb = ga, lo, hi;
            for (int c = 0; c < group; c += 32)
                for (int k = 0; k < 16; k += VW) {
                    vload_nibbles(p + c / 2 + k, &lo, &hi);
                    ga = vfma(lo, vload(xq + c + k), ga);
                    gb = vfma(hi, vload(xq + c + 16 + k), gb);
                }
            acc = vfma(vadd(ga, gb), vset1(sz_at(L->scale, g0 + gi, L->sdt)), acc);
            extra += zb_at(L, g0 + gi) * xg[gi];
        }
        return vhsum(acc) + extra;
    }
#endif
    for (int gi = 0; gi < ng; gi++) {
        float g = 0.f;
        for (int c = 0; c < group; c += 32) {
            const uint8_t *p = w + ((size_t)gi * group + c) / 2;
            const float *xq = xp + (size_t)gi * group + c;
#pragma omp simd reduction(+ : g)
            for (int j = 0; j < 16; j++) g += (float)(p[j] & 15) * xq[j] + (float)(p[j] >> 4) * xq[16 + j];
        }
        s += g * sz_at(L->scale, g0 + gi, L->sdt);
        extra += zb_at(L, g0 + gi) * xg[gi];
    }
    return s + extra;
}

/* The int8/int4 rows are multiplied in integers where the ISA has int16 dot products (VPDPWSSD with
 * AVX512-VNNI / AVX-VNNI, else VPMADDWD + VPADDD): x is quantised once per GEMV to int16 with one scale
 * (x ~= xq * xs, error <= |x|max / 65534, finer than x's own bf16 rounding for all but its smallest entries) and
 * weights are widened to int16: about a third of the instructions of the widen-to-fp32 path, which is
 * compute-bound on a CPU core. */
#if defined(HAVE_XQ16)
/* int32 lanes stay exact over I8_BLOCK columns: each of the two accumulators' lanes adds I8_BLOCK / (2 VW)
 * products of |127 * 32767|, and 2 * 256 * 4.2e6 < 2^31 */
#define I8_BLOCK (256 * VW)
static float dot_i8_x16(const int8_t *w, const int16_t *xq, int n) {
    vf f = vzero();
    int i = 0;
    while (i + 2 * VW <= n) {
        int end = i + I8_BLOCK < n ? i + I8_BLOCK : n;
        vi a0 = vi_zero(), a1 = a0;
        for (; i + 4 * VW <= end; i += 4 * VW) {
            a0 = vi_dp(a0, vi_i8to16(w + i), vi_load16(xq + i));
            a1 = vi_dp(a1, vi_i8to16(w + i + 2 * VW), vi_load16(xq + i + 2 * VW));
        }
        for (; i + 2 * VW <= end; i += 2 * VW) a0 = vi_dp(a0, vi_i8to16(w + i), vi_load16(xq + i));
        f = vadd(f, vi_tof(vi_add(a0, a1)));
    }
    float s = vhsum(f);
    for (; i < n; i++) s += (float)w[i] * (float)xq[i];
    return s;
}

/* int4 row against xq permuted per 64 columns as [32 even columns, 32 odd columns]; xg = per-group sums of x
 * (float, exact x), for the zero-point term. */
static float dot_i4_x16(const uint8_t *w, const int16_t *xq, float xs, const float *xg, const Linear *L, size_t g0,
                        int n, int group) {
    vf acc = vzero();
    float extra = 0.f;
    int ng = n / group;
    for (int gi = 0; gi < ng; gi++) {
        const uint8_t *p = w + (size_t)gi * group / 2;
        const int16_t *xg16 = xq + (size_t)gi * group;
        vi a = vi_zero();
        for (int c = 0; c < group; c += 64)
            for (int k = 0; k < 32; k += 2 * VW) { /* 2 VW bytes = 2 VW even + 2 VW odd columns */
                vi b = vi_u8to16(p + c / 2 + k);
                a = vi_dp(a, vi_lo4(b), vi_load16(xg16 + c + k));
                a = vi_dp(a, vi_hi4(b), vi_load16(xg16 + c + 32 + k));
            }
        acc = vfma(vi_tof(a), vset1(sz_at(L->scale, g0 + gi, L->sdt) * xs), acc);
        extra += zb_at(L, g0 + gi) * xg[gi];
    }
    return vhsum(acc) + extra;
}
#endif

/* ---- GEMV over several Linears at once (one parallel region; rows split evenly over threads) ------- */
typedef struct {
    const Linear *L;
    const float *x;
    float *y;
    /* prepared forms of x, filled by prep() */
    const uint16_t *xb;
    const float *xp, *xg;
    const int16_t *xq; /* int16 path: x quantised to int16 (int4: permuted), x ~= xq * xs */
    float xs;
} Job;

#define MAX_JOBS 64

typedef struct {
    uint16_t *xb;
    float *xp, *xg;
} PrepBuf;

/* per-group sums of x, for int4's zero-point term (w = q * scale + zb) */
static const float *group_sums(const float *x, int n, int group, float *out) {
    for (int gi = 0; gi < n / group; gi++) {
        float s = 0.f;
        for (int c = 0; c < group; c++) s += x[gi * group + c];
        out[gi] = s;
    }
    return out;
}

static void prep(Job *j, PrepBuf *buf, const Job *prev) {
    const Linear *L = j->L;
    int n = L->in;
    if (prev && prev->x == j->x && prev->L->kind == L->kind && prev->L->group == L->group) {
        j->xb = prev->xb, j->xp = prev->xp, j->xg = prev->xg, j->xq = prev->xq, j->xs = prev->xs;
        return;
    }
#if defined(HAVE_XQ16)
    if ((L->kind == W_I8 && n % 32 == 0) || (L->kind == W_I4 && L->group % 64 == 0)) {
        float mx = 0.f;
        for (int i = 0; i < n; i++) mx = fabsf(j->x[i]) > mx ? fabsf(j->x[i]) : mx;
        float xs = mx > 0.f ? mx / 32767.f : 1.f, inv = 1.f / xs;
        int16_t *xq = (int16_t *)buf->xb;
        if (L->kind == W_I8) {
            for (int i = 0; i < n; i++) xq[i] = (int16_t)lrintf(j->x[i] * inv);
        } else {
            for (int c = 0; c < n; c += 64)
                for (int t = 0; t < 32; t++) {
                    xq[c + t] = (int16_t)lrintf(j->x[c + 2 * t] * inv);
                    xq[c + 32 + t] = (int16_t)lrintf(j->x[c + 2 * t + 1] * inv);
                }
            j->xg = group_sums(j->x, n, L->group, buf->xg);
        }
        j->xq = xq, j->xs = xs;
        return;
    }
#endif
    j->xq = NULL;
    if (L->kind == W_BF16) {
        for (int i = 0; i < n; i++) buf->xb[i] = f2bf(j->x[i]);
        j->xb = buf->xb;
    } else if (L->kind == W_I4) {
        for (int c = 0; c + 32 <= n; c += 32)
            for (int t = 0; t < 16; t++) {
                buf->xp[c + t] = j->x[c + 2 * t];
                buf->xp[c + 16 + t] = j->x[c + 2 * t + 1];
            }
        j->xp = buf->xp, j->xg = group_sums(j->x, n, L->group, buf->xg);
    }
}

static inline float row_dot(const Job *j, int r) {
    const Linear *L = j->L;
    int n = L->in;
    float y;
    switch (L->kind) {
    case W_F32: y = dot_f32((const float *)L->w + (size_t)r * n, j->x, n); break;
    case W_BF16: y = dot_bf16((const uint16_t *)L->w + (size_t)r * n, j->x, j->xb, n); break;
    case W_I8:
#if defined(HAVE_XQ16)
        if (j->xq) {
            y = dot_i8_x16((const int8_t *)L->w + (size_t)r * n, j->xq, n) * (j->xs * sz_at(L->scale, r, L->sdt));
            break;
        }
#endif
        y = dot_i8((const int8_t *)L->w + (size_t)r * n, j->x, n) * sz_at(L->scale, r, L->sdt);
        break;
    default: {
        size_t g0 = (size_t)r * (n / L->group);
#if defined(HAVE_XQ16)
        if (j->xq) {
            y = dot_i4_x16((const uint8_t *)L->w + (size_t)r * (n / 2), j->xq, j->xs, j->xg, L, g0, n, L->group);
            break;
        }
#endif
        y = dot_i4((const uint8_t *)L->w + (size_t)r * (n / 2), j->xp, j->xg, L, g0, n, L->group);
    }
    }
    return L->bias ? y + L->bias[r] : y;
}

static PrepBuf *prep_bufs(const Model *m) { return (PrepBuf *)m->scratch; }

static void gemv_multi(const Model *m, Job *jobs, int nj, int bf16) {
    PrepBuf *bufs = prep_bufs(m);
    long total = 0;
    for (int j = 0; j < nj; j++) {
        prep(&jobs[j], &bufs[j], j ? &jobs[j - 1] : NULL);
        total += jobs[j].L->out;
    }
#pragma omp parallel num_threads(m->n_threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long r0 = total * t / nt, r1 = total * (t + 1) / nt, base = 0;
        for (int j = 0; j < nj && base < r1; j++) {
            long out = jobs[j].L->out;
            long a = r0 > base ? r0 - base : 0, b = r1 - base < out ? r1 - base : out;
            /* one row at a time: a single sequential stream per thread is what the hardware prefetcher
             * follows best (measured: interleaving 4 rows cut bf16 GEMV bandwidth from ~44 to ~24 GB/s) */
            for (long r = a; r < b; r++) jobs[j].y[r] = row_dot(&jobs[j], (int)r);
            base += out;
        }
    }
    for (int j = 0; j < nj; j++) round_vec(jobs[j].y, jobs[j].L->out, bf16);
}

static void gemv(const Model *m, const Linear *L, const float *x, float *y) {
    Job j = {L, x, y, NULL, NULL, NULL, NULL, 1.f};
    gemv_multi(m, &j, 1, m->bf16);
}


/* ---- element-wise pieces ------------------------------------------------------------------------ */
static void rmsnorm(const Model *m, const float *x, const float *w, float *out) {
    int n = m->hidden;
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + m->eps);
    for (int i = 0; i < n; i++) {
        float t = x[i] * r;
        if (m->bf16) t = rb(t); /* xf.to(x.dtype) before the weight multiply */
        out[i] = m->bf16 ? rb(w[i] * t) : w[i] * t;
    }
}

/* cos/sin of the position's angle for each (even, odd) pair, computed once per step for all layers */
static void rope_table(const Model *m, int pos, float *cs, float *sn) {
    int d = m->head_dim;
    for (int i = 0; i < d / 2; i++) {
        float inv = 1.0f / powf(m->theta, (float)(2 * i) / (float)d);
        float f = (float)pos * inv;
        cs[i] = cosf(f), sn[i] = sinf(f);
    }
}

static void rope(const Model *m, float *x, int n_heads, const float *cs, const float *sn) {
    int d = m->head_dim;
    for (int h = 0; h < n_heads; h++)
        for (int i = 0; i < d / 2; i++) {
            float *p = x + (size_t)h * d + 2 * i;
            float x0 = p[0], x1 = p[1];
            p[0] = x0 * cs[i] - x1 * sn[i];
            p[1] = x1 * cs[i] + x0 * sn[i];
        }
    round_vec(x, n_heads * d, m->bf16);
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

static void swiglu(const Model *m, const float *g, const float *u, float *a, int n) {
    int i = 0;
#if defined(VW)
    const vf one = vset1(1.0f);
    for (; i + VW <= n; i += VW) {
        vf gv = vload(g + i);
        vf sv = vdiv(gv, vadd(one, vexp(vsub(vzero(), gv))));
        if (m->bf16) sv = vrb(sv);
        vf av = vmul(sv, vload(u + i));
        vstore(a + i, m->bf16 ? vrb(av) : av);
    }
#endif
    for (; i < n; i++) {
        float s = silu(g[i]);
        if (m->bf16) s = rb(s);
        a[i] = m->bf16 ? rb(s * u[i]) : s * u[i];
    }
}

static void add_into(const Model *m, float *x, const float *y, int n) {
    for (int i = 0; i < n; i++) x[i] = m->bf16 ? rb(x[i] + y[i]) : x[i] + y[i];
}

/* ---- attention over the cache --------------------------------------------------------------------- */
/* Query heads h0..h1 (all reading kv head kvh) against positions 0..T-1: each K/V row is widened to fp32 once
 * and used by every head of the group (GQA), and exp is vectorised. */
static void attend_group(const Model *m, const float *q, const KV *kc, const KV *vc, int T, int kvh, int h0,
                         int h1, float *out) {
    int d = m->head_dim, bf = m->bf16;
    float scale = 1.0f / sqrtf((float)d), row[MAX_HEAD_DIM];
    const size_t L = m->scratch_len;
    int t0 = 0;
#if defined(VW)
    if (d % VW == 0 && d <= 256) { /* Q K^T VW positions at a time: K block widened once, VW dots reduced together */
        static __thread float kblk[VW * 256];
#if defined(__AVX512BF16__)
        if (bf && h1 - h0 <= 16) { /* bf16 cache: multiply bf16 pairs straight from the cache (q holds bf16 values) */
            static __thread uint16_t qb[16 * 256];
            for (int h = h0; h < h1; h++)
                for (int i = 0; i < d; i++) qb[(h - h0) * d + i] = f2bf(q[(size_t)h * d + i]);
            for (; t0 + 16 <= T; t0 += 16) {
                const uint16_t *kr[16];
                for (int k = 0; k < 16; k++) kr[k] = (const uint16_t *)kc->base + kv_row(m, kc, kvh, t0 + k);
                for (int h = h0; h < h1; h++) {
                    __m512 v[16];
                    for (int k = 0; k < 16; k++) v[k] = _mm512_setzero_ps();
                    for (int c = 0; c < d; c += 32) {
                        __m512bh qv = (__m512bh)_mm512_loadu_si512(qb + (h - h0) * d + c);
                        for (int k = 0; k < 16; k++)
                            v[k] = _mm512_dpbf16_ps(v[k], (__m512bh)_mm512_loadu_si512(kr[k] + c), qv);
                    }
                    __m512 r = vsum_lanes(v);
                    r = vrb(_mm512_mul_ps(vrb(r), _mm512_set1_ps(scale)));
                    _mm512_storeu_ps(m->scores + h * L + t0, r);
                }
            }
        }
#endif
        for (; t0 + VW <= T; t0 += VW) {
            for (int k = 0; k < VW; k++) {
                size_t off = kv_row(m, kc, kvh, t0 + k);
                for (int c = 0; c < d; c += VW)
                    vstore(kblk + k * d + c, bf ? vload_bf16((const uint16_t *)kc->base + off + c)
                                                : vload((const float *)kc->base + off + c));
            }
            for (int h = h0; h < h1; h++) {
                const float *qh = q + (size_t)h * d;
                vf v[VW];
                for (int k = 0; k < VW; k++) v[k] = vzero();
                for (int c = 0; c < d; c += VW) {
                    vf qv = vload(qh + c);
                    for (int k = 0; k < VW; k++) v[k] = vfma(vload(kblk + k * d + c), qv, v[k]);
                }
                vf r = vsum_lanes(v), vs = vset1(scale);
                r = bf ? vrb(vmul(vrb(r), vs)) : vmul(r, vs);
                vstore(m->scores + h * L + t0, r);
            }
        }
    }
#endif
    for (int t = t0; t < T; t++) {
        size_t off = kv_row(m, kc, kvh, t);
        const float *k = (const float *)kc->base + off;
        if (bf) {
            const uint16_t *kb = (const uint16_t *)kc->base + off;
            for (int i = 0; i < d; i++) row[i] = bf2f(kb[i]);
            k = row;
        }
        for (int h = h0; h < h1; h++) {
            float s = dot_f32(k, q + (size_t)h * d, d);
            m->scores[h * L + t] = bf ? rb(rb(s) * scale) : s * scale;
        }
    }
    for (int h = h0; h < h1; h++) { /* softmax in fp32, as `scores.float().softmax(-1)` */
        float *sc = m->scores + h * L, mx = -INFINITY, sum = 0.f;
        for (int t = 0; t < T; t++) mx = sc[t] > mx ? sc[t] : mx;
        int t = 0;
#if defined(VW)
        vf acc = vzero(), vmx = vset1(mx);
        for (; t + VW <= T; t += VW) {
            vf e = vexp(vsub(vload(sc + t), vmx));
            vstore(sc + t, e);
            acc = vadd(acc, e);
        }
        sum = vhsum(acc);
#endif
        for (; t < T; t++) sum += (sc[t] = expf(sc[t] - mx));
        for (t = 0; t < T; t++) sc[t] = bf ? rb(sc[t] / sum) : sc[t] / sum;
        float *oh = out + (size_t)h * d;
        for (int i = 0; i < d; i++) oh[i] = 0.f;
    }
#if defined(VW)
    if (d % VW == 0) { /* P @ V with up to 8 heads' accumulators in registers, VW dimensions at a time */
        for (int hb = h0; hb < h1; hb += 8) {
            int nb = h1 - hb < 8 ? h1 - hb : 8;
            const float *ps = m->scores + hb * L;
            for (int c = 0; c < d; c += VW) {
                vf acc[8];
                for (int k = 0; k < 8; k++) acc[k] = vzero();
                for (int t = 0; t < T;) { /* page by page: the rows of a page are contiguous */
                    int run = vc->block_size - t % vc->block_size;
                    run = run < T - t ? run : T - t;
                    size_t off = kv_row(m, vc, kvh, t) + c;
                    if (nb == 8) { /* the GQA group of the 0.3B / 21B shapes: accumulators stay in registers */
                        vf a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], a4 = acc[4], a5 = acc[5], a6 = acc[6],
                           a7 = acc[7];
                        for (int e = t + run; t < e; t++, off += d) {
                            vf v = bf ? vload_bf16((const uint16_t *)vc->base + off) : vload((const float *)vc->base + off);
                            a0 = vfma(vset1(ps[t]), v, a0);
                            a1 = vfma(vset1(ps[L + t]), v, a1);
                            a2 = vfma(vset1(ps[2 * L + t]), v, a2);
                            a3 = vfma(vset1(ps[3 * L + t]), v, a3);
                            a4 = vfma(vset1(ps[4 * L + t]), v, a4);
                            a5 = vfma(vset1(ps[5 * L + t]), v, a5);
                            a6 = vfma(vset1(ps[6 * L + t]), v, a6);
                            a7 = vfma(vset1(ps[7 * L + t]), v, a7);
                        }
                        acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4, acc[5] = a5, acc[6] = a6,
                        acc[7] = a7;
                    } else {
                        for (int e = t + run; t < e; t++, off += d) {
                            vf v = bf ? vload_bf16((const uint16_t *)vc->base + off) : vload((const float *)vc->base + off);
                            for (int k = 0; k < nb; k++) acc[k] = vfma(vset1(ps[k * L + t]), v, acc[k]);
                        }
                    }
                }
                for (int k = 0; k < nb; k++) vstore(out + (size_t)(hb + k) * d + c, acc[k]);
            }
        }
        for (int h = h0; h < h1; h++) round_vec(out + (size_t)h * d, d, bf);
        return;
    }
#endif
    for (int t = 0; t < T; t++) {
        size_t off = kv_row(m, vc, kvh, t);
        const float *v = (const float *)vc->base + off;
        if (bf) {
            const uint16_t *vb = (const uint16_t *)vc->base + off;
            for (int i = 0; i < d; i++) row[i] = bf2f(vb[i]);
            v = row;
        }
        for (int h = h0; h < h1; h++) {
            float p = m->scores[h * L + t], *oh = out + (size_t)h * d;
#pragma omp simd
            for (int i = 0; i < d; i++) oh[i] += p * v[i];
        }
    }
    for (int h = h0; h < h1; h++) round_vec(out + (size_t)h * d, d, bf);
}

static void attention(const Model *m, const float *q, const KV *kc, const KV *vc, int T, float *out) {
    int group = m->n_heads / m->n_kv, split = m->n_threads / m->n_kv;
    split = split < 1 ? 1 : split > group ? group : split; /* enough tasks for every thread */
#pragma omp parallel for num_threads(m->n_threads) schedule(static)
    for (int task = 0; task < m->n_kv * split; task++) {
        int kvh = task / split, part = task % split;
        attend_group(m, q, kc, vc, T, kvh, kvh * group + group * part / split, kvh * group + group * (part + 1) / split,
                     out);
    }
}

static void store_kv(const Model *m, const KV *c, const float *src, int pos) {
    int d = m->head_dim;
    for (int h = 0; h < m->n_kv; h++) {
        size_t off = kv_row(m, c, h, pos);
        if (m->bf16) {
            uint16_t *p = (uint16_t *)c->base + off;
            for (int i = 0; i < d; i++) p[i] = f2bf(src[(size_t)h * d + i]);
        } else {
            memcpy((float *)c->base + off, src + (size_t)h * d, sizeof(float) * d);
        }
    }
}

/* ---- scratch -------------------------------------------------------------------------------------- */
typedef struct {
    float *x, *n, *q, *k, *v, *att, *o, *blk, *g, *u, *a, *y, *probs;
} Act;

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* the vector width of the kernels built: 512 (AVX-512), 256 (AVX2 + FMA) or 0 (the plain C loops) */
int ernie_simd_width(void) {
#if defined(VW)
    return VW * 32;
#else
    return 0;
#endif
}

/* the instruction sets the kernels were built for, e.g. "avx512+vnni+bf16", "avx2+fma", "generic" */
const char *ernie_isa(void) {
    return
#if defined(__AVX512F__)
        "avx512"
#if defined(__AVX512VNNI__)
        "+vnni"
#endif
#if defined(__AVX512BF16__)
        "+bf16"
#endif
#elif defined(VW)
        "avx2+fma"
#if defined(__AVXVNNI__)
        "+avxvnni"
#endif
#else
        "generic"
#endif
        ;
}

int ernie_prepare(Model *m, int max_len) {
    if (m->scratch && m->scratch_len >= max_len) return 0;
    free(m->scratch);
    int W = m->max_width, S = m->max_experts, qd = m->n_heads * m->head_dim;
    size_t prep = (size_t)MAX_JOBS * align64(sizeof(PrepBuf));
    size_t per_job = align64(W * 2) + align64(W * 4) + align64(W * 4);
    size_t act = sizeof(float) * ((size_t)W * 4 + (size_t)qd * 4 + (size_t)S * W * 4 + 4096 + 64);
    size_t scores = sizeof(float) * (size_t)m->n_heads * max_len;
    size_t total = prep + MAX_JOBS * per_job + act + scores + 64 * 32;
    char *p = aligned_alloc(64, align64(total));
    if (!p) return -1;
    m->scratch = p;
    m->scratch_len = max_len;
    PrepBuf *bufs = (PrepBuf *)p;
    char *q = p + prep;
    for (int j = 0; j < MAX_JOBS; j++) {
        bufs[j].xb = (uint16_t *)q, q += align64(W * 2);
        bufs[j].xp = (float *)q, q += align64(W * 4);
        bufs[j].xg = (float *)q, q += align64(W * 4);
    }
    m->scores = (float *)q;
    return 0;
}

void ernie_release(Model *m) {
    free(m->scratch);
    m->scratch = NULL;
    m->scratch_len = 0;
}

static Act carve(const Model *m) {
    int W = m->max_width, S = m->max_experts, qd = m->n_heads * m->head_dim;
    float *p = m->scores + (size_t)m->n_heads * m->scratch_len;
    p = (float *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
    Act a;
    a.x = p, p += W;
    a.n = p, p += W;
    a.q = p, p += qd;
    a.k = p, p += qd;
    a.v = p, p += qd;
    a.att = p, p += qd;
    a.o = p, p += W;
    a.blk = p, p += W;
    a.g = p, p += (size_t)S * W;
    a.u = p, p += (size_t)S * W;
    a.a = p, p += (size_t)S * W;
    a.y = p, p += (size_t)S * W;
    a.probs = p;
    return a;
}

/* ---- MoE block ---------------------------------------------------------------------------------- */
static void moe(const Model *m, const Layer *L, Act *A, float *out, double *t0) {
    int H = m->hidden, E = L->n_experts, K = L->top_k;
    float *probs = A->probs, mx = -INFINITY, sum = 0.f;
    for (int e = 0; e < E; e++) { /* fp32 router on the (bf16-valued) normed input */
        probs[e] = dot_f32(L->router + (size_t)e * H, A->n, H);
        mx = probs[e] > mx ? probs[e] : mx;
    }
    for (int e = 0; e < E; e++) sum += (probs[e] = expf(probs[e] - mx));
    for (int e = 0; e < E; e++) probs[e] /= sum;
    int sel[64];
    float w[64], wsum = 0.f;
    for (int k = 0; k < K; k++) { /* top-k of probs + correction bias (selection only) */
        int best = -1;
        float bv = -INFINITY;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int j = 0; j < k; j++) taken |= sel[j] == e;
            float v = probs[e] + (L->corr ? L->corr[e] : 0.f);
            if (!taken && (best < 0 || v > bv)) best = e, bv = v;
        }
        sel[k] = best;
        w[k] = probs[best];
        wsum += w[k];
    }
    float denom = wsum > L->norm_min ? wsum : L->norm_min;
    for (int k = 0; k < K; k++) w[k] = m->bf16 ? rb(w[k] / denom) : w[k] / denom;
    for (int a = 1; a < K; a++) /* experts run (and accumulate) in id order, as the PyTorch loop does */
        for (int b = a; b > 0 && sel[b - 1] > sel[b]; b--) {
            int ti = sel[b]; sel[b] = sel[b - 1]; sel[b - 1] = ti;
            float tw = w[b]; w[b] = w[b - 1]; w[b - 1] = tw;
        }
    Job jobs[MAX_JOBS];
    int nj = 0, S = K + (L->has_shared ? 1 : 0), W = m->max_width;
    tick(t0, P_ROUTER);
    for (int s = 0; s < S; s++) {
        const Linear *g = s < K ? &L->experts[sel[s] * 3] : &L->sgate;
        const Linear *u = s < K ? &L->experts[sel[s] * 3 + 1] : &L->sup;
        jobs[nj++] = (Job){g, A->n, A->g + (size_t)s * W, NULL, NULL, NULL, NULL, 1.f};
        jobs[nj++] = (Job){u, A->n, A->u + (size_t)s * W, NULL, NULL, NULL, NULL, 1.f};
    }
    gemv_multi(m, jobs, nj, m->bf16);
    nj = 0;
    for (int s = 0; s < S; s++) {
        const Linear *dn = s < K ? &L->experts[sel[s] * 3 + 2] : &L->sdown;
        int I = dn->in;
        swiglu(m, A->g + (size_t)s * W, A->u + (size_t)s * W, A->a + (size_t)s * W, I);
        jobs[nj++] = (Job){dn, A->a + (size_t)s * W, A->y + (size_t)s * W, NULL, NULL, NULL, NULL, 1.f};
    }
    gemv_multi(m, jobs, nj, m->bf16);
    for (int i = 0; i < H; i++) out[i] = 0.f;
    for (int s = 0; s < K; s++) {
        const float *y = A->y + (size_t)s * W;
        for (int i = 0; i < H; i++) {
            float t = m->bf16 ? rb(y[i] * w[s]) : y[i] * w[s];
            out[i] = m->bf16 ? rb(out[i] + t) : out[i] + t;
        }
    }
    if (L->has_shared) add_into(m, out, A->y + (size_t)K * W, H);
    tick(t0, P_MLP);
}

/* ---- the step ------------------------------------------------------------------------------------ */
/* Feed `token` at position `pos` (= cache rows already filled), write K/V row `pos` of every layer into
 * kc[l]/vc[l] ((n_kv, max_len, head_dim), model dtype: the one-page case of `KV`) and the next-token logits
 * (vocab floats) into `logits`. */
int ernie_step(Model *m, int token, int pos, int max_len, void **kc, void **vc, float *logits) {
    if (token < 0 || token >= m->vocab || pos < 0 || pos >= max_len || m->head_dim > MAX_HEAD_DIM) return -2;
    if ((m->embed_kind != 0 && m->embed_kind != W_I8) || (m->embed_kind == W_I8 && (!m->embed_scale || m->embed_sdt & ~1)))
        return -2;
    static const int32_t one_page = 0; /* the contiguous cache is page 0 of block_size max_len */
    if (ernie_prepare(m, max_len)) return -1;
    Act A = carve(m);
    int H = m->hidden;
    float cs[MAX_HEAD_DIM / 2], sn[MAX_HEAD_DIM / 2];
    rope_table(m, pos, cs, sn);
    if (m->embed_kind == W_I8) { /* Int8Embedding.forward: (q.float() * s.float()).to(model dtype), one rounding */
        const int8_t *e = (const int8_t *)m->embed + (size_t)token * H;
        float s = sz_at(m->embed_scale, (size_t)token, m->embed_sdt);
        for (int i = 0; i < H; i++) {
            float v = (float)e[i] * s;
            A.x[i] = m->bf16 ? rb(v) : v;
        }
    } else if (m->bf16) {
        const uint16_t *e = (const uint16_t *)m->embed + (size_t)token * H;
        for (int i = 0; i < H; i++) A.x[i] = bf2f(e[i]);
    } else {
        memcpy(A.x, (const float *)m->embed + (size_t)token * H, sizeof(float) * H);
    }
    double t0 = omp_get_wtime();
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *L = &m->layers[l];
        rmsnorm(m, A.x, L->ln1, A.n);
        tick(&t0, P_OTHER);
        Job qkv[3] = {{&L->q, A.n, A.q, NULL, NULL, NULL, NULL, 1.f}, {&L->k, A.n, A.k, NULL, NULL, NULL, NULL, 1.f},
                      {&L->v, A.n, A.v, NULL, NULL, NULL, NULL, 1.f}};
        gemv_multi(m, qkv, 3, m->bf16);
        tick(&t0, P_ATTN_PROJ);
        rope(m, A.q, m->n_heads, cs, sn);
        rope(m, A.k, m->n_kv, cs, sn);
        KV kl = {kc[l], &one_page, max_len}, vl = {vc[l], &one_page, max_len};
        store_kv(m, &kl, A.k, pos);
        store_kv(m, &vl, A.v, pos);
        attention(m, A.q, &kl, &vl, pos + 1, A.att);
        tick(&t0, P_ATTN);
        gemv(m, &L->o, A.att, A.o);
        tick(&t0, P_ATTN_PROJ);
        add_into(m, A.x, A.o, H);
        rmsnorm(m, A.x, L->ln2, A.n);
        tick(&t0, P_OTHER);
        if (L->is_moe) {
            moe(m, L, &A, A.blk, &t0);
        } else {
            Job gu[2] = {{&L->gate, A.n, A.g, NULL, NULL, NULL, NULL, 1.f}, {&L->up, A.n, A.u, NULL, NULL, NULL, NULL, 1.f}};
            gemv_multi(m, gu, 2, m->bf16);
            swiglu(m, A.g, A.u, A.a, L->gate.out);
            gemv(m, &L->down, A.a, A.blk);
            tick(&t0, P_MLP);
        }
        add_into(m, A.x, A.blk, H);
    }
    rmsnorm(m, A.x, m->norm, A.n);
    tick(&t0, P_OTHER);
    gemv(m, &m->head, A.n, logits);
    tick(&t0, P_HEAD);
    return 0;
}

/* y = L x for one Linear (kernel tests and `ernie45 bench --kernels`); m supplies threads and scratch. */
int ernie_gemv(Model *m, const Linear *L, const float *x, float *y) {
    if (ernie_prepare(m, 1)) return -1;
    gemv(m, L, x, y);
    return 0;
}

/* ---- dequantisation for prefill ------------------------------------------------------------------------- */
/* Rows r0..r1 of L widened to fp32 into out ((r1 - r0) x in, row-major): prefill on CPUs without bf16 matmul
 * hardware multiplies fp32 tiles with MKL instead of PyTorch's emulated bf16, and this writes each tile in one
 * pass over the weights (the same values as ernie45.quant.kernels' dequantisation: q * scale + zb, with
 * zb = zero - 8 * scale per group, from L's scales and zeros in their own dtype). */
int ernie_dequant(const Linear *L, int r0, int r1, float *out, int n_threads) {
    int n = L->in;
    if (r0 < 0 || r1 > L->out || r0 > r1 || (L->kind == W_I4 && (L->group <= 0 || n % L->group || n % 2)))
        return -2;
    if ((L->kind == W_I8 || L->kind == W_I4) && (!L->scale || (L->kind == W_I4 && !L->zero) || L->sdt & ~1))
        return -2;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int r = r0; r < r1; r++) {
        float *o = out + (size_t)(r - r0) * n;
        switch (L->kind) {
        case W_F32: memcpy(o, (const float *)L->w + (size_t)r * n, sizeof(float) * n); break;
        case W_BF16: {
            const uint16_t *w = (const uint16_t *)L->w + (size_t)r * n;
#pragma omp simd
            for (int k = 0; k < n; k++) o[k] = bf2f(w[k]);
            break;
        }
        case W_I8: {
            const int8_t *w = (const int8_t *)L->w + (size_t)r * n;
            float s = sz_at(L->scale, r, L->sdt);
#pragma omp simd
            for (int k = 0; k < n; k++) o[k] = (float)w[k] * s;
            break;
        }
        default: {
            const uint8_t *w = (const uint8_t *)L->w + (size_t)r * (n / 2);
            int g = L->group, ng = n / g;
            for (int gi = 0; gi < ng; gi++) {
                size_t i = (size_t)r * ng + gi;
                float s = sz_at(L->scale, i, L->sdt), z = zb_at(L, i);
                const uint8_t *p = w + (size_t)gi * g / 2;
                float *og = o + (size_t)gi * g;
#pragma omp simd
                for (int j = 0; j < g / 2; j++) { /* q * s, then + z: two roundings, as PyTorch's mul_ and add_ */
                    float lo = (float)(p[j] & 15) * s, hi = (float)(p[j] >> 4) * s;
                    og[2 * j] = lo + z;
                    og[2 * j + 1] = hi + z;
                }
            }
        }
        }
    }
    return 0;
}
