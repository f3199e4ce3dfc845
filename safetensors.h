/* safetensors.h: read and write .safetensors files.
 * Format: 8-byte little-endian header length N, N bytes of JSON
 * {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
 *  "__metadata__": {"key": "value", ...}}, then the raw tensor bytes.
 * Every function that can fail returns 0 on success and -1 on failure, with a
 * one-line message "<file>: <why> (<fix>)" in err (never exits, never crashes
 * on a truncated or corrupt file). */
#ifndef SDLORA_SAFETENSORS_H
#define SDLORA_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

typedef enum { ST_F32 = 0, ST_F16, ST_BF16, ST_F64, ST_I64, ST_I32, ST_I16, ST_I8, ST_U8, ST_BOOL } st_dtype;

#define ST_MAX_DIMS 8
#define ST_ERR_LEN 512

typedef struct {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    size_t numel;
    size_t nbytes;
    const uint8_t *data;      /* points into the mapped file */
} st_tensor;

typedef struct {
    char *path;
    int ntensors;
    st_tensor *tensors;
    int nmeta;
    char **meta_keys, **meta_vals;
    void *map;                /* the whole file, mmap'ed (or read) */
    size_t size;
    int mapped;
} st_file;

size_t st_dtype_size(st_dtype dt);
const char *st_dtype_name(st_dtype dt);

int st_open(st_file *f, const char *path, char *err);
void st_close(st_file *f);
const st_tensor *st_find(const st_file *f, const char *name);     /* NULL if absent */
const char *st_meta(const st_file *f, const char *key);           /* NULL if absent */
/* convert a float tensor (F32/F16/BF16/F64) to float32; dst holds t->numel floats */
int st_to_f32(const st_tensor *t, float *dst, char *err);
/* find + check the shape (ndim, shape; NULL shape = any) + convert into dst.
 * An absent or misshapen tensor is an error naming it. */
int st_read_f32(const st_file *f, const char *name, int ndim, const int64_t *shape,
                float *dst, char *err);
/* the same into fp16 (uint16_t bit patterns): F16 copied as is, F32 / BF16 /
 * F64 rounded to nearest even (what --weight-dtype fp16 holds) */
int st_to_f16(const st_tensor *t, uint16_t *dst, char *err);
int st_read_f16(const st_file *f, const char *name, int ndim, const int64_t *shape,
                uint16_t *dst, char *err);
/* a model parameter held as fp32 (into dst) or as fp16 (into dst16; the
 * other NULL): st_read_f32 / st_read_f16, where the tensor may also have the
 * shape followed by 1s when squeeze is set (an LDM 1x1 conv for a linear) */
int st_read_param(const st_file *f, const char *name, int squeeze, int ndim, const int64_t *shape,
                  float *dst, uint16_t *dst16, char *err);
/* give back the mapped pages of a tensor already copied out (st_read_f32 and
 * st_read_f16 do it): loading then peaks near the copy, not file + copy.
 * The tensor stays readable (the pages come back from the file). */
void st_release(const st_file *f, const st_tensor *t);
/* find + convert into a new malloc'ed buffer (caller frees); *numel if non-NULL */
float *st_load_f32(const st_file *f, const char *name, size_t *numel, char *err);

/* fp16 / bf16 <-> fp32 (fp16: half.h's exact conversions) */
float st_f16_to_f32(uint16_t h);
uint16_t st_f32_to_f16(float f);
float st_bf16_to_f32(uint16_t h);
uint16_t st_f32_to_bf16(float f);

/* writing: collect tensors (data is copied) and metadata, then save to
 * path.tmp, fsync, rename onto path, so a failure never leaves a half file. */
typedef struct st_writer st_writer;
st_writer *st_writer_new(void);
int st_writer_add(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape,
                  const void *data);
/* add a float32 array stored as dtype dt (F32, F16 or BF16) */
int st_writer_add_f32(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape,
                      const float *data);
int st_writer_meta(st_writer *w, const char *key, const char *val);
int st_writer_save(st_writer *w, const char *path, char *err);
/* kohya's sshs_model_hash (64 hex digits) and sshs_legacy_hash (8) of what
 * w holds, as sd-scripts' precalculate_safetensors_hashes computes them: over
 * the file Python's safetensors writes with only the "ss_*" metadata. 0, or
 * -1 when out of memory. */
int st_writer_kohya_hashes(const st_writer *w, char model_hash[65], char legacy_hash[9]);
void st_writer_free(st_writer *w);

#endif
