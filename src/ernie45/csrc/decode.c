/* One decode step of ERNIE 4.5 (dense and MoE) on CPU, in one call: one sequence (ernie_step) or B sequences
 * over a paged KV cache (ernie_step_batch; ernie_step is its one-row, one-page case; ernie_step_batch_q8 over an
 * int8 one).
 *
 * Why C: at batch 1 every token streams every weight once, so a step is a chain of GEMVs bound by memory
 * bandwidth, plus ~25 small element-wise ops per layer. In PyTorch each of those ops costs framework overhead,
 * and PyTorch has no bandwidth-bound bf16 / int8 / int4 GEMV on CPU (see bench/PROFILE.md). Here the whole
 * step runs without returning to Python, with fused dequantising GEMVs that read each weight byte once. A batch
 * reads each weight once for all its rows, and each row's arithmetic is exactly the single-row step's (the same
 * kernels, roundings and summation orders), so a row's logits do not depend on the batch it is in.
 *
 * Numerics follow ernie45.model exactly, op by op: activations are computed in fp32 and, for a bf16 model,
 * rounded to bf16 wherever the PyTorch forward materialises a bf16 tensor (so greedy tokens match it).
 * Threads: OpenMP from the same libgomp that PyTorch loads (one thread pool in the process).
 * Weights are read in place from the PyTorch tensors (pointers set up by ernie45/fast.py).
 *
 * ISA levels (ernie45/native.py builds one library per level): AVX-512 (+BF16, +VNNI where present), AVX2 + FMA
 * (x86-64-v3, + AVX-VNNI where present), NEON on aarch64 (vec_neon.h, + BFDOT where the bf16 extension is
 * targeted) and the plain C loops (x86-64-v2, -DERNIE45_PLAIN_C, or any other CPU), which are also the scalar
 * reference of every vector kernel. The AVX-512, AVX2 and NEON kernels are one source over a thin vector
 * layer (`vf`: VW fp32 lanes, `vi`: int32 lanes fed by int16 pairs) below. Without OpenMP (e.g. Apple clang) the
 * step builds and runs on one thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h>
#else /* built without OpenMP (e.g. Apple clang): one thread, the pragmas are ignored */
#include <time.h>
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline double omp_get_wtime(void) { /* wall time, for the profile only */
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2, W_I4 = 3 };
#define MAX_HEAD_DIM 512

typedef struct {
    int kind, out, in, group; /* group: int4 group size (columns); int8: 0 (one scale per row) or 32 (GGUF Q8_0) */
    int sdt;                  /* dtype of scale and zero: 0 fp32, 1 bf16 (the quantized module's own tensors) */
    const void *w;            /* F32 float[out][in]; BF16 uint16[out][in]; I8 int8[out][in]; I4 uint8[out][in/2] */
    const void *scale;        /* I8 [out] (group 0) or [out][in/32]; I4 [out][in/group] */
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
    const void *embed; /* [vocab][hidden]: the model dtype (bf16 when bf16 != 0), int8 (W_I8), or [vocab][hidden/2]
                        * int4 nibbles (W_I4, Int4Linear's row-major layout) */
    int embed_kind;    /* 0: a float table in the model dtype; W_I8: int8 rows, one scale per row (Int8Embedding);
                        * W_I4: int4 groups with scale and zero (Int4Embedding, e.g. a GGUF's Q4_0 token_embd) */
    int embed_sdt;     /* dtype of embed_scale (and embed_zero): 0 fp32, 1 bf16 (the module's tensors, in place) */
    const void *embed_scale; /* W_I8: [vocab] (embed_group 0) or [vocab][hidden/embed_group]; row t = q[t] * scale
                              * in fp32, rounded to bf16 in a bf16 model; W_I4: [vocab][hidden/embed_group], as an
                              * Int4Linear's */
    const void *embed_zero;  /* W_I4: [vocab][hidden/embed_group] */
    int embed_group;         /* W_I4: columns per group; W_I8: 0 (one scale per row) or columns per group */
    const float *norm;
    Linear head;
    const Layer *layers;
    int max_width;     /* widest Linear input or output (informative: the scratch is sized from the layers) */
    int max_experts;   /* top_k + shared slots (informative, likewise) */
    void *scratch;     /* owned (a Scratch, see prepare()); NULL until the first call */
    int scratch_len;   /* attention scores capacity in positions */
    float *scores;     /* owned: per thread, (n_heads / n_kv) x scratch_len */
    const unsigned char *want; /* B flags for the next step_batch call, or NULL: the rows whose logits are computed (a
                                * server's prompt-chunk rows need none but their last), written back to back in row
                                * order (logits then holds one head row per flagged row), each bit for bit what it
                                * would be without the flags */
    /* A multi-token-prediction layer (ernie45.mtp) run as a one-layer model (ernie_mtp_batch): mtp_proj.w set, a
     * row's input is proj(cat(rmsnorm(embed(token), mtp_enorm), rmsnorm(h_in, mtp_hnorm))) instead of the
     * embedding; norm NULL: the head reads the layer's output as it is (the post-norm variant, whose embedding is
     * also zeroed at absolute position 0 when mtp_zero0 is set). The head may hold fewer rows than vocab (a
     * draft vocabulary): head row i scores token mtp_ids[i] (ascending), each logits row is vocab wide, -inf at
     * the other tokens. */
    const float *mtp_enorm, *mtp_hnorm;
    Linear mtp_proj;
    int mtp_zero0;
    const int32_t *mtp_ids;
} Model;

/* The KV layout every attention kernel reads: per layer a pool of pages (num_blocks, n_kv, block_size, head_dim)
 * and a block table; position t of kv head h lives in page table[t / block_size], row t % block_size. The contiguous
 * cache (n_kv, max_len, head_dim) is the one-page case: block_size = max_len, table = {0}.
 * Pages hold the model dtype (scale NULL), or int8 with one fp32 scale per row (scale: (num_blocks, n_kv,
 * block_size), `--kv-cache-dtype int8` of the server): row x is stored as q = round_half_even(x / s) clamped to
 * [-127, 127], s = max|x| / 127 (q = 0 where s is 0), and attention reads (float)q * s rounded to the model dtype,
 * then runs exactly the arithmetic of the float pages (attend_impl's two instances: float pages and int8 pages). */
typedef struct {
    void *base;
    const int32_t *table;
    int block_size;
    float *scale;
} KV;

/* the row index of (kvh, t) in the pool: its element offset is row * head_dim, its scale scale[row] */
static inline size_t kv_rowi(const Model *m, const KV *c, int kvh, int t) {
    return ((size_t)c->table[t / c->block_size] * m->n_kv + kvh) * c->block_size + t % c->block_size;
}
static inline size_t kv_row(const Model *m, const KV *c, int kvh, int t) { return kv_rowi(m, c, kvh, t) * m->head_dim; }

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
static inline vf vset_halves(float a, float b) { return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b)); }
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
/* the sum of v's lanes by the tree of vsum_lanes (lane i there: ((x0 + x2) + (x1 + x3)) per 128-bit block b,
 * then (b0 + b1) + (b2 + b3)): one vector's reduction, bitwise a lane of vsum_lanes */
static inline float vsum1(vf v) {
    v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm512_cvtss_f32(v);
}
#if defined(__AVX512BF16__)
/* bf16 pair dot products (VDPBF16PS): a vbf holds BF_PAIRS bf16, lane i of vbf_dot adds a[2i] b[2i] + a[2i+1] b[2i+1] */
#define BF_PAIRS 32
typedef __m512bh vbf;
static inline vbf vbf_load(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512(p); }
static inline vf vbf_dot(vf acc, vbf a, vbf b) { return _mm512_dpbf16_ps(acc, a, b); }
#endif
#if defined(__AVX512BW__)
/* int16 dot products: a vi holds VW int32 sums, each of two int16 x int16 products (2 * VW int16 per operand) */
#define HAVE_XQ16 1
typedef __m512i vi;
#define vi_zero _mm512_setzero_si512
#define vi_add _mm512_add_epi32
static inline vi vi_load16(const int16_t *p) { return _mm512_loadu_si512(p); }
static inline vi vi_i8to16(const int8_t *p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
static inline vf vi_tof(vi a) { return _mm512_cvtepi32_ps(a); }
#if defined(__AVX512VNNI__)
static inline vi vi_dp(vi acc, vi a, vi b) { return _mm512_dpwssd_epi32(acc, a, b); }
#else
static inline vi vi_dp(vi acc, vi a, vi b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
#endif
/* int4 x int8 (see HAVE_XQ8): a vq holds 4 VW bytes; vq_dp2 adds a . x + b . y per int32 lane of 4 bytes, a and b
 * unsigned (nibbles), x and y signed */
typedef __m512i vq;
static inline vq vq_load(const void *p) { return _mm512_loadu_si512(p); }
static inline vq vq_lo(vq b) { return _mm512_and_si512(b, _mm512_set1_epi8(15)); }
static inline vq vq_hi(vq b) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(15)); }
#if defined(__AVX512VNNI__)
static inline vi vq_dp2(vi acc, vq a, vq x, vq b, vq y) { return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, a, x), b, y); }
#else /* int16 pair sums: 2 * 15 * 127 each, two of them added: far from 2^15 */
static inline vi vq_dp2(vi acc, vq a, vq x, vq b, vq y) {
    vq p = _mm512_add_epi16(_mm512_maddubs_epi16(a, x), _mm512_maddubs_epi16(b, y));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
}
#endif
/* lane l of the result: p[idx[l]] */
static inline vf vq_lanes(const float *p, vi idx) { return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(p)); }
static inline vi vq_lane_groups(int group) { /* lane l -> 8 l / group (group a power of 2) */
    return _mm512_srli_epi32(_mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120),
                             __builtin_ctz(group));
}
/* VW int32 lanes (each within int8) -> VW bytes at p */
static inline void vstore_i8(int8_t *p, vi v) { _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(v)); }
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
/* the sum of v's lanes by the tree of vsum_lanes ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)) */
static inline float vsum1(vf v) {
    v = _mm256_add_ps(v, _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
    v = _mm256_add_ps(v, _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm256_add_ps(v, _mm256_permute2f128_ps(v, v, 0x01));
    return _mm256_cvtss_f32(v);
}
#define HAVE_XQ16 1
typedef __m256i vi;
#define vi_zero _mm256_setzero_si256
#define vi_add _mm256_add_epi32
static inline vi vi_load16(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vi vi_i8to16(const int8_t *p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }
static inline vf vi_tof(vi a) { return _mm256_cvtepi32_ps(a); }
#if defined(__AVXVNNI__)
static inline vi vi_dp(vi acc, vi a, vi b) { return _mm256_dpwssd_avx_epi32(acc, a, b); }
#else
static inline vi vi_dp(vi acc, vi a, vi b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
#endif
typedef __m256i vq;
static inline vq vq_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vq vq_lo(vq b) { return _mm256_and_si256(b, _mm256_set1_epi8(15)); }
static inline vq vq_hi(vq b) { return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(15)); }
#if defined(__AVXVNNI__)
static inline vi vq_dp2(vi acc, vq a, vq x, vq b, vq y) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, a, x), b, y);
}
#else
static inline vi vq_dp2(vi acc, vq a, vq x, vq b, vq y) {
    vq p = _mm256_add_epi16(_mm256_maddubs_epi16(a, x), _mm256_maddubs_epi16(b, y));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
#endif
static inline vf vq_lanes(const float *p, vi idx) { return _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx); }
static inline vi vq_lane_groups(int group) {
    return _mm256_srli_epi32(_mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56), __builtin_ctz(group));
}
static inline void vstore_i8(int8_t *p, vi v) {
    __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packs_epi16(h, h));
}

#elif defined(__aarch64__) && !defined(ERNIE45_PLAIN_C) /* NEON (-DERNIE45_PLAIN_C: the plain C loops) */
#include "vec_neon.h"
#define VEC_NEON 1
#endif
#if defined(HAVE_XQ16) && !defined(VEC_NEON)
/* 32 bytes b -> their 16 even-indexed bytes to e, the 16 odd ones to o */
static inline void deinterleave32(const int8_t *b, int8_t *e, int8_t *o) {
    const __m128i eo = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    __m128i u = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)b), eo);
    __m128i v = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(b + 16)), eo);
    _mm_storeu_si128((__m128i *)e, _mm_unpacklo_epi64(u, v));
    _mm_storeu_si128((__m128i *)o, _mm_unpackhi_epi64(u, v));
}
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

/* bf16 weight row; xb = x in bf16 (exact: in a bf16 model x holds bf16 values). AVX512-BF16 / aarch64 BFDOT multiply
 * bf16 pairs directly (products are exact in fp32, like the widening path). */
static float dot_bf16(const uint16_t *w, const float *x, const uint16_t *xb, int n) {
#if defined(BF_PAIRS) /* AVX512-BF16, or aarch64 BFDOT (vec_neon.h) */
    vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 4 * BF_PAIRS <= n; i += 4 * BF_PAIRS) {
        a0 = vbf_dot(a0, vbf_load(w + i), vbf_load(xb + i));
        a1 = vbf_dot(a1, vbf_load(w + i + BF_PAIRS), vbf_load(xb + i + BF_PAIRS));
        a2 = vbf_dot(a2, vbf_load(w + i + 2 * BF_PAIRS), vbf_load(xb + i + 2 * BF_PAIRS));
        a3 = vbf_dot(a3, vbf_load(w + i + 3 * BF_PAIRS), vbf_load(xb + i + 3 * BF_PAIRS));
    }
    for (; i + BF_PAIRS <= n; i += BF_PAIRS) a0 = vbf_dot(a0, vbf_load(w + i), vbf_load(xb + i));
    float s = vhsum(vadd(vadd(a0, a1), vadd(a2, a3)));
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

