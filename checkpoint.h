/* checkpoint.h: the original LDM single-file layout of Stable Diffusion 1.x
 * (v1-5-pruned-emaonly.safetensors and every model merged or fine-tuned from
 * it) and its correspondence with the diffusers / transformers module names
 * that unet.c, vae.c and clip.c use.
 *
 * One file holds three models under three prefixes:
 *   model.diffusion_model.         the UNet (LDM's openaimodel.UNetModel)
 *   first_stage_model.             the VAE  (LDM's AutoencoderKL)
 *   cond_stage_model.transformer.  the CLIP text model (transformers' own names)
 * plus a few non-weights a loader skips (ldm_ignorable).
 *
 * A loader uses it in three steps:
 *   1. ldm_infer_file(): the architecture from tensor names and shapes alone
 *      (a single file carries no config.json), or a one-line reason the file
 *      is not an SD1.x checkpoint (SDXL, SD2.x, inpainting, a LoRA, ...);
 *   2. turn the ldm_*_arch into its own config and build its parameter table;
 *   3. for each diffusers name in the table, ldm_*_name() gives the LDM name,
 *      and ldm_read_f32() reads it (accepting the 1x1-conv form where the
 *      mapping says so).
 *
 * The name maps are the inverse of diffusers' convert_ldm_unet_checkpoint,
 * convert_ldm_vae_checkpoint and convert_ldm_clip_checkpoint; the fixtures
 * (tools/make_ldm_fixtures.py) are verified by loading them back with
 * diffusers' from_single_file.
 */
#ifndef SDLORA_CHECKPOINT_H
#define SDLORA_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>
#include "safetensors.h"

#define LDM_MAX_LEVELS 8
#define LDM_NAME_LEN 192      /* the longest SD1.5 LDM name is under 100 characters */

#define LDM_UNET_PREFIX "model.diffusion_model."
#define LDM_VAE_PREFIX  "first_stage_model."
#define LDM_CLIP_PREFIX "cond_stage_model.transformer."
/* SD2.x: the OpenCLIP ViT-H/14 text tower (open_clip's own names) */
#define LDM_OPENCLIP_PREFIX "cond_stage_model.model."

/* What the ldm_*_name functions return besides -1 (unknown name, index out of
 * range for the layout, or out too small) and 0 (same shape in both):
 * LDM_SQUEEZE: the LDM tensor is a 1x1 conv, shape (C, C, 1, 1), where
 * diffusers has a linear (C, C): the same numbers in the same order, so a
 * loader accepts either shape (ldm_read_f32 does). */
#define LDM_SQUEEZE 1
/* LDM_SPLIT_Q, _K, _V (OpenCLIP, SD2.x): the LDM tensor is attention's fused
 * in_proj, (3d, d) or (3d): q, k and v stacked by rows, and the diffusers
 * tensor is row block 0, 1 or 2 of it (ldm_read_split reads one block) */
#define LDM_SPLIT_Q 2
#define LDM_SPLIT_K 3
#define LDM_SPLIT_V 4

/* ---- UNet ------------------------------------------------------------------
 * LDM numbers the down path as one list, input_blocks: [0] is conv_in, then
 * per level the resnet (+ transformer) blocks, then one block holding the
 * downsampler; output_blocks holds each up level's resnet (+ transformer)
 * blocks, the upsampler riding in the level's last block, after the resnet
 * (".1.conv") or after resnet and transformer (".2.conv"). So an LDM name
 * depends on the block counts, which blocks have attention and where the
 * resamplers are: that is the layout. */
typedef struct {
    int nlevels;                       /* len(block_out_channels): 4 */
    int layers[LDM_MAX_LEVELS];        /* resnets per down level (2); up level b has layers[nlevels-1-b] + 1 */
    int down_attn[LDM_MAX_LEVELS];     /* down level has transformers: 1,1,1,0 */
    int up_attn[LDM_MAX_LEVELS];       /* up level (diffusers' up order): 0,1,1,1 */
    int downsample[LDM_MAX_LEVELS];    /* down level ends in a downsampler: all but the last */
    int upsample[LDM_MAX_LEVELS];      /* up level ends in an upsampler: all but the last */
} ldm_unet_layout;

/* UNet2DConditionModel config.json fields. Those marked "assumed" are not in
 * the tensors' shapes; they hold SD1.x's values (the v1-inference.yaml every
 * SD1.x single file was trained with). */
