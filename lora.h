/* lora.h: the LoRA layer (article 2.2, 4.1), in the LoRA paper's convention:
 *
 *     y = W0 x + b + (alpha / r) * B (A dropout(x))
 *
 *   W0 (out x in), b: the frozen pretrained weight and bias (owned by the model)
 *   A  (r x in):   "lora_down"; Kaiming-uniform (a = sqrt(5)) as kohya / peft,
 *                  or Gaussian on request
 *   B  (out x r):  "lora_up"; zero, so training starts from the base model
 *   trainable parameters: r * (in + out)
 */
#ifndef SDLORA_LORA_H
#define SDLORA_LORA_H

#include "nn.h"

typedef struct {
    int in, out, r;
    float alpha;
    float scale;          /* alpha / r (rsLoRA would be alpha / sqrt(r)) */
    float dropout;        /* on the LoRA branch's input x only, as peft does (kohya
                             drops A x instead; NOTES.md 3.1) */
    float *A, *B;         /* (r x in), (out x r): trainable */
    float *dA, *dB;       /* their gradients, same shapes; NULL = frozen */
    int k;                /* conv LoRA (LoCon): A is a k x k convolution
                             (r, in, k, k), i.e. r x (in k k); 0: linear or 1x1 */
} lora_t;

/* the columns of A: in, or in * k * k for a k x k conv LoRA */
static inline size_t lora_fan_in(const lora_t *L) {
    return (size_t)L->in * (L->k > 1 ? (size_t)L->k * L->k : 1);
}

/* Set sizes and initialise: A ~ Kaiming-uniform(a = sqrt(5)), i.e.
 * U(-1/sqrt(in), 1/sqrt(in)), or N(0, 1/r) when gaussian (peft's "gaussian");
 * B = 0. A and B point at caller storage (one parameter block). */
void lora_init(lora_t *L, int in, int out, int r, float alpha, float dropout,
               float *A, float *B, int gaussian, rng_t *rng);
size_t lora_num_params(const lora_t *L);               /* r * (in [k k] + out) */
/* the same for a k x k conv LoRA: A (r, in, k, k) Kaiming-uniform with
 * fan_in = in k k (torch's rule for a conv weight, as kohya's lora_down), B = 0 */
void lora_conv_init(lora_t *L, int in, int out, int k, int r, float alpha, float dropout,
                    float *A, float *B, rng_t *rng);

/* Linear with an optional adapter (L == NULL: plain linear).
 *   inp (N, in) -> out (N, outc); in/outc must equal L->in/L->out when L is set
 *   ax (N, r): saved A dropout(x) for backward (unused when L == NULL)
 *   mask (N * in): dropout mask, needed only when L->dropout > 0
 *   scratch: lora_scratch_floats(L, N) floats of the caller's arena, used only
 *   while the call runs (the layer itself never allocates)
 * A 1x1 convolution (proj_in / proj_out of SD1.x transformers) is the same
 * map at every pixel: the UNet runs it on (pixels, channels) tokens. */
size_t lora_scratch_floats(const lora_t *L, int N);
void lora_forward(float *out, float *ax, uint8_t *mask, float *scratch, const float *inp,
                  const float *w0, const float *b0, const lora_t *L,
                  int N, int in, int outc, rng_t *rng);
/* dinp += dout W0 + scale * (dout B) A (masked);  dB += scale * dout^T ax;
 * dA += scale * (dout B)^T dropout(x). Never a gradient for W0 or b. */
void lora_backward(float *dinp, const float *dout, const float *inp, const float *ax,
                   const uint8_t *mask, float *scratch, const float *w0, lora_t *L,
                   int N, int in, int outc);

/* Conv LoRA (LoCon, kohya's conv_dim) on a convolution with kernel k x k
 * (L->k; 0 means 1x1 and also serves a linear as a 1x1 conv on a 1x1 image),
 * stride and padding. Only the adapter's branch: the caller runs the frozen
 * convolution into out first.
 *   down: ax = conv(dropout(x), A)  A (r, in, k, k), the conv's stride / padding
 *   up:   out += (alpha/r) * conv1x1(ax, B)   B (out, r, 1, 1)
 *   inp (Bn, in, H, W); out, dout (Bn, out, Ho, Wo); ax (Bn, r, Ho, Wo) saved
 *   mask (Bn * in * H * W): dropout mask, only when L->dropout > 0
 *   scratch: lora_conv_scratch_floats(L, ..., backward) floats */