/* int8 row with one scale per group of 32 columns (from element g0 of L's scales): per group the fp32 sum of
 * w * x, times the group's scale into the accumulator, in group order */
static float dot_i8_g32(const int8_t *w, const float *x, const Linear *L, size_t g0, int n) {
    float s = 0.f;
#if defined(VW)
    vf acc = vzero();
    for (int c = 0; c < n; c += 32) {
        vf g = vzero();
        for (int k = 0; k < 32; k += VW) g = vfma(vload_i8(w + c + k), vload(x + c + k), g);
        acc = vfma(g, vset1(sz_at(L->scale, g0 + c / 32, L->sdt)), acc);
    }
    s = vhsum(acc);
#else
    for (int c = 0; c < n; c += 32) {
        float g = 0.f;
#pragma omp simd reduction(+ : g)
        for (int j = 0; j < 32; j++) g += (float)w[c + j] * x[c + j];
        s += g * sz_at(L->scale, g0 + c / 32, L->sdt);
    }
#endif
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

/* int4 rows are multiplied by x quantised to int8 per group (VPDPBUSD with AVX512-VNNI / AVX-VNNI, VPMADDUBSW +
 * VPMADDWD on AVX2, SDOT with aarch64's dotprod, SMULL + SMLAL + ADDP on plain NEON: the vq layer): the nibbles are
 * unsigned bytes as they lie, so one instruction multiplies 4 VW of them -- twice the rate of int16 products, which
 * bound batched decode (8 rows: compute-bound). The arithmetic is qmm.c's (prefill): per group a = round(x * 127 /
 * amax), d = amax / 127, y = sum over groups of scale * d * sum(q * a) plus zero * sum(x) - 8 * scale * d * sum(a)
 * (centring q on 8 halves the activations' rounding error). About 0.5 % of a product's largest output (Gaussian x),
 * against ~10 % for the int4 weights themselves. A chunk is CW = 8 VW columns: 4 VW packed bytes, one vector; x is
 * permuted per chunk as [its even columns, its odd columns] so the low and high nibbles meet their columns lane for
 * lane (lane l of either holds columns 8l .. 8l + 7 of the chunk). */
#if defined(HAVE_XQ16)
#define HAVE_XQ8 1
#define CW (8 * VW)
#endif

/* The int8 rows are multiplied in integers where the ISA has int16 dot products (VPDPWSSD with
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

/* int8 row with one scale per group of 32 columns against xq: exact int32 sums per group, each times the group's
 * scale into the accumulator, in group order (the arithmetic of tile_i8g; the caller multiplies by xs) */
static float dot_i8_x16_g32(const int8_t *w, const int16_t *xq, const Linear *L, size_t g0, int n) {
    vf acc = vzero();
    for (int c = 0; c < n; c += 32) {
        vi a = vi_zero();
        for (int k = 0; k < 32; k += 2 * VW) a = vi_dp(a, vi_i8to16(w + c + k), vi_load16(xq + c + k));
        acc = vfma(vi_tof(a), vset1(sz_at(L->scale, g0 + c / 32, L->sdt)), acc);
    }
    return vhsum(acc);
}

#endif

/* ---- GEMV over several Linears and batch rows at once (one parallel region) ------------------------------ */
/* A Job is one Linear applied to one batch row's x. Consecutive jobs of the same Linear form a group: each weight
 * row is read once and multiplied with every x of its group while it is hot in L1 (decode is memory-bound). */
typedef struct {
    const Linear *L;
    const float *x;
    float *y;
    /* prepared forms of x, filled by prep() */
    const uint16_t *xb;
    const float *xp, *xg;
    const int16_t *xq; /* int16 path: x quantised to int16 (int4: permuted), x ~= xq * xs */
    const int8_t *x8;  /* int4 x int8 path: x quantised per group, permuted per chunk; xd: the groups' steps d, xt:
                        * their centring terms -8 d sum(a) (both zero-padded like xg) */
    const float *xd, *xt;
    float xs;
    int src;           /* the job whose prepared x this one reuses (itself where it prepares) */
    size_t off;        /* where its prepared x lives in the prep arena */
} Job;

#define JOB(L_, x_, y_) ((Job){(L_), (x_), (y_), NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1.f, 0, 0})

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* per-group sums of x, for int4's zero-point term (w = q * scale + zb) */
/* VW lanes as int32 -> the low 16 bits of each, stored to p (what (int16_t) / (uint16_t) casts keep) */
#if defined(__AVX512F__)
static inline void vstore_lo16(void *p, __m512i v) { _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(v)); }
#elif defined(VEC_NEON) /* vstore_lo16 and the VI32 lanes below: vec_neon.h */
#elif defined(VW)
static inline void vstore_lo16(void *p, __m256i v) {
    __m256i t = _mm256_packus_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0xffff)), _mm256_setzero_si256());
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(_mm256_permute4x64_epi64(t, 0x08)));
}
#endif
#if defined(__AVX512F__)
#define VI32 __m512i
#define vcast_i(v) _mm512_castps_si512(v)
#define vi32_set1 _mm512_set1_epi32
#define vi32_and _mm512_and_si512
#define vi32_or _mm512_or_si512
#define vi32_add _mm512_add_epi32
#define vi32_srli _mm512_srli_epi32
#define vcvt_i32 _mm512_cvtps_epi32
static inline VI32 vi32_sel_gt(VI32 a, VI32 b, VI32 yes, VI32 no) { /* a > b (signed) ? yes : no */
    return _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(a, b), no, yes);
}
#elif defined(VEC_NEON)
#elif defined(VW)
#define VI32 __m256i
#define vcast_i(v) _mm256_castps_si256(v)
#define vi32_set1 _mm256_set1_epi32
#define vi32_and _mm256_and_si256
#define vi32_or _mm256_or_si256
#define vi32_add _mm256_add_epi32
#define vi32_srli _mm256_srli_epi32
#define vcvt_i32 _mm256_cvtps_epi32
static inline VI32 vi32_sel_gt(VI32 a, VI32 b, VI32 yes, VI32 no) {
    return _mm256_blendv_epi8(no, yes, _mm256_cmpgt_epi32(a, b));
}
#endif

/* per-group sums of x, for int4's zero-point term (w = q * scale + zb), zero-padded to whole 64 bytes; with
 * vectors: VW-lane partial sums in column order, then the vsum1 tree (one code for every batch) */
static const float *group_sums(const float *x, int n, int group, float *out) {
    for (int gi = 0; gi < n / group; gi++) {
        const float *g = x + (size_t)gi * group;
#if defined(VW)
        if (group % VW == 0) {
            vf v = vzero();
            for (int c = 0; c < group; c += VW) v = vadd(v, vload(g + c));
            out[gi] = vsum1(v);
            continue;
        }
#endif
        float s = 0.f;
        for (int c = 0; c < group; c++) s += g[c];
        out[gi] = s;
    }
    for (size_t gi = n / group; gi < align64(4 * (size_t)(n / group)) / 4; gi++) out[gi] = 0.f;
    return out;
}

#if defined(HAVE_XQ16)
/* x quantised to int16, xq[i] = (int16_t)lrintf(x[i] * inv) (the rounding mode's nearest, even on ties) */
static void quant16(const float *x, int n, float inv, int16_t *xq) {
    int i = 0;
#if defined(VW)
    for (; i + VW <= n; i += VW) vstore_lo16(xq + i, vcvt_i32(vmul(vload(x + i), vset1(inv))));
#endif
    for (; i < n; i++) xq[i] = (int16_t)lrintf(x[i] * inv);
}

/* max |x[i]|, NaN ignored (as `fabsf(x) > mx ? fabsf(x) : mx`; max is exact in any order) */
static float absmax(const float *x, int n) {
    float mx = 0.f;
    int i = 0;
#if defined(VW)
    vf m = vzero(), sign = vset1(-0.0f);
#if defined(__AVX512F__)
#define vandn_ps _mm512_andnot_ps
#elif defined(VEC_NEON)
#define vandn_ps vandn_f32
#else
#define vandn_ps _mm256_andnot_ps
#endif
    for (; i + VW <= n; i += VW) m = vmax(vandn_ps(sign, vload(x + i)), m); /* a NaN lane keeps m (the 2nd operand) */
#undef vandn_ps
    float t[VW];
    vstore(t, m);
    for (int k = 0; k < VW; k++) mx = t[k] > mx ? t[k] : mx;
#endif
    for (; i < n; i++) mx = fabsf(x[i]) > mx ? fabsf(x[i]) : mx;
    return mx;
}
#endif

/* x rounded to bf16 as f2bf does (nearest even; NaN kept, quiet) */
static void to_bf16(const float *x, int n, uint16_t *xb) {
    int i = 0;
#if defined(VW)
    for (; i + VW <= n; i += VW) {
        VI32 u = vcast_i(vload(x + i));
        VI32 r = vi32_srli(vi32_add(u, vi32_add(vi32_set1(0x7fff), vi32_and(vi32_srli(u, 16), vi32_set1(1)))), 16);
        VI32 q = vi32_or(vi32_srli(u, 16), vi32_set1(0x40));
        vstore_lo16(xb + i, vi32_sel_gt(vi32_and(u, vi32_set1(0x7fffffff)), vi32_set1(0x7f800000), q, r));
    }
#endif
    for (; i < n; i++) xb[i] = f2bf(x[i]);
}

/* bytes of a prepared x for L: [xb or xq (int16)] [xp] [xg], as prep() lays them out */
#define NGMAX 512 /* int4 groups per row on the tiled path */

static size_t prep_bytes(const Linear *L) {
    size_t n = L->in;
    if (L->kind == W_F32) return 0;
    if (L->kind != W_I4) return align64(2 * n);
    /* float path: [xp] [xg]; int8: [x8] [xd] [xg] [xt], each group array padded by a vector (tile_i4q reads VW) */
    return align64(2 * n) + align64(4 * n) + 3 * (align64(4 * (n / (L->group > 0 ? L->group : 1))) + 64);
}

#if defined(HAVE_XQ8)
/* whether L's int4 rows take tile_i4q: groups of 32 or more dividing a chunk or made of whole chunks */
static int i4q_fits(const Linear *L) {
    int n = L->in, g = L->group;
    return g >= 32 && (g & (g - 1)) == 0 && n % CW == 0 && n % g == 0 && n / g <= NGMAX;
}

/* x -> int8 per group (see HAVE_XQ8) into x8, permuted per chunk; d, the fp32 group sums xg (group_sums') and the
 * centring terms t, zero-padded to whole vectors. Rounding: lrintf's (the current mode: nearest even), as qmm.c. */
static void quant8_groups(const float *x, int n, int group, int8_t *x8, float *d, float *xg, float *t) {
    int ng = n / group;
    group_sums(x, n, group, xg);
    for (int g = ng; g < (int)(align64(4 * (size_t)ng) + 64) / 4; g++) d[g] = t[g] = 0.f;
    for (int g = 0; g < ng; g++) {
        const float *xs = x + (size_t)g * group;
        float m = absmax(xs, group), inv = m > 0.f ? 127.f / m : 0.f;
        VI32 qs = vi32_set1(0);
        d[g] = m / 127.f;
        for (int c = g * group; c < (g + 1) * group; c += 32) { /* 32 columns: 16 even, 16 odd */
            int8_t b[32];
            for (int k = 0; k < 32; k += VW) {
                VI32 a = vcvt_i32(vmul(vload(x + c + k), vset1(inv)));
                qs = vi32_add(qs, a);
                vstore_i8(b + k, a);
            }
            int8_t *o = x8 + c - c % CW + c % CW / 2; /* the chunk's even columns first, then its odd ones */
            deinterleave32(b, o, o + CW / 2);
        }
        int32_t q[VW], sum = 0;
        memcpy(q, &qs, sizeof q);
        for (int k = 0; k < VW; k++) sum += q[k];
        t[g] = -8.f * (d[g] * (float)sum);
    }
}
#endif

static void prep(Job *j, char *buf) {
    const Linear *L = j->L;
    int n = L->in;
    uint16_t *xb = (uint16_t *)buf;
    float *xp = (float *)(buf + align64(2 * (size_t)n)), *xg = (float *)(buf + align64(2 * (size_t)n) + align64(4 * (size_t)n));
#if defined(HAVE_XQ8)
    if (L->kind == W_I4 && i4q_fits(L)) { /* [x8] [xd] [xg] [xt] */
        size_t gb = align64(4 * (size_t)(n / L->group)) + 64;
        float *d = (float *)(buf + align64((size_t)n)), *g = (float *)((char *)d + gb), *t = (float *)((char *)g + gb);
        quant8_groups(j->x, n, L->group, (int8_t *)buf, d, g, t);
        j->x8 = (const int8_t *)buf, j->xd = d, j->xg = g, j->xt = t, j->xq = NULL, j->xs = 1.f;
        return;
    }
    if (L->kind == W_I8 && n % 32 == 0) {
        float mx = absmax(j->x, n);
        float xs = mx > 0.f ? mx / 32767.f : 1.f;
        quant16(j->x, n, 1.f / xs, (int16_t *)xb);
        j->xq = (const int16_t *)xb, j->x8 = NULL, j->xs = xs;
        return;
    }
#endif
    j->xq = NULL, j->x8 = NULL;
    if (L->kind == W_BF16) {
        to_bf16(j->x, n, xb);
        j->xb = xb;
    } else if (L->kind == W_I4) {
        for (int c = 0; c + 32 <= n; c += 32)
            for (int t = 0; t < 16; t++) {
                xp[c + t] = j->x[c + 2 * t];
                xp[c + 16 + t] = j->x[c + 2 * t + 1];
            }
        j->xp = xp, j->xg = group_sums(j->x, n, L->group, xg);
    }
}

