/* test_bf16.c: the bf16 compute mode (matmul_bf16.c).
 *
 *  - gemm_bf16_round against hand-worked bit patterns: ties to even, carries
 *    into the exponent, overflow to inf, inf, NaN, signed zero, denormals.
 *  - each bf16 kernel this CPU and build have (portable, AVX512-BF16, the
 *    element-by-element fallback) against a reference summed in double from
 *    the bf16-rounded operands, all four transposes, operands inside wider
 *    buffers, ragged edges, odd K, several K blocks, beta 0 / 1 / other,
 *    beta 0 over a NaN C. Tolerance, per element, from the fp32
 *    accumulation bound: each of the K products is exact in fp32 and is
 *    added with one rounding (relative 2^-24), and each K block adds the
 *    alpha, beta and block-sum roundings, so
 *        |got - ref| <= (K + 3 nblocks + 2) 2^-24 (|alpha| sum_p |a_p b_p| + |beta c|).
 *  - the kernels give the same bits as each other, and for 1 and N threads.
 *  - gemm() and gemm_packed() follow gemm_set_compute.
 *  - the AMX kernel through its plain-C model of the tiles (any CPU): the
 *    model's TDPBF16PS on hand-worked bits, whole products bit for bit
 *    against a scalar sum in AMX's order, threads, packed B, error bounds;
 *    where the CPU has AMX, the real tiles against the model (else a
 *    printed skip). AMX has its own order, so its own bits: it is not in
 *    the kernels compared bit for bit above. */
#include "testutil.h"
#ifdef _OPENMP
#include <omp.h>
#endif

static float f_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static double bf(float x) { return gemm_bf16_to_float(gemm_bf16_round(x)); }

START_TEST(test_round_bits) {
    static const struct { uint32_t in; uint16_t out; } cases[] = {
        {0x3f800000u, 0x3f80},  /* 1.0 exact */
        {0x3f807fffu, 0x3f80},  /* just under half an ulp: down */
        {0x3f808000u, 0x3f80},  /* a tie, kept bit even: down */
        {0x3f808001u, 0x3f81},  /* just over half: up */
        {0x3f818000u, 0x3f82},  /* a tie, kept bit odd: up to even */
        {0xbf818000u, 0xbf82},  /* the same, negative */
        {0x3fffffffu, 0x4000},  /* carry into the exponent: 2.0 */
        {0x7f7fffffu, 0x7f80},  /* FLT_MAX rounds to inf */
        {0x7f7f7fffu, 0x7f7f},  /* the largest that stays finite */
        {0x7f800000u, 0x7f80},  /* inf */
        {0xff800000u, 0xff80},  /* -inf */
        {0x7fc00000u, 0x7fc0},  /* quiet NaN */
        {0x7f800001u, 0x7fc0},  /* signalling NaN, payload only in the low half */
        {0xffffffffu, 0x7fc0},  /* negative NaN: canonical, as torch */
        {0x00000000u, 0x0000},  /* +0 */
        {0x80000000u, 0x8000},  /* -0 */
        {0x00008000u, 0x0000},  /* denormal tie, even: down to 0 */
        {0x00018000u, 0x0002},  /* denormal tie, odd: up */
        {0x007fffffu, 0x0080},  /* largest denormal rounds to the smallest normal */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint16_t got = gemm_bf16_round(f_of(cases[i].in));
        ck_assert_msg(got == cases[i].out, "round(0x%08x) = 0x%04x, want 0x%04x",
                      (unsigned)cases[i].in, (unsigned)got, (unsigned)cases[i].out);
    }
    ck_assert(gemm_bf16_to_float(0x3f80) == 1.0f);
    ck_assert(gemm_bf16_to_float(0xc040) == -3.0f);
    ck_assert(isinf(gemm_bf16_to_float(0x7f80)));
    ck_assert(isnan(gemm_bf16_to_float(0x7fc0)));
}
END_TEST

START_TEST(test_parse_compute) {
    ck_assert_int_eq(gemm_parse_compute("fp32"), GEMM_F32);
    ck_assert_int_eq(gemm_parse_compute("bf16"), GEMM_BF16);
    ck_assert_int_eq(gemm_parse_compute("fp16"), -1);
    ck_assert_int_eq(gemm_parse_compute("BF16"), -1);
    ck_assert_int_eq(gemm_parse_compute(""), -1);
    ck_assert_int_eq(gemm_parse_compute(NULL), -1);
}
END_TEST

/* reference: rounded operands, double sums; returns the failing count */
static int check_against_ref(int ta, int tb, int M, int N, int K, float alpha,
                             const float *A, int lda, const float *B, int ldb,
                             float beta, const float *C0, const float *C, int ldc) {
    int nkb = (K + 511) / 512, bad = 0;
    double u = 1.0 / 16777216.0;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double mag;
            double want = ref_gemm_at(ta, tb, i, j, K, alpha, A, lda, B, ldb, beta,
                                      C0[(size_t)i * ldc + j], bf, &mag);
            double tol = (K + 3.0 * nkb + 2.0) * u * mag + 1e-30;
            double got = C[(size_t)i * ldc + j];
            if (!(fabs(got - want) <= tol)) {
                if (bad < 3)
                    fprintf(stderr, "M=%d N=%d K=%d ta=%d tb=%d [%d,%d] got %.9g want %.9g tol %.3g\n",
                            M, N, K, ta, tb, i, j, got, want, tol);
                bad++;
            }
        }
    return bad;
}

