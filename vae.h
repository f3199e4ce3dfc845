/* vae.h: diffusers' AutoencoderKL as Stable Diffusion 1.x uses it, forward
 * and backward, built from its config.json.
 *
 * Encoder (image -> posterior):
 *   conv_in -> down_blocks[i] (resnets, then a stride-2 downsampler on all but
 *   the last) -> mid_block (resnet, attention, resnet) -> conv_norm_out, SiLU,
 *   conv_out -> quant_conv (1x1) -> moments = [mean | logvar]
 *   logvar = clamp(logvar, -30, 20);  sample = mean + exp(logvar / 2) * noise
 * Decoder (latent -> image):
 *   post_quant_conv (1x1) -> conv_in -> mid_block -> up_blocks[i] (resnets,
 *   then nearest 2x + conv on all but the last) -> conv_norm_out, SiLU, conv_out
 * The diffusion model sees latents = scaling_factor * (sample - shift_factor)
 * (0.18215 and 0 for SD1.x): vae_encode_latents / vae_decode_latents.
 *
 * Parameters live in one float block, in the order of a table of
 * (diffusers name, offset, shape) built from the config, so loading is one
 * loop over the table. Weight gradients go to a second block of the same
 * layout, allocated only on request (vae_alloc_grads): without it the VAE is
 * frozen and backward only computes input gradients. Activations live in one
 * block allocated up front by vae_alloc_acts (the encoder's, then the
 * decoder's, each at offsets vae.c's vae_layout computes from the shape),
 * so a full autoencoder step (encode, decode, backward through both) needs
 * no malloc.
 *
 * With the fp16 weight dtype (vae_build_dtype, --weight-dtype fp16) every
 * conv and linear weight is held as fp16 and widened, exactly, to fp32 right
 * before its layer runs: all arithmetic stays fp32, and an fp16 checkpoint
 * gives the same bits as fp32-held weights. Backward then refuses (only the
 * tiny model's pre-training runs it, on fp32 weights).
 */
#ifndef SDLORA_VAE_H
#define SDLORA_VAE_H

#include <stddef.h>
#include "nn.h"
#include "json.h"
#include "safetensors.h"
#include "half.h"
#include "arena.h"

#define VAE_MAX_LEVELS 8
#define VAE_NAME_LEN 96
#define VAE_ERR_LEN 512

typedef struct {
    int in_channels, out_channels;   /* image channels: 3, 3 */
    int latent_channels;             /* 4 */
    int nlevels;                     /* len(block_out_channels) */
    int block_out[VAE_MAX_LEVELS];   /* (128, 256, 512, 512) for SD1.x */
    int layers;                      /* layers_per_block (decoder blocks have one more resnet) */
    int groups;                      /* norm_num_groups (every norm; eps is fixed at 1e-6) */
    int mid_attn;                    /* mid_block_add_attention */
    int quant_conv, post_quant_conv; /* use_quant_conv, use_post_quant_conv */
    int sample_size;                 /* image side it was trained at; informational */
    float scaling_factor;            /* 0.18215 */
    float shift_factor;              /* 0 when the config says null */
} vae_config;

/* one parameter tensor: its diffusers name and where it is held */
typedef struct {
    char name[VAE_NAME_LEN];
    size_t offset;           /* in the fp32 layout: params + offset (fp32 weights), grads + offset */
    int ndim;
    int shape[4];
    size_t numel;
    float *data;             /* the tensor as fp32, or NULL when held as fp16 */
    uint16_t *data16;        /* the tensor as fp16 (a matrix with fp16 weights), or NULL */
} vae_param;

struct vae_net;                      /* the module tree, private to vae.c */
struct nn_ops;                       /* backend.h */

typedef struct {
    vae_config cfg;
    float *params;                   /* every weight, one block (fp16 weights: only the vectors) */
    float *grads;                    /* fp32 layout; NULL = frozen (no weight gradients) */
    size_t nparams;
    vae_param *table;
    int ntable;
    /* --weight-dtype fp16: the conv / linear weights (nmat of the nparams
     * numbers) in params16, each widened into wbuf (room for the largest)
     * just before its layer */
    weight_dtype wdtype;
    uint16_t *params16;
    size_t nmat;
    float *wbuf;
    const uint16_t *wbuf_of;         /* the fp16 matrix wbuf holds now, or NULL */
    struct vae_net *net;

    /* activations, one block (vae_alloc_acts; offsets from vae.c's
     * vae_layout): the encoder's in [0, enc_floats), the decoder's above */
    arena_t acts;
    size_t enc_floats;
    int train;                       /* forward keeps what backward needs */
    int B, H, W;                     /* image shape the block was sized for */
    int enc_B, enc_H, enc_W;         /* last training-mode encoder forward (0: none) */
    int dec_B, dec_h, dec_w;         /* last training-mode decoder forward (0: none) */
    float dec_in_scale;              /* d(decoder input)/d(caller's input): 1 or 1/scaling */

    /* the operations table the layers run through (backend.h): NULL = the
     * CPU's; after vae_to_device a device's, with its copies of params /
     * params16, a widening buffer, and acts.base in its memory */
    const struct nn_ops *ops;
    float *dparams;
    uint16_t *dparams16;
    float *dwbuf;
    const uint16_t *dwbuf_of;

    char err[VAE_ERR_LEN];           /* why the last call returned -1 */
} vae_t;

/* config.json -> vae_config. Keys starting with '_' are ignored; any other
 * key this code does not know, or a value it does not implement (another
 * block type, act_fn, latents_mean, ...), is an error naming the key.
 * Returns 0 or -1 (message in err, VAE_ERR_LEN). */