/* not inlined: one compiled copy for every caller, so the compiler's vectorisation of the `omp simd` reductions (the
 * plain C loops, the kernels' tails) cannot differ between a lone row and a batch */
static __attribute__((noinline)) float row_dot(const Job *j, int r) {
    const Linear *L = j->L;
    int n = L->in;
    float y;
    switch (L->kind) {
    case W_F32: y = dot_f32((const float *)L->w + (size_t)r * n, j->x, n); break;
    case W_BF16: y = dot_bf16((const uint16_t *)L->w + (size_t)r * n, j->x, j->xb, n); break;
    case W_I8:
        if (L->group) { /* 32 (checked by step_checked) */
            size_t g0 = (size_t)r * (n / 32);
#if defined(HAVE_XQ16)
            if (j->xq) {
                y = dot_i8_x16_g32((const int8_t *)L->w + (size_t)r * n, j->xq, L, g0, n) * j->xs;
                break;
            }
#endif
            y = dot_i8_g32((const int8_t *)L->w + (size_t)r * n, j->x, L, g0, n);
            break;
        }
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
        y = dot_i4((const uint8_t *)L->w + (size_t)r * (n / 2), j->xp, j->xg, L, g0, n, L->group);
    }
    }
    return L->bias ? y + L->bias[r] : y;
}

/* ---- register tiles: R weight rows x C batch rows (one Linear's jobs) ----------------------------------------
 * Every output (weight row r, batch row c) has exactly one vector accumulator, updated chunk by chunk in column
 * order, and is reduced by the transpose-and-add tree of vsum_lanes; the zero-point term of int4 and the scale and
 * bias are applied by tile_out. That arithmetic is the output's own: it does not depend on the tile's shape (R,
 * C), so a row stepped alone (C = 1) gets the bits it gets in any batch. In a tile each weight chunk is loaded
 * (int8/int4: widened, unpacked) once for the C batch rows and each x chunk once for the R weight rows, so the
 * loads per multiply fall from about 1 + 1/C (one weight row at a time) to 1/R + 1/C, and one vsum_lanes reduces
 * up to VW outputs. Integer accumulation (the int16 paths) is exact, so only its conversions to float are ordered.
 * Weights are streamed with software prefetch, PF_AHEAD bytes ahead of what the tiles read: R interleaved rows
 * and the longer work per byte at large C both defeat the hardware prefetcher (measured: up to 45 % of a B=16
 * step stalled on weight loads without it). */
#if defined(VW)
#define INL static inline __attribute__((always_inline))
#define PF_AHEAD 8192 /* bytes */
#define RMAX 4
#define CMAX 4
#define OUT_BUF 4096 /* outputs buffered before tile_out */
enum { T_F32, T_BF16, T_I8, T_I4 };

/* which tiled kernel applies to L's jobs (-1: none, every output goes through row_dot). It depends on the Linear
 * only (xq is set by prep for every job of an int8/int4 Linear of these shapes), never on the batch. */
static int tile_kind(const Job *J) {
    const Linear *L = J->L;
    int n = L->in;
    switch (L->kind) {
    case W_F32: return n % VW ? -1 : T_F32;
#if defined(BF_PAIRS)
    case W_BF16: return n % BF_PAIRS ? -1 : T_BF16;
#else
    case W_BF16: return n % VW ? -1 : T_BF16;
#endif
#if defined(HAVE_XQ16)
    case W_I8: return J->xq && n % (2 * VW) == 0 ? T_I8 : -1;
    case W_I4: return J->x8 ? T_I4 : -1;
#endif
    default: return -1;
    }
}

/* rows per tile (1, 2 or 4) for one batch row, for 2-3 and for more, and batch rows per tile (<= CMAX), per kind
 * (T_F32, T_BF16, T_I8, T_I4). Measured (0.3B shape, 2 threads): while the weights stream from memory (one or a
 * few batch rows) fp32 and bf16 are fastest one row at a time, int8/int4 rows (shorter, more instructions per
 * byte) four at a time; with more batch rows the largest tile that fits the registers (32 with AVX-512, 16 with
 * AVX2) wins. int4 x int8 (tile_i4q, one 3072 x 1024 weight, groups of 128, out of cache): 4 x 4 with AVX-512
 * (B = 8: 93 us against 101 for 4 x 2 and 117 for 2 x 4), 1 x 4 with AVX2 (142 us against 148-155 for 2 x 2-3). */
#if defined(__AVX512F__)
static const int RT[4][3] = {{1, 1, 4}, {1, 1, 4}, {4, 1, 4}, {4, 4, 4}}, CB[4] = {4, 4, 4, 4};
#else
static const int RT[4][3] = {{1, 2, 2}, {2, 2, 2}, {4, 2, 2}, {2, 2, 1}}, CB[4] = {4, 4, 2, 4};
#endif

/* the R x C accumulators a[c * R + r] reduced into out[c * stride + r], VW at a time (lanes past R * C: zero
 * vectors); one accumulator alone by vsum1, the same tree */
INL void tile_reduce(const int R, const int C, const vf *a, float *out, int stride) {
    if (R * C == 1) {
        out[0] = vsum1(a[0]);
        return;
    }
    float t[RMAX * CMAX + VW];
    for (int k = 0; k < R * C; k += VW) {
        vf v[VW];
        for (int i = 0; i < VW; i++) v[i] = k + i < R * C ? a[k + i] : vzero();
        vstore(t + k, vsum_lanes(v));
    }
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) out[c * stride + r] = t[c * R + r];
}

/* the weights are prefetched as one sequential stream per thread, a cursor PF_AHEAD bytes ahead of the tiles: each
 * step of a tile's pass (one line of each of its R rows) moves it by R steps, in part (step mod parts) of the
 * tile's passes, so over the passes it moves by the tile's bytes and its requests are spread over the tile's time */
#define PF_SEQ(step)                                                                                               \
    do {                                                                                                           \
        if (cnt == 0) {                                                                                            \
            for (int r_ = 0; r_ < R; r_++) __builtin_prefetch(pf + r_ * (step), 0, 3);                             \
            pf += R * (step);                                                                                      \
            cnt = parts;                                                                                           \
        }                                                                                                          \
        cnt--;                                                                                                     \
    } while (0)
/* v in a register: an x chunk is loaded once for the tile's R rows, not folded into each of their multiplies */
#if !defined(REG) /* vec_neon.h has aarch64's */
#define REG(v) __asm__("" : "+v"(v))
#endif

/* one chunk of VW columns of a float tile: R weight vectors (LOAD widens them to fp32), then each batch row's x
 * against all of them; a[c * R + r] accumulates output (r, c) in column order */
#define FMA_CHUNK(LOAD, i)                                                                                         \
    do {                                                                                                           \
        vf wv[RMAX];                                                                                               \
        for (int r = 0; r < R; r++) {                                                                              \
            wv[r] = LOAD(w[r] + (i));                                                                              \
            REG(wv[r]);                                                                                            \
        }                                                                                                          \
        for (int c = 0; c < C; c++) {                                                                              \
            vf xv = vload(x[c] + (i));                                                                             \
            REG(xv);                                                                                               \
            for (int r = 0; r < R; r++) a[c * R + r] = vfma(wv[r], xv, a[c * R + r]);                              \
        }                                                                                                          \
    } while (0)

/* fp32 weights: lines of 16 columns */
INL void tile_f32(const int R, const int C, const Linear *L, const Job *J, long r0, const char **pfp, int cnt,
                  int parts, float *s, int stride) {
    const char *pf = *pfp;
    const int n = L->in;
    const float *w[RMAX], *x[CMAX];
    vf a[RMAX * CMAX];
    for (int r = 0; r < R; r++) w[r] = (const float *)L->w + (size_t)(r0 + r) * n;
    for (int c = 0; c < C; c++) x[c] = J[c].x;
    for (int k = 0; k < R * C; k++) a[k] = vzero();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        PF_SEQ(64);
        for (int u = 0; u < 16; u += VW) FMA_CHUNK(vload, i + u);
    }
    for (; i < n; i += VW) FMA_CHUNK(vload, i);
    *pfp = pf;
    tile_reduce(R, C, a, s, stride);
}

#if defined(BF_PAIRS)
/* bf16 weights against x in bf16, BF_PAIRS columns a chunk (VDPBF16PS: 32, one line; aarch64 BFDOT: 8), pairs of
 * exact products summed in fp32; lines of 32 columns */
INL void tile_bf16(const int R, const int C, const Linear *L, const Job *J, long r0, const char **pfp, int cnt,
                   int parts, float *s, int stride) {
    const char *pf = *pfp;
    const int n = L->in;
    const uint16_t *w[RMAX], *x[CMAX];
    vf a[RMAX * CMAX];
    for (int r = 0; r < R; r++) w[r] = (const uint16_t *)L->w + (size_t)(r0 + r) * n;
    for (int c = 0; c < C; c++) x[c] = J[c].xb;
    for (int k = 0; k < R * C; k++) a[k] = vzero();
    for (int i = 0; i < n; i += BF_PAIRS) {
        if (i % 32 == 0) PF_SEQ(64);
        vbf wv[RMAX];
        for (int r = 0; r < R; r++) wv[r] = vbf_load(w[r] + i);
        for (int c = 0; c < C; c++) {
            vbf xv = vbf_load(x[c] + i);
            REG(xv);
            for (int r = 0; r < R; r++) a[c * R + r] = vbf_dot(a[c * R + r], wv[r], xv);
        }
    }
    *pfp = pf;
    tile_reduce(R, C, a, s, stride);
}
#else
/* bf16 weights widened to fp32 (exact) against x in fp32: lines of 32 columns */
INL void tile_bf16(const int R, const int C, const Linear *L, const Job *J, long r0, const char **pfp, int cnt,
                   int parts, float *s, int stride) {
    const char *pf = *pfp;
    const int n = L->in;
    const uint16_t *w[RMAX];
    const float *x[CMAX];
    vf a[RMAX * CMAX];
    for (int r = 0; r < R; r++) w[r] = (const uint16_t *)L->w + (size_t)(r0 + r) * n;
    for (int c = 0; c < C; c++) x[c] = J[c].x;
    for (int k = 0; k < R * C; k++) a[k] = vzero();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        PF_SEQ(64);
        for (int u = 0; u < 32; u += VW) FMA_CHUNK(vload_bf16, i + u);
    }
    for (; i < n; i += VW) FMA_CHUNK(vload_bf16, i);
    *pfp = pf;
    tile_reduce(R, C, a, s, stride);
}
#endif
#undef FMA_CHUNK

#if defined(HAVE_XQ16)
/* the exact int32 sums a[] of columns [i, end) (int8 widened to int16 against xq), lines of 64 columns */
INL void i8_block(const int R, const int C, const int8_t *const *w, const int16_t *const *x, int i, int end,
                  vi *a, const char **pfp, int *cntp, int parts) {
    const char *pf = *pfp;
    int cnt = *cntp;
    for (int k = 0; k < R * C; k++) a[k] = vi_zero();
#define I8_CHUNK(i)                                                                                                \
    do {                                                                                                           \
        vi wv[RMAX];                                                                                               \
        for (int r = 0; r < R; r++) wv[r] = vi_i8to16(w[r] + (i));                                                 \
        for (int c = 0; c < C; c++) {                                                                              \
            vi xv = vi_load16(x[c] + (i));                                                                         \
            REG(xv);                                                                                               \
            for (int r = 0; r < R; r++) a[c * R + r] = vi_dp(a[c * R + r], wv[r], xv);                             \
        }                                                                                                          \
    } while (0)
    for (; i + 64 <= end; i += 64) {
        PF_SEQ(64);
        for (int u = 0; u < 64; u += 2 * VW) I8_CHUNK(i + u);
    }
    for (; i < end; i += 2 * VW) I8_CHUNK(i);
#undef I8_CHUNK
    *pfp = pf, *cntp = cnt;
}

/* int8 weights: exact int32 sums over blocks of I8_BLOCK columns (i8_block), each block's sum converted and added
 * to the output's fp32 accumulator, in block order (tile_out applies xs * scale) */
INL void tile_i8(const int R, const int C, const Linear *L, const Job *J, long r0, const char **pfp, int cnt,
                 int parts, float *s, int stride) {
    const int n = L->in;
    const int8_t *w[RMAX];
    const int16_t *x[CMAX];
    vf f[RMAX * CMAX];
    vi a[RMAX * CMAX];
    for (int r = 0; r < R; r++) w[r] = (const int8_t *)L->w + (size_t)(r0 + r) * n;
    for (int c = 0; c < C; c++) x[c] = J[c].xq;
    if (n <= I8_BLOCK) { /* one block: f = 0 + its sum is its sum (a converted int is never -0) */
        i8_block(R, C, w, x, 0, n, a, pfp, &cnt, parts);
        for (int k = 0; k < R * C; k++) f[k] = vi_tof(a[k]);
    } else {
        for (int k = 0; k < R * C; k++) f[k] = vzero();
        for (int i = 0; i < n; i += I8_BLOCK) {
            i8_block(R, C, w, x, i, i + I8_BLOCK < n ? i + I8_BLOCK : n, a, pfp, &cnt, parts);
            for (int k = 0; k < R * C; k++) f[k] = vadd(f[k], vi_tof(a[k]));
        }
    }
    tile_reduce(R, C, f, s, stride);
}