static const int kernels[] = {GEMM_BF16_PORTABLE, GEMM_BF16_AVX512, GEMM_BF16_SCALAR};
static const char *knames[] = {"portable", "avx512bf16", "scalar"};
#define NKERNELS 3
#define PAD 3

/* one problem, all transposes, every kernel the CPU has: each within the
 * bound of the reference, and all of them the same bits */
static void check_case(int M, int N, int K, float alpha, float beta, int nan_c) {
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int arows = ta ? K : M, acols = ta ? M : K;
            int brows = tb ? N : K, bcols = tb ? K : N;
            int lda = acols + PAD, ldb = bcols + PAD, ldc = N + PAD;
            size_t nc = (size_t)M * ldc;
            float *A = rand_buf((size_t)arows * lda, 11 + M + 7 * K + ta);
            float *B = rand_buf((size_t)brows * ldb, 12 + N + 5 * K + tb);
            float *C0 = rand_buf(nc, 13 + M * N);
            if (nan_c)
                for (size_t i = 0; i < nc; i++) C0[i] = NAN;
            float *first = NULL;
            for (int k = 0; k < NKERNELS; k++) {
                if (!gemm_bf16_set_kernel(kernels[k])) continue;
                float *C = malloc(nc * sizeof(float));
                ck_assert_ptr_nonnull(C);
                memcpy(C, C0, nc * sizeof(float));
                gemm_bf16(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
                int bad = check_against_ref(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C0, C, ldc);
                ck_assert_msg(bad == 0, "%s: %d elements outside the bound (M=%d N=%d K=%d ta=%d tb=%d)",
                              knames[k], bad, M, N, K, ta, tb);
                for (int i = 0; i < M; i++)   /* padding untouched */
                    ck_assert(memcmp(C + (size_t)i * ldc + N, C0 + (size_t)i * ldc + N,
                                     PAD * sizeof(float)) == 0 || nan_c);
                if (!first) {
                    first = C;
                } else {
                    for (int i = 0; i < M; i++)
                        ck_assert_msg(memcmp(C + (size_t)i * ldc, first + (size_t)i * ldc,
                                             N * sizeof(float)) == 0,
                                      "%s differs from the portable kernel (M=%d N=%d K=%d ta=%d tb=%d)",
                                      knames[k], M, N, K, ta, tb);
                    free(C);
                }
            }
            free(first);
            free(A);
            free(B);
            free(C0);
        }
    gemm_bf16_set_kernel(GEMM_BF16_AUTO);
}

START_TEST(test_kernels_vs_reference) {
    fprintf(stderr, "bf16 kernel chosen here: %s\n", gemm_bf16_kernel_name());
    check_case(1, 1, 1, 1.0f, 0.0f, 0);         /* under 32768 multiply-adds: element by element */
    check_case(5, 7, 3, 0.5f, 0.0f, 0);
    check_case(13, 33, 17, 1.0f, 1.0f, 0);
    check_case(13, 33, 81, 1.0f, 1.0f, 0);      /* packed: ragged MR and NR edges, odd K */
    check_case(12, 32, 96, -2.0f, 0.75f, 0);    /* exactly one tile */
    check_case(37, 65, 1031, 1.0f, 0.0f, 1);    /* three K blocks, odd, NaN C with beta 0 */
    check_case(200, 70, 600, 0.25f, 1.0f, 0);   /* two M blocks, two K blocks */
    check_case(3, 1100, 40, 1.0f, 0.0f, 0);     /* two N panels, attention's short K */
    check_case(250, 2, 513, 1.0f, -1.0f, 0);    /* tall and thin (LoRA's rank) */
}
END_TEST

/* the value the mode is for: a product whose operands bf16 changes */
START_TEST(test_rounding_applied) {
    float a[2] = {1.0f + 1.0f / 512, 1.0f}, b[2] = {1.0f, 1.0f / 4096}, c;
    /* bf16(1 + 2^-9) = 1 (under half a bf16 ulp, 2^-8); 1 * 1 + 1 * 2^-12 in fp32 */
    gemm_bf16(0, 0, 1, 1, 2, 1.0f, a, 2, b, 1, 0.0f, &c, 1);
    ck_assert(c == 1.0f + 1.0f / 4096);
    gemm(0, 0, 1, 1, 2, 1.0f, a, 2, b, 1, 0.0f, &c, 1);
    ck_assert(c == 1.0f + 1.0f / 512 + 1.0f / 4096);
}
END_TEST

START_TEST(test_thread_invariant) {
#ifdef _OPENMP
    int M = 300, N = 260, K = 1100, saved = omp_get_max_threads();
    float *A = rand_buf((size_t)M * K, 21), *B = rand_buf((size_t)N * K, 22);
    float *C1 = rand_buf((size_t)M * N, 23), *C4 = malloc((size_t)M * N * sizeof(float));
    ck_assert_ptr_nonnull(C4);
    memcpy(C4, C1, (size_t)M * N * sizeof(float));
    for (int k = 0; k < NKERNELS - 1; k++) {
        if (!gemm_bf16_set_kernel(kernels[k])) continue;
        omp_set_num_threads(1);
        gemm_bf16(0, 1, M, N, K, 1.0f, A, K, B, K, 0.5f, C1, N);
        omp_set_num_threads(4);
        gemm_bf16(0, 1, M, N, K, 1.0f, A, K, B, K, 0.5f, C4, N);
        ck_assert_msg(memcmp(C1, C4, (size_t)M * N * sizeof(float)) == 0,
                      "%s: 1 and 4 threads differ", knames[k]);
    }
    omp_set_num_threads(saved);
    gemm_bf16_set_kernel(GEMM_BF16_AUTO);
    free(A); free(B); free(C1); free(C4);
#endif
}
END_TEST