int vae_config_from_json(vae_config *c, const json *j, char *err);

/* Build the module tree and parameter table for c and allocate params
 * (zeroed). Returns 0 or -1. */
int vae_build(vae_t *v, const vae_config *c, char *err);
/* the same with the weights held as wdtype (vae_build: WEIGHT_F32) */
int vae_build_dtype(vae_t *v, const vae_config *c, weight_dtype wdtype, char *err);
void vae_free(vae_t *v);

/* index of a parameter by diffusers name, or -1 */
int vae_param_index(const vae_t *v, const char *name);

/* Maps one of our diffusers names to the name the file uses, e.g.
 * "encoder.down_blocks.0.resnets.0.norm1.weight" ->
 * "first_stage_model.encoder.down.0.block.0.norm1.weight". Writes into buf
 * (len bytes) or returns a string of its own; NULL means "not in this file". */
typedef const char *(*vae_name_fn)(const char *name, void *ctx, char *buf, size_t len);

/* Load every table tensor from an open file: name mapped by map (NULL: the
 * name as is), shape checked (a (O, I, 1, 1) tensor is accepted for an
 * (O, I) linear and vice versa: same numbers), F32/F16/BF16 converted.
 * extra_prefix: when non-NULL, every file tensor whose name starts with it
 * must have been used ("" = the whole file), else an error naming it.
 * Errors name the missing, misshapen or extra tensor. Returns 0 or -1. */
int vae_load_st(vae_t *v, const st_file *f, vae_name_fn map, void *ctx,
                const char *extra_prefix, char *err);

/* Read dir/config.json and dir/diffusion_pytorch_model.safetensors, build and
 * load. v is overwritten (vae_free a built one first); on failure it is left
 * empty, safe to vae_free. Older diffusers files that
 * name the attention query/key/value/proj_attn are accepted. The file must
 * hold nothing else. Returns 0 or -1 (message in err). */
int vae_load_diffusers(vae_t *v, const char *dir, char *err);
int vae_load_diffusers_dtype(vae_t *v, const char *dir, weight_dtype wdtype, char *err);

/* allocate (zeroed) / zero the weight-gradient block. Returns 0 or -1
 * (out of memory, or fp16 weights). */
int vae_alloc_grads(vae_t *v);
void vae_zero_grads(vae_t *v);

/* Size the activation block for batch B of H x W images (latents H/f x W/f with
 * f = 2^(nlevels-1), each downsample taking floor(side/2)). train: forwards
 * keep their activations and the block holds the backward's buffers too;
 * otherwise each block's input is dropped once its output is made.
 * Any later call with a shape that fits is allowed. Returns 0 or -1. */
int vae_alloc_acts(vae_t *v, int B, int H, int W, int train);
/* latent side for an image side (0 if too small to downsample) */
int vae_latent_side(const vae_config *c, int side);
/* floats the activation block holds */
size_t vae_acts_floats(const vae_t *v);

/* Encoder: img (B, in_channels, H, W) -> mean, logvar (B, latent_channels,
 * h, w), logvar clamped to [-30, 20]. Returns 0 or -1 (message in v->err). */
int vae_encode(vae_t *v, float *mean, float *logvar, const float *img, int B, int H, int W);

/* sample = mean + exp(0.5 logvar) * noise (n floats) and its backward:
 * dmean += dsample,  dlogvar += dsample * noise * 0.5 exp(0.5 logvar) */
void vae_posterior_sample(float *sample, const float *mean, const float *logvar,
                          const float *noise, size_t n);
void vae_posterior_sample_backward(float *dmean, float *dlogvar, const float *dsample,
                                   const float *logvar, const float *noise, size_t n);

/* latents (B, latent_channels, h, w) = scaling_factor * (z - shift_factor),
 * z = the posterior sample with the given noise (same shape), or the mean
 * when noise is NULL. Returns 0 or -1. */
int vae_encode_latents(vae_t *v, float *latents, const float *img, const float *noise,
                       int B, int H, int W);

/* Given dmean, dlogvar (either may be NULL = zero) after a training-mode
 * vae_encode / vae_encode_latents (of which only the encode counts: the
 * sample and the scaling are the caller's to differentiate):
 *   dimg (B, in_channels, H, W) = dL/dimg     written, may be NULL
 *   grads += dL/dweights                      when vae_alloc_grads was called
 * Returns 0 or -1 (also with fp16 weights: backward needs fp32). */
int vae_encoder_backward(vae_t *v, const float *dmean, const float *dlogvar, float *dimg);

/* Decoder: z (B, latent_channels, h, w) -> img (B, out_channels, h f, w f).
 * vae_decode_latents first undoes the scaling: z = latents / scaling + shift.
 * Returns 0 or -1. */
int vae_decode(vae_t *v, float *img, const float *z, int B, int h, int w);
int vae_decode_latents(vae_t *v, float *img, const float *latents, int B, int h, int w);

/* Given dimg after a training-mode decode:
 *   dlatent = dL/d(the input of that decode: z, or latents)   written, may be NULL
 *   grads += dL/dweights                                       when allocated
 * Returns 0 or -1. */
int vae_decoder_backward(vae_t *v, const float *dimg, float *dlatent);

/* Run the forward (encode, decode) on ops's device from now on: the weights
 * are copied there once, vae_alloc_acts allocates the activations there (the
 * same offsets), and each call uploads its input and downloads its output
 * (the API stays host arrays). Backward and vae_alloc_grads then refuse.
 * Call before vae_alloc_acts. Returns 0 or -1 (v->err). */
int vae_to_device(vae_t *v, const struct nn_ops *ops);

#endif
