/* unet.h: diffusers' UNet2DConditionModel as Stable Diffusion 1.x uses it,
 * forward and backward, built from its config.json, with LoRA adapters.
 *
 *   eps = UNet(x_t, t, context)
 *
 *   time_proj (sinusoidal) -> time_embedding (linear_1, SiLU, linear_2)
 *   conv_in -> down_blocks -> mid_block -> up_blocks (each resnet takes the
 *   channel-concatenation with a skip saved on the way down)
 *   -> conv_norm_out (GroupNorm) -> SiLU -> conv_out
 *
 * Parameters live in one float block, in the order of a table of
 * (diffusers name, offset, shape) built from the config, so loading a
 * checkpoint is one loop over the table. Activations live in one arena sized
 * up front by unet_alloc_acts(). Backward computes gradients for the input
 * latents, the text context and the LoRA A/B matrices; every pretrained
 * weight is frozen, and no work is spent on its gradient, unless a gradient
 * block of the same layout as params was allocated (unet_alloc_grads: full
 * fine-tuning, the article's baseline, and how the tiny model is trained).
 */
#ifndef SDLORA_UNET_H
#define SDLORA_UNET_H

#include <stddef.h>
#include <stdint.h>
#include "nn.h"
#include "lora.h"
#include "arena.h"
#include "json.h"
#include "half.h"
#include "safetensors.h"
#include "backend.h"

#define UNET_MAX_LEVELS 8
#define UNET_NAME_LEN 96
#define UNET_ERR_LEN 512

typedef struct {
    int in_channels, out_channels;   /* 4, 4 */
    int sample_size;                 /* latent side the model was trained at (64); informational */
    int nlevels;                     /* len(block_out_channels) */
    int block_out[UNET_MAX_LEVELS];  /* block_out_channels: (320, 640, 1280, 1280) */
    int layers[UNET_MAX_LEVELS];     /* layers_per_block, per down block (up blocks have one more) */
    int down_attn[UNET_MAX_LEVELS];  /* 1: CrossAttnDownBlock2D, 0: DownBlock2D */
    int up_attn[UNET_MAX_LEVELS];    /* 1: CrossAttnUpBlock2D, 0: UpBlock2D (in up order) */
    int heads[UNET_MAX_LEVELS];      /* attention heads per down block: config "attention_head_dim"! */
    int tlayers[UNET_MAX_LEVELS];    /* transformer_layers_per_block, per down block */
    int cross_dim;                   /* cross_attention_dim: 768 for SD1.x */
    int groups;                      /* norm_num_groups */
    float eps;                       /* norm_eps, of the resnet and output group norms */
    int linear_proj;                 /* use_linear_projection: proj_in/out are linears (SD2) */
    int flip_sin_to_cos;
    float freq_shift;
} unet_config;

/* one parameter tensor: its diffusers name and where it is held */
typedef struct {
    char name[UNET_NAME_LEN];
    size_t offset;           /* in the fp32 layout: params + offset (fp32 weights), grads + offset */
    int ndim;
    int shape[4];
    size_t numel;
    float *data;             /* the tensor as fp32, or NULL when held as fp16 */
    uint16_t *data16;        /* the tensor as fp16 (a matrix with fp16 weights), or NULL */
} unet_param;

/* one LoRA adapter and the diffusers module it sits on, e.g.
 * "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" */
typedef struct {
    char name[UNET_NAME_LEN];
    int is_conv;                     /* a conv: 1x1 (proj_in / proj_out without linear projection,
                                        conv_shortcut) or, when L.k = 3, a 3x3 one (LoCon) */
    lora_t L;
} unet_lora;

struct unet_net;                     /* the module tree, private to unet.c */

typedef struct {
    unet_config cfg;
    float *params;                   /* every pretrained weight, one block (fp16 weights:
                                        only the vectors, biases and norm scales) */
    float *grads;                    /* same layout: dL/dparams; NULL = frozen (no work) */
    size_t nparams;
    unet_param *table;
    /* --weight-dtype fp16: the weight matrices (convolutions, linears; nmat
     * of the nparams numbers) held as fp16 in params16, and each widened to
     * fp32 into wbuf (room for the largest) just before its layer runs */
    weight_dtype wdtype;
    uint16_t *params16;
    size_t nmat;
    float *wbuf;
    const uint16_t *wbuf_of;         /* the fp16 matrix wbuf holds now, or NULL */
    int ntable;
    struct unet_net *net;

    /* LoRA: A and B of every adapter in one block (and their gradients in
     * another, same layout), so the optimizer can treat them as one vector */
    unet_lora *loras;
    int nloras;
    float *lora_params, *lora_grads;
    size_t lora_nparams;
    rng_t dropout_rng;

    /* activations: one arena, every tensor at the offset unet_layout (in
     * unet.c) gives it for the shape and mode of unet_alloc_acts */
    arena_t acts;
    int train;                       /* forward keeps what backward needs */
    int checkpoint;                  /* ... only block outputs; backward recomputes the rest */
    int B, H, W, Tc;                 /* shape of the last forward (and of the allocation) */
    int have_forward;                /* backward needs a forward just before it */

    /* where the layers run (backend.h): NULL or nn_ops_cpu, or a device's
     * table after unet_to_device, with the device's copies of the weights
     * (fp32, the layout of params), of the LoRA blocks, and staging for
     * unet_forward / unet_backward's inputs and outputs (io: x, t, ctx,
     * eps, deps, dx, dctx of the allocated shape) */
    const nn_ops *ops;
    float *dparams;                  /* fp16 weights: the vectors only, as params */
    uint16_t *dparams16;             /* fp16 weights: the matrices, as params16 */
    float *dwbuf;                    /* ... each widened here before its layer, as wbuf */
    const uint16_t *dwbuf_of;
    float *dlora_params, *dlora_grads;
    size_t dlora_n;
    float *dio;
    size_t dio_n;
    /* on a device: 1 = unet_forward's ctx and unet_backward's dctx are that
     * device's memory (the text encoder's output there, --te), used in
     * place; 0 (the default) = host memory, copied up and down */
    int ctx_on_device;

    char err[UNET_ERR_LEN];          /* why the last call returned -1 */
} unet_t;

