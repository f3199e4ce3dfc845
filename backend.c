/* backend.c: nn_ops_cpu, the CPU's operations table (backend.h). The
 * helpers are the loops unet.c ran inline before it called them through
 * the table, unchanged, so every number is the same. */
#include <stdlib.h>
#include <string.h>
#include "backend.h"
#include "half.h"
#include "ddpm.h"
#include "cuda/cuda.h"
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

float nn_clip_grad_norm2(const nn_ops *ops, float *g1, size_t n1, float *g2, size_t n2, float max_norm) {
    if (max_norm <= 0) return 0;
    double s2 = (n1 ? ops->grad_sumsq(g1, n1) : 0) + (n2 ? ops->grad_sumsq(g2, n2) : 0);
    float norm = (float)sqrt(s2), coef = max_norm / (norm + 1e-6f);
    if (coef < 1.0f) {
        if (n1) ops->scale(g1, coef, n1);
        if (n2) ops->scale(g2, coef, n2);
    }
    return norm;
}

/* x_0[b, t] = tok[ids[b, t]] + pos[t], each row widened from fp16 when the
 * table is held so (exact), then one float add: clip.c's loop */
void nn_embedding_forward(float *out, const int *ids, const float *tok, const uint16_t *tok16,
                          const float *pos, const uint16_t *pos16, int B, int T, int C) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            size_t r = (size_t)ids[b * T + t];
            float *x = out + ((size_t)b * T + t) * C;
            for (int i = 0; i < C; i++) {
                float te = tok ? tok[r * C + i] : half_to_float(tok16[r * C + i]);
                float pe = pos ? pos[(size_t)t * C + i] : half_to_float(pos16[(size_t)t * C + i]);
                x[i] = te + pe;
            }
        }
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

/* the training draws by index (ddpm.h's ddpm_rng_*_at): the numbers of the
 * CPU loops of ddpm_sample_timesteps / _noise / ddpm_noise_offset */
static void cpu_ddpm_timesteps(int *t, float *tf, int B, int T, uint64_t s0) {
    for (int b = 0; b < B; b++) {
        t[b] = (int)(ddpm_rng_u64_at(s0, (uint64_t)b + 1) % (uint64_t)T);
        tf[b] = (float)t[b];
    }
}
static void cpu_ddpm_normal(float *eps, size_t n, uint64_t s0) {
    for (size_t i = 0; i < n; i++) eps[i] = ddpm_rng_normal_at(s0, i);
}
static void cpu_ddpm_noise_offset(float *eps, int B, int C, size_t HW, float offset, uint64_t s0) {
    if (offset == 0.0f) return;
    for (size_t bc = 0; bc < (size_t)B * C; bc++) {
        float d = offset * ddpm_rng_normal_at(s0, bc);
        for (size_t i = 0; i < HW; i++) eps[bc * HW + i] += d;
    }
}
/* ddpm.c's functions read only these two tables of the schedule */
static ddpm_schedule sched_of(const float *sqrt_abar, const float *sqrt_1m_abar) {
    ddpm_schedule s;
    memset(&s, 0, sizeof s);
    s.sqrt_abar = (float *)sqrt_abar;
    s.sqrt_1m_abar = (float *)sqrt_1m_abar;
    return s;
}
static void cpu_ddpm_add_noise(float *xt, const float *x0, const float *eps, const int *t, int B, size_t n,
                               const float *sa, const float *s1a) {
    ddpm_schedule s = sched_of(sa, s1a);
    ddpm_add_noise(xt, x0, eps, t, B, n, &s);
}
static void cpu_ddpm_target(float *target, const float *x0, const float *eps, const int *t, int B, size_t n,
                            ddpm_prediction pred, const float *sa, const float *s1a) {
    ddpm_schedule s = sched_of(sa, s1a);
    ddpm_target(target, x0, eps, t, B, n, pred, &s);
}
static void cpu_ddpm_loss_weights(float *w, const int *t, int B, float gamma, ddpm_prediction pred,
                                  const float *sa, const float *s1a) {
    ddpm_schedule s = sched_of(sa, s1a);
    if (gamma > 0) ddpm_min_snr_weights(w, t, B, gamma, pred, &s);
    else for (int b = 0; b < B; b++) w[b] = 1.0f;
}

void nn_ddpm_micro(const nn_ops *ops, const nn_ddpm_cfg *c, rng_t *rng, const float *x0, int B, int C, size_t HW,
                   int *t, float *tf, float *eps, float *xt, float *target, float *w) {
    size_t per = (size_t)C * HW, n = per * B;
    /* micro_noise's order: B timesteps, B C HW normals, then B C offsets */
    uint64_t s_t = rng->state, s_eps = ddpm_rng_skip(s_t, (uint64_t)B), s_off = ddpm_rng_skip(s_eps, 2 * (uint64_t)n);
    ops->ddpm_timesteps(t, tf, B, c->T, s_t);
    ops->ddpm_normal(eps, n, s_eps);
    ops->ddpm_noise_offset(eps, B, C, HW, c->noise_offset, s_off);
    rng->state = c->noise_offset != 0.0f ? ddpm_rng_skip(s_off, 2 * (uint64_t)B * C) : s_off;
    ops->ddpm_add_noise(xt, x0, eps, t, B, per, c->sqrt_abar, c->sqrt_1m_abar);
    ops->ddpm_target(target, x0, eps, t, B, per, c->pred, c->sqrt_abar, c->sqrt_1m_abar);
    if (w) ops->ddpm_loss_weights(w, t, B, c->min_snr, c->pred, c->sqrt_abar, c->sqrt_1m_abar);
}