/* calls from inside a parallel region (as attention makes them: one
 * product per thread, each packing into its own thread's buffer, of
 * growing sizes) give the bits of the same calls made outside one */
START_TEST(test_nested_calls) {
    enum { NP = 8 };
    int M = 64, K = 300;
    float *A = rand_buf((size_t)M * K, 41), *B = rand_buf((size_t)K * 512, 42);
    float *want = malloc(sizeof(float) * NP * M * 512), *got = malloc(sizeof(float) * NP * M * 512);
    ck_assert(want && got);
    for (int k = 0; k < NKERNELS - 1; k++) {
        if (!gemm_bf16_set_kernel(kernels[k])) continue;
        for (int t = 0; t < NP; t++)   /* N grows with t: the buffers must grow */
            gemm_bf16(0, 0, M, 64 * (t + 1), K, 1.0f, A, K, B, 512, 0.0f, want + (size_t)t * M * 512, 512);
        int i;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic) num_threads(4)
#endif
        for (i = 0; i < NP; i++)
            gemm_bf16(0, 0, M, 64 * (i + 1), K, 1.0f, A, K, B, 512, 0.0f, got + (size_t)i * M * 512, 512);
        for (int t = 0; t < NP; t++)
            for (int r = 0; r < M; r++)
                ck_assert_msg(memcmp(want + (size_t)t * M * 512 + (size_t)r * 512, got + (size_t)t * M * 512 + (size_t)r * 512,
                                     sizeof(float) * 64 * (t + 1)) == 0, "%s: nested call %d differs", knames[k], t);
    }
    gemm_bf16_set_kernel(GEMM_BF16_AUTO);
    free(A); free(B); free(want); free(got);
}
END_TEST

/* gemm and gemm_packed in GEMM_BF16 mode are gemm_bf16; back in GEMM_F32
 * they are fp32 again */
START_TEST(test_mode_routes_gemm) {
    int M = 70, N = 90, K = 130;
    float *A = rand_buf((size_t)M * K, 31), *B = rand_buf((size_t)N * K, 32);
    float *want = malloc((size_t)M * N * sizeof(float)), *got = malloc((size_t)M * N * sizeof(float));
    float *f32 = malloc((size_t)M * N * sizeof(float));
    ck_assert(want && got && f32);
    ck_assert_int_eq(gemm_compute(), GEMM_F32);
    gemm(0, 1, M, N, K, 1.0f, A, K, B, K, 0.0f, f32, N);
    gemm_bf16(0, 1, M, N, K, 1.0f, A, K, B, K, 0.0f, want, N);
    ck_assert(memcmp(want, f32, (size_t)M * N * sizeof(float)) != 0);

    gemm_set_compute(GEMM_BF16);
    ck_assert_int_eq(gemm_compute(), GEMM_BF16);
    gemm(0, 1, M, N, K, 1.0f, A, K, B, K, 0.0f, got, N);
    ck_assert(memcmp(want, got, (size_t)M * N * sizeof(float)) == 0);
    gemm_packed_b *pb = gemm_pack_b(1, K, N, B, K);
    ck_assert_ptr_nonnull(pb);
    memset(got, 0, (size_t)M * N * sizeof(float));
    gemm_packed(0, M, 1.0f, A, K, pb, 0.0f, got, N);
    ck_assert(memcmp(want, got, (size_t)M * N * sizeof(float)) == 0);

    gemm_set_compute(GEMM_F32);
    gemm(0, 1, M, N, K, 1.0f, A, K, B, K, 0.0f, got, N);
    ck_assert(memcmp(f32, got, (size_t)M * N * sizeof(float)) == 0);
    gemm_packed(0, M, 1.0f, A, K, pb, 0.0f, got, N);
    ck_assert(memcmp(f32, got, (size_t)M * N * sizeof(float)) == 0);
    gemm_packed_b_free(pb);
    free(A); free(B); free(want); free(got); free(f32);
}
END_TEST

/* B packed once under GEMM_BF16 (gemm_pack_b, as attention packs K and V
 * per head): gemm_packed gives gemm_bf16's bits on every kernel (the AMX
 * model's too), small products, odd K, several K blocks and ragged N
 * included; a pack made under another kernel serves it too (the B layout
 * is the same for every kernel); a pack made in one mode and used in the
 * other gives that mode's bits, B itself freed */