/* int8 weights with one scale per group of 32 columns (GGUF Q8_0): exact int32 sums per group (one vi_dp with
 * AVX-512, two with AVX2, four with NEON), each times the group's scale into the output's fp32 accumulator, in
 * group order; tile_out then multiplies by xs. One prefetch step per 64 columns (a line of each row). The scales
 * are read one at a time: widening VW of them at once (to a stack array, or a register to lane-permute) measured
 * 2-2.5x slower with AVX-512. */
INL void tile_i8g(const int R, const int C, const Linear *L, const Job *J, long r0, const char **pfp, int cnt,
                  int parts, float *s, int stride) {
    const char *pf = *pfp;
    const int n = L->in, ng = n / 32, sdt = L->sdt;
    const int8_t *w[RMAX];
    const int16_t *x[CMAX];
    vf acc[RMAX * CMAX];
    for (int r = 0; r < R; r++) w[r] = (const int8_t *)L->w + (size_t)(r0 + r) * n;
    for (int c = 0; c < C; c++) x[c] = J[c].xq;
    for (int k = 0; k < R * C; k++) acc[k] = vzero();
    for (int g = 0; g < ng; g++) {
        const int cc = 32 * g;
        if (cc % 64 == 0) PF_SEQ(64);
        vi a[RMAX * CMAX];
        for (int k = 0; k < R * C; k++) a[k] = vi_zero();
        for (int q = 0; q < 32; q += 2 * VW) {
            vi wv[RMAX];
            for (int r = 0; r < R; r++) wv[r] = vi_i8to16(w[r] + cc + q);
            for (int c = 0; c < C; c++) {
                vi xv = vi_load16(x[c] + cc + q);
                REG(xv);
                for (int r = 0; r < R; r++) a[c * R + r] = vi_dp(a[c * R + r], wv[r], xv);
            }
        }
        for (int r = 0; r < R; r++) {
            vf scv = vset1(sz_at(L->scale, (size_t)(r0 + r) * ng + g, sdt));
            for (int c = 0; c < C; c++) acc[c * R + r] = vfma(vi_tof(a[c * R + r]), scv, acc[c * R + r]);
        }
    }
    *pfp = pf;
    tile_reduce(R, C, acc, s, stride);
}

/* cnt (<= VW) consecutive scales or zeros from element i of p (dtype sdt) as fp32 lanes, zero past cnt */
static inline vf vload_sz(const void *p, size_t i, int sdt, int cnt) {
#if defined(__AVX512F__)
    __mmask16 m = (__mmask16)((1u << cnt) - 1);
    if (sdt)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
#else
    if (cnt == VW) return sdt ? vload_bf16((const uint16_t *)p + i) : vload((const float *)p + i);
    float t[VW] = {0};
    for (int k = 0; k < cnt; k++) t[k] = sz_at(p, i + k, sdt);
    return vload(t);
#endif
}

/* int4 weights against x in int8 per group (HAVE_XQ8): exact int32 sums per group (groups of whole chunks) or per
 * chunk with each lane in its own group (smaller groups), each times scale * d (one fp32 product per group) into the
 * output's fp32 accumulator, in column order; ext gets the zero-point and centring terms, zero * sum(x) + scale * t,
 * in VW lanes of groups, reduced like the sums (tile_out adds them, xs = 1). G: the group size as a constant (0:
 * L->group). One prefetch step per 128 columns (a line of each row). */
/* the low and high nibbles of chunk cc (columns) of the R weight rows, as bytes */
INL void i4q_nibbles(const int R, const uint8_t *const *w, int cc, vq *lo, vq *hi) {
    for (int r = 0; r < R; r++) {
        vq b = vq_load(w[r] + cc / 2);
        lo[r] = vq_lo(b), hi[r] = vq_hi(b);
    }
}

INL void tile_i4q(const int R, const int C, const int G, const Linear *L, const Job *J, long r0, const char **pfp,
                  int cnt, int parts, float *s, float *ext, int stride) {
    const char *pf = *pfp;
    const int n = L->in, group = G ? G : L->group, ng = n / group, sdt = L->sdt;
    const uint8_t *w[RMAX];
    const int8_t *x[CMAX];
    vf acc[RMAX * CMAX];
    float sc[RMAX][NGMAX + VW] __attribute__((aligned(64))), zr[RMAX][NGMAX + VW] __attribute__((aligned(64)));
    for (int r = 0; r < R; r++) {
        w[r] = (const uint8_t *)L->w + (size_t)(r0 + r) * (n / 2);
        for (int g = 0; g < ng + VW; g += VW) { /* zero past ng: the lane groups' loads read up to VW beyond */
            size_t i = (size_t)(r0 + r) * ng + g;
            int k = ng - g < VW ? ng - g : VW;
            vstore(sc[r] + g, k > 0 ? vload_sz(L->scale, i, sdt, k) : vzero());
            vstore(zr[r] + g, k > 0 ? vload_sz(L->zero, i, sdt, k) : vzero());
        }
    }
    for (int c = 0; c < C; c++) x[c] = J[c].x8;
    for (int k = 0; k < R * C; k++) acc[k] = vzero();
    float p[RMAX * CMAX][NGMAX + VW] __attribute__((aligned(64))); /* scale * d per output and group */
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++)
            for (int g = 0; g < ng; g += VW) vstore(p[c * R + r] + g, vmul(vload(sc[r] + g), vload(J[c].xd + g)));
    if (group > CW) { /* whole chunks per group: int32 sums over the group, then one conversion */
        for (int g0 = 0, gi = 0; g0 < n; g0 += group, gi++) {
            vi a[RMAX * CMAX];
            for (int k = 0; k < R * C; k++) a[k] = vi_zero();
            for (int cc = g0; cc < g0 + group; cc += CW) {
                if (cc % 128 == 0) PF_SEQ(64);
                vq lo[RMAX], hi[RMAX];
                i4q_nibbles(R, w, cc, lo, hi);
                for (int c = 0; c < C; c++) {
                    vq xe = vq_load(x[c] + cc), xo = vq_load(x[c] + cc + CW / 2);
                    REG(xe);
                    REG(xo);
                    for (int r = 0; r < R; r++) a[c * R + r] = vq_dp2(a[c * R + r], lo[r], xe, hi[r], xo);
                }
            }
            for (int k = 0; k < R * C; k++) acc[k] = vfma(vi_tof(a[k]), vset1(p[k][gi]), acc[k]);
        }
    } else { /* a group per chunk, or a chunk of groups (lane l in group 8 l / group): converted chunk by chunk */
        const vi idx = vq_lane_groups(group);
        for (int cc = 0; cc < n; cc += CW) {
            if (cc % 128 == 0) PF_SEQ(64);
            const int gi = cc / group;
            vq lo[RMAX], hi[RMAX];
            i4q_nibbles(R, w, cc, lo, hi);
            for (int c = 0; c < C; c++) {
                vq xe = vq_load(x[c] + cc), xo = vq_load(x[c] + cc + CW / 2);
                REG(xe);
                REG(xo);
                for (int r = 0; r < R; r++) {
                    const int k = c * R + r;
                    vf f = vi_tof(vq_dp2(vi_zero(), lo[r], xe, hi[r], xo));
                    acc[k] = vfma(f, group == CW ? vset1(p[k][gi]) : vq_lanes(p[k] + gi, idx), acc[k]);
                }
            }
        }
    }
    *pfp = pf;
    tile_reduce(R, C, acc, s, stride);
    for (int k = 0; k < R * C; k++) acc[k] = vzero();
    for (int g = 0; g < ng; g += VW)
        for (int c = 0; c < C; c++) {
            vf xg = vload(J[c].xg + g), xt = vload(J[c].xt + g);
            for (int r = 0; r < R; r++)
                acc[c * R + r] = vfma(vload(sc[r] + g), xt, vfma(vload(zr[r] + g), xg, acc[c * R + r]));
        }
    tile_reduce(R, C, acc, ext, stride);
}
#endif

/* the outputs of rows r0..r0+R-1: s[c * stride + r] (the reduced sums) to J[c].y[r0 + r], with the int8 scale, the
 * int4 xs and zero-point term, and the bias. One compiled copy for every tile shape and batch, and explicit fmas
 * where a product meets a sum, so no compiler contracts an output's last roundings differently anywhere. */
static __attribute__((noinline)) void tile_out(const Linear *L, const Job *J, int C, long r0, int R, const float *s,
                                               const float *ext, int stride) {
    const float *bias = L->bias ? L->bias + r0 : NULL;
    for (int c = 0; c < C; c++) {
        float *y = J[c].y + r0, xs = J[c].xs;
        const float *sc = s + (size_t)c * stride, *ec = ext + (size_t)c * stride;
        switch (L->kind) {
        case W_I8:
            if (L->group) { /* the group scales are in the sums already */
                for (int r = 0; r < R; r++) y[r] = bias ? fmaf(sc[r], xs, bias[r]) : sc[r] * xs;
                break;
            }
            for (int r = 0; r < R; r++) {
                float m = xs * sz_at(L->scale, (size_t)r0 + r, L->sdt);
                y[r] = bias ? fmaf(sc[r], m, bias[r]) : sc[r] * m;
            }
            break;
        case W_I4:
            for (int r = 0; r < R; r++) {
                float v = fmaf(sc[r], xs, ec[r]);
                y[r] = bias ? v + bias[r] : v;
            }
            break;
        default:
            for (int r = 0; r < R; r++) y[r] = bias ? sc[r] + bias[r] : sc[r];
        }
    }
}

/* one tile through the kernel of its kind, shape (R, C) as compile-time constants */
#define TILE_CALL(R_, C_)                                                                                           \
    switch (kind) {                                                                                                 \
    case T_F32: tile_f32(R_, C_, L, J, r0, pfp, cnt, parts, s, stride); return;                                     \
    case T_BF16: tile_bf16(R_, C_, L, J, r0, pfp, cnt, parts, s, stride); return;                                   \
    TILE_CALL_Q(R_, C_)                                                                                             \
    }                                                                                                               \
    return
#if defined(HAVE_XQ16)
#define TILE_CALL_Q(R_, C_)                                                                                         \
    case T_I8:                                                                                                      \
        if (L->group) tile_i8g(R_, C_, L, J, r0, pfp, cnt, parts, s, stride);                                       \
        else tile_i8(R_, C_, L, J, r0, pfp, cnt, parts, s, stride);                                                 \
        return;                                                                                                     \
    default: /* groups of 128 and 32 (Q4_0's) as constants, others read from L */                               \
        if (L->group == 128) tile_i4q(R_, C_, 128, L, J, r0, pfp, cnt, parts, s, ext, stride);                     \
        else if (L->group == 32) tile_i4q(R_, C_, 32, L, J, r0, pfp, cnt, parts, s, ext, stride);                  \
        else tile_i4q(R_, C_, 0, L, J, r0, pfp, cnt, parts, s, ext, stride);                                       \
        return;
#else
#define TILE_CALL_Q(R_, C_)
#endif
#define TILE_R(R_)                                                                                                  \
    switch (C) {                                                                                                    \
    case 1: { TILE_CALL(R_, 1); }                                                                                   \
    case 2: { TILE_CALL(R_, 2); }                                                                                   \
    case 3: { TILE_CALL(R_, 3); }                                                                                   \
    default: { TILE_CALL(R_, 4); }                                                                                  \
    }

static void tile_r1(int kind, int C, const Linear *L, const Job *J, long r0, const char **pfp, int cnt, int parts,
                     float *s, float *ext, int stride) {
    TILE_R(1)
}
static void tile_r2(int kind, int C, const Linear *L, const Job *J, long r0, const char **pfp, int cnt, int parts,
                     float *s, float *ext, int stride) {
    TILE_R(2)
}
static void tile_r4(int kind, int C, const Linear *L, const Job *J, long r0, const char **pfp, int cnt, int parts,
                     float *s, float *ext, int stride) {
    TILE_R(4)
}

/* rows [a, b) of the jobs J[0..nb) (one Linear): tiles of R rows, the batch split into ceil(nb / CB) near-equal
 * parts; each tile's weight rows are read from memory once, its other parts read them from L1/L2 */
