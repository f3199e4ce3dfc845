/* clip.h: the CLIP text transformer as SD1.x uses it (transformers'
 * CLIPTextModel, the openai/clip-vit-large-patch14 architecture), forward
 * and backward, with LoRA on the attention and MLP projections.
 *
 *   x = token_embedding[ids] + position_embedding[0..T-1]
 *   for each layer:  x = x + out_proj(causal_attention(q, k, v of layer_norm1(x)))
 *                    x = x + fc2(act(fc1(layer_norm2(x))))     act: quick_gelu | gelu
 *   out = final_layer_norm(x)
 *
 * clip_skip (A1111's count, k >= 1): run only the first n_layers - k + 1
 * layers, then final_layer_norm. k = 1 is last_hidden_state. diffusers'
 * encode_prompt(clip_skip = k - 1) is the same thing: it takes
 * hidden_states[-k] and applies final_layer_norm to it; diffusers' None is our 1.
 *
 * Parameters live in one float block with a table of (name, offset, shape),
 * names as transformers writes them without the "text_model." prefix. With
 * the fp16 weight dtype (--weight-dtype fp16) every matrix (the embeddings,
 * q/k/v/out_proj, fc1, fc2) is held as fp16 instead and widened, exactly, to
 * fp32 right before the layer that reads it (the embeddings row by row), so
 * all arithmetic stays fp32 and an fp16 checkpoint gives the same bits. The
 * backward gives gradients for the LoRA parameters only: the frozen weights
 * get none, and no work is spent on them, unless a gradient block of the
 * params' layout was allocated (clip_alloc_grads: full fine-tuning). */
#ifndef SDLORA_CLIP_H
#define SDLORA_CLIP_H

#include <stddef.h>
#include <stdint.h>
#include "lora.h"
#include "safetensors.h"
#include "half.h"
#include "arena.h"

enum { CLIP_ACT_QUICKGELU = 0, CLIP_ACT_GELU = 1 };

typedef struct {
    int vocab_size;          /* 49408 for SD1.x */
    int hidden_size;         /* d: 768 */
    int intermediate_size;   /* 3072 */
    int num_layers;          /* num_hidden_layers: 12 */
    int num_heads;           /* num_attention_heads: 12 */
    int max_pos;             /* max_position_embeddings: 77 */
    int act;                 /* hidden_act: CLIP_ACT_* */
    float layer_norm_eps;    /* 1e-5 */
    int bos_token_id, eos_token_id, pad_token_id;
} clip_config;

/* transformers' CLIPTextConfig defaults, for keys config.json leaves out */
void clip_config_default(clip_config *c);
/* from config.json text (a CLIPTextConfig, or a CLIPConfig holding "text_config");
 * checks every size. Returns 0, or -1 with a one-line reason in err (ST_ERR_LEN). */
int clip_config_parse(clip_config *c, const char *text, size_t len, const char *path, char *err);
int clip_config_load(clip_config *c, const char *path, char *err);

typedef struct {
    char name[64];           /* "encoder.layers.3.mlp.fc1.weight" */
    size_t offset;           /* in the fp32 layout: params + offset (fp32 weights), grads + offset */
    int ndim;
    int64_t shape[2];
    size_t numel;
    float *data;             /* the tensor as fp32, or NULL when held as fp16 */
    uint16_t *data16;        /* the tensor as fp16 (a matrix with fp16 weights), or NULL */
} clip_param;

typedef struct {
    float *ln1_w, *ln1_b, *q_b, *k_b, *v_b, *o_b, *ln2_w, *ln2_b, *fc1_b, *fc2_b;
    /* self_attn.{q,k,v,out}_proj, mlp.fc1, mlp.fc2: read through the table
     * entry, fp32 or fp16 */
    const clip_param *q_w, *k_w, *v_w, *o_w, *fc1_w, *fc2_w;
} clip_layer;

/* the six adapted projections of a layer, in this order */
enum { CLIP_Q = 0, CLIP_K, CLIP_V, CLIP_O, CLIP_FC1, CLIP_FC2, CLIP_NPROJ };

