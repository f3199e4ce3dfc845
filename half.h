/* half.h: IEEE 754 binary16 ("fp16", "half") <-> float32, exact, in one place.
 *
 * With --weight-dtype fp16 the frozen pretrained weights are held as fp16
 * (uint16_t bit patterns) to halve their memory, and every weight matrix is
 * widened to fp32 right before the layer that uses it: all arithmetic stays
 * fp32. Widening is exact (every half is a float), so a model loaded from an
 * fp16 file computes the very same numbers either way. */
#ifndef SDLORA_HALF_H
#define SDLORA_HALF_H

#include <stddef.h>
#include <stdint.h>

/* how the frozen weights are held in memory (--weight-dtype) */
typedef enum { WEIGHT_F32 = 0, WEIGHT_F16 = 1 } weight_dtype;
/* "fp32" / "fp16" -> 0 with *dt set, else -1 */
int weight_dtype_parse(const char *s, weight_dtype *dt);
const char *weight_dtype_name(weight_dtype dt);

/* exact widening; NaN keeps its payload */
float half_to_float(uint16_t h);
/* round to nearest, ties to even; overflow -> inf, NaN -> NaN (payload kept
 * where it fits, else the quiet NaN bit) */
uint16_t float_to_half(float f);

/* dst[i] = half_to_float(src[i]), over n (threads split the range) */
void half_to_float_array(float *dst, const uint16_t *src, size_t n);
/* dst[i] = float_to_half(src[i]) */
void float_to_half_array(uint16_t *dst, const float *src, size_t n);

/* The one-matrix widening buffer of an fp16-held model: buf gets the n
 * halfs at src widened, unless *held says it already holds them (asking
 * again costs nothing); *held = src after. Set *held = NULL whenever the
 * fp16 weights change. Returns buf. */
const float *half_widen_cached(float *buf, const uint16_t **held, const uint16_t *src, size_t n);
/* a parameter held as fp32 (f32) or as fp16 (f16, when not NULL), read to
 * or written from n floats */
void half_param_get(float *dst, const float *f32, const uint16_t *f16, size_t n);
void half_param_set(float *f32, uint16_t *f16, const float *src, size_t n);

#endif
