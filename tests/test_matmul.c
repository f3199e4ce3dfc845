/* test_matmul.c: gemm against a plain double-precision reference.
 *
 * Every case runs all four (transA, transB) combinations on operands that
 * sit inside larger buffers (lda/ldb/ldc wider than the rows), so a wrong
 * stride, a wrong transpose, a missed edge tile, a K block summed twice or
 * beta applied per K block all show up as a mismatch. Sizes are chosen to
 * hit the small path, the blocked path, ragged MR/NR edges, more than one
 * K block (K > 512), more than one N panel (N > 4096) and tall, thin
 * problems (many row blocks, one column strip). */
#include "testutil.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* C = alpha op(A) op(B) + beta C, summed in double; beta == 0 ignores C */
static void ref_gemm(int ta, int tb, int M, int N, int K, float alpha,
                     const float *A, int lda, const float *B, int ldb,
                     float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float *c = &C[(size_t)i * ldc + j];
            *c = (float)ref_gemm_at(ta, tb, i, j, K, alpha, A, lda, B, ldb, beta, *c, NULL, NULL);
        }
}

/* one (M, N, K, alpha, beta) problem, all four transpose combinations.
 * Operands have PAD extra columns per row; C's padding must stay untouched. */
#define PAD 3
static void check_case(int M, int N, int K, float alpha, float beta, int nan_c) {
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int arows = ta ? K : M, acols = ta ? M : K;
            int brows = tb ? N : K, bcols = tb ? K : N;
            int lda = acols + PAD, ldb = bcols + PAD, ldc = N + PAD;
            size_t na = (size_t)arows * lda, nb = (size_t)brows * ldb, nc = (size_t)M * ldc;
            float *A = rand_buf(na ? na : 1, 1 + M + 7 * K + ta);
            float *B = rand_buf(nb ? nb : 1, 2 + N + 5 * K + tb);
            float *C = rand_buf(nc, 3 + M * N);
            float *R = malloc(nc * sizeof(float));
            ck_assert_ptr_nonnull(R);
            if (nan_c)
                for (size_t i = 0; i < nc; i++) C[i] = NAN;
            memcpy(R, C, nc * sizeof(float));

            gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
            ref_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, R, ldc);

            /* compare the M x N part; padding columns must be bit-unchanged */
            float *got = malloc((size_t)M * N * sizeof(float));
            float *want = malloc((size_t)M * N * sizeof(float));
            ck_assert_ptr_nonnull(got);
            ck_assert_ptr_nonnull(want);
            for (int i = 0; i < M; i++) {
                memcpy(got + (size_t)i * N, C + (size_t)i * ldc, N * sizeof(float));
                memcpy(want + (size_t)i * N, R + (size_t)i * ldc, N * sizeof(float));
                ck_assert_msg(memcmp(C + (size_t)i * ldc + N, R + (size_t)i * ldc + N,
                                     PAD * sizeof(float)) == 0,
                              "C padding written: M=%d N=%d K=%d ta=%d tb=%d", M, N, K, ta, tb);
            }
            double e = rel_err(got, want, (size_t)M * N);
            ck_assert_msg(e < 1e-5, "M=%d N=%d K=%d ta=%d tb=%d alpha=%g beta=%g nanC=%d: rel err %g",
                          M, N, K, ta, tb, alpha, beta, nan_c, e);
            free(A); free(B); free(C); free(R); free(got); free(want);
        }
}

static const int sizes[][3] = {   /* M, N, K */
    {1, 1, 1}, {1, 7, 33}, {7, 1, 33}, {7, 33, 100}, {33, 7, 257},
    {100, 257, 33}, {257, 100, 300}, {64, 64, 64}, {13, 300, 600}, {50, 40, 1100},
};

START_TEST(test_gemm_vs_reference) {
    const float betas[] = {0.0f, 1.0f, 0.5f};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
        for (int b = 0; b < 3; b++)
            check_case(sizes[s][0], sizes[s][1], sizes[s][2], 1.5f, betas[b], 0);
}
END_TEST

/* beta == 0 means C is write-only: NaN already there must not leak through
 * (0 * NaN is NaN, so an implementation that computes beta * C fails) */
START_TEST(test_gemm_beta0_ignores_nan) {
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
        check_case(sizes[s][0], sizes[s][1], sizes[s][2], -0.75f, 0.0f, 1);
}
END_TEST

/* panel boundaries: N past one NC panel; M of many row blocks */
START_TEST(test_gemm_large_edges) {
    check_case(7, 4100, 20, 1.0f, 0.5f, 0);
    check_case(4100, 17, 9, 2.0f, 0.0f, 0);
}
END_TEST

/* K == 0 or alpha == 0: C = beta * C exactly, and A, B are not needed */
START_TEST(test_gemm_degenerate) {
    float C[6] = {1, 2, 3, 4, 5, 6};
    gemm(0, 0, 2, 3, 0, 1.0f, NULL, 1, NULL, 3, 0.5f, C, 3);
    for (int i = 0; i < 6; i++) ck_assert_float_eq(C[i], 0.5f * (i + 1));
    float D[6] = {NAN, NAN, NAN, NAN, NAN, NAN};
    float A[2] = {1, 2}, B[3] = {1, 2, 3};
    gemm(0, 0, 2, 3, 1, 0.0f, A, 1, B, 3, 0.0f, D, 3);
    for (int i = 0; i < 6; i++) ck_assert_float_eq(D[i], 0.0f);
}
END_TEST

/* the same bits whatever the thread count, and when called from inside a
 * parallel region (where it must neither nest nor share its buffers), in all
 * four transpose cases; N = 517 leaves a ragged last column strip, K = 700
 * more than one K block */