typedef struct {
    ldm_unet_layout layout;
    int in_channels, out_channels;     /* 4, 4 (conv_in / conv_out) */
    int nlevels;
    int block_out[LDM_MAX_LEVELS];     /* block_out_channels: 320, 640, 1280, 1280 */
    int layers_per_block;              /* layers[0] (SD1.x: the same for every level) */
    int tlayers[LDM_MAX_LEVELS];       /* transformer_layers_per_block, per down level (1) */
    int heads[LDM_MAX_LEVELS];         /* config "attention_head_dim" = heads: 8, ASSUMED */
    int cross_dim;                     /* cross_attention_dim, from attn2.to_k: 768 */
    int linear_proj;                   /* use_linear_projection: proj_in is (C, C) not (C, C, 1, 1) */
    int time_embed_dim;                /* time_embed.0: 4 * block_out[0] */
    int groups;                        /* norm_num_groups: 32, ASSUMED */
    float eps;                         /* norm_eps: 1e-5, ASSUMED */
    int flip_sin_to_cos;               /* 1, ASSUMED */
    float freq_shift;                  /* 0, ASSUMED */
    int sample_size;                   /* 64, ASSUMED (informational) */
} ldm_unet_arch;

/* ---- VAE -------------------------------------------------------------------
 * LDM numbers the decoder's levels by resolution (up.0 is full size), the
 * reverse of diffusers' up_blocks; the mid attention's q, k, v, proj_out are
 * 1x1 convs. */
typedef struct {
    int nlevels;                       /* 4 */
    int layers;                        /* resnets per encoder level (2); decoder levels have one more */
} ldm_vae_layout;

typedef struct {
    ldm_vae_layout layout;
    int in_channels, out_channels;     /* 3, 3 */
    int latent_channels;               /* z_channels: 4 */
    int nlevels;
    int block_out[LDM_MAX_LEVELS];     /* ch * ch_mult: 128, 256, 512, 512 */
    int layers_per_block;              /* 2 */
    int mid_attn;                      /* mid_block_add_attention: 1 */
    int quant_conv, post_quant_conv;   /* present: 1, 1 */
    int groups;                        /* 32, ASSUMED */
    float scaling_factor;              /* 0.18215, ASSUMED (v1-inference.yaml scale_factor) */
    int sample_size;                   /* 512, ASSUMED (informational) */
} ldm_vae_arch;

/* ---- CLIP text model -------------------------------------------------------
 * SD1.x: LDM keeps transformers' names under cond_stage_model.transformer.;
 * some old files (written with early transformers versions) lack the
 * "text_model." level, which the layout records.
 * SD2.x: OpenCLIP's names under cond_stage_model.model. (token_embedding,
 * positional_embedding, transformer.resblocks.N.{ln_1, attn.in_proj_*,
 * attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final). SD2 conditions on
 * the penultimate layer (LDM's FrozenOpenCLIPEmbedder, layer="penultimate"):
 * the last resblock never runs, and diffusers' text_encoder for SD2 is a
 * CLIPTextModel with one layer fewer (23 of OpenCLIP-H's 24), whose
 * last_hidden_state, final_layer_norm included, is that output. So the
 * model built here has num_layers = resblocks - 1 and the last resblock of
 * the file is read by nobody (but for a 1024-wide file with 23 resblocks,
 * converted from diffusers: those are the 23 layers). */
typedef struct {
    int num_layers;                    /* layers of the text model built (OpenCLIP: resblocks - 1) */
    int text_model_level;              /* 1: ...transformer.text_model.encoder..., 0: ...transformer.encoder... */
    int openclip;                      /* 1: SD2.x OpenCLIP names under LDM_OPENCLIP_PREFIX */
} ldm_clip_layout;

typedef struct {
    ldm_clip_layout layout;
    int vocab_size;                    /* 49408 */
    int hidden_size;                   /* 768 */
    int intermediate_size;             /* 3072 */
    int num_layers;                    /* 12 */
    int num_heads;                     /* hidden / 64 = 12 (CLIP's head width; 1 if hidden is not a multiple of 64) */
    int max_pos;                       /* 77 */
    int gelu;                          /* hidden_act: 0 quick_gelu (openai CLIP), 1 gelu (OpenCLIP) */
    int resblocks;                     /* OpenCLIP: resblocks in the file (num_layers + 1, or 23 = num_layers
                                          for an OpenCLIP-H file holding only the layers SD2 runs) */
    /* layer_norm_eps 1e-5: ASSUMED (both text towers) */
} ldm_clip_arch;

