/* A stand-alone driver of the C decode step (src/ernie45/csrc/decode.c), for running the kernels where Python and
 * PyTorch cannot: cross-compiled for aarch64 and run under qemu-aarch64 by tests/test_aarch64.py.
 *
 *   step_driver MODEL TOKENS OUT THREADS [B OUT_BATCH [KV8_STEPS]]
 *
 * MODEL: the Model struct and everything it points to, as the test wrote them from a FastDecoder's ctypes structs
 *   (ernie45/native_abi.py): "ERNSTEP1", uint64 n_relocs, uint64 blob_size, n_relocs uint64 offsets, then the blob,
 *   which starts with the Model. Each pointer field of a struct in the blob holds the offset of what it points to
 *   (NULL stays 0), and the offsets of those fields are the relocations: the driver adds the blob's address to each.
 *   The structs have the same layout on x86-64 and aarch64 (LP64, natural alignment).
 * TOKENS: int32 T, int32 P, T int32 tokens, then the K/V rows of positions 0..P-1 as the PyTorch prefill cached
 *   them: per layer K then V, (n_kv, P, head_dim) in the model dtype. Tokens P..T-1 are fed one at a time at
 *   positions P..T-1 (ernie_step over a contiguous cache of T positions).
 * OUT: (T - P) x vocab fp32 logits, the next-token logits after each fed token.
 * With B: the same steps again as row 0 of a batch of B sequences (ernie_step_batch over a paged cache of pages of
 *   16 positions, the rows' pages interleaved in one pool, every row prefilled with the same rows; row b feeds token
 *   (t + 7 b) mod vocab), and row 0's logits to OUT_BATCH: a row's arithmetic does not depend on its batch, so they
 *   must equal OUT's bits.
 * With KV8_STEPS: the first KV8_STEPS tokens from position 0 as B rows once over int8 pages (ernie_step_batch_q8,
 *   the server's int8 KV cache) and once over float pages holding each new row's int8 round trip
 *   (ernie_step_batch_rt): the two must give the same logits bit for bit (as test_native_kv8 checks on x86); the
 *   driver exits with 2 where they differ.
 * Prints the kernels' ISA string (ernie_isa) and their vector width.
 */
#include "decode.c"

#include <stdio.h>

static int fail(const char *what) {
    fprintf(stderr, "step_driver: %s\n", what);
    return 1;
}

static int write_floats(const char *path, const float *x, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return 1;
    size_t w = fwrite(x, sizeof(float), n, f);
    return (fclose(f) != 0) | (w != n);
}

