/* model.h: a whole Stable Diffusion 1.x or 2.x model — tokenizer, CLIP text
 * encoder, UNet, VAE and the noise schedule — loaded from a diffusers folder
 * or an SD1.x / SD2.x single-file checkpoint. Both programs start here.
 * SD2.x: the text encoder is OpenCLIP-H as a CLIPTextModel (gelu) whose
 * last layer is OpenCLIP's penultimate one, the UNet has linear projections
 * and per-level heads, and prediction is epsilon or v (the folder's
 * scheduler config; for a single file, an AUTOMATIC1111 .yaml beside it,
 * else v, as diffusers decides). */
#ifndef SDLORA_MODEL_H
#define SDLORA_MODEL_H

#include "tokenizer.h"
#include "clip.h"
#include "unet.h"
#include "vae.h"
#include "ddpm.h"

#define SD_ERR_LEN 1024
#define SD_DEFAULT_MODEL "models/tiny"

typedef struct {
    tokenizer *tok;
    clip_t clip;
    unet_t unet;
    vae_t vae;
    ddpm_schedule sched;
    ddpm_prediction prediction;  /* what the UNet outputs: the loss target and how samplers read it */
    int steps_offset;            /* scheduler config (1 for SD1.x) */
    char timestep_spacing[16];   /* scheduler config "timestep_spacing", "" when absent
                                    (then each sampler takes diffusers' class default) */
    char path[1024];             /* what was loaded */
    char name[256];              /* its base name, for metadata and PNG text */
    int single_file;
    weight_dtype wdtype;         /* how the weight matrices of all three parts are held (--weight-dtype) */
} sd_model;

/* path: a diffusers folder (model_index.json / unet/ text_encoder/ vae/
 * tokenizer/) or an SD1.x / SD2.x .safetensors single file; NULL = SD_DEFAULT_MODEL.
 * tokenizer_dir: where vocab.json + merges.txt are for a single file (NULL:
 * beside the file, then the Hugging Face cache). Returns 0 or -1 with a
 * one-line message in err (SD_ERR_LEN). */
int sd_model_load(sd_model *m, const char *path, const char *tokenizer_dir, char *err);
/* the same with the weight matrices of the text encoder, the UNet and the
 * VAE held as wdtype (--weight-dtype; sd_model_load: WEIGHT_F32).
 * WEIGHT_F16 halves their memory and computes in fp32 (clip.h, unet.h,
 * vae.h); from an fp16 file the numbers are the same. */
int sd_model_load_dtype(sd_model *m, const char *path, const char *tokenizer_dir, weight_dtype wdtype,
                        char *err);
void sd_model_free(sd_model *m);
/* bytes the three parts' pretrained weights take as held (fp32 or fp16
 * matrices, fp32 vectors), not counting the widening buffers */
size_t sd_model_weight_bytes(const sd_model *m);

/* the latent side for an image side (side / 8 for SD1.x), and the image
 * side the model was trained at (unet sample_size * 8) */
int sd_latent_side(const sd_model *m, int image_side);
int sd_default_image_side(const sd_model *m);

/* context (n, 77, d) for n prompts (CLIP forward, inference). clip_skip as
 * AUTOMATIC1111 counts (1 = last layer). Returns 0 or -1 (err). */
int sd_encode_prompts(sd_model *m, const char **prompts, int n, int clip_skip, float *ctx, char *err);

#endif
