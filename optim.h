/* optim.h: AdamW on the trainable (LoRA) parameters, learning-rate
 * schedules and gradient-norm clipping, as torch.optim.AdamW,
 * diffusers.optimization.get_scheduler and torch.nn.utils.clip_grad_norm_. */
#ifndef SDLORA_OPTIM_H
#define SDLORA_OPTIM_H

#include <stddef.h>

typedef struct {
    float lr, beta1, beta2, eps, weight_decay;
    long step;            /* number of updates done */
    size_t n;
    float *m, *v;         /* first and second moments (n each) */
} adamw_t;

int adamw_init(adamw_t *o, size_t n, float lr, float beta1, float beta2, float eps, float wd);
void adamw_free(adamw_t *o);
/* one update of params (n) with grads (n) at learning rate lr */
void adamw_step(adamw_t *o, float *params, const float *grads, float lr);

typedef enum { LR_CONSTANT, LR_CONSTANT_WARMUP, LR_LINEAR, LR_COSINE } lr_schedule;
int lr_schedule_from_name(const char *name, lr_schedule *s);
/* learning rate at optimizer step `step` (0-based) of `total` */
float lr_at(lr_schedule s, float base_lr, long step, long warmup, long total);

/* scale grads so their global L2 norm is at most max_norm; returns the norm
 * before clipping (for the log). max_norm <= 0: no clipping. */
float clip_grad_norm(float *grads, size_t n, float max_norm);

#endif
