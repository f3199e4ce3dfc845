/* lora.h: the LoRA layer (article 2.2, 4.1), in the LoRA paper's convention:
 *
 *     y = W0 x + b + (alpha / r) * B (A dropout(x))
 *
 *   W0 (out x in) and b: the frozen pretrained weight and bias
 *   A  (r x in):  "lora_down", Kaiming-uniform (a = sqrt(5)) as kohya / peft,
 *                 or Gaussian on request
 *   B  (out x r): "lora_up", zero, so the layer starts as the base model
 *   trainable parameters: r * (in + out)
 *
 * A 1x1 convolution (proj_in / proj_out of SD1.x transformers) is the same
 * map applied at every pixel; lora_conv1x1_* take NCHW input. */
#ifndef SDLORA_LORA_H
#define SDLORA_LORA_H

#include "nn.h"

typedef struct {
    int in, out, r;
    float alpha;          /* scale = alpha / r */
    float dropout;        /* on the LoRA branch input only, as peft */
    const float *w0;      /* (out x in), frozen */
    const float *b0;      /* (out) or NULL, frozen */
    float *A, *B;         /* (r x in), (out x r), trainable */
    float *dA, *dB;       /* gradients, same shapes (NULL: frozen) */
} lora_t;

/* ... see lora.c */
#endif