static void gemv_rows(const Job *J, int nb, long a, long b) {
    const Linear *L = J->L;
    int kind = tile_kind(J);
    if (kind < 0) {
        for (long r = a; r < b; r++)
            for (int k = 0; k < nb; k++) J[k].y[r] = row_dot(&J[k], (int)r);
        return;
    }
    if (nb > OUT_BUF / 4) { /* a batch wider than the output buffer: in parts (each output is its own anyway) */
        for (int k = 0; k < nb; k += OUT_BUF / 4) gemv_rows(J + k, nb - k < OUT_BUF / 4 ? nb - k : OUT_BUF / 4, a, b);
        return;
    }
    int R = RT[kind][nb == 1 ? 0 : nb < 4 ? 1 : 2], parts = (nb + CB[kind] - 1) / CB[kind];
    size_t rb = L->kind == W_F32 ? 4 * (size_t)L->in : L->kind == W_BF16 ? 2 * (size_t)L->in
              : L->kind == W_I8 ? (size_t)L->in : (size_t)L->in / 2;
    /* the results of up to `blk` rows at a time, then tile_out for all of them */
    float s[OUT_BUF], ext[OUT_BUF];
    int blk = OUT_BUF / nb / 4 * 4;
    blk = blk < 4 ? 4 : blk; /* nb <= OUT_BUF / 4: more batch rows than that are split by the caller */
    const char *pf = (const char *)L->w + a * rb + PF_AHEAD;
    for (long b0 = a; b0 < b; b0 += blk) {
        long b1 = b0 + blk < b ? b0 + blk : b;
        for (long r0 = b0; r0 < b1;) {
            int rt = b1 - r0 >= R ? R : 1;
            void (*tile)(int, int, const Linear *, const Job *, long, const char **, int, int, float *, float *, int) =
                rt == 4 ? tile_r4 : rt == 2 ? tile_r2 : tile_r1;
            for (int p = 0, c0 = 0; p < parts; p++) {
                int C = nb / parts + (p < nb % parts);
                tile(kind, C, L, J + c0, r0, &pf, p, parts, s + c0 * blk + (r0 - b0), ext + c0 * blk + (r0 - b0), blk);
                c0 += C;
            }
            r0 += rt;
        }
        tile_out(L, J, nb, b0, (int)(b1 - b0), s, ext, blk);
    }
}
#else
static void gemv_rows(const Job *J, int nb, long a, long b) {
    for (long r = a; r < b; r++)
        for (int k = 0; k < nb; k++) J[k].y[r] = row_dot(&J[k], (int)r);
}
#endif

/* ---- scratch -------------------------------------------------------------------------------------- */
/* Everything a step needs besides the weights and the caller's buffers, sized for cap_b batch rows; rows are
 * B consecutive vectors of the stride named beside each array (rounded up to 16 floats). */
typedef struct {
    float *x, *n, *o, *blk; /* hidden (sh) */
    float *cat;             /* an MTP row's normed embedding and hidden state, side by side (2 sh) */
    float *q, *att;         /* n_heads * head_dim (sq) */
    float *k, *v;           /* n_kv * head_dim (skv) */
    float *g, *u, *a;       /* MLP / expert intermediates (sf): expert slot s at s * expert width, shared last */
    float *y;               /* expert outputs (sy = slots x hidden) */
    float *probs;           /* router probabilities (se) */
    float *rw;              /* routing weights (sk) */
    float *cs, *sn;         /* RoPE cos / sin (sd) */
    int *sel;               /* selected experts, id order (sk) */
    int *pairs;             /* (row, slot) pairs grouped by expert: row * sk + slot */
    int *cnt;               /* per expert: first pair (E + 1) */
    int *T;                 /* positions attended per row */
    Job *jobs;
    int *hash;              /* prep sharing in gemv_multi: hash_len slots */
} Act;

typedef struct {
    int cap_b, cap_threads, hash_len, cap_jobs;
    int sh, sq, skv, sf, sy, se, sk, sd; /* strides (floats / ints) */
    void *rows;                          /* the block Act points into */
    char *prep;                          /* prepared x (prep()), grown on demand */
    size_t prep_cap;
    Act a;
} Scratch;

static inline void share_prep(Job *jobs, int j) {
    const Job *o = &jobs[jobs[j].src];
    if (o != &jobs[j]) {
        jobs[j].xb = o->xb, jobs[j].xp = o->xp, jobs[j].xg = o->xg, jobs[j].xq = o->xq, jobs[j].xs = o->xs;
        jobs[j].x8 = o->x8, jobs[j].xd = o->xd, jobs[j].xt = o->xt;
    }
}

/* one GEMV over every job: prep each distinct x once (a row's q/k/v share one), then rows split over threads */
static int gemv_multi(const Model *m, Job *jobs, int nj, int bf16) {
    Scratch *s = (Scratch *)m->scratch;
    int hn = s->hash_len, *hash = s->a.hash;
    if (2 * nj > hn) return -1; /* never: cap_jobs bounds every call */
    for (int i = 0; i < hn; i++) hash[i] = -1;
    size_t bytes = 0;
    int owners = 0;
    for (int j = 0; j < nj; j++) { /* jobs with the same x and the same prepared form share one (prep is pure) */
        const Linear *L = jobs[j].L;
        unsigned h = (unsigned)(((uintptr_t)jobs[j].x >> 2) * 2654435761u) ^ (unsigned)(L->kind * 977 + L->group);
        for (h &= hn - 1;; h = (h + 1) & (hn - 1)) {
            int o = hash[h];
            if (o < 0) {
                hash[h] = j, jobs[j].src = j, jobs[j].off = bytes, owners++;
                bytes += prep_bytes(L);
                break;
            }
            const Linear *P = jobs[o].L;
            if (jobs[o].x == jobs[j].x && P->kind == L->kind && P->group == L->group && P->in == L->in) {
                jobs[j].src = o;
                break;
            }
        }
    }
    if (bytes > s->prep_cap) {
        free(s->prep);
        s->prep_cap = 0;
        if (!(s->prep = aligned_alloc(64, align64(bytes)))) return -1;
        s->prep_cap = align64(bytes);
    }
    /* rows are split by cost: a row of a group of nb jobs counts nb + 2 (one read of the weight row, nb dots) */
    long total = 0;
    for (int j = 0, e; j < nj; j = e) {
        for (e = j + 1; e < nj && jobs[e].L == jobs[j].L; e++) {}
        total += (long)jobs[j].L->out * (e - j + 2);
    }
    /* each distinct x is prepared once (by many threads when there are many), then shared by its other jobs */
    int serial = owners < 4;
    if (serial) {
        for (int j = 0; j < nj; j++)
            if (jobs[j].src == j) prep(&jobs[j], s->prep + jobs[j].off);
        for (int j = 0; j < nj; j++) share_prep(jobs, j);
    }
#pragma omp parallel num_threads(m->n_threads)
    {
        if (!serial) {
#pragma omp for schedule(dynamic)
            for (int j = 0; j < nj; j++)
                if (jobs[j].src == j) prep(&jobs[j], s->prep + jobs[j].off);
#pragma omp for schedule(static)
            for (int j = 0; j < nj; j++) share_prep(jobs, j);
        }
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long c0 = total * t / nt, c1 = total * (t + 1) / nt, base = 0;
        for (int j = 0, e; j < nj && base < c1; j = e) {
            for (e = j + 1; e < nj && jobs[e].L == jobs[j].L; e++) {}
            long out = jobs[j].L->out, u = e - j + 2; /* row r starts at cost base + r * u */
            long a = c0 > base ? (c0 - base + u - 1) / u : 0, b = (c1 - base + u - 1) / u;
            a = a < out ? a : out, b = b < out ? b : out;
            if (b > a) gemv_rows(&jobs[j], e - j, a, b);
            if (b > a)
                for (int k = j; k < e; k++) round_vec(jobs[k].y + a, (int)(b - a), bf16);
            base += out * u;
        }
    }
    return 0;
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

/* ---- reading the cache ------------------------------------------------------------------------------ */
/* one int8 cache element as attention reads it: (float)q * s in fp32, rounded to the model dtype (the engine's
 * `(q.float() * s).to(dtype)`) */
static inline float kv_deq(int8_t q, float s, int bf) {
    float v = (float)q * s;
    return bf ? rb(v) : v;
}

/* the row at element offset `off` of c as the fp32 values attention reads: fp32 pages in place, bf16 widened
 * (exact), int8 dequantised into `row` */
static inline __attribute__((always_inline)) const float *kv_widen(const Model *m, const KV *c, size_t off,
                                                                   float *row) {
    int d = m->head_dim, bf = m->bf16, i = 0;
    if (c->scale) {
        const int8_t *p = (const int8_t *)c->base + off;
        float s = c->scale[off / d];
#if defined(VW)
        for (; i + VW <= d; i += VW) {
            vf v = vmul(vload_i8(p + i), vset1(s));
            vstore(row + i, bf ? vrb(v) : v);
        }
#endif
        for (; i < d; i++) row[i] = kv_deq(p[i], s, bf);
        return row;
    }
    if (!bf) return (const float *)c->base + off;
    const uint16_t *p = (const uint16_t *)c->base + off;
    for (; i < d; i++) row[i] = bf2f(p[i]);
    return row;
}

/* ---- attention over the cache --------------------------------------------------------------------- */
/* Query heads h0..h1 (all reading kv head kvh) against positions 0..T-1: each K/V row is widened to fp32 once
 * and used by every head of the group (GQA), and exp is vectorised. Int8 pages are dequantised where float pages
 * are widened, into the same fp32 (or bf16) values, and then go through the same arithmetic. */
static inline __attribute__((always_inline)) void attend_impl(const Model *m, const float *q, const KV *kc,
                                                              const KV *vc, int T, int kvh, int h0, int h1,
                                                              float *out, float *sc, const int q8) {
    (void)q8; /* read by the vector kernels only */
    int d = m->head_dim, bf = m->bf16;
    float scale = 1.0f / sqrtf((float)d), row[MAX_HEAD_DIM];
    const size_t L = m->scratch_len;
    int t0 = 0;
#if defined(VW)
    if (d % VW == 0 && d <= 256) { /* Q K^T VW positions at a time: K block widened once, VW dots reduced together */
        static __thread float kblk[VW * 256];
#if defined(__AVX512BF16__)
        if (bf && h1 - h0 <= 16 && d % 32 == 0) { /* bf16 pairs straight from the cache (q holds bf16 values) */
            static __thread uint16_t qb[16 * 256], kb[16 * 256 + 32]; /* kb: int8 rows dequantised to bf16 */
            for (int h = h0; h < h1; h++)
                for (int i = 0; i < d; i++) qb[(h - h0) * d + i] = f2bf(q[(size_t)h * d + i]);
            for (; t0 + 16 <= T; t0 += 16) {
                const uint16_t *kr[16];
                if (!q8) {
                    for (int k = 0; k < 16; k++) kr[k] = (const uint16_t *)kc->base + kv_row(m, kc, kvh, t0 + k);
                } else {
                    /* the high halves of 2 x 16 bf16-rounded fp32 lanes: their 32 bf16 values, in order */
                    const __m512i hi = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                                        31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
                    for (int k = 0; k < 16; k++) {
                        size_t r = kv_rowi(m, kc, kvh, t0 + k);
                        const int8_t *p = (const int8_t *)kc->base + r * d;
                        __m512 vs = _mm512_set1_ps(kc->scale[r]);
                        for (int c = 0; c < d; c += 32) {
                            __m512i u0 = _mm512_castps_si512(vrb(_mm512_mul_ps(vload_i8(p + c), vs)));
                            __m512i u1 = _mm512_castps_si512(vrb(_mm512_mul_ps(vload_i8(p + c + 16), vs)));
                            _mm512_storeu_si512(kb + k * d + c, _mm512_permutex2var_epi16(u0, hi, u1));
                        }
                        kr[k] = kb + k * d;
                    }
                }
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
                    _mm512_storeu_ps(sc + (h - h0) * L + t0, r);
                }
            }
        }
#endif
        for (; t0 + VW <= T; t0 += VW) {
            if (q8) {
                for (int k = 0; k < VW; k++) {
                    size_t r = kv_rowi(m, kc, kvh, t0 + k);
                    const int8_t *p = (const int8_t *)kc->base + r * d;
                    vf vs = vset1(kc->scale[r]);
                    for (int c = 0; c < d; c += VW) {
                        vf v = vmul(vload_i8(p + c), vs);
                        vstore(kblk + k * d + c, bf ? vrb(v) : v);
                    }
                }
            } else {
                for (int k = 0; k < VW; k++) {
                    size_t off = kv_row(m, kc, kvh, t0 + k);
                    for (int c = 0; c < d; c += VW)
                        vstore(kblk + k * d + c, bf ? vload_bf16((const uint16_t *)kc->base + off + c)
                                                    : vload((const float *)kc->base + off + c));
                }
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
                vstore(sc + (h - h0) * L + t0, r);
            }
        }
    }
#endif
    for (int t = t0; t < T; t++) {
        const float *k = kv_widen(m, kc, kv_row(m, kc, kvh, t), row);
        for (int h = h0; h < h1; h++) {
            float s = dot_f32(k, q + (size_t)h * d, d);
            sc[(h - h0) * L + t] = bf ? rb(rb(s) * scale) : s * scale;
        }
    }
    for (int h = h0; h < h1; h++) { /* softmax in fp32, as `scores.float().softmax(-1)` */
        float *sh = sc + (h - h0) * L, mx = -INFINITY, sum = 0.f;
        for (int t = 0; t < T; t++) mx = sh[t] > mx ? sh[t] : mx;
        int t = 0;
#if defined(VW)
        vf acc = vzero(), vmx = vset1(mx);
        for (; t + VW <= T; t += VW) {
            vf e = vexp(vsub(vload(sh + t), vmx));
            vstore(sh + t, e);
            acc = vadd(acc, e);
        }
        sum = vhsum(acc);
#endif
        for (; t < T; t++) sum += (sh[t] = expf(sh[t] - mx));
        for (t = 0; t < T; t++) sh[t] = bf ? rb(sh[t] / sum) : sh[t] / sum;
        float *oh = out + (size_t)h * d;
        for (int i = 0; i < d; i++) oh[i] = 0.f;
    }
#if defined(VW)
    if (d % VW == 0) { /* P @ V with up to 8 heads' accumulators in registers, VW dimensions at a time */
/* one page's run of rows t..e-1: `v` is row t's VW elements (LOAD), the row pointers step by ADVANCE */
#define PV_RUN(LOAD, ...)                                                                                         \
    if (nb == 8) { /* the GQA group of the 0.3B / 21B shapes: accumulators stay in registers */                  \
        vf a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7]; \
        for (int e = t + run; t < e; t++, __VA_ARGS__) {                                                          \
            vf v = LOAD;                                                                                          \
            a0 = vfma(vset1(ps[t]), v, a0);                                                                       \
            a1 = vfma(vset1(ps[L + t]), v, a1);                                                                   \
            a2 = vfma(vset1(ps[2 * L + t]), v, a2);                                                               \
            a3 = vfma(vset1(ps[3 * L + t]), v, a3);                                                               \
            a4 = vfma(vset1(ps[4 * L + t]), v, a4);                                                               \
            a5 = vfma(vset1(ps[5 * L + t]), v, a5);                                                               \
            a6 = vfma(vset1(ps[6 * L + t]), v, a6);                                                               \
            a7 = vfma(vset1(ps[7 * L + t]), v, a7);                                                               \
        }                                                                                                         \
        acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4, acc[5] = a5, acc[6] = a6, acc[7] = a7;   \
    } else {                                                                                                      \
        for (int e = t + run; t < e; t++, __VA_ARGS__) {                                                          \
            vf v = LOAD;                                                                                          \
            for (int k = 0; k < nb; k++) acc[k] = vfma(vset1(ps[k * L + t]), v, acc[k]);                          \
        }                                                                                                         \
    }
        for (int hb = h0; hb < h1; hb += 8) {
            int nb = h1 - hb < 8 ? h1 - hb : 8;
            const float *ps = sc + (hb - h0) * L;
            for (int c = 0; c < d; c += VW) {
                vf acc[8];
                for (int k = 0; k < 8; k++) acc[k] = vzero();
                for (int t = 0; t < T;) { /* page by page: the rows of a page (and their scales) are contiguous */
                    int run = vc->block_size - t % vc->block_size;
                    run = run < T - t ? run : T - t;
                    size_t r = kv_rowi(m, vc, kvh, t), off = r * d + c;
                    if (q8) {
                        const int8_t *p = (const int8_t *)vc->base + off;
                        const float *sp = vc->scale + r;
                        if (bf) {
                            PV_RUN(vrb(vmul(vload_i8(p), vset1(*sp))), p += d, sp++)
                        } else {
                            PV_RUN(vmul(vload_i8(p), vset1(*sp)), p += d, sp++)
                        }
                    } else {
                        PV_RUN(bf ? vload_bf16((const uint16_t *)vc->base + off) : vload((const float *)vc->base + off),
                               off += d)
                    }
                }
                for (int k = 0; k < nb; k++) vstore(out + (size_t)(hb + k) * d + c, acc[k]);
            }
        }
#undef PV_RUN
        for (int h = h0; h < h1; h++) round_vec(out + (size_t)h * d, d, bf);
        return;
    }