typedef struct {
    ldm_unet_arch unet;
    ldm_vae_arch vae;
    ldm_clip_arch clip;
    int sd2;                           /* 1: SD2.x (OpenCLIP text encoder, heads 64 wide) */
} ldm_arch;

/* ---- names: diffusers -> LDM ------------------------------------------------
 * Each writes the full LDM name (with its prefix) into out (n bytes) and
 * returns 0 or LDM_SQUEEZE, or -1 when the name is not one of the model's
 * parameters under this layout.
 *   unet: "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
 *      -> "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
 *   vae:  "encoder.mid_block.attentions.0.to_q.weight"
 *      -> "first_stage_model.encoder.mid.attn_1.q.weight"     (LDM_SQUEEZE)
 *   clip: "text_model.encoder.layers.0.self_attn.q_proj.weight" or the same
 *         without "text_model." (transformers >= 5.6 state dicts)
 *      -> "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
 *         SD2.x: "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" (LDM_SPLIT_Q) */
int ldm_unet_name(const char *diffusers_name, const ldm_unet_layout *lay, char *out, size_t n);
int ldm_vae_name(const char *diffusers_name, const ldm_vae_layout *lay, char *out, size_t n);
int ldm_clip_name(const char *diffusers_name, const ldm_clip_layout *lay, char *out, size_t n);

/* 1 for the tensors an SD1.x / SD2.x single file carries that are not
 * weights of the three models: the DDPM schedule buffers (betas,
 * alphas_cumprod, ...), model_ema.* (EMA bookkeeping and, in non-pruned
 * files, the EMA copy), CLIP's position_ids buffer, OpenCLIP's
 * text_projection, logit_scale and attn_mask (SD conditions on hidden
 * states, not on the projected embedding). A loader skips these. */
int ldm_ignorable(const char *ldm_name);

/* ---- architecture ----------------------------------------------------------
 * From the names and shapes of n tensors (t[i].data is not read, the order
 * does not matter). Returns 0, or -1 with one line "<why> (<what to do>)" in
 * err (ST_ERR_LEN), for: an empty file, a LoRA file, SDXL, an inpainting / pix2pix UNet
 * (9 / 8 input channels), a diffusers-format or VAE-only file, a file without
 * model.diffusion_model.* tensors, a missing component, and any layout an
 * SD1.x UNet / VAE / CLIP cannot have. An SD2.x file (OpenCLIP text encoder)
 * is read as SD1.x's layout with: the OpenCLIP names, linear proj_in /
 * proj_out (from their shape), heads 64 wide (SD2's num_head_channels: 64,
 * so 5, 10, 20, 20 heads; one head on a level narrower than 64) and
 * sample_size 96 (diffusers' default for an SD2 single file, SD2.1-768;
 * model.c makes it 64 when a .yaml beside the file says epsilon). */
int ldm_infer(const st_tensor *t, int n, ldm_arch *a, char *err);
/* the same on an open file; the message starts with the file's path */
int ldm_infer_file(const st_file *f, ldm_arch *a, char *err);
/* "sd1" / "sd2" when f is an SD1.x / SD2.x single-file checkpoint, else NULL
 * and the reason in err */
const char *ldm_detect(const st_file *f, char *err);

/* Read LDM tensor ldm_name as float32 into dst, checking it has the diffusers
 * shape (ndim, shape), or, when squeeze (an ldm_*_name result of
 * LDM_SQUEEZE), that shape followed by dimensions of size 1. */
int ldm_read_f32(const st_file *f, const char *ldm_name, int squeeze, int ndim,
                 const int64_t *shape, float *dst, char *err);
/* For a name ldm_clip_name returned with LDM_SPLIT_Q/K/V (split): read row
 * block split - LDM_SPLIT_Q of the fused tensor, which must have shape
 * (3 shape[0], shape[1..]), as float32 into dst (the diffusers shape). For
 * split 0 or LDM_SQUEEZE it is ldm_read_f32. Returns 0 or -1 (err). */
int ldm_read_split(const st_file *f, const char *ldm_name, int split, int ndim,
                   const int64_t *shape, float *dst, char *err);

#endif