START_TEST(test_packed_bf16) {
    static const int shapes[][3] = {{5, 7, 3}, {13, 33, 81}, {33, 47, 63}, {37, 65, 1031},
                                    {32, 40, 4096}, {32, 4096, 40}, {200, 70, 600}, {1, 300, 9}};
    static const int pkern[] = {GEMM_BF16_PORTABLE, GEMM_BF16_AVX512, GEMM_BF16_SCALAR, GEMM_BF16_AMX_MODEL};
    static const char *pnames[] = {"portable", "avx512bf16", "scalar", "amx-model"};
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++)
        for (int tb = 0; tb < 2; tb++)
            for (int ta = 0; ta < 2; ta++) {
                int M = shapes[c][0], N = shapes[c][1], K = shapes[c][2];
                int lda = (ta ? M : K) + PAD, ldb = (tb ? K : N) + PAD, ldc = N + PAD;
                size_t nc = (size_t)M * ldc;
                float *A = rand_buf((size_t)(ta ? K : M) * lda, 51 + c + ta);
                float *B = rand_buf((size_t)(tb ? N : K) * ldb, 61 + c + tb);
                float *want = rand_buf(nc, 71 + c), *got = malloc(nc * sizeof(float));
                float *C0 = malloc(nc * sizeof(float));
                ck_assert(got && C0);
                memcpy(C0, want, nc * sizeof(float));
                for (int k = 0; k < 4; k++) {
                    if (!gemm_bf16_set_kernel(pkern[k])) continue;
                    memcpy(want, C0, nc * sizeof(float));
                    gemm_bf16(ta, tb, M, N, K, 0.5f, A, lda, B, ldb, 1.0f, want, ldc);
                    gemm_set_compute(GEMM_BF16);
                    gemm_packed_b *pb = gemm_pack_b(tb, K, N, B, ldb);
                    ck_assert_ptr_nonnull(pb);
                    memcpy(got, C0, nc * sizeof(float));
                    gemm_packed(ta, M, 0.5f, A, lda, pb, 1.0f, got, ldc);
                    ck_assert_msg(memcmp(want, got, nc * sizeof(float)) == 0,
                                  "%s: packed bf16 differs (M=%d N=%d K=%d ta=%d tb=%d)", pnames[k], M, N, K, ta, tb);
                    /* a pack made under the portable kernel */
                    ck_assert(gemm_bf16_set_kernel(GEMM_BF16_PORTABLE));
                    gemm_packed_b *other = gemm_pack_b(tb, K, N, B, ldb);
                    ck_assert_ptr_nonnull(other);
                    ck_assert(gemm_bf16_set_kernel(pkern[k]));
                    memcpy(got, C0, nc * sizeof(float));
                    gemm_packed(ta, M, 0.5f, A, lda, other, 1.0f, got, ldc);
                    ck_assert_msg(memcmp(want, got, nc * sizeof(float)) == 0,
                                  "%s: a portable kernel's pack differs (M=%d N=%d K=%d ta=%d tb=%d)", pnames[k], M, N, K, ta, tb);
                    gemm_packed_b_free(other);
                    /* the bf16 pack under fp32: fp32 sums, B not read */
                    gemm_set_compute(GEMM_F32);
                    float *f32 = malloc(nc * sizeof(float));
                    ck_assert_ptr_nonnull(f32);
                    memcpy(f32, C0, nc * sizeof(float));
                    gemm(ta, tb, M, N, K, 0.5f, A, lda, B, ldb, 1.0f, f32, ldc);
                    float *Bkeep = malloc((size_t)(tb ? N : K) * ldb * sizeof(float));
                    ck_assert_ptr_nonnull(Bkeep);
                    memcpy(Bkeep, B, (size_t)(tb ? N : K) * ldb * sizeof(float));
                    for (size_t i = 0; i < (size_t)(tb ? N : K) * ldb; i++) B[i] = NAN;
                    memcpy(got, C0, nc * sizeof(float));
                    gemm_packed(ta, M, 0.5f, A, lda, pb, 1.0f, got, ldc);
                    memcpy(B, Bkeep, (size_t)(tb ? N : K) * ldb * sizeof(float));
                    free(Bkeep);
                    ck_assert(memcmp(f32, got, nc * sizeof(float)) == 0);
                    gemm_packed_b_free(pb);
                    /* an fp32 pack under bf16: gemm_bf16's bits */
                    pb = gemm_pack_b(tb, K, N, B, ldb);
                    ck_assert_ptr_nonnull(pb);
                    gemm_set_compute(GEMM_BF16);
                    memcpy(got, C0, nc * sizeof(float));
                    gemm_packed(ta, M, 0.5f, A, lda, pb, 1.0f, got, ldc);
                    ck_assert(memcmp(want, got, nc * sizeof(float)) == 0);
                    gemm_set_compute(GEMM_F32);
                    gemm_packed_b_free(pb);
                    free(f32);
                }
                free(A); free(B); free(want); free(got); free(C0);
            }
    gemm_bf16_set_kernel(GEMM_BF16_AUTO);
}
END_TEST

/* attention under --compute bf16 (its K and V packed once per head in
 * bf16): the same bits with 1 and 4 threads and on every kernel, forward
 * and backward, several query tiles per head, causal and not */