START_TEST(test_gemm_thread_invariant) {
#ifdef _OPENMP
    const int M = 203, N = 517, K = 700;
    float *A = rand_buf((size_t)M * K, 11), *B = rand_buf((size_t)N * K, 12);
    float *C0 = rand_buf((size_t)M * N, 13);
    float *C1 = malloc((size_t)M * N * sizeof(float)), *C2 = malloc((size_t)M * N * sizeof(float));
    float *C3 = malloc((size_t)2 * M * N * sizeof(float));
    ck_assert(C1 && C2 && C3);
    int saved = omp_get_max_threads();
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int lda = ta ? M : K, ldb = tb ? K : N;
            memcpy(C1, C0, (size_t)M * N * sizeof(float));
            omp_set_num_threads(1);
            gemm(ta, tb, M, N, K, 0.5f, A, lda, B, ldb, 0.5f, C1, N);
            for (int nt = 2; nt <= 5; nt++) {
                memcpy(C2, C0, (size_t)M * N * sizeof(float));
                omp_set_num_threads(nt);
                gemm(ta, tb, M, N, K, 0.5f, A, lda, B, ldb, 0.5f, C2, N);
                ck_assert_msg(memcmp(C1, C2, (size_t)M * N * sizeof(float)) == 0,
                              "ta=%d tb=%d: 1 vs %d threads differ", ta, tb, nt);
            }
            /* two concurrent calls from a parallel region */
            omp_set_num_threads(2);
            #pragma omp parallel for num_threads(2)
            for (int t = 0; t < 2; t++) {
                memcpy(C3 + (size_t)t * M * N, C0, (size_t)M * N * sizeof(float));
                gemm(ta, tb, M, N, K, 0.5f, A, lda, B, ldb, 0.5f, C3 + (size_t)t * M * N, N);
            }
            ck_assert_msg(memcmp(C1, C3, (size_t)M * N * sizeof(float)) == 0,
                          "ta=%d tb=%d: nested call differs", ta, tb);
            ck_assert_msg(memcmp(C1, C3 + (size_t)M * N, (size_t)M * N * sizeof(float)) == 0,
                          "ta=%d tb=%d: nested call differs", ta, tb);
        }
    omp_set_num_threads(saved);
    free(A); free(B); free(C0); free(C1); free(C2); free(C3);
#endif
}
END_TEST

/* gemm_packed with a B packed once gives gemm's bits, for either layout of
 * B, ragged sizes, more than one K block, the small path, beta != 0, and
 * 1 or 2 threads; and a packed B is reused across calls unchanged. The
 * narrow shapes (N up to 2 strips: gemm reads A in place there,
 * gemm_packed always packs it) check that path against the blocked one. */
START_TEST(test_gemm_packed_same_bits) {
    static const int cases[][3] = {   /* M, N, K */
        {203, 517, 700}, {64, 40, 1100}, {5, 7, 9}, {300, 33, 64}, {1, 1000, 50},
        {1000, 32, 64}, {301, 16, 200}, {77, 13, 384}, {2000, 32, 300}, {130, 5, 100},
        {100, 16, 1100}, {40, 32, 800}, {500, 64, 100}, {90, 50, 900}, {256, 8, 256}, {70, 40, 500},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++) {
                int M = cases[c][0], N = cases[c][1], K = cases[c][2];
                int lda = (ta ? M : K) + PAD, ldb = (tb ? K : N) + PAD, ldc = N + PAD;
                float *A = rand_buf((size_t)(ta ? K : M) * lda, 21 + c);
                float *B = rand_buf((size_t)(tb ? N : K) * ldb, 22 + c);
                float *C0 = rand_buf((size_t)M * ldc, 23 + c);
                float *C1 = malloc((size_t)M * ldc * sizeof(float));
                float *C2 = malloc((size_t)M * ldc * sizeof(float));
                ck_assert(C1 && C2);
                gemm_packed_b *pb = gemm_pack_b(tb, K, N, B, ldb);
                ck_assert_ptr_nonnull(pb);
                for (int nt = 1; nt <= 2; nt++) {
#ifdef _OPENMP
                    int saved = omp_get_max_threads();
                    omp_set_num_threads(nt);
#endif
                    for (int rep = 0; rep < 2; rep++) {
                        float beta = rep ? 0.5f : 0.0f;
                        memcpy(C1, C0, (size_t)M * ldc * sizeof(float));
                        memcpy(C2, C0, (size_t)M * ldc * sizeof(float));
                        gemm(ta, tb, M, N, K, 1.25f, A, lda, B, ldb, beta, C1, ldc);
                        gemm_packed(ta, M, 1.25f, A, lda, pb, beta, C2, ldc);
                        ck_assert_msg(memcmp(C1, C2, (size_t)M * ldc * sizeof(float)) == 0,
                                      "M=%d N=%d K=%d ta=%d tb=%d beta=%g threads=%d: packed differs",
                                      M, N, K, ta, tb, beta, nt);
                    }
#ifdef _OPENMP
                    omp_set_num_threads(saved);
#endif
                }
                gemm_packed_b_free(pb);
                free(A); free(B); free(C0); free(C1); free(C2);
            }
    ck_assert_ptr_null(gemm_pack_b(0, 0, 5, NULL, 5));
    gemm_packed_b_free(NULL);
}
END_TEST

static Suite *matmul_suite(void) {
    Suite *s = suite_create("matmul");
    TCase *tc = tcase_create("gemm");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_gemm_vs_reference);
    tcase_add_test(tc, test_gemm_beta0_ignores_nan);
    tcase_add_test(tc, test_gemm_large_edges);
    tcase_add_test(tc, test_gemm_degenerate);
    tcase_add_test(tc, test_gemm_thread_invariant);
    tcase_add_test(tc, test_gemm_packed_same_bits);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(matmul_suite)
