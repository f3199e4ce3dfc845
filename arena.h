/* arena.h: a model's activation memory, laid out before anything runs.
 *
 * llm.c lists its activations' sizes in one function and points them into
 * one block. A UNet is a tree of blocks whose sizes depend on the config, so
 * here the layout function of each model (unet_layout, vae_layout,
 * clip_layout) walks its modules in forward order and takes an offset for
 * every tensor it will hold:
 *
 *     arena_plan p = {0};
 *     rb->h1 = arena_take(&p, B * C * H * W);     // kept for backward
 *     size_t m = arena_mark(&p);
 *     tmp   = arena_take(&p, N * r);              // needed only inside a layer
 *     arena_release(&p, m);                       // the next block reuses it
 *
 * The plan keeps the high-water mark (peak), which is the one size the model
 * allocates. Offsets, not pointers: the CPU allocates the block once with
 * arena_alloc and a tensor lives at arena_at(&a, off); a second backend
 * allocates the same number of floats once on its device and adds the same
 * offsets to its own base. Offsets are rounded to 16 floats (64 bytes) so
 * every tensor starts on a cache line and a vector boundary. */
#ifndef SDLORA_ARENA_H
#define SDLORA_ARENA_H

#include <stddef.h>

#define ARENA_ALIGN 16    /* floats: 64 bytes */

typedef struct {
    size_t top;           /* floats taken and not given back */
    size_t peak;          /* the most that was ever taken at once: the block's size */
} arena_plan;

/* room for n floats: returns its offset */
size_t arena_take(arena_plan *p, size_t n);
/* where the plan stands now, and giving back everything taken since */
size_t arena_mark(const arena_plan *p);
void arena_release(arena_plan *p, size_t mark);

/* the block itself, on the CPU */
typedef struct {
    float *base;
    size_t nfloats;
} arena_t;

/* one allocation of p->peak floats, 64-byte aligned. Returns 0, or -1 when
 * memory runs out (a->base NULL). Frees what a held before. */
int arena_alloc(arena_t *a, const arena_plan *p);
void arena_free(arena_t *a);
/* the tensor at offset off */
static inline float *arena_at(const arena_t *a, size_t off) { return a->base + off; }

#endif