START_TEST(test_attention_bf16) {
    int B = 1, Tq = 200, Tk = 1500, H = 3, Dh = 40, C = H * Dh;   /* 87 query rows per tile */
    size_t nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C;
    float *q = rand_buf(nq, 81), *k = rand_buf(nk, 82), *v = rand_buf(nk, 83), *dout = rand_buf(nq, 84);
    float *res[2 * NKERNELS][4] = {{0}};
    int nres = 0, saved = 1;
#ifdef _OPENMP
    saved = omp_get_max_threads();
#endif
    (void)saved;
    gemm_set_compute(GEMM_BF16);
    for (int causal = 0; causal < 2; causal++) {
        nres = 0;
        for (int kk = 0; kk < NKERNELS - 1; kk++) {
            if (!gemm_bf16_set_kernel(kernels[kk])) continue;
            for (int nt = 1; nt <= 4; nt += 3) {
#ifdef _OPENMP
                omp_set_num_threads(nt);
#endif
                float **r = res[nres++];
                r[0] = malloc(nq * sizeof(float));
                r[1] = calloc(nq, sizeof(float));
                r[2] = calloc(nk, sizeof(float));
                r[3] = calloc(nk, sizeof(float));
                ck_assert(r[0] && r[1] && r[2] && r[3]);
                attention_forward(r[0], NULL, q, k, v, B, Tq, Tk, H, Dh, causal);
                attention_backward(r[1], r[2], r[3], dout, q, k, v, NULL, B, Tq, Tk, H, Dh, causal);
            }
        }
        ck_assert_int_ge(nres, 2);
        for (int i = 1; i < nres; i++)
            for (int t = 0; t < 4; t++)
                ck_assert_msg(memcmp(res[0][t], res[i][t], (t < 2 ? nq : nk) * sizeof(float)) == 0,
                              "attention bf16 run %d differs from run 0 in output %d (causal %d)", i, t, causal);
        for (int i = 0; i < nres; i++)
            for (int t = 0; t < 4; t++) free(res[i][t]);
    }
    /* and it is bf16: not the fp32 result, but close to it */
    gemm_set_compute(GEMM_F32);
    float *o32 = malloc(nq * sizeof(float)), *o16 = malloc(nq * sizeof(float));
    ck_assert(o32 && o16);
    attention_forward(o32, NULL, q, k, v, B, Tq, Tk, H, Dh, 0);
    gemm_set_compute(GEMM_BF16);
    attention_forward(o16, NULL, q, k, v, B, Tq, Tk, H, Dh, 0);
    gemm_set_compute(GEMM_F32);
    double d = 0, n = 0;
    for (size_t i = 0; i < nq; i++) { d += (double)(o16[i] - o32[i]) * (o16[i] - o32[i]); n += (double)o32[i] * o32[i]; }
    ck_assert_msg(d > 0 && sqrt(d / n) < 2e-2, "bf16 attention rel L2 %.3g against fp32", sqrt(d / n));
    /* the backward adds into dq, dk, dv (bf16 sums a head's dK and dV apart
     * and adds them at the end): from the same nonzero start, each
     * gradient's change is within bf16's error of the fp32 one */
    for (int causal = 0; causal < 2; causal++) {
        float *g[2][3];
        size_t ng[3] = {nq, nk, nk};
        for (int m = 0; m < 2; m++) {
            for (int t = 0; t < 3; t++) g[m][t] = rand_buf(ng[t], 90 + t);
            gemm_set_compute(m ? GEMM_BF16 : GEMM_F32);
            attention_backward(g[m][0], g[m][1], g[m][2], dout, q, k, v, NULL, B, Tq, Tk, H, Dh, causal);
        }
        gemm_set_compute(GEMM_F32);
        for (int t = 0; t < 3; t++) {
            float *g0 = rand_buf(ng[t], 90 + t);
            double dd = 0, nn = 0;
            for (size_t i = 0; i < ng[t]; i++) {
                double e = (double)g[1][t][i] - g[0][t][i], c = (double)g[0][t][i] - g0[i];
                dd += e * e;
                nn += c * c;
            }
            ck_assert_msg(nn > 0 && dd > 0 && sqrt(dd / nn) < 2e-2, "bf16 attention gradient %d (causal %d): rel L2 %.3g",
                          t, causal, sqrt(dd / nn));
            free(g0); free(g[0][t]); free(g[1][t]);
        }
    }
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
    gemm_bf16_set_kernel(GEMM_BF16_AUTO);
    free(q); free(k); free(v); free(dout); free(o32); free(o16);
}
END_TEST

/* ---- the AMX kernel, through its model --------------------------------- */

/* one TDPBF16PS of the model on hand-worked bits (tiles: row-major 16 x 16
 * words; a word is (lo, hi) = (even, odd) bf16). Powers of two: 1 = 0x3f80,
 * 2^-12 = 0x3980, -1 = 0xbf80, 2^100 = 0x7180, 2^-64 = 0x1f80,
 * 2^-60 = 0x2180, 2^-63 = 0x2000, -1.5 2^-63 = 0xa040; 0x0040 is a bf16
 * denormal (2^-127). */
