/* bench_matmul.c: our gemm beside OpenBLAS cblas_sgemm on the GEMM shapes
 * Stable Diffusion 1.5's UNet runs at 64x64 latents (512x512 images).
 * `make bench` builds and runs it. Both libraries get every core; each shape
 * is warmed up, then timed best-of-N in three alternating rounds per library,
 * so a noisy neighbour costs a repeat rather than a wrong figure. The load
 * average printed first says how busy the machine was.
 *
 * GFLOP/s = 2 M N K / seconds / 1e9. The last line is the geometric mean of
 * ours / OpenBLAS over the shapes run. The bf16 columns are our gemm in the
 * bf16 compute mode (gemm_bf16: operands rounded to bf16, fp32 sums), its
 * speed-up over our fp32 gemm, and its relative error against OpenBLAS's
 * fp32 result (max |diff| / max |C|).
 *
 *   bench_matmul [INDEX...]    only the shapes at these 0-based indices
 *   OMP_NUM_THREADS            threads for both libraries (default: all)
 *   SDLORA_BENCH_CLOCK=cpu     time by the process's CPU time instead of the
 *                              wall clock: on a shared machine, time spent
 *                              descheduled is not counted. With T threads the
 *                              figure is flop / (CPU seconds / T), i.e. as if
 *                              each thread had its own core; exact at T = 1,
 *                              and it counts idle OpenMP threads' spinning
 *                              (run with OMP_WAIT_POLICY=passive). */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "nn.h"
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    const char *what;
    int ta, tb, M, N, K;
} shape_t;

/* row-major, as the layers call gemm:
 *  linear forward   out(T, o) = x(T, i) W(o, i)^T      ta=0 tb=1  M=T N=o K=i
 *  linear backward  dx(T, i) = dout(T, o) W(o, i)      ta=0 tb=0  M=T N=i K=o
 *                   dW(o, i) = dout(T, o)^T x(T, i)    ta=1 tb=0  M=o N=i K=T
 *  attention        S = Q K^T (per head, Dh = 40)      ta=0 tb=1  M=Tq N=Tk K=Dh
 *                   O = P V                            ta=0 tb=0  M=Tq N=Dh K=Tk
 *  conv 3x3 (im2col) out(O, HW) = W(O, C*9) cols(C*9, HW)  ta=0 tb=0
 *                   dcols(C*9, HW) = W^T dout(O, HW)   ta=1 tb=0 */
static const shape_t shapes[] = {
    {"linear 320->320 (to_q/k/v/out), 64x64",   0, 1, 4096,  320,   320},
    {"linear 320->2560 (GEGLU proj), 64x64",    0, 1, 4096, 2560,   320},
    {"linear 1280->320 (ff out), 64x64",        0, 1, 4096,  320,  1280},
    {"linear 640->5120 (GEGLU proj), 32x32",    0, 1, 1024, 5120,   640},
    {"linear 1280->1280, 16x16",                0, 1,  256, 1280,  1280},
    {"linear bwd dx 320x320, 64x64",            0, 0, 4096,  320,   320},
    {"linear bwd dW 320x320, 64x64",            1, 0,  320,  320,  4096},
    {"attn Q K^T, 4096x4096, Dh 40",            0, 1, 4096, 4096,    40},
    {"attn P V, 4096x4096, Dh 40",              0, 0, 4096,   40,  4096},
    {"conv3x3 320ch, 64x64",                    0, 0,  320, 4096,  2880},
    {"conv3x3 640ch, 32x32",                    0, 0,  640, 1024,  5760},
    {"conv3x3 1280ch, 16x16",                   0, 0, 1280,  256, 11520},
    {"conv3x3 1280ch, 8x8",                     0, 0, 1280,   64, 11520},
    {"conv3x3 bwd dcols 320ch, 64x64",          1, 0, 2880, 4096,   320},
    {"square 1024^3",                           0, 0, 1024, 1024,  1024},
};

static int use_cpu_clock;   /* SDLORA_BENCH_CLOCK=cpu */
static int nthreads = 1;