typedef struct {
    char name[80];           /* module path, "text_model.encoder.layers.0.self_attn.q_proj" */
    int layer, proj;         /* which layer, which CLIP_* projection */
    lora_t L;
} clip_adapter;

typedef struct {
    clip_config config;
    /* parameters: one block, one table */
    float *params;                     /* fp16 weights: only the vectors (biases, norm scales) */
    float *grads;                      /* fp32 layout: dL/dparams; NULL = frozen (no work) */
    size_t num_params;
    clip_param *table;
    int ntable;
    /* --weight-dtype fp16: the matrices (nmat of the num_params numbers) in
     * params16; a layer's matrix is widened into wbuf (room for the largest
     * layer matrix; the embeddings are gathered row by row, not widened) */
    weight_dtype wdtype;
    uint16_t *params16;
    size_t nmat;
    float *wbuf;
    const uint16_t *wbuf_of;           /* the fp16 matrix wbuf holds now, or NULL */
    const clip_param *tok_emb, *pos_emb;   /* (vocab, d), (max_pos, d) */
    clip_layer *layers;                /* num_layers */
    float *lnf_w, *lnf_b;              /* final_layer_norm */
    /* LoRA: adapters[layer * CLIP_NPROJ + proj], NULL-free once added */
    clip_adapter *adapters;
    int nadapters;
    float *lora_params, *lora_grads;   /* A and B of all adapters; their gradients */
    size_t num_lora_params;
    int training;                      /* 1: LoRA dropout active in forward */
    rng_t rng;                         /* dropout masks */
    /* the last forward's activations, the dropout masks, the backward's
     * workspace, the adapters' scratch and the ids: one block, laid out by
     * clip.c's clip_layout for the forward's shape (offsets in layout) and
     * reallocated only when a forward needs more */
    arena_t acts;
    struct clip_layout *layout;
    int B, T, nrun, dropout_on;        /* shape, layers run, dropout used by the last forward */
    /* the operations table (backend.h): NULL = the CPU's; after clip_to_device
     * a device's, with its copies of params / params16 / lora_params, a
     * widening buffer, and acts.base in its memory */
    const struct nn_ops *ops;
    float *dparams, *dlora_params, *dwbuf;
    float *dlora_grads;                /* on a device with LoRA: the gradients of dlora_params there */
    uint16_t *dparams16;
    const uint16_t *dwbuf_of;
    char err[ST_ERR_LEN];              /* why the last clip_forward/clip_backward failed */
} clip_t;

/* Allocate the parameter block for config c (values uninitialised).
 * Returns 0, or -1 with err on a size overflow / out of memory. */
int clip_init(clip_t *m, const clip_config *c, char *err);
/* the same with the matrices held as wdtype (clip_init: WEIGHT_F32). With
 * WEIGHT_F16 they take half the memory; full fine-tuning (clip_alloc_grads)
 * then refuses, LoRA training works as ever. */
int clip_init_dtype(clip_t *m, const clip_config *c, weight_dtype wdtype, char *err);
void clip_free(clip_t *m);

/* Load every parameter from an open safetensors file, names prefix + table
 * name, e.g. prefix "cond_stage_model.transformer.text_model." for an LDM
 * checkpoint. F32/F16/BF16. An absent or misshapen tensor is an error naming it. */
int clip_load_st(clip_t *m, const st_file *f, const char *prefix, char *err);
/* A transformers folder (SD's text_encoder/): dir/config.json and
 * dir/model.safetensors (or model.fp16.safetensors), names with the
 * "text_model." prefix (transformers 4) or without it (transformers 5). */
int clip_load_hf(clip_t *m, const char *dir, char *err);
int clip_load_hf_dtype(clip_t *m, const char *dir, weight_dtype wdtype, char *err);