static void tdp_cases(uint32_t *a, uint32_t *b, float *c) {
    memset(a, 0, 256 * 4);
    memset(b, 0, 256 * 4);
    memset(c, 0, 256 * 4);
    /* c[0][0]: pair 0 even 1 * 1, odd 2^-12 * 2^-12; pair 1 even 2^-24, odd -1.
     * SDM order: e = 1 + 2^-24 = 1 (a tie, to even), o = 2^-24 - 1 (exact),
     * c = e + o = 2^-24. Pair by pair, even first: 1, 1, 1, 0. */
    a[0 * 16 + 0] = 0x3f80u | 0x3980u << 16;  b[0 * 16 + 0] = 0x3f80u | 0x3980u << 16;
    a[0 * 16 + 1] = 0x3980u | 0xbf80u << 16;  b[1 * 16 + 0] = 0x3980u | 0x3f80u << 16;
    /* c[1][1] = 1 + (2^-24 + 2^-24) = 1 + 2^-23; summed into c one product at
     * a time (either order) it stays 1 */
    c[1 * 16 + 1] = 1.0f;
    a[1 * 16 + 0] = 0x3980u | 0x3980u << 16;  b[0 * 16 + 1] = 0x3980u | 0x3980u << 16;
    /* c[2][2]: denormal input * 2^100 = 0 (would be 2^-27 without DAZ) */
    a[2 * 16 + 0] = 0x0040u;                  b[0 * 16 + 2] = 0x7180u;
    /* c[3][3]: 2^-64 * 2^-64 = 2^-128, a denormal result: flushed to 0 */
    a[3 * 16 + 0] = 0x1f80u;                  b[0 * 16 + 3] = 0x1f80u;
    /* c[4][4]: 2^-60 * 2^-60 = 2^-120, normal: kept */
    a[4 * 16 + 0] = 0x2180u;                  b[0 * 16 + 4] = 0x2180u;
    /* c[5][5]: 2^-125 + (-1.5 2^-63) 2^-63 = 2^-127, a denormal sum: 0 */
    c[5 * 16 + 5] = 0x1p-125f;
    a[5 * 16 + 0] = 0xa040u;                  b[0 * 16 + 5] = 0x2000u;
}

static void check_tdp_cases(const float *c, const char *who) {
    static const struct { int at; uint32_t want; } w[] = {
        {0 * 16 + 0, 0x33800000u},   /* 2^-24 */
        {1 * 16 + 1, 0x3f800001u},   /* 1 + 2^-23 */
        {2 * 16 + 2, 0x00000000u},
        {3 * 16 + 3, 0x00000000u},
        {4 * 16 + 4, 0x03800000u},   /* 2^-120 */
        {5 * 16 + 5, 0x00000000u},
    };
    for (size_t i = 0; i < sizeof w / sizeof w[0]; i++) {
        uint32_t u;
        memcpy(&u, &c[w[i].at], 4);
        ck_assert_msg(u == w[i].want, "%s TDPBF16PS: c[%d][%d] = 0x%08x, want 0x%08x", who,
                      w[i].at / 16, w[i].at % 16, (unsigned)u, (unsigned)w[i].want);
    }
}

START_TEST(test_amx_model_tdp_bits) {
    uint32_t a[256], b[256];
    float c[256];
    tdp_cases(a, b, c);
    gemm_bf16_tdp_model(c, a, b);
    check_tdp_cases(c, "model");
    /* a full tile: every c[m][n] = 1 + sum over 16 pairs of 2^-24 (even)
     * and 2^-24 (odd) = 1 + 2 (16 * 2^-24) = 1 + 2^-19; pair by pair it would stay 1 */
    for (int i = 0; i < 256; i++) { a[i] = 0x3980u | 0x3980u << 16; b[i] = a[i]; c[i] = 1.0f; }
    gemm_bf16_tdp_model(c, a, b);
    for (int i = 0; i < 256; i++) ck_assert_msg(c[i] == 1.0f + 0x1p-19f, "full tile [%d] = %.9g", i, c[i]);
}
END_TEST

/* element (i, j) of the AMX kernel's result, summed here from its
 * description alone: K blocks as matmul_bf16.c cuts them, in each block
 * per step of 16 pairs an even sum and an odd sum (fp32, one rounding per
 * add: products of bf16 are exact in fp32), e + o added to the block's
 * sum, then alpha * sum + beta * c per block */
static float ref_amx_at(int ta, int tb, int i, int j, int K, float alpha, const float *A, int lda,
                        const float *B, int ldb, float beta, float c) {
    int nkb = (K + 511) / 512, kb = ((K + nkb - 1) / nkb + 1) / 2 * 2;
    for (int pc = 0; pc < K; pc += kb) {
        int pe = K - pc < kb ? K : pc + kb;
        float acc = 0.0f;
        for (int ps = pc; ps < pe; ps += 32) {
            float e = 0.0f, o = 0.0f;
            for (int p = ps; p < pe && p < ps + 32; p++) {
                float x = (float)bf(ta ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p]);
                float y = (float)bf(tb ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j]);
                float prod = x * y;
                if ((p - ps) % 2 == 0) e = e + prod;
                else o = o + prod;
            }
            float t = e + o;
            acc = acc + t;
        }
        float bet = pc == 0 ? beta : 1.0f, v = alpha * acc;
        c = bet == 0.0f ? v : v + bet * c;
    }
    return c;
}