static double now(void) {
    struct timespec ts;
    clock_gettime(use_cpu_clock ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return (ts.tv_sec + 1e-9 * ts.tv_nsec) / (use_cpu_clock ? nthreads : 1);
}

static void pause_ms(int ms) {
    /* lets the other library's spinning worker threads go to sleep before
     * the next timing, so they do not steal the cores being measured */
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void run(int lib, const shape_t *s, const float *A, const float *B, float *C) {
    int lda = s->ta ? s->M : s->K, ldb = s->tb ? s->K : s->N;
    if (lib == 2)
        gemm_bf16(s->ta, s->tb, s->M, s->N, s->K, 1.0f, A, lda, B, ldb, 0.0f, C, s->N);
    else if (lib == 0)
        gemm(s->ta, s->tb, s->M, s->N, s->K, 1.0f, A, lda, B, ldb, 0.0f, C, s->N);
    else
        cblas_sgemm(CblasRowMajor, s->ta ? CblasTrans : CblasNoTrans, s->tb ? CblasTrans : CblasNoTrans,
                    s->M, s->N, s->K, 1.0f, A, lda, B, ldb, 0.0f, C, s->N);
}

/* best time of repeated runs (after one warm-up), for at least min_s */
static double best_time(int lib, const shape_t *s, const float *A, const float *B, float *C,
                        double min_s) {
    run(lib, s, A, B, C);
    double best = 1e30, spent = 0;
    for (int rep = 0; rep < 50 && (rep < 2 || spent < min_s); rep++) {
        double t0 = now();
        run(lib, s, A, B, C);
        double t = now() - t0;
        spent += t;
        if (t < best) best = t;
    }
    return best;
}

int main(int argc, char **argv) {
    const char *clk = getenv("SDLORA_BENCH_CLOCK");
    use_cpu_clock = clk && strcmp(clk, "cpu") == 0;
#ifdef _OPENMP
    nthreads = omp_get_max_threads();
#endif
    openblas_set_num_threads(nthreads);
    const char *ct = getenv("OPENBLAS_CORETYPE");
    printf("threads %d (ours and OpenBLAS); OpenBLAS core %s; OPENBLAS_CORETYPE=%s\n",
           nthreads, openblas_get_corename(), ct ? ct : "(unset)");
    printf("config: %s\n", openblas_get_config());
    printf("bf16 kernel: %s\n", gemm_bf16_kernel_name());
    printf("clock: %s\n", use_cpu_clock ? "process CPU time / threads (SDLORA_BENCH_CLOCK=cpu)" : "wall");
    FILE *ci = fopen("/proc/cpuinfo", "r");
    char cbuf[256];
    while (ci && fgets(cbuf, sizeof cbuf, ci))
        if (strncmp(cbuf, "model name", 10) == 0) { printf("cpu: %s", strchr(cbuf, ':') + 2); break; }
    if (ci) fclose(ci);
    FILE *la = fopen("/proc/loadavg", "r");
    char lbuf[64];
    if (la && fgets(lbuf, sizeof lbuf, la)) printf("load average: %s", lbuf);
    if (la) fclose(la);
    printf("\n");
    printf("%-38s %2s %2s %5s %5s %5s %9s %9s %6s %8s %9s %6s %8s\n", "shape", "tA", "tB", "M", "N", "K",
           "ours", "OpenBLAS", "ratio", "maxdiff", "ours bf16", "x fp32", "bf16 err");
    printf("%-38s %29s %9s %9s %15s %9s\n", "", "", "GFLOP/s", "GFLOP/s", "", "GFLOP/s");

    double log_sum = 0, log_bf16 = 0;
    int nshapes = (int)(sizeof shapes / sizeof shapes[0]), nrun = 0;
    for (int i = 0; i < nshapes; i++) {
        const shape_t *s = &shapes[i];
        int wanted = argc < 2;
        for (int a = 1; a < argc; a++) wanted |= atoi(argv[a]) == i;
        if (!wanted) continue;
        nrun++;
        size_t na = (size_t)s->M * s->K, nb = (size_t)s->K * s->N, nc = (size_t)s->M * s->N;
        float *A = malloc(na * sizeof(float)), *B = malloc(nb * sizeof(float));
        float *C0 = malloc(nc * sizeof(float)), *C1 = malloc(nc * sizeof(float));
        float *C2 = malloc(nc * sizeof(float));
        if (!A || !B || !C0 || !C1 || !C2) { fprintf(stderr, "error: out of memory\n"); return 1; }
        uint64_t st = 42 + (uint64_t)i;
        for (size_t j = 0; j < na; j++) { st = st * 6364136223846793005ULL + 1; A[j] = (float)(st >> 40) / 16777216.0f - 0.5f; }
        for (size_t j = 0; j < nb; j++) { st = st * 6364136223846793005ULL + 1; B[j] = (float)(st >> 40) / 16777216.0f - 0.5f; }

        /* rounds alternate the two libraries, so a busy spell on a shared
         * machine does not land on one of them only */
        double t_ours = 1e30, t_blas = 1e30, t_bf16 = 1e30;
        for (int round = 0; round < 3; round++) {
            pause_ms(100);
            double t = best_time(0, s, A, B, C0, 0.12);
            if (t < t_ours) t_ours = t;
            pause_ms(100);
            t = best_time(1, s, A, B, C1, 0.12);
            if (t < t_blas) t_blas = t;
            pause_ms(100);
            t = best_time(2, s, A, B, C2, 0.12);
            if (t < t_bf16) t_bf16 = t;
        }

        /* the two results must agree, or the figures mean nothing */
        double maxd = 0, maxc = 0, maxd2 = 0;
        for (size_t j = 0; j < nc; j++) {
            double d = fabs((double)C0[j] - C1[j]), d2 = fabs((double)C2[j] - C1[j]);
            if (!(d <= maxd)) maxd = d;
            if (!(d2 <= maxd2)) maxd2 = d2;
            if (fabs(C1[j]) > maxc) maxc = fabs(C1[j]);
        }
        double flop = 2.0 * s->M * s->N * s->K;
        double g_ours = flop / t_ours * 1e-9, g_blas = flop / t_blas * 1e-9;
        log_sum += log(g_ours / g_blas);
        double g_bf16 = flop / t_bf16 * 1e-9;
        log_bf16 += log(g_bf16 / g_ours);
        printf("%-38s %2d %2d %5d %5d %5d %9.1f %9.1f %6.2f %8.1e %9.1f %6.2f %8.1e\n", s->what, s->ta, s->tb,
               s->M, s->N, s->K, g_ours, g_blas, g_ours / g_blas, maxc > 0 ? maxd / maxc : maxd,
               g_bf16, g_bf16 / g_ours, maxc > 0 ? maxd2 / maxc : maxd2);
        fflush(stdout);
        free(A); free(B); free(C0); free(C1); free(C2);
    }
    if (nrun) printf("\ngeometric mean ours / OpenBLAS over %d shapes: %.2f\n", nrun, exp(log_sum / nrun));
    if (nrun) printf("geometric mean ours bf16 / ours fp32 over %d shapes: %.2f\n", nrun, exp(log_bf16 / nrun));
    return 0;
}