/* Read table entry i from tensor `name` of f, which must have the entry's
 * shape or, when squeeze, that shape followed by 1s (an LDM 1x1 conv).
 * Held as fp16: F16 copied as is, others rounded to nearest even; held as
 * fp32: converted exactly. Returns 0 or -1 (err, ST_ERR_LEN). */
int clip_read_param(clip_t *m, int i, const st_file *f, const char *name, int squeeze, char *err);
/* table entry i as fp32 (numel floats), and back (rounded when held as
 * fp16): how a LoRA is merged into the weights whatever their dtype */
void clip_param_get(const clip_t *m, int i, float *dst);
void clip_param_set(clip_t *m, int i, const float *src);

/* ids (B, T) -> out (B, T, d) (out NULL: on a device only, see
 * clip_to_device). Needs 1 <= T <= max_pos, 0 <= ids < vocab,
 * 1 <= clip_skip <= num_layers. Keeps the activations backward needs.
 * Returns 0, or -1 with the reason in m->err. */
int clip_forward(clip_t *m, float *out, const int *ids, int B, int T, int clip_skip);
/* dout (B, T, d) for the out of the last clip_forward: ACCUMULATES (+=) into
 * the LoRA gradients (clip_zero_grad first) and, when allocated, into grads
 * (clip_zero_grads first): every weight, final_layer_norm, the position
 * embedding and the token embedding rows of the ids seen. Layers that
 * clip_skip left out get nothing. Without grads, no gradient for frozen
 * weights or the embeddings, and backward stops at the first layer's
 * adapters. Returns 0, or -1 with m->err (no forward, nothing to train, OOM). */
int clip_backward(clip_t *m, const float *dout);

/* Full fine-tuning: allocate grads (zeroed, the fp32 layout of params).
 * A backward then needs a forward after it (as after clip_add_lora).
 * Returns 0, or -1 with m->err (out of memory, or fp16 weights). clip_zero_grads zeroes it (not to be
 * confused with clip_zero_grad, the LoRA gradients). */
int clip_alloc_grads(clip_t *m);
void clip_zero_grads(clip_t *m);

/* pooled (B, d): the row of hidden (B, T, d; the clip_skip 1 output) at the
 * end-of-text token of each sequence, as CLIPTextModel's pooler_output:
 * the first position with id == eos_token_id, or, for configs with
 * eos_token_id == 2 (made before transformers PR #24773), the position of the
 * largest id. */
void clip_pooled(const clip_t *m, float *pooled, const float *hidden, const int *ids, int B, int T);

/* LoRA on q_proj, k_proj, v_proj, out_proj, fc1, fc2 of every layer (kohya's
 * text-encoder default). A Kaiming-uniform, B = 0 (lora_init), seeded.
 * Returns 0, or -1 with err (already added, bad rank, out of memory). */
int clip_add_lora(clip_t *m, int rank, float alpha, float dropout, uint64_t seed, char *err);
void clip_zero_grad(clip_t *m);
int clip_num_adapters(const clip_t *m);
/* adapter i (0 <= i < clip_num_adapters), NULL when out of range */
clip_adapter *clip_adapter_at(clip_t *m, int i);

/* Run clip_forward and clip_backward on ops's device from now on (full
 * fine-tuning refuses): the weights and the LoRA A, B (unmerged adapters,
 * as they are now) are copied there once, with room for dA, dB
 * (dlora_grads, zeroed); the activations live there. The ids go up and the
 * embedding gather runs there; out comes down, or with out = NULL stays
 * there (clip_device_out). clip_backward's dout is then device memory (the
 * UNet's dctx there), and the LoRA gradients accumulate in dlora_grads
 * (clip_zero_grad zeroes them): train on dlora_params / dlora_grads with
 * the table's adamw_step, and download dlora_params into lora_params to
 * save. Returns 0 or -1 (m->err). */
struct nn_ops;
int clip_to_device(clip_t *m, const struct nn_ops *ops);
/* on a device: where the last clip_forward left out (device memory; NULL
 * before a forward or off a device) */
float *clip_device_out(clip_t *m);

#endif