/* gemm_bf16 under the AMX model == ref_amx_at bit for bit, all transposes */
static void check_amx_case(int M, int N, int K, float alpha, float beta) {
    ck_assert(gemm_bf16_set_kernel(GEMM_BF16_AMX_MODEL));
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int lda = (ta ? M : K) + PAD, ldb = (tb ? K : N) + PAD, ldc = N + PAD;
            size_t nc = (size_t)M * ldc;
            float *A = rand_buf((size_t)(ta ? K : M) * lda, 101 + M + 7 * K + ta);
            float *B = rand_buf((size_t)(tb ? N : K) * ldb, 102 + N + 5 * K + tb);
            float *C0 = rand_buf(nc, 103 + M * N), *C = malloc(nc * sizeof(float));
            ck_assert_ptr_nonnull(C);
            memcpy(C, C0, nc * sizeof(float));
            gemm_bf16(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
            int bad = 0;
            for (int i = 0; i < M; i++) {
                for (int j = 0; j < N; j++) {
                    float want = ref_amx_at(ta, tb, i, j, K, alpha, A, lda, B, ldb, beta, C0[(size_t)i * ldc + j]);
                    float got = C[(size_t)i * ldc + j];
                    if (memcmp(&want, &got, 4) != 0 && bad++ < 3)
                        fprintf(stderr, "amx-model M=%d N=%d K=%d ta=%d tb=%d [%d,%d] got %a want %a\n",
                                M, N, K, ta, tb, i, j, got, want);
                }
                ck_assert(memcmp(C + (size_t)i * ldc + N, C0 + (size_t)i * ldc + N, PAD * sizeof(float)) == 0);
            }
            ck_assert_msg(bad == 0, "amx-model: %d elements differ from the AMX-order sum (M=%d N=%d K=%d ta=%d tb=%d)",
                          bad, M, N, K, ta, tb);
            free(A); free(B); free(C0); free(C);
        }
    gemm_bf16_set_kernel(GEMM_BF16_AUTO);
}

START_TEST(test_amx_model_vs_order_ref) {
    static const int e[] = {1, 15, 17, 31, 33};
    for (int x = 0; x < 5; x++)     /* small: element by element, in the AMX order */
        for (int y = 0; y < 5; y++)
            check_amx_case(e[x], e[y], e[(x + y) % 5], 1.0f, (x + y) & 1 ? 1.0f : 0.0f);
    check_amx_case(33, 47, 63, 1.0f, 0.0f);      /* tiles: ragged 32 + 1 rows, 32 + 15 columns, odd K */
    check_amx_case(17, 33, 65, -0.5f, 1.0f);     /* one A tile of rows, 33 pairs: a 1-pair last step */
    check_amx_case(1, 40, 1100, 1.0f, 1.0f);     /* one row; three K blocks of 184 pairs (11 steps + 8) */
    check_amx_case(40, 1, 1031, 2.0f, 0.0f);     /* one column; odd K over blocks */
    check_amx_case(65, 96, 64, 1.0f, 0.0f);      /* whole steps, no partial one */
    check_amx_case(200, 70, 600, 0.25f, 1.0f);   /* two M blocks, two K blocks */
    check_amx_case(3, 1100, 40, 1.0f, 0.0f);     /* two N panels, attention's K = 40 */
}
END_TEST

START_TEST(test_amx_model_thread_invariant) {
#ifdef _OPENMP
    int M = 150, N = 100, K = 700, saved = omp_get_max_threads();
    float *A = rand_buf((size_t)M * K, 111), *B = rand_buf((size_t)K * N, 112);
    float *C1 = rand_buf((size_t)M * N, 113), *C2 = malloc((size_t)M * N * sizeof(float));
    ck_assert_ptr_nonnull(C2);
    memcpy(C2, C1, (size_t)M * N * sizeof(float));
    ck_assert(gemm_bf16_set_kernel(GEMM_BF16_AMX_MODEL));
    omp_set_num_threads(1);
    gemm_bf16(1, 0, M, N, K, 1.0f, A, M, B, N, 0.5f, C1, N);
    omp_set_num_threads(2);
    gemm_bf16(1, 0, M, N, K, 1.0f, A, M, B, N, 0.5f, C2, N);
    ck_assert_msg(memcmp(C1, C2, (size_t)M * N * sizeof(float)) == 0, "amx-model: 1 and 2 threads differ");
    omp_set_num_threads(saved);
    gemm_bf16_set_kernel(GEMM_BF16_AUTO);
    free(A); free(B); free(C1); free(C2);
#else
    fprintf(stderr, "test_amx_model_thread_invariant: skipped (built without OpenMP)\n");
#endif
}
END_TEST

/* close to the exact sum and to fp32. Against the exact sum of the
 * bf16-rounded operands, check_against_ref's bound: a product passes
 * through at most (its step's pairs <= 16) + 1 (e + o) + (the block's
 * steps) + 3 per block (alpha, beta, the blocks' sum) roundings of
 * relative size 2^-24 each, fewer than K + 3 nblocks + 2 for every K.
 * Against fp32 gemm: each operand is rounded to 8 significant bits
 * (relative error <= 2^-9), so a product moves by at most
 * (2 2^-9 + 2^-18) |a b|, plus both results' accumulation bounds. And the
 * difference is not zero: the operands were rounded. */