#endif
    for (int t = 0; t < T; t++) {
        const float *v = kv_widen(m, vc, kv_row(m, vc, kvh, t), row);
        for (int h = h0; h < h1; h++) {
            float p = sc[(h - h0) * L + t], *oh = out + (size_t)h * d;
#pragma omp simd
            for (int i = 0; i < d; i++) oh[i] += p * v[i];
        }
    }
    for (int h = h0; h < h1; h++) round_vec(out + (size_t)h * d, d, bf);
}

/* the kernel specialised (two functions, so each has its own code and registers) for float pages and for int8
 * pages; kc and vc are both one or the other */
static __attribute__((noinline)) void attend_float(const Model *m, const float *q, const KV *kc, const KV *vc, int T,
                                                   int kvh, int h0, int h1, float *out, float *sc) {
    attend_impl(m, q, kc, vc, T, kvh, h0, h1, out, sc, 0);
}
static __attribute__((noinline)) void attend_int8(const Model *m, const float *q, const KV *kc, const KV *vc, int T,
                                                  int kvh, int h0, int h1, float *out, float *sc) {
    attend_impl(m, q, kc, vc, T, kvh, h0, h1, out, sc, 1);
}
static void attend_group(const Model *m, const float *q, const KV *kc, const KV *vc, int T, int kvh, int h0,
                         int h1, float *out, float *sc) {
    (kc->scale ? attend_int8 : attend_float)(m, q, kc, vc, T, kvh, h0, h1, out, sc);
}

/* Every (batch row, kv head, part of its query group) is one task; a row reads its own pages. The group is split
 * as for a single row (by threads and kv heads only), so a row's result does not depend on the batch. Scores live
 * per thread: group x scratch_len floats each. */
static void attention(const Model *m, int B, const float *q, int sq, void *kbase, void *vbase, float *kscale,
                      float *vscale, const int32_t *tables, int stride, int bs, const int *T, float *out) {
    int group = m->n_heads / m->n_kv, split = m->n_threads / m->n_kv;
    split = split < 1 ? 1 : split > group ? group : split; /* enough tasks for every thread */
    int per = m->n_kv * split;
#pragma omp parallel for num_threads(m->n_threads) schedule(dynamic)
    for (int task = 0; task < B * per; task++) {
        int b = task / per, kvh = task % per / split, part = task % split;
        KV kc = {kbase, tables + (size_t)b * stride, bs, kscale}, vc = {vbase, tables + (size_t)b * stride, bs, vscale};
        float *sc = m->scores + (size_t)omp_get_thread_num() * group * m->scratch_len;
        attend_group(m, q + (size_t)b * sq, &kc, &vc, T[b], kvh, kvh * group + group * part / split,
                     kvh * group + group * (part + 1) / split, out + (size_t)b * sq, sc);
    }
}

/* One K or V row x (d fp32 values) quantised to int8 as the engine's PyTorch reference does it: x rounded to the
 * model dtype, s = max|x| / 127 (fp32), q = round_half_even(x / s) (one fp32 division per element) clamped to
 * [-127, 127], q = 0 where s is not > 0. Returns s. */
static float quant_row(const Model *m, const float *src, int8_t *q) {
    int d = m->head_dim, nan = 0;
    float x[MAX_HEAD_DIM], amax = 0.f;
    for (int i = 0; i < d; i++) {
        x[i] = m->bf16 ? rb(src[i]) : src[i];
        float a = fabsf(x[i]);
        nan |= a != a;
        amax = a > amax ? a : amax;
    }
    if (nan) amax = NAN; /* torch's amax propagates NaN */
    float s = amax / 127.0f;
    for (int i = 0; i < d; i++) {
        float r = s > 0 ? nearbyintf(x[i] / s) : 0.f; /* the default rounding mode: half to even */
        r = r < -127.f ? -127.f : r > 127.f ? 127.f : r;
        q[i] = r == r ? (int8_t)r : 0;
    }
    return s;
}

/* Row `pos` of every kv head from src (n_kv x d fp32): in the model dtype, or int8 + scale (int8 pages), or with
 * round_trip (float pages) as the int8 row dequantised, the values attention reads from int8 pages. */
static void store_kv(const Model *m, const KV *c, const float *src, int pos, int round_trip) {
    int d = m->head_dim;
    for (int h = 0; h < m->n_kv; h++) {
        size_t off = kv_row(m, c, h, pos);
        const float *x = src + (size_t)h * d;
        float y[MAX_HEAD_DIM];
        if (c->scale) {
            c->scale[off / d] = quant_row(m, x, (int8_t *)c->base + off);
            continue;
        }
        if (round_trip) {
            int8_t q[MAX_HEAD_DIM];
            float s = quant_row(m, x, q);
            for (int i = 0; i < d; i++) y[i] = kv_deq(q[i], s, m->bf16);
            x = y;
        }
        if (m->bf16) {
            uint16_t *p = (uint16_t *)c->base + off;
            for (int i = 0; i < d; i++) p[i] = f2bf(x[i]);
        } else {
            memcpy((float *)c->base + off, x, sizeof(float) * d);
        }
    }
}

/* the vector width of the kernels built: 512 (AVX-512), 256 (AVX2 + FMA), 128 (NEON) or 0 (the plain C loops) */
int ernie_simd_width(void) {
#if defined(VW)
    return VW * 32;
#else
    return 0;
#endif
}

/* 1 where int4 rows are multiplied by x quantised to int8 per group (HAVE_XQ8: the vector ISAs), else 0 */
int ernie_int4_x8(void) {
#if defined(HAVE_XQ8)
    return 1;
#else
    return 0;
#endif
}

/* the instruction sets the kernels were built for, e.g. "avx512+vnni+bf16", "avx2+fma", "neon+bf16", "generic" */
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
#elif defined(VEC_NEON)
        "neon"
#if defined(VEC_BFDOT)
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

/* ---- scratch sizing ------------------------------------------------------------------------------- */
static inline int imax(int a, int b) { return a > b ? a : b; }
static inline int pad16(int n) { return (n + 15) & ~15; }

/* the widest expert intermediate of a MoE layer (an expert slot's width in g / u / a) */
static int expert_width(const Layer *L) {
    int w = 1;
    for (int e = 0; e < L->n_experts; e++) {
        const Linear *x = &L->experts[e * 3];
        w = imax(w, imax(imax(x[0].out, x[1].out), x[2].in));
    }
    return w;
}

static size_t layout(Scratch *s, char *base, int B) {
    size_t off = 0;
#define TAKE(f, type, count) \
    (s->a.f = base ? (type *)(base + off) : NULL, off += align64(sizeof(type) * (size_t)(count)))
    TAKE(x, float, B * s->sh), TAKE(n, float, B * s->sh), TAKE(o, float, B * s->sh), TAKE(blk, float, B * s->sh);
    TAKE(cat, float, 2 * B * s->sh);
    TAKE(q, float, B * s->sq), TAKE(att, float, B * s->sq), TAKE(k, float, B * s->skv), TAKE(v, float, B * s->skv);
    TAKE(g, float, B * s->sf), TAKE(u, float, B * s->sf), TAKE(a, float, B * s->sf), TAKE(y, float, B * s->sy);
    TAKE(probs, float, B * s->se), TAKE(rw, float, B * s->sk), TAKE(cs, float, B * s->sd), TAKE(sn, float, B * s->sd);
    TAKE(sel, int, B * s->sk), TAKE(pairs, int, B * s->sk), TAKE(cnt, int, s->se + 1), TAKE(T, int, B);
    TAKE(jobs, Job, s->cap_jobs), TAKE(hash, int, s->hash_len);
#undef TAKE
    return off;
}

/* scratch for B rows attending over up to T positions (capacity grows ahead of T, up to `bound`) */
static int prepare(Model *m, int B, int T, long bound) {
    Scratch *s = (Scratch *)m->scratch;
    if (!s) {
        if (!(s = calloc(1, sizeof(Scratch)))) return -1;
        m->scratch = s;
    }
    int nt = imax(m->n_threads, 1), group = imax(m->n_kv > 0 ? m->n_heads / m->n_kv : m->n_heads, 1);
    if (T > m->scratch_len || nt > s->cap_threads) { /* attention scores, per thread */
        long cap = imax(T, m->scratch_len);
        if (T > m->scratch_len) {
            long ahead = imax(2 * m->scratch_len, 1024);
            cap = imax(T, (int)(ahead < bound ? ahead : bound));
        }
        int threads = imax(nt, s->cap_threads);
        free(m->scores);
        m->scores = aligned_alloc(64, align64(sizeof(float) * threads * group * cap));
        m->scratch_len = m->scores ? (int)cap : 0;
        s->cap_threads = m->scores ? threads : 0;
        if (!m->scores) return -1;
    }
    if (B <= s->cap_b) return 0;
    Scratch t = *s;
    int H = m->hidden, d = m->head_dim, F = 1, S = 1, E = 1, K = 1;
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *L = &m->layers[l];
        if (L->is_moe) {
            int sw = L->has_shared ? imax(imax(L->sgate.out, L->sup.out), L->sdown.in) : 0;
            F = imax(F, L->top_k * expert_width(L) + sw);
            S = imax(S, L->top_k + (L->has_shared ? 1 : 0));
            E = imax(E, L->n_experts), K = imax(K, L->top_k);
        } else {
            F = imax(F, imax(L->gate.out, L->up.out));
        }
    }
    t.cap_b = B > 1 ? (B + 7) & ~7 : 1;
    t.sh = pad16(H), t.sq = pad16(m->n_heads * d), t.skv = pad16(m->n_kv * d), t.sf = pad16(F), t.sy = pad16(S * H);
    t.se = pad16(E), t.sk = K, t.sd = pad16(imax(d / 2, 1));
    t.cap_jobs = t.cap_b * imax(3, 2 * S); /* the most jobs of one GEMV: q/k/v, or the gates and ups of all slots */
    for (t.hash_len = 64; t.hash_len < 2 * t.cap_jobs; t.hash_len *= 2) {}
    char *p = aligned_alloc(64, align64(layout(&t, NULL, t.cap_b)));
    if (!p) return -1;
    layout(&t, p, t.cap_b);
    free(s->rows);
    t.rows = p;
    *s = t;
    return 0;
}

int ernie_prepare(Model *m, int max_len) { return prepare(m, 1, max_len, max_len); }