/* The CPU's functions as a "device": nn_ops_cpu with .device = 1, so that a
 * model copies its weights into this table's memory and train.c/sample.c
 * take their --device cuda paths, on the host. Allocations are filled with
 * 0xff bytes (a float NaN, an int -1), as cudaMalloc leaves garbage: a
 * device buffer read before it is written shows up as NaN in the outputs.
 * Freed blocks are filled again before free() (a 64-byte header keeps the
 * size and the data aligned as malloc's). The live blocks are listed, so
 * that an upload whose destination, or a download whose source, is not in
 * one (a host pointer where a GPU would need a device one) fails as
 * cudaMemcpy would. */
#define DEV_HDR 64
static struct { unsigned char *p; size_t n; } *dev_blocks;
static size_t dev_nblocks, dev_cap;
static const char *dev_err;

static void *dev_alloc(size_t bytes) {
    if (dev_nblocks == dev_cap) {
        size_t cap = dev_cap ? 2 * dev_cap : 256;
        void *nb = realloc(dev_blocks, cap * sizeof *dev_blocks);
        if (!nb) return NULL;
        dev_blocks = nb; dev_cap = cap;
    }
    unsigned char *p = malloc(DEV_HDR + (bytes ? bytes : 1));
    if (!p) return NULL;
    memcpy(p, &bytes, sizeof bytes);
    memset(p + DEV_HDR, 0xff, bytes ? bytes : 1);
    dev_blocks[dev_nblocks].p = p + DEV_HDR;
    dev_blocks[dev_nblocks++].n = bytes;
    return p + DEV_HDR;
}
static void dev_free(void *q) {
    if (!q) return;
    for (size_t i = 0; i < dev_nblocks; i++)
        if (dev_blocks[i].p == q) { dev_blocks[i] = dev_blocks[--dev_nblocks]; break; }
    unsigned char *p = (unsigned char *)q - DEV_HDR;
    size_t bytes; memcpy(&bytes, p, sizeof bytes);
    memset(q, 0xff, bytes ? bytes : 1);
    free(p);
}
/* [p, p + bytes) inside one live block */
static int dev_owns(const void *p, size_t bytes) {
    const unsigned char *c = p;
    for (size_t i = 0; i < dev_nblocks; i++)
        if (c >= dev_blocks[i].p && c <= dev_blocks[i].p + dev_blocks[i].n && bytes <= (size_t)(dev_blocks[i].p + dev_blocks[i].n - c))
            return 1;
    return 0;
}
/* either side may be device memory: one address space, so memmove */
static int dev_upload(void *dst, const void *src, size_t bytes) {
    if (bytes && !dev_owns(dst, bytes)) { dev_err = "cpu-as-device: an upload's destination is not device memory"; return 0; }
    if (bytes) memmove(dst, src, bytes);
    return 1;
}
static int dev_download(void *dst, const void *src, size_t bytes) {
    if (bytes && !dev_owns(src, bytes)) { dev_err = "cpu-as-device: a download's source is not device memory"; return 0; }
    if (bytes) memmove(dst, src, bytes);
    return 1;
}
static const char *dev_error(void) {
    const char *e = dev_err;
    dev_err = NULL;
    return e;
}

const nn_ops *nn_ops_cpu_device(void) {
    static nn_ops t;
    if (!t.name) {
        t = nn_ops_cpu;
        t.name = "cpu-as-device";
        t.device = 1;
        t.alloc = dev_alloc;
        t.free = dev_free;
        t.upload = dev_upload;
        t.download = dev_download;
        t.error = dev_error;
    }
    return &t;
}

const nn_ops *nn_device_emulated(void) {
    const char *e = getenv("SDLORA_DEVICE");
    return e && strcmp(e, "emulate") == 0 ? nn_ops_cpu_device() : NULL;
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
    .gelu_backward = gelu_backward,
    .quickgelu_backward = quickgelu_backward,
    .embedding_forward = nn_embedding_forward,
    .lora_conv_forward = lora_conv_forward,
    .lora_conv_backward = lora_conv_backward,
    .ddpm_timesteps = cpu_ddpm_timesteps,
    .ddpm_normal = cpu_ddpm_normal,
    .ddpm_noise_offset = cpu_ddpm_noise_offset,
    .ddpm_add_noise = cpu_ddpm_add_noise,
    .ddpm_target = cpu_ddpm_target,
    .ddpm_loss_weights = cpu_ddpm_loss_weights,
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

/* --compute (fp32|bf16|fp16, checked by the caller's cli_parse), --device
 * and --tf32: the CPU GEMM's mode (fp16 runs only on the device: the CPU's
 * part stays fp32) and, with --device cuda, the device's */
void nn_set_compute(const char *compute, const char *device, int tf32) {
    gemm_set_compute(strcmp(compute, "bf16") == 0 ? GEMM_BF16 : GEMM_F32);
#ifdef SDLORA_CUDA
    if (strcmp(device, "cuda") == 0) {
        cuda_set_compute(strcmp(compute, "bf16") == 0 ? CUDA_COMPUTE_BF16 :
                         strcmp(compute, "fp16") == 0 ? CUDA_COMPUTE_F16 : CUDA_COMPUTE_F32);
        cuda_set_tf32(tf32);
    }
#else
    (void)device; (void)tf32;
#endif
}