START_TEST(test_amx_model_close_to_fp32) {
    int M = 70, N = 90, K = 1031, nkb = (K + 511) / 512;
    float *A = rand_buf((size_t)M * K, 131), *B = rand_buf((size_t)K * N, 132);
    float *C0 = rand_buf((size_t)M * N, 133), *C = malloc((size_t)M * N * sizeof(float));
    float *F = malloc((size_t)M * N * sizeof(float));
    ck_assert(C && F);
    memcpy(C, C0, (size_t)M * N * sizeof(float));
    memcpy(F, C0, (size_t)M * N * sizeof(float));
    ck_assert(gemm_bf16_set_kernel(GEMM_BF16_AMX_MODEL));
    gemm_bf16(0, 0, M, N, K, 0.5f, A, K, B, N, 1.0f, C, N);
    ck_assert_int_eq(check_against_ref(0, 0, M, N, K, 0.5f, A, K, B, N, 1.0f, C0, C, N), 0);
    gemm(0, 0, M, N, K, 0.5f, A, K, B, N, 1.0f, F, N);
    double u = 1.0 / 16777216.0, maxrel = 0;
    int differ = 0;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double mag;
            ref_gemm_at(0, 0, i, j, K, 0.5f, A, K, B, N, 1.0f, C0[(size_t)i * N + j], NULL, &mag);
            double tol = (2.0 / 512 + 1.0 / 262144) * mag * 1.01 + 2.0 * (K + 3.0 * nkb + 2.0) * u * mag * 1.01;
            double d = fabs((double)C[(size_t)i * N + j] - F[(size_t)i * N + j]);
            ck_assert_msg(d <= tol, "amx-model vs fp32 [%d,%d]: %.3g > %.3g", i, j, d, tol);
            if (d / mag > maxrel) maxrel = d / mag;
            differ += d > 0;
        }
    ck_assert(differ > 0);
    fprintf(stderr, "amx-model vs fp32 gemm: largest |difference| / sum|a b| = %.3g (bound %.3g)\n",
            maxrel, 2.0 / 512 + 1.0 / 262144);
    gemm_bf16_set_kernel(GEMM_BF16_AUTO);
    free(A); free(B); free(C0); free(C); free(F);
}
END_TEST

/* on a CPU with AMX: the tiles give the model's bits (one instruction on
 * the hand-worked tiles and on random ones; whole products) and AUTO
 * chooses them (its self-check passed). Elsewhere: skipped, and says so. */
START_TEST(test_amx_hw_equals_model) {
    if (!gemm_bf16_set_kernel(GEMM_BF16_AMX)) {
        fprintf(stderr, "test_amx_hw_equals_model: skipped: this CPU, OS or build has no AMX "
                        "(the kernel is tested through its model only)\n");
        return;
    }
    uint32_t a[256], b[256];
    float c[256], cm[256];
    tdp_cases(a, b, c);
    ck_assert(gemm_bf16_tdp_hw(c, a, b));
    check_tdp_cases(c, "AMX");
    uint64_t s = 7;
    for (int r = 0; r < 20; r++) {
        for (int i = 0; i < 256; i++) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            a[i] = (uint32_t)(s >> 32) & 0xbfffbfffu;     /* no inf or NaN: exponents below 0x80 */
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            b[i] = (uint32_t)(s >> 32) & 0xbfffbfffu;
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            c[i] = cm[i] = (float)((s >> 40) * (1.0 / 16777216.0)) - 0.5f;
        }
        ck_assert(gemm_bf16_tdp_hw(c, a, b));
        gemm_bf16_tdp_model(cm, a, b);
        ck_assert_msg(memcmp(c, cm, sizeof c) == 0, "AMX TDPBF16PS differs from the model (random tiles %d)", r);
    }
    static const int shapes[][3] = {{33, 47, 63}, {17, 33, 65}, {200, 70, 600}, {37, 65, 1031}, {3, 1100, 40}};
    for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++)
        for (int t = 0; t < 4; t++) {
            int M = shapes[k][0], N = shapes[k][1], K = shapes[k][2], ta = t & 1, tb = t >> 1;
            float *A = rand_buf((size_t)M * K, 141 + k), *B = rand_buf((size_t)K * N, 142 + k);
            float *C1 = rand_buf((size_t)M * N, 143 + k), *C2 = malloc((size_t)M * N * sizeof(float));
            ck_assert_ptr_nonnull(C2);
            memcpy(C2, C1, (size_t)M * N * sizeof(float));
            ck_assert(gemm_bf16_set_kernel(GEMM_BF16_AMX));
            gemm_bf16(ta, tb, M, N, K, 0.5f, A, ta ? M : K, B, tb ? K : N, 1.0f, C1, N);
            ck_assert(gemm_bf16_set_kernel(GEMM_BF16_AMX_MODEL));
            gemm_bf16(ta, tb, M, N, K, 0.5f, A, ta ? M : K, B, tb ? K : N, 1.0f, C2, N);
            ck_assert_msg(memcmp(C1, C2, (size_t)M * N * sizeof(float)) == 0,
                          "AMX gemm differs from the model (M=%d N=%d K=%d ta=%d tb=%d)", M, N, K, ta, tb);
            free(A); free(B); free(C1); free(C2);
        }
    ck_assert(gemm_bf16_set_kernel(GEMM_BF16_AUTO));
    ck_assert_str_eq(gemm_bf16_kernel_name(), "amx");
}
END_TEST

static Suite *bf16_suite(void) {
    Suite *s = suite_create("bf16");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_round_bits);
    tcase_add_test(tc, test_parse_compute);
    tcase_add_test(tc, test_kernels_vs_reference);
    tcase_add_test(tc, test_rounding_applied);
    tcase_add_test(tc, test_thread_invariant);
    tcase_add_test(tc, test_nested_calls);
    tcase_add_test(tc, test_mode_routes_gemm);
    tcase_add_test(tc, test_packed_bf16);
    tcase_add_test(tc, test_attention_bf16);
    tcase_add_test(tc, test_amx_model_tdp_bits);
    tcase_add_test(tc, test_amx_model_vs_order_ref);
    tcase_add_test(tc, test_amx_model_thread_invariant);
    tcase_add_test(tc, test_amx_model_close_to_fp32);
    tcase_add_test(tc, test_amx_hw_equals_model);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(bf16_suite)