void ernie_release(Model *m) {
    Scratch *s = (Scratch *)m->scratch;
    if (s) {
        free(s->rows);
        free(s->prep);
        free(s);
    }
    free(m->scores);
    m->scratch = NULL;
    m->scores = NULL;
    m->scratch_len = 0;
}

/* ---- MoE block ---------------------------------------------------------------------------------- */
/* One row's routing: softmax of its fp32 router logits, top-k of probs + correction bias (selection only),
 * weights renormalised; sel / w in expert id order, the order the PyTorch loop accumulates in. */
static void route(const Model *m, const Layer *L, float *probs, int *sel, float *w) {
    int E = L->n_experts, K = L->top_k;
    float mx = -INFINITY, sum = 0.f, wsum = 0.f;
    for (int e = 0; e < E; e++) mx = probs[e] > mx ? probs[e] : mx;
    for (int e = 0; e < E; e++) sum += (probs[e] = expf(probs[e] - mx));
    for (int e = 0; e < E; e++) probs[e] /= sum;
    for (int k = 0; k < K; k++) {
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
    for (int a = 1; a < K; a++)
        for (int b = a; b > 0 && sel[b - 1] > sel[b]; b--) {
            int ti = sel[b]; sel[b] = sel[b - 1]; sel[b - 1] = ti;
            float tw = w[b]; w[b] = w[b - 1]; w[b - 1] = tw;
        }
}

/* The MoE block of B rows (input A.n, output A.blk). Each row is routed alone; then every selected expert's
 * weights are read once for all the rows that chose it, and the shared experts once for all rows. Row b's slot
 * k (its k-th expert in id order, k = K the shared one) lives at g/u/a + b * sf + k * ew and y + b * sy + k * H,
 * and each row sums its slots in the single-row order, so its result does not depend on the batch. */
static int moe(const Model *m, const Layer *L, int B, int par, double *t0) {
    Scratch *s = (Scratch *)m->scratch;
    Act *A = &s->a;
    Job *jobs = A->jobs;
    int H = m->hidden, E = L->n_experts, K = L->top_k, S = K + (L->has_shared ? 1 : 0), ew = expert_width(L);
    int sk = s->sk, *cnt = A->cnt, *pairs = A->pairs, nj = 0;
    Linear R = {W_F32, E, H, 0, 0, L->router, NULL, NULL, NULL}; /* the fp32 router: dot_f32 per expert, unrounded */
    for (int b = 0; b < B; b++) jobs[b] = JOB(&R, A->n + (size_t)b * s->sh, A->probs + (size_t)b * s->se);
    if (gemv_multi(m, jobs, B, 0)) return -1;
#pragma omp parallel for num_threads(m->n_threads) if (par)
    for (int b = 0; b < B; b++) route(m, L, A->probs + (size_t)b * s->se, A->sel + (size_t)b * sk, A->rw + (size_t)b * sk);
    /* (row, slot) pairs grouped by expert, rows ascending; afterwards expert e's pairs are [cnt[e-1], cnt[e]) */
    for (int e = 0; e <= E; e++) cnt[e] = 0;
    for (int b = 0; b < B; b++)
        for (int k = 0; k < K; k++) cnt[A->sel[b * sk + k] + 1]++;
    for (int e = 0; e < E; e++) cnt[e + 1] += cnt[e];
    for (int b = 0; b < B; b++)
        for (int k = 0; k < K; k++) pairs[cnt[A->sel[b * sk + k]]++] = b * sk + k;
    tick(t0, P_ROUTER);
    for (int e = 0; e < E; e++)
        for (int w = 0; w < 2; w++) /* gate, up */
            for (int p = e ? cnt[e - 1] : 0; p < cnt[e]; p++) {
                int b = pairs[p] / sk, k = pairs[p] % sk;
                size_t o = (size_t)b * s->sf + (size_t)k * ew;
                jobs[nj++] = JOB(&L->experts[e * 3 + w], A->n + (size_t)b * s->sh, (w ? A->u : A->g) + o);
            }
    if (L->has_shared)
        for (int w = 0; w < 2; w++)
            for (int b = 0; b < B; b++)
                jobs[nj++] = JOB(w ? &L->sup : &L->sgate, A->n + (size_t)b * s->sh,
                                 (w ? A->u : A->g) + (size_t)b * s->sf + (size_t)K * ew);
    if (gemv_multi(m, jobs, nj, m->bf16)) return -1;
#pragma omp parallel for num_threads(m->n_threads) if (par)
    for (int i = 0; i < B * S; i++) {
        int b = i / S, k = i % S;
        size_t o = (size_t)b * s->sf + (size_t)k * ew;
        const Linear *dn = k < K ? &L->experts[A->sel[b * sk + k] * 3 + 2] : &L->sdown;
        swiglu(m, A->g + o, A->u + o, A->a + o, dn->in);
    }
    nj = 0;
    for (int e = 0; e < E; e++)
        for (int p = e ? cnt[e - 1] : 0; p < cnt[e]; p++) {
            int b = pairs[p] / sk, k = pairs[p] % sk;
            jobs[nj++] = JOB(&L->experts[e * 3 + 2], A->a + (size_t)b * s->sf + (size_t)k * ew,
                             A->y + (size_t)b * s->sy + (size_t)k * H);
        }
    if (L->has_shared)
        for (int b = 0; b < B; b++)
            jobs[nj++] = JOB(&L->sdown, A->a + (size_t)b * s->sf + (size_t)K * ew, A->y + (size_t)b * s->sy + (size_t)K * H);
    if (gemv_multi(m, jobs, nj, m->bf16)) return -1;
#pragma omp parallel for num_threads(m->n_threads) if (par)
    for (int b = 0; b < B; b++) {
        float *out = A->blk + (size_t)b * s->sh;
        const float *w = A->rw + (size_t)b * sk, *y0 = A->y + (size_t)b * s->sy;
        for (int i = 0; i < H; i++) out[i] = 0.f;
        for (int k = 0; k < K; k++) {
            const float *y = y0 + (size_t)k * H;
            for (int i = 0; i < H; i++) {
                float t = m->bf16 ? rb(y[i] * w[k]) : y[i] * w[k];
                out[i] = m->bf16 ? rb(out[i] + t) : out[i] + t;
            }
        }
        if (L->has_shared) add_into(m, out, y0 + (size_t)K * H, H);
    }
    tick(t0, P_MLP);
    return 0;
}

/* ---- the step ------------------------------------------------------------------------------------ */
/* row r of an int4 Linear widened to fp32 into o: q * scale + zb, zb = zero - 8 * scale per group -- the values of
 * ernie45.quant.kernels.dequantize_int4 (two roundings, as PyTorch's mul_ and add_) */
static void dequant_i4_row(const Linear *L, int r, float *o) {
    int n = L->in, g = L->group, ng = n / g;
    const uint8_t *w = (const uint8_t *)L->w + (size_t)r * (n / 2);
    for (int gi = 0; gi < ng; gi++) {
        size_t i = (size_t)r * ng + gi;
        float s = sz_at(L->scale, i, L->sdt), z = zb_at(L, i);
        const uint8_t *p = w + (size_t)gi * g / 2;
        float *og = o + (size_t)gi * g;
#pragma omp simd
        for (int j = 0; j < g / 2; j++) {
            float lo = (float)(p[j] & 15) * s, hi = (float)(p[j] >> 4) * s;
            og[2 * j] = lo + z;
            og[2 * j + 1] = hi + z;
        }
    }
}

static void embed_row(const Model *m, int token, float *x) {
    int H = m->hidden;
    if (m->embed_kind == W_I4) { /* Int4Embedding.forward: the dequantised row, rounded once to the model dtype */
        Linear E = {0};
        E.kind = W_I4, E.out = m->vocab, E.in = H, E.group = m->embed_group, E.w = m->embed;
        E.scale = m->embed_scale, E.zero = m->embed_zero, E.sdt = m->embed_sdt;
        dequant_i4_row(&E, token, x);
        if (m->bf16)
            for (int i = 0; i < H; i++) x[i] = rb(x[i]);
    } else if (m->embed_kind == W_I8) { /* Int8Embedding.forward: (q.float() * s.float()).to(model dtype), one rounding */
        const int8_t *e = (const int8_t *)m->embed + (size_t)token * H;
        int g = m->embed_group ? m->embed_group : H, ng = H / g; /* group 0: one scale per row */
        for (int gi = 0; gi < ng; gi++) {
            float s = sz_at(m->embed_scale, (size_t)token * ng + gi, m->embed_sdt);
            for (int i = gi * g; i < (gi + 1) * g; i++) {
                float v = (float)e[i] * s;
                x[i] = m->bf16 ? rb(v) : v;
            }
        }
    } else if (m->bf16) {
        const uint16_t *e = (const uint16_t *)m->embed + (size_t)token * H;
        for (int i = 0; i < H; i++) x[i] = bf2f(e[i]);
    } else {
        memcpy(x, (const float *)m->embed + (size_t)token * H, sizeof(float) * H);
    }
}

/* B rows, arguments checked: every weight is read once per GEMV for all rows (row b's vectors at stride) */
static int step(Model *m, int B, const int *tokens, const int *pos, void **kp, void **vp, void **ks, void **vs,
                int round_trip, const int32_t *tables, int stride, int bs, float *logits, float *hidden,
                int hidden_pre, const float *h_in, int rope_offset) {
    int maxT = 0;
    for (int b = 0; b < B; b++) maxT = imax(maxT, pos[b] + 1);
    if (prepare(m, B, maxT, (long)stride * bs)) return -1;
    Scratch *s = (Scratch *)m->scratch;
    Act *A = &s->a;
    Job *jobs = A->jobs;
    int H = m->hidden, nt = m->n_threads;
    int par = (long)B * H >= 16384; /* per-row element-wise work on all threads once there is enough of it */
    size_t sh = s->sh, sq = s->sq, skv = s->skv, sf = s->sf;
#pragma omp parallel for num_threads(nt) if (par)
    for (int b = 0; b < B; b++) {
        embed_row(m, tokens[b], A->x + b * sh);
        rope_table(m, pos[b] + rope_offset, A->cs + (size_t)b * s->sd, A->sn + (size_t)b * s->sd);
        A->T[b] = pos[b] + 1;
    }
    if (h_in) { /* an MTP layer's rows: x = proj(cat(enorm(embedding), hnorm(h_in))) */
        for (int b = 0; b < B; b++) {
            float *c = A->cat + 2 * b * sh;
            if (m->mtp_zero0 && pos[b] + rope_offset == 0) memset(A->x + b * sh, 0, sizeof(float) * H);
            rmsnorm(m, A->x + b * sh, m->mtp_enorm, c);
            rmsnorm(m, h_in + (size_t)b * H, m->mtp_hnorm, c + H);
            jobs[b] = JOB(&m->mtp_proj, c, A->x + b * sh);
        }
        if (gemv_multi(m, jobs, B, m->bf16)) return -1;
    }
    double t0 = omp_get_wtime();
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *L = &m->layers[l];
#pragma omp parallel for num_threads(nt) if (par)
        for (int b = 0; b < B; b++) rmsnorm(m, A->x + b * sh, L->ln1, A->n + b * sh);
        tick(&t0, P_OTHER);
        for (int b = 0; b < B; b++) {
            jobs[b] = JOB(&L->q, A->n + b * sh, A->q + b * sq);
            jobs[B + b] = JOB(&L->k, A->n + b * sh, A->k + b * skv);
            jobs[2 * B + b] = JOB(&L->v, A->n + b * sh, A->v + b * skv);
        }
        if (gemv_multi(m, jobs, 3 * B, m->bf16)) return -1;
        tick(&t0, P_ATTN_PROJ);
#pragma omp parallel for num_threads(nt) if (par)
        for (int b = 0; b < B; b++) {
            const float *cs = A->cs + (size_t)b * s->sd, *sn = A->sn + (size_t)b * s->sd;
            rope(m, A->q + b * sq, m->n_heads, cs, sn);
            rope(m, A->k + b * skv, m->n_kv, cs, sn);
            KV kl = {kp[l], tables + (size_t)b * stride, bs, ks ? (float *)ks[l] : NULL},
               vl = {vp[l], tables + (size_t)b * stride, bs, vs ? (float *)vs[l] : NULL};
            store_kv(m, &kl, A->k + b * skv, pos[b], round_trip);
            store_kv(m, &vl, A->v + b * skv, pos[b], round_trip);
        }
        attention(m, B, A->q, (int)sq, kp[l], vp[l], ks ? (float *)ks[l] : NULL, vs ? (float *)vs[l] : NULL, tables,
                  stride, bs, A->T, A->att);
        tick(&t0, P_ATTN);
        for (int b = 0; b < B; b++) jobs[b] = JOB(&L->o, A->att + b * sq, A->o + b * sh);
        if (gemv_multi(m, jobs, B, m->bf16)) return -1;
        tick(&t0, P_ATTN_PROJ);
#pragma omp parallel for num_threads(nt) if (par)
        for (int b = 0; b < B; b++) {
            add_into(m, A->x + b * sh, A->o + b * sh, H);
            rmsnorm(m, A->x + b * sh, L->ln2, A->n + b * sh);
        }
        tick(&t0, P_OTHER);
        if (L->is_moe) {
            if (moe(m, L, B, par, &t0)) return -1;
        } else {
            for (int b = 0; b < B; b++) {
                jobs[b] = JOB(&L->gate, A->n + b * sh, A->g + b * sf);
                jobs[B + b] = JOB(&L->up, A->n + b * sh, A->u + b * sf);
            }
            if (gemv_multi(m, jobs, 2 * B, m->bf16)) return -1;
#pragma omp parallel for num_threads(nt) if (par)
            for (int b = 0; b < B; b++) swiglu(m, A->g + b * sf, A->u + b * sf, A->a + b * sf, L->gate.out);
            for (int b = 0; b < B; b++) jobs[b] = JOB(&L->down, A->a + b * sf, A->blk + b * sh);
            if (gemv_multi(m, jobs, B, m->bf16)) return -1;
            tick(&t0, P_MLP);
        }
#pragma omp parallel for num_threads(nt) if (par)
        for (int b = 0; b < B; b++) add_into(m, A->x + b * sh, A->blk + b * sh, H);
    }
#pragma omp parallel for num_threads(nt) if (par)
    for (int b = 0; b < B; b++) {
        if (m->norm)
            rmsnorm(m, A->x + b * sh, m->norm, A->n + b * sh);
        else
            memcpy(A->n + b * sh, A->x + b * sh, sizeof(float) * H);
    }
    if (hidden) /* the last hidden state of each row, for a draft head (MTP): the final norm's input or output */
        for (int b = 0; b < B; b++) memcpy(hidden + (size_t)b * H, (hidden_pre ? A->x : A->n) + b * sh, sizeof(float) * H);
    tick(&t0, P_OTHER);
    int nh = 0, R = m->head.out, V = m->mtp_ids ? m->vocab : R; /* logits rows are V wide */
    for (int b = 0; b < B; b++)
        if (!m->want || m->want[b]) {
            jobs[nh] = JOB(&m->head, A->n + b * sh, logits + (size_t)nh * V + (V - R)); /* a row's tail */
            nh++;
        }
    if (nh && gemv_multi(m, jobs, nh, m->bf16)) return -1;
    for (int r = 0; r < nh && m->mtp_ids; r++) { /* spread the tail over the row in place, -inf between: ids
                                                  * ascending, so ids[i] <= V - R + i and no unread score is hit */
        float *y = logits + (size_t)r * V;
        for (int p = 0, i = 0; p < V; p++)
            y[p] = i < R && p == m->mtp_ids[i] ? y[V - R + i++] : -INFINITY;
    }
    tick(&t0, P_HEAD);
    return 0;
}