/* config.json -> unet_config. Every size comes from the file; a key that asks
 * for something this code does not implement (class embeddings, other block
 * types, ...) is an error naming the key. Returns 0 or -1 (message in err). */
int unet_config_from_json(unet_config *c, const json *j, char *err);
/* SD1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json, the keys
 * that matter): for the tests and tools that build its architecture in
 * memory (random weights, memory budgets). Returns 0 or -1. */
int unet_config_sd15(unet_config *c, char *err);

/* Build the module tree and the parameter table for c and allocate params
 * (zeroed). Returns 0 or -1. */
int unet_build(unet_t *u, const unet_config *c, char *err);
/* the same with the weights held as wdtype (unet_build: WEIGHT_F32). With
 * WEIGHT_F16 every matrix is fp16 (half the memory) and widened, exactly, to
 * fp32 right before use: all arithmetic stays fp32, and the LoRA parameters,
 * activations and gradients are fp32 as ever. Full fine-tuning
 * (unet_alloc_grads) needs WEIGHT_F32. */
int unet_build_dtype(unet_t *u, const unet_config *c, weight_dtype wdtype, char *err);
void unet_free(unet_t *u);
/* the parameter and tensor counts of a config, without allocating them
 * (SD1.5: 859,520,964 parameters in 686 tensors). Returns 0 or -1. */
int unet_count_params(const unet_config *c, size_t *nparams, int *ntensors, char *err);

/* Read dir/config.json and dir/diffusion_pytorch_model.safetensors (F32, F16
 * or BF16). Every tensor of the table must be present with its shape, and the
 * file must hold nothing else. Returns 0 or -1 (message in err). */
int unet_load_diffusers(unet_t *u, const char *dir, char *err);
int unet_load_diffusers_dtype(unet_t *u, const char *dir, weight_dtype wdtype, char *err);

/* Read table entry i from tensor `name` of f, which must have the entry's
 * shape or, when squeeze, that shape followed by 1s (an LDM 1x1 conv for a
 * diffusers linear). Held as fp16: F16 tensors are copied as they are, others
 * rounded to nearest even; held as fp32: converted exactly. The file's pages
 * of the tensor are given back (st_release). Returns 0 or -1 (err, ST_ERR_LEN). */
int unet_read_param(unet_t *u, int i, const st_file *f, const char *name, int squeeze, char *err);
/* table entry i as fp32 (numel floats), and back (rounded when held as fp16):
 * how a LoRA is merged into the weights whatever their dtype */
void unet_param_get(const unet_t *u, int i, float *dst);
void unet_param_set(unet_t *u, int i, const float *src);

/* index of a parameter by diffusers name, or -1 */
int unet_param_index(const unet_t *u, const char *name);

/* Add LoRA adapters (A Kaiming-uniform, B zero) to
 *   "qv":          attn1 and attn2 to_q, to_v
 *   "attn":        attn1 and attn2 to_q, to_k, to_v, to_out.0
 *   "transformer": every linear and 1x1 conv inside the Transformer2DModels:
 *                  proj_in, proj_out, attn to_q/k/v/out.0, ff.net.0.proj, ff.net.2
 * scale = alpha / rank; dropout on the adapter's input while training.
 * Once per model; invalidates the activation arena (call unet_alloc_acts
 * after). Returns 0 or -1 (message in u->err). */
int unet_add_lora(unet_t *u, const char *targets, int rank, float alpha, float dropout,
                  uint64_t seed);
/* the same, and with conv_rank > 0 LoRA on the ResNet blocks and samplers as
 * kohya's conv_dim / conv_alpha adds it (LoCon): resnets' conv1 / conv2 and
 * the down/upsamplers' 3x3 conv at conv_rank, conv_alpha; the resnets'
 * time_emb_proj and conv_shortcut (a linear, a 1x1 conv) at rank, alpha.
 * conv_in and conv_out get none, as in kohya. conv_rank 0: unet_add_lora. */
