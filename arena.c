/* arena.c: the activation layout's bookkeeping (see arena.h). */
#include <stdlib.h>
#include "arena.h"

size_t arena_take(arena_plan *p, size_t n) {
    size_t off = p->top;
    p->top += (n + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
    if (p->top > p->peak) p->peak = p->top;
    return off;
}

size_t arena_mark(const arena_plan *p) { return p->top; }

void arena_release(arena_plan *p, size_t mark) {
    if (mark < p->top) p->top = mark;
}

int arena_alloc(arena_t *a, const arena_plan *p) {
    arena_free(a);
    size_t n = p->peak ? p->peak : ARENA_ALIGN;
    size_t bytes = (n + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN * sizeof(float);
    void *mem = NULL;
    if (posix_memalign(&mem, 64, bytes) != 0) return -1;
    a->base = mem;
    a->nfloats = n;
    return 0;
}

void arena_free(arena_t *a) {
    free(a->base);
    a->base = NULL;
    a->nfloats = 0;
}