/* a Linear the kernels cannot read: int8 groups other than none or 32 whole columns */
static int linear_bad(const Linear *L) { return L->kind == W_I8 && L->group && (L->group != 32 || L->in % 32); }

static int linears_bad(const Model *m) {
    int bad = linear_bad(&m->head) || (m->mtp_proj.w && linear_bad(&m->mtp_proj));
    for (int l = 0; l < m->n_layers && !bad; l++) {
        const Layer *L = &m->layers[l];
        bad = linear_bad(&L->q) || linear_bad(&L->k) || linear_bad(&L->v) || linear_bad(&L->o);
        if (!L->is_moe) {
            bad = bad || linear_bad(&L->gate) || linear_bad(&L->up) || linear_bad(&L->down);
            continue;
        }
        for (int e = 0; e < 3 * L->n_experts && !bad; e++) bad = linear_bad(&L->experts[e]);
        if (L->has_shared) bad = bad || linear_bad(&L->sgate) || linear_bad(&L->sup) || linear_bad(&L->sdown);
    }
    return bad;
}

static int step_checked(Model *m, int B, const int *tokens, const int *pos, void **kpages, void **vpages,
                        void **kscales, void **vscales, int round_trip, const int32_t *tables, int table_stride,
                        int block_size, float *logits, float *hidden, int hidden_pre, const float *h_in,
                        int rope_offset) {
    if (B < 1 || table_stride < 1 || block_size < 1 || m->head_dim > MAX_HEAD_DIM || m->n_kv < 1) return -2;
    if (linears_bad(m)) return -2;
    if ((m->embed_kind != 0 && m->embed_kind != W_I8 && m->embed_kind != W_I4) ||
        (m->embed_kind != 0 && (!m->embed_scale || m->embed_sdt & ~1)) ||
        (m->embed_kind == W_I4 && (!m->embed_zero || m->embed_group <= 0 || m->hidden % m->embed_group ||
                                   m->embed_group % 2)) ||
        (m->embed_kind == W_I8 && (m->embed_group < 0 || (m->embed_group && m->hidden % m->embed_group))))
        return -2;
    if (!kscales != !vscales) return -2;
    for (int l = 0; kscales && l < m->n_layers; l++)
        if (!kscales[l] || !vscales[l]) return -2;
    long cap = (long)table_stride * block_size;
    for (int b = 0; b < B; b++) {
        if (tokens[b] < 0 || tokens[b] >= m->vocab || pos[b] < 0 || pos[b] >= cap) return -2;
        for (int i = 0; i <= pos[b] / block_size; i++) /* the pages it reads and writes */
            if (tables[(size_t)b * table_stride + i] < 0) return -2;
    }
    if (!h_in != !m->mtp_proj.w || rope_offset < 0 ||
        (h_in && (!m->mtp_enorm || !m->mtp_hnorm || m->mtp_proj.in != 2 * m->hidden || m->mtp_proj.out != m->hidden)))
        return -2;
    if (m->mtp_ids) { /* ascending token ids, one per head row */
        if (m->head.out > m->vocab) return -2;
        for (int i = 0; i < m->head.out; i++)
            if (m->mtp_ids[i] < 0 || m->mtp_ids[i] >= m->vocab || (i && m->mtp_ids[i] <= m->mtp_ids[i - 1])) return -2;
    }
    return step(m, B, tokens, pos, kpages, vpages, kscales, vscales, round_trip, tables, table_stride, block_size,
                logits, hidden, hidden_pre, h_in, rope_offset);
}

/* B sequences, one new token each: tokens[b] at position pos[b] (= positions already cached for row b).
 * kpages[l]/vpages[l]: layer l's page pools (num_blocks, n_kv, block_size, head_dim), model dtype;
 * tables: B rows of table_stride int32 block ids. Writes K/V of position pos[b] into row b's pages and the
 * next-token logits (B x vocab, fp32) into logits. Returns 0, -1 (allocation), -2 (bad argument).
 * Row b's logits are bit for bit those of the same sequence stepped alone (ernie_step on a contiguous cache). */
int ernie_step_batch(Model *m, int B, const int *tokens, const int *pos, void **kpages, void **vpages,
                     const int32_t *tables, int table_stride, int block_size, float *logits) {
    return step_checked(m, B, tokens, pos, kpages, vpages, NULL, NULL, 0, tables, table_stride, block_size, logits,
                        NULL, 0, NULL, 0);
}

/* ernie_step_batch that also writes each row's last hidden state (B x hidden, fp32; in a bf16 model the bf16
 * values) into hidden: the final norm's output (hidden_pre 0, what the head reads) or its input (hidden_pre 1) --
 * what a multi-token-prediction draft head is fed after a verification step. */
int ernie_step_batch_h(Model *m, int B, const int *tokens, const int *pos, void **kpages, void **vpages,
                       const int32_t *tables, int table_stride, int block_size, float *logits, float *hidden,
                       int hidden_pre) {
    if (!hidden) return -2;
    return step_checked(m, B, tokens, pos, kpages, vpages, NULL, NULL, 0, tables, table_stride, block_size, logits,
                        hidden, hidden_pre, NULL, 0);
}

/* ernie_step_batch (float pages) storing each new K/V row as its int8 round trip: the values ernie_step_batch_q8
 * stores and attention reads, dequantised, so the logits equal ernie_step_batch_q8's bit for bit (the float
 * reference of the int8 cache, for tests and accuracy studies). */
int ernie_step_batch_rt(Model *m, int B, const int *tokens, const int *pos, void **kpages, void **vpages,
                        const int32_t *tables, int table_stride, int block_size, float *logits) {
    return step_checked(m, B, tokens, pos, kpages, vpages, NULL, NULL, 1, tables, table_stride, block_size, logits,
                        NULL, 0, NULL, 0);
}

/* ernie_step_batch over an int8 KV cache (see KV): kpages[l]/vpages[l] int8 (num_blocks, n_kv, block_size,
 * head_dim), kscales[l]/vscales[l] fp32 (num_blocks, n_kv, block_size), one scale per (position, kv head) row.
 * The new K/V rows are quantised into them; the logits are bit for bit those of ernie_step_batch on float pages
 * holding the dequantised values ((float)q * s rounded to the model dtype). */
int ernie_step_batch_q8(Model *m, int B, const int *tokens, const int *pos, void **kpages, void **vpages,
                        void **kscales, void **vscales, const int32_t *tables, int table_stride, int block_size,
                        float *logits) {
    if (!kscales || !vscales) return -2;
    return step_checked(m, B, tokens, pos, kpages, vpages, kscales, vscales, 0, tables, table_stride, block_size,
                        logits, NULL, 0, NULL, 0);
}

/* ernie_step_batch_q8 that also writes each row's last hidden state into hidden (as ernie_step_batch_h): a draft
 * head (MTP) beside an int8 KV cache. */
int ernie_step_batch_q8_h(Model *m, int B, const int *tokens, const int *pos, void **kpages, void **vpages,
                          void **kscales, void **vscales, const int32_t *tables, int table_stride, int block_size,
                          float *logits, float *hidden, int hidden_pre) {
    if (!kscales || !vscales || !hidden) return -2;
    return step_checked(m, B, tokens, pos, kpages, vpages, kscales, vscales, 0, tables, table_stride, block_size,
                        logits, hidden, hidden_pre, NULL, 0);
}

/* A multi-token-prediction layer's step (m: the layer as a one-layer model, see Model.mtp_proj): row b reads
 * tokens[b] = x_{j+1} and h_in[b] = h_j (B x hidden fp32, the target's hidden states) at cache position pos[b], RoPE
 * position pos[b] + rope_offset; writes its K/V into the one layer's pages, the head's logits (B x head.out, or the
 * flagged rows of m->want) and the layer's output (B x hidden, before the final norm: a chained draft's h_in). */
int ernie_mtp_batch(Model *m, int B, const int *tokens, const float *h_in, const int *pos, int rope_offset,
                    void **kpages, void **vpages, const int32_t *tables, int table_stride, int block_size,
                    float *logits, float *hidden) {
    if (!h_in || !hidden || m->n_layers != 1) return -2;
    return step_checked(m, B, tokens, pos, kpages, vpages, NULL, NULL, 0, tables, table_stride, block_size, logits,
                        hidden, 1, h_in, rope_offset);
}

/* Feed `token` at position `pos` (= cache rows already filled), write K/V row `pos` of every layer into
 * kc[l]/vc[l] ((n_kv, max_len, head_dim), model dtype) and the next-token logits (vocab floats) into `logits`:
 * the batch of one row whose cache is one page of block_size max_len. */
int ernie_step(Model *m, int token, int pos, int max_len, void **kc, void **vc, float *logits) {
    static const int32_t one_page = 0;
    return ernie_step_batch(m, 1, &token, &pos, kc, vc, &one_page, 1, max_len, logits);
}

/* y = L x for one Linear (the read-bandwidth probe of `ernie45 bench`); m supplies threads and scratch. */
int ernie_gemv(Model *m, const Linear *L, const float *x, float *y) {
    if (prepare(m, 1, 1, 1)) return -1;
    Job j = JOB(L, x, y);
    return gemv_multi(m, &j, 1, m->bf16);
}

/* y[b] = L x[b] for B rows (x: B x in, y: B x out, row-major), as one GEMV of a batched step (kernel tests and
 * timings). */
int ernie_gemv_batch(Model *m, const Linear *L, int B, const float *x, float *y) {
    if (B < 1 || prepare(m, B, 1, 1)) return -1;
    Scratch *s = (Scratch *)m->scratch;
    if (B > s->cap_jobs) return -1;
    Job *jobs = s->a.jobs;
    for (int b = 0; b < B; b++) jobs[b] = JOB(L, x + (size_t)b * L->in, y + (size_t)b * L->out);
    return gemv_multi(m, jobs, B, m->bf16);
}

/* ---- dequantisation for prefill ------------------------------------------------------------------------- */
/* Rows r0..r1 of L widened to fp32 into out ((r1 - r0) x in, row-major): prefill on CPUs without bf16 matmul
 * hardware multiplies fp32 tiles with MKL instead of PyTorch's emulated bf16, and this writes each tile in one
 * pass over the weights (the same values as ernie45.quant.kernels' dequantisation: q * scale + zb, with
 * zb = zero - 8 * scale per group, from L's scales and zeros in their own dtype). */
int ernie_dequant(const Linear *L, int r0, int r1, float *out, int n_threads) {
    int n = L->in;
    if (r0 < 0 || r1 > L->out || r0 > r1 || (L->kind == W_I4 && (L->group <= 0 || n % L->group || n % 2)) ||
        (L->kind == W_I8 && (L->group < 0 || (L->group && n % L->group))))
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
            int g = L->group ? L->group : n > 0 ? n : 1, ng = n / g; /* group 0: one scale per row */
            for (int gi = 0; gi < ng; gi++) {
                float s = sz_at(L->scale, (size_t)r * ng + gi, L->sdt);
#pragma omp simd
                for (int k = gi * g; k < (gi + 1) * g; k++) o[k] = (float)w[k] * s;
            }
            break;
        }
        default: dequant_i4_row(L, r, o);
        }
    }
    return 0;
}
