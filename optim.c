/* optim.c: AdamW, learning-rate schedules, gradient clipping.
 * Only the LoRA parameters are optimised (article 5.4.2: "仅更新LoRA参数"),
 * so the moments cost 2 floats per trainable parameter, not per model weight. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "optim.h"

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

int adamw_init(adamw_t *o, size_t n, float lr, float beta1, float beta2, float eps, float wd) {
    memset(o, 0, sizeof *o);
    o->lr = lr; o->beta1 = beta1; o->beta2 = beta2; o->eps = eps; o->weight_decay = wd;
    o->n = n;
    o->m = calloc(n ? n : 1, sizeof(float));
    o->v = calloc(n ? n : 1, sizeof(float));
    if (!o->m || !o->v) { adamw_free(o); return -1; }
    return 0;
}

void adamw_free(adamw_t *o) {
    free(o->m); free(o->v);
    o->m = o->v = NULL;
}

/* AdamW (Loshchilov & Hutter), in torch's order of operations:
 *   p <- p (1 - lr wd)                         decoupled weight decay
 *   m <- b1 m + (1 - b1) g
 *   v <- b2 v + (1 - b2) g^2
 *   p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps) */
void adamw_step(adamw_t *o, float *p, const float *g, float lr) {
    o->step++;
    float b1 = o->beta1, b2 = o->beta2;
    /* bias corrections computed in double as torch does (Python floats) */
    double bc1 = 1.0 - pow(b1, (double)o->step);
    double bc2 = 1.0 - pow(b2, (double)o->step);
    float step_size = (float)(lr / bc1);
    float bc2_sqrt = (float)sqrt(bc2);
    float decay = (float)(1.0 - (double)lr * o->weight_decay);
    for (size_t i = 0; i < o->n; i++) {
        p[i] *= decay;
        o->m[i] = o->m[i] * b1 + (1.0f - b1) * g[i];
        o->v[i] = o->v[i] * b2 + (1.0f - b2) * g[i] * g[i];
        float denom = sqrtf(o->v[i]) / bc2_sqrt + o->eps;
        p[i] -= step_size * (o->m[i] / denom);
    }
}

int lr_schedule_from_name(const char *name, lr_schedule *s) {
    if (strcmp(name, "constant") == 0) *s = LR_CONSTANT;
    else if (strcmp(name, "constant_with_warmup") == 0) *s = LR_CONSTANT_WARMUP;
    else if (strcmp(name, "linear") == 0) *s = LR_LINEAR;
    else if (strcmp(name, "cosine") == 0) *s = LR_COSINE;
    else return -1;
    return 0;
}

/* diffusers' get_scheduler(name, num_warmup_steps, num_training_steps):
 *   warm-up (all but constant):  lr * step / warmup          for step < warmup
 *   linear:   lr * (total - step) / (total - warmup)
 *   cosine:   lr * 0.5 (1 + cos(pi * progress)),  progress = (step - warmup) / (total - warmup)
 * (plain "constant" ignores warm-up, as diffusers does) */
float lr_at(lr_schedule s, float base_lr, long step, long warmup, long total) {
    if (s == LR_CONSTANT) return base_lr;
    /* the factor is a Python float in diffusers: compute in double, round once */
    if (step < warmup) return (float)((double)base_lr * ((double)step / (double)(warmup > 1 ? warmup : 1)));
    if (s == LR_CONSTANT_WARMUP) return base_lr;
    double span = (double)(total - warmup > 1 ? total - warmup : 1);
    if (s == LR_LINEAR) {
        double f = (double)(total - step) / span;
        return (float)((double)base_lr * (f > 0 ? f : 0));
    }
    double progress = (double)(step - warmup) / span;
    double f = 0.5 * (1.0 + cos(M_PI * 2.0 * 0.5 * progress));
    return (float)((double)base_lr * (f > 0 ? f : 0));
}

/* torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), applied when < 1 */
float clip_grad_norm(float *g, size_t n, float max_norm) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)g[i] * g[i];
    float norm = (float)sqrt(s);
    if (max_norm > 0) {
        float coef = max_norm / (norm + 1e-6f);
        if (coef < 1.0f)
            for (size_t i = 0; i < n; i++) g[i] *= coef;
    }
    return norm;
}
