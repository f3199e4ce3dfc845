/* backend.c: nn_ops_cpu, the CPU's operations table (backend.h). The
 * helpers are the loops unet.c ran inline before it called them through
 * the table, unchanged, so every number is the same. */
#include <stdlib.h>
#include <string.h>
#include "backend.h"
#include "half.h"
#include "ddpm.h"
#include <math.h>

static void *cpu_alloc(size_t bytes) { return malloc(bytes ? bytes : 1); }
static void cpu_free(void *p) { free(p); }
static int cpu_move(void *dst, const void *src, size_t bytes) {
    if (bytes) memcpy(dst, src, bytes);
    return 1;
}
static const char *cpu_error(void) { return NULL; }
static void cpu_set_layer(const char *name) { (void)name; }

static void cpu_copy(float *dst, const float *src, size_t n) { memcpy(dst, src, sizeof(float) * n); }
static void cpu_zero(float *p, size_t n) { memset(p, 0, sizeof(float) * n); }
static void cpu_add(float *out, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}
static void cpu_accumulate(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

void nn_transpose(float *out, const float *in, int B, int R, int S) {
    for (int b = 0; b < B; b++) {
        for (int s = 0; s < S; s++) {
            const float *ib = in + (size_t)b * R * S;
            float *o = out + ((size_t)b * S + s) * R;
            for (int r = 0; r < R; r++) o[r] = ib[(size_t)r * S + s];
        }
    }
}

void nn_add_chan(float *y, const float *v, int B, int C, size_t HW) {
    for (int b = 0; b < B; b++)
        for (int c = 0; c < C; c++) {
            float *p = y + ((size_t)b * C + c) * HW;
            float a = v[(size_t)b * C + c];
            for (size_t i = 0; i < HW; i++) p[i] += a;
        }
}

void nn_sum_chan(float *out, const float *x, int B, int C, size_t HW) {
    for (int b = 0; b < B; b++)
        for (int c = 0; c < C; c++) {
            const float *p = x + ((size_t)b * C + c) * HW;
            double s = 0;
            for (size_t i = 0; i < HW; i++) s += p[i];
            out[(size_t)b * C + c] = (float)s;
        }
}

/* sum of g^2 in index order, in double (train.c's --clip sum) */
static double cpu_grad_sumsq(const float *g, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)g[i] * g[i];
    return s;
}
static void cpu_scale(float *g, float k, size_t n) {
    for (size_t i = 0; i < n; i++) g[i] *= k;
}

float nn_clip_grad_norm(const nn_ops *ops, float *g1, size_t n1, float *g2, size_t n2, float max_norm) {
    if (max_norm <= 0) return 0;
    double s2 = n1 ? ops->grad_sumsq(g1, n1) : 0;
    for (size_t i = 0; i < n2; i++) s2 += (double)g2[i] * g2[i];
    /* coef = max_norm / (norm + 1e-6), applied when < 1 (torch, and train.c) */
    float norm = (float)sqrt(s2), coef = max_norm / (norm + 1e-6f);
    if (coef < 1.0f) {
        if (n1) ops->scale(g1, coef, n1);
        for (size_t i = 0; i < n2; i++) g2[i] *= coef;
    }
    return norm;
}

static void cpu_memmove(float *dst, const float *src, size_t n) { if (n) memmove(dst, src, sizeof(float) * n); }

/* the loop vae.c's down_forward ran inline: each row copied, then a zero */
void nn_pad_br(float *out, const float *in, int BC, int H, int W) {
    size_t Wp = (size_t)W + 1;
    for (int bc = 0; bc < BC; bc++) {
        const float *s = in + (size_t)bc * H * W;
        float *d = out + (size_t)bc * (H + 1) * Wp;
        for (int i = 0; i < H; i++) {
            memcpy(d + (size_t)i * Wp, s + (size_t)i * W, (size_t)W * sizeof(float));
            d[(size_t)i * Wp + W] = 0.0f;
        }
        memset(d + (size_t)H * Wp, 0, Wp * sizeof(float));
    }
}

const nn_ops nn_ops_cpu = {
    .name = "cpu",
    .device = 0,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_move,
    .download = cpu_move,
    .error = cpu_error,
    .set_layer = cpu_set_layer,
    .copy = cpu_copy,
    .zero = cpu_zero,
    .add = cpu_add,
    .accumulate = cpu_accumulate,
    .transpose = nn_transpose,
    .add_chan = nn_add_chan,
    .sum_chan = nn_sum_chan,
    .widen_f16 = half_to_float_array,
    .move = cpu_memmove,
    .pad_br = nn_pad_br,
    .gemm = gemm,
    .linear_forward = linear_forward,
    .linear_backward = linear_backward,
    .conv2d_forward = conv2d_forward,
    .conv2d_backward = conv2d_backward,
    .groupnorm_forward = groupnorm_forward,
    .groupnorm_backward = groupnorm_backward,
    .layernorm_forward = layernorm_forward,
    .layernorm_backward = layernorm_backward,
    .silu_forward = silu_forward,
    .silu_backward = silu_backward,
    .gelu_forward = gelu_forward,
    .quickgelu_forward = quickgelu_forward,
    .geglu_forward = geglu_forward,
    .geglu_backward = geglu_backward,
    .upsample2x_forward = upsample2x_forward,
    .upsample2x_backward = upsample2x_backward,
    .timestep_embedding = timestep_embedding,
    .attention_forward = attention_forward,
    .attention_backward = attention_backward,
    .lora_forward = lora_forward,
    .lora_backward = lora_backward,
    .adamw_step = adamw_step,
    .grad_sumsq = cpu_grad_sumsq,
    .scale = cpu_scale,
    .mse_loss_forward = mse_loss_forward,
    .mse_loss_backward = mse_loss_backward,
};

/* ---- fp16's loss scale (backend.h) */
void nn_loss_scaler_init(nn_loss_scaler *s) {
    s->scale = 65536.0f;
    s->good = 0;
    s->interval = 2000;
}

int nn_loss_scaler_unscale(nn_loss_scaler *s, const nn_ops *o1, float *g1, size_t n1,
                           const nn_ops *o2, float *g2, size_t n2) {
    /* the sum of squares is inf or NaN exactly when some element is (each
     * square of a finite float is finite in double, and so is their sum) */
    double s2 = (n1 ? o1->grad_sumsq(g1, n1) : 0) + (n2 ? o2->grad_sumsq(g2, n2) : 0);
    if (!isfinite(s2)) {
        s->scale *= 0.5f;
        s->good = 0;
        return 0;
    }
    float inv = 1.0f / s->scale;          /* a power of two: exact */
    if (n1) o1->scale(g1, inv, n1);
    if (n2) o2->scale(g2, inv, n2);
    if (++s->good >= s->interval) {
        s->scale *= 2.0f;
        s->good = 0;
    }
    return 1;
}
