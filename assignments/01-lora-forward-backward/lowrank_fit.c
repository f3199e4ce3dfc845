/* lowrank_fit.c: assignment 01's experiment, no model needed.
 *
 * A frozen layer y = x W0^T should become y* = x (W0 + D)^T, where the
 * change D (out x in) has rank 8. A LoRA of rank r and scale alpha/r learns
 * it with AdamW on the MSE, through YOUR lora_forward / lora_backward. The
 * best a rank-r update can do is drop D's r largest singular directions, so
 * the final loss should fall as r grows and stop falling at r = 8.
 *
 *   cc -O2 -std=c99 -D_POSIX_C_SOURCE=200809L -I. assignments/01-lora-forward-backward/lowrank_fit.c \
 *      lora.c nn.c matmul.c optim.c safetensors.c json.c half.c profile.c -lm -o /tmp/lowrank_fit
 *   /tmp/lowrank_fit                       the sweep: r = 1..32, alpha = r and alpha = 8
 *   /tmp/lowrank_fit RANK ALPHA [STEPS] [LR] one run, loss every 50 steps
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lora.h"
#include "optim.h"

enum { IN = 64, OUT = 64, N = 256, TRUE_RANK = 8 };

static float W0[OUT * IN], D[OUT * IN], X[N * IN], Y[N * OUT];

static void setup(void) {
    rng_t g; rng_seed(&g, 1234);
    for (int i = 0; i < OUT * IN; i++) W0[i] = (2.0f * rng_uniform(&g) - 1.0f) / 8.0f;
    /* D = U V, U: out x 8, V: 8 x in, so rank(D) = 8 */
    float U[OUT * TRUE_RANK], V[TRUE_RANK * IN];
    for (int i = 0; i < OUT * TRUE_RANK; i++) U[i] = rng_normal(&g) * 0.1f;
    for (int i = 0; i < TRUE_RANK * IN; i++) V[i] = rng_normal(&g) * 0.1f;
    gemm(0, 0, OUT, IN, TRUE_RANK, 1.0f, U, TRUE_RANK, V, IN, 0.0f, D, IN);
    for (int i = 0; i < N * IN; i++) X[i] = rng_normal(&g);
    /* targets: y* = x (W0 + D)^T */
    float W[OUT * IN];
    for (int i = 0; i < OUT * IN; i++) W[i] = W0[i] + D[i];
    linear_forward(Y, X, W, NULL, N, IN, OUT);
}

/* trains one LoRA; returns the final loss L = mean((y - y*)^2) */
static double fit(int r, float alpha, int steps, float lr, int verbose) {
    size_t np = (size_t)r * (IN + OUT);
    float *p = malloc(sizeof(float) * np), *dp = calloc(np, sizeof(float));
    float *y = malloc(sizeof(float) * N * OUT), *dy = malloc(sizeof(float) * N * OUT);
    float *ax = malloc(sizeof(float) * N * r);
    lora_t L; rng_t g; rng_seed(&g, 7);
    lora_init(&L, IN, OUT, r, alpha, 0.0f, p, p + (size_t)r * IN, 0, &g);
    float *scratch = malloc(sizeof(float) * lora_scratch_floats(&L, N));
    L.dA = dp; L.dB = dp + (size_t)r * IN;
    adamw_t opt;
    adamw_init(&opt, np, lr, 0.9f, 0.999f, 1e-8f, 0.0f);
    double loss = 0;
    for (int step = 0; step <= steps; step++) {
        lora_forward(y, ax, NULL, scratch, X, W0, NULL, &L, N, IN, OUT, NULL);
        /* L = (1/n) sum (y - y*)^2,  dL/dy = 2 (y - y*) / n */
        loss = 0;
        for (int i = 0; i < N * OUT; i++) {
            double d = (double)y[i] - Y[i];
            loss += d * d;
            dy[i] = (float)(2.0 * d / (N * OUT));
        }
        loss /= N * OUT;
        if (verbose && step % 50 == 0) printf("step %4d  loss %.6f\n", step, loss);
        if (step == steps) break;
        memset(dp, 0, sizeof(float) * np);
        lora_backward(NULL, dy, X, ax, NULL, scratch, W0, &L, N, IN, OUT);
        adamw_step(&opt, p, dp, lr);
    }
    adamw_free(&opt);
    free(p); free(dp); free(y); free(dy); free(ax); free(scratch);
    return loss;
}

int main(int argc, char **argv) {
    setup();
    double base = 0;   /* the loss before training: B = 0, so y = x W0^T */
    for (int i = 0; i < N * OUT; i++) {
        double d = 0;
        for (int k = 0; k < IN; k++) d += (double)X[i / OUT * IN + k] * D[i % OUT * IN + k];
        base += d * d;
    }
    base /= N * OUT;
    if (argc >= 3) {
        int r = atoi(argv[1]);
        float alpha = (float)atof(argv[2]);
        int steps = argc > 3 ? atoi(argv[3]) : 500;
        float lr = argc > 4 ? (float)atof(argv[4]) : 1e-2f;
        if (r < 1 || r > IN || steps < 0 || !(lr > 0)) { fprintf(stderr, "error: need 1 <= RANK <= %d, STEPS >= 0, LR > 0\n", IN); return 2; }
        printf("rank %d alpha %g (scale %g), %zu trainable numbers vs %d in W0; loss at B = 0: %.6f\n",
               r, alpha, alpha / r, (size_t)r * (IN + OUT), IN * OUT, base);
        fit(r, alpha, steps, lr, 1);
        return 0;
    }
    printf("rank(D) = %d, in = out = %d; loss before training %.6f; AdamW lr 1e-2\n", TRUE_RANK, IN, base);
    printf("%5s %7s | %-23s | %-23s\n", "", "", "     after 30 steps", "     after 500 steps");
    printf("%5s %7s | %11s %11s | %11s %11s\n", "rank", "params", "alpha = r", "alpha = 8", "alpha = r", "alpha = 8");
    static const int ranks[] = {1, 2, 4, 8, 16, 32};
    for (int i = 0; i < 6; i++) {
        int r = ranks[i];
        printf("%5d %7d | %11.6f %11.6f | %11.6f %11.6f\n", r, r * (IN + OUT),
               fit(r, (float)r, 30, 1e-2f, 0), fit(r, 8.0f, 30, 1e-2f, 0),
               fit(r, (float)r, 500, 1e-2f, 0), fit(r, 8.0f, 500, 1e-2f, 0));
    }
    return 0;
}