size_t lora_conv_scratch_floats(const lora_t *L, int Bn, int H, int W, int stride, int pad, int backward);
void lora_conv_forward(float *out, float *ax, uint8_t *mask, float *scratch, const float *inp,
                       const lora_t *L, int Bn, int H, int W, int stride, int pad, rng_t *rng);
/* dB += s dout ax^T;  g = s B^T dout;  dA += conv_dW(g, dropout(x));
 * dinp += conv_dX(g, A) through the mask (dinp may be NULL) */
void lora_conv_backward(float *dinp, const float *dout, const float *inp, const float *ax,
                        const uint8_t *mask, float *scratch, lora_t *L,
                        int Bn, int H, int W, int stride, int pad);

/* W0 += weight * scale * B A  (merge, for inference at no extra cost; article 2.2)
 * and its exact inverse with -weight (unmerge). */
void lora_merge(float *w0, const lora_t *L, float weight);
void lora_unmerge(float *w0, const lora_t *L, float weight);


/* ---- LoRA files ------------------------------------------------------------
 * Written in kohya's format, which AUTOMATIC1111, ComfyUI and diffusers'
 * load_lora_weights all read:
 *   lora_unet_<module with '.' -> '_'>.lora_down.weight   A  (r x in) or (r, in, 1, 1)
 *   lora_unet_<...>.lora_up.weight                        B  (out x r) or (out, r, 1, 1)
 *   lora_unet_<...>.alpha                                 alpha (a scalar)
 *   a 3x3 conv's LoRA (LoCon): lora_down (r, in, 3, 3), lora_up (out, r, 1, 1)
 *   lora_te_text_model_encoder_layers_0_self_attn_q_proj.*  for the text encoder
 * Read: kohya files and diffusers/peft files ("unet.<module>.lora_A.weight",
 * "text_encoder.<module>.lora_B.weight", "base_model.model.<module>...",
 * and the older "<module>.processor.to_q_lora.down.weight" attention-processor
 * keys). Every entry's name is normalised to the kohya form, which is what
 * the models match against their own module names. */
#include "safetensors.h"

typedef struct {
    char name[256];       /* kohya form: "lora_unet_down_blocks_0_..._attn1_to_q" */
    int r, in, out;
    int conv;             /* stored as 4-D (r, in, k, k) / (out, r, 1, 1) */
    int k;                /* LoCon: down is a k x k conv (k > 1), A is r x (in k k); else 0 */
    float alpha;          /* scale = alpha / r */
    float *A, *B;         /* owned, (r x in [k k]), (out x r) */
} lora_entry;

typedef struct {
    int n;
    lora_entry *e;
    const char *format;   /* "kohya" or "peft" */
} lora_file;

/* "lora_unet" + "down_blocks.0.attentions.0.proj_in" -> "lora_unet_down_blocks_0_attentions_0_proj_in" */
void lora_kohya_name(char *out, size_t n, const char *prefix, const char *module);

/* one adapter to save: its kohya name, the layer, and whether it wraps a conv
 * (1x1, or k x k when L->k > 1: then lora_down is saved as (r, in, k, k)) */
typedef struct { const char *name; const lora_t *L; int conv; } lora_ref;

/* Save in kohya's format (dt: ST_F32, ST_F16 or ST_BF16), with the given
 * metadata (ss_* keys) and kohya's sshs_model_hash / sshs_legacy_hash of them
 * (st_writer_kohya_hashes), to path via a temporary file and rename. */
int lora_save_kohya(const char *path, const lora_ref *refs, int n, st_dtype dt,
                    const char **meta_keys, const char **meta_vals, int nmeta, char *err);
/* Load a kohya or diffusers/peft LoRA file. Any key that is not part of a
 * complete (down, up[, alpha]) triple is an error naming it. */
int lora_file_load(const char *path, lora_file *lf, char *err);
void lora_file_free(lora_file *lf);
const lora_entry *lora_file_find(const lora_file *lf, const char *kohya_name);

#endif
