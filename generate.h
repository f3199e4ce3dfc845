/* generate.h: text to image with a loaded SD1.x model (article 5.5):
 *   prompt, negative -> CLIP -> cond, uncond
 *   seeded noise -> for each sampler step: eps = u + cfg (c - u), step
 *   -> VAE decode -> RGB
 * Used by ./sample and by ./train's sample grids. */
#ifndef SDLORA_GENERATE_H
#define SDLORA_GENERATE_H

#include <stdint.h>
#include "model.h"
#include "lora.h"

typedef struct {
    const char *prompt, *negative;   /* negative may be "" */
    int width, height;               /* pixels, multiples of 8 */
    int steps;
    float cfg;                       /* classifier-free guidance scale */
    uint64_t seed;
    int batch;                       /* images per call; image i uses the
                                        noise of one randn call for the whole batch, as diffusers */
    int clip_skip;                   /* 1 = last layer (AUTOMATIC1111's count) */
    const char *sampler;             /* "ddim" "ddpm" "euler" "euler_a" "dpmpp_2m" */
    int karras;                      /* Karras sigmas */
    int rng_cuda;                    /* 0: torch CPU generator, 1: torch CUDA Philox (A1111 GPU seeds) */
    /* when set, called after each sampler step (step = 1 .. steps): ./sample's progress line */
    void (*on_step)(void *ctx, int step, int steps);
    void *on_step_ctx;
} gen_params;

/* Fill rgb (batch x height x width x 3) with the generated images.
 * Returns 0 or -1 with a one-line message in err (SD_ERR_LEN). */
int sd_generate(sd_model *m, const gen_params *p, uint8_t *rgb, char *err);

/* AUTOMATIC1111's "parameters" PNG text for p (loras: "<lora:name:w>" text
 * or ""), e.g. "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a,
 * CFG scale: 7, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly" */
void sd_params_text(char *buf, size_t n, const sd_model *m, const gen_params *p, const char *loras);

/* Apply a LoRA file with weight w to the model's UNet and text encoder.
 * merge: W0 += w (alpha/r) B A in place; otherwise attach it as a side
 * branch (the weights stay as loaded). Weights held as fp16 (--weight-dtype
 * fp16; the text encoder's always merge) are merged in fp32 and rounded back
 * to fp16. Every entry must match a module of
 * the model with the right shape, else an error names it (no partial load:
 * on error the model is as before). */
int sd_apply_lora(sd_model *m, const lora_file *lf, float w, int merge, char *err);

/* AUTOMATIC1111's LoRA tags in a prompt: "a cat <lora:style:0.8>, night"
 * gives text "a cat , night" (tags removed, as A1111 removes them) and
 * {"style", 0.8}. "<lora:name>" means weight 1. Other <...> text is left
 * alone. Returns the number of tags (at most max), or -1 with err
 * (SD_ERR_LEN) for a malformed tag or too many. */
typedef struct { char name[256]; float weight; } sd_prompt_lora;
int sd_prompt_loras(const char *prompt, char *text, size_t ntext,
                    sd_prompt_lora *loras, int max, char *err);

/* Several prompts in one string: buf is cut in place at every character of
 * seps ("|", or "|\n" for a prompts file) and out[] receives the non-empty
 * parts, at most max. Returns how many. */
int sd_split_prompts(char *buf, const char *seps, char **out, int max);

#endif