int main(int argc, char **argv) {
    if (argc < 5 || argc == 6 || argc > 8)
        return fail("usage: step_driver MODEL TOKENS OUT THREADS [B OUT_BATCH [KV8_STEPS]]");
    FILE *f = fopen(argv[1], "rb");
    if (!f) return fail("cannot open the model file");
    char magic[8];
    uint64_t nrel, size;
    if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "ERNSTEP1", 8) || fread(&nrel, 8, 1, f) != 1 ||
        fread(&size, 8, 1, f) != 1)
        return fail("not a model file");
    uint64_t *rel = malloc(8 * (nrel ? nrel : 1));
    char *blob = aligned_alloc(64, (size + 63) / 64 * 64);
    if (!rel || !blob || fread(rel, 8, nrel, f) != nrel || fread(blob, 1, size, f) != size)
        return fail("truncated model file");
    fclose(f);
    for (uint64_t i = 0; i < nrel; i++) {
        uint64_t v;
        if (rel[i] + 8 > size) return fail("bad relocation");
        memcpy(&v, blob + rel[i], 8);
        v += (uint64_t)(uintptr_t)blob;
        memcpy(blob + rel[i], &v, 8);
    }
    Model *m = (Model *)blob;
    m->n_threads = atoi(argv[4]);
    m->scratch = NULL, m->scores = NULL, m->scratch_len = 0;

    /* tokens and the prefilled rows */
    f = fopen(argv[2], "rb");
    int32_t T, P;
    if (!f || fread(&T, 4, 1, f) != 1 || fread(&P, 4, 1, f) != 1 || P < 0 || T <= P) return fail("bad tokens file");
    int32_t *tokens = malloc(4 * (size_t)T);
    if (!tokens || fread(tokens, 4, T, f) != (size_t)T) return fail("truncated tokens file");
    int L = m->n_layers, nkv = m->n_kv, d = m->head_dim, V = m->vocab, S = T - P;
    size_t elt = m->bf16 ? 2 : 4, prow = (size_t)P * d * elt; /* bytes of one kv head's prefilled rows */
    char *pre = malloc(2 * (size_t)L * nkv * prow + 1);
    if (!pre || fread(pre, 1, 2 * (size_t)L * nkv * prow, f) != 2 * (size_t)L * nkv * prow)
        return fail("truncated prefill rows");
    fclose(f);

    void **kc = calloc(L, sizeof(void *)), **vc = calloc(L, sizeof(void *));
    float *logits = malloc(sizeof(float) * (size_t)S * V);
    if (!kc || !vc || !logits) return fail("out of memory");
    for (int l = 0; l < L; l++) {
        kc[l] = calloc((size_t)nkv * T * d, elt), vc[l] = calloc((size_t)nkv * T * d, elt);
        if (!kc[l] || !vc[l]) return fail("out of memory");
        for (int h = 0; h < nkv; h++) {
            memcpy((char *)kc[l] + (size_t)h * T * d * elt, pre + ((size_t)(2 * l) * nkv + h) * prow, prow);
            memcpy((char *)vc[l] + (size_t)h * T * d * elt, pre + ((size_t)(2 * l + 1) * nkv + h) * prow, prow);
        }
    }
    for (int t = P; t < T; t++) {
        int rc = ernie_step(m, tokens[t], t, T, kc, vc, logits + (size_t)(t - P) * V);
        if (rc) {
            fprintf(stderr, "step_driver: ernie_step failed (%d) at position %d\n", rc, t);
            return 1;
        }
    }
    if (write_floats(argv[3], logits, (size_t)S * V)) return fail("cannot write the logits");

    if (argc >= 7) {
        int B = atoi(argv[5]), bs = 16, npg = (T + bs - 1) / bs;
        if (B < 1) return fail("bad batch size");
        size_t page = (size_t)nkv * bs * d * elt;
        int32_t *tables = malloc(sizeof(int32_t) * (size_t)B * npg);
        int *tok = malloc(sizeof(int) * B), *pos = malloc(sizeof(int) * B);
        float *bl = malloc(sizeof(float) * (size_t)B * V);
        if (!tables || !tok || !pos || !bl) return fail("out of memory");
        for (int b = 0; b < B; b++)
            for (int i = 0; i < npg; i++) tables[(size_t)b * npg + i] = i * B + (B - 1 - b); /* interleaved */
        for (int l = 0; l < L; l++) {
            char *kp = calloc((size_t)B * npg, page), *vp = calloc((size_t)B * npg, page);
            if (!kp || !vp) return fail("out of memory");
            for (int b = 0; b < B; b++)
                for (int h = 0; h < nkv; h++)
                    for (int t = 0; t < P; t++) { /* row t of head h: page table[t / bs], row t % bs */
                        size_t at = (((size_t)tables[(size_t)b * npg + t / bs] * nkv + h) * bs + t % bs) * d * elt;
                        size_t from = (size_t)t * d * elt;
                        memcpy(kp + at, pre + ((size_t)(2 * l) * nkv + h) * prow + from, d * elt);
                        memcpy(vp + at, pre + ((size_t)(2 * l + 1) * nkv + h) * prow + from, d * elt);
                    }
            free(kc[l]), free(vc[l]);
            kc[l] = kp, vc[l] = vp;
        }
        for (int t = P; t < T; t++) {
            for (int b = 0; b < B; b++) tok[b] = (tokens[t] + 7 * b) % V, pos[b] = t;
            int rc = ernie_step_batch(m, B, tok, pos, kc, vc, tables, npg, bs, bl);
            if (rc) {
                fprintf(stderr, "step_driver: ernie_step_batch failed (%d) at position %d\n", rc, t);
                return 1;
            }
            memcpy(logits + (size_t)(t - P) * V, bl, sizeof(float) * V);
        }
        if (write_floats(argv[6], logits, (size_t)S * V)) return fail("cannot write the batch logits");
        if (argc == 8) {
            int K = atoi(argv[7]), kpg = (K + bs - 1) / bs;
            if (K < 1 || K > T) return fail("bad KV8_STEPS");
            size_t pg8 = (size_t)nkv * bs * d, spg = (size_t)nkv * bs; /* int8 bytes and scales per page */
            void **kq = calloc(L, sizeof(void *)), **vq = calloc(L, sizeof(void *));
            void **ks = calloc(L, sizeof(void *)), **vs = calloc(L, sizeof(void *));
            float *lq = malloc(sizeof(float) * (size_t)B * V);
            if (!kq || !vq || !ks || !vs || !lq) return fail("out of memory");
            for (int l = 0; l < L; l++) {
                memset(kc[l], 0, (size_t)B * npg * page), memset(vc[l], 0, (size_t)B * npg * page);
                kq[l] = calloc((size_t)B * kpg, pg8), vq[l] = calloc((size_t)B * kpg, pg8);
                ks[l] = calloc((size_t)B * kpg * spg, sizeof(float));
                vs[l] = calloc((size_t)B * kpg * spg, sizeof(float));
                if (!kq[l] || !vq[l] || !ks[l] || !vs[l]) return fail("out of memory");
            }
            for (int b = 0; b < B; b++)
                for (int i = 0; i < kpg; i++) tables[(size_t)b * kpg + i] = i * B + b;
            for (int t = 0; t < K; t++) {
                for (int b = 0; b < B; b++) tok[b] = (tokens[t] + 7 * b) % V, pos[b] = t;
                int rc = ernie_step_batch_rt(m, B, tok, pos, kc, vc, tables, kpg, bs, bl);
                int rq = ernie_step_batch_q8(m, B, tok, pos, kq, vq, ks, vs, tables, kpg, bs, lq);
                if (rc || rq) {
                    fprintf(stderr, "step_driver: int8 KV steps failed (%d, %d) at position %d\n", rc, rq, t);
                    return 1;
                }
                if (memcmp(bl, lq, sizeof(float) * (size_t)B * V)) {
                    fprintf(stderr, "step_driver: int8 pages differ from their float round trip at position %d\n", t);
                    return 2;
                }
            }
        }
    }
    printf("%s %d\n", ernie_isa(), ernie_simd_width());
    ernie_release(m);
    return 0;
}