int unet_add_lora_conv(unet_t *u, const char *targets, int rank, float alpha, int conv_rank, float conv_alpha,
                       float dropout, uint64_t seed);
/* the adapter on a diffusers module name, or NULL */
unet_lora *unet_find_lora(unet_t *u, const char *module_name);
/* zero every LoRA gradient (backward accumulates into them) */
void unet_zero_lora_grads(unet_t *u);

/* Full fine-tuning: allocate u->grads (zeroed, the layout of u->params), after
 * which unet_backward also accumulates dL/dW for every parameter of the table
 * (with LoRA adapters present, their dA, dB as before, and W0 gets the
 * gradient of W0 itself). Invalidates the activation arena, which then holds
 * a little more (call unet_alloc_acts after). Returns 0 or -1 (u->err). */
int unet_alloc_grads(unet_t *u);
void unet_zero_grads(unet_t *u);

/* Size the activation arena for batch B, latents h x w (multiples of
 * 2^(nlevels-1)), context length Tc, for
 *   train 0: inference: forward frees each block's inner activations as soon
 *            as the block is done; no backward
 *   train 1: training: forward keeps what backward needs
 *   train 2: training with gradient checkpointing: forward keeps only the
 *            output of every resnet and transformer; backward runs each of
 *            them forward again just before its backward (about one more
 *            forward of compute for much less memory; same numbers) */
int unet_alloc_acts(unet_t *u, int B, int h, int w, int Tc, int train);
/* floats the arena holds (the peak of the layout) */
size_t unet_acts_floats(const unet_t *u);

/* eps_out (B, out_channels, h, w) = UNet(x (B, in_channels, h, w), t (B),
 * ctx (B, Tc, cross_dim)). Any shape whose needs fit the arena. Returns 0 or
 * -1 (message in u->err). */
int unet_forward(unet_t *u, float *eps_out, const float *x, const float *t, const float *ctx,
                 int B, int h, int w, int Tc);

/* Given deps = dL/d eps_out, after a training-mode forward:
 *   dx   (B, in_channels, h, w) = dL/dx        written, may be NULL
 *   dctx (B, Tc, cross_dim)     = dL/dctx      written, may be NULL
 *   every adapter's dA, dB += dL/dA, dL/dB     accumulated
 *   grads += dL/dparams                        accumulated, when allocated
 * Returns 0 or -1 (message in u->err). */
int unet_backward(unet_t *u, const float *deps, float *dx, float *dctx);

/* Inference adapters from a LoRA file (generate.c's sd_apply_lora):
 * unet_lora_site says whether a diffusers module name can carry an adapter
 * (1, with its sizes) or not (0). unet_attach_lora adds a frozen adapter
 * y += scale B (A x) there, A (r x in) and B (out x r) copied; scale is
 * weight * alpha / r. A second one on the same module is stacked onto the
 * first (ranks concatenated). Invalidates the activation arena, as
 * unet_add_lora does. Returns 0 or -1 (message in u->err). */
/* ---- running on a device (backend.h) ----------------------------------
 * unet_to_device(u, ops): from now on every layer runs through ops, on its
 * memory. The weights are copied there once, held as they are on the host
 * (fp16-held matrices are widened on the device, one at a time, before
 * their layer; full fine-tuning is refused with a message); unet_alloc_acts
 * allocates the arena there (same offsets) and copies the LoRA A, B and
 * their gradients there. The host keeps its copy of everything and stays
 * the master of the LoRA parameters: after an optimizer step on the host,
 * unet_lora_upload sends A, B up; unet_lora_grads_download brings dA, dB
 * down into u->lora_grads. unet_param_set also updates the device's copy.
 * unet_forward / unet_backward keep their host pointers: x, t, ctx and deps
 * go up, eps, dx and dctx come down (ctx and dctx stay there with ctx_on_device) (SD1.5 at 512^2, batch 1: 64 KB of
 * latents and 231 KB of context per call). Each returns 0 or -1 (u->err),
 * and so do unet_forward / unet_backward when the device reports an error. */
int unet_to_device(unet_t *u, const nn_ops *ops);
int unet_lora_upload(unet_t *u);
int unet_lora_grads_download(unet_t *u);
/* on a device: where unet_forward leaves eps when given eps_out = NULL, and
 * where unet_backward reads deps when given deps = NULL (device memory, for
 * the current shape), so the loss and its gradient can run there too */
int unet_device_io(unet_t *u, float **eps, float **deps);

#define UNET_ATTACH_LORA 1   /* generate.c uses side branches when this is set */
int unet_lora_site(const unet_t *u, const char *module, int *in, int *out, int *is_conv);
int unet_attach_lora(unet_t *u, const char *module, int r, float scale,
                     const float *A, const float *B);

#endif
