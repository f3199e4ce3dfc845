/* profile.h: where a step's time goes, by kind of operation.
 *
 * SDLORA_PROFILE=1 in the environment (or prof_enable(1)) makes every
 * primitive of nn.c, attention.c and lora.c add its wall time and its
 * floating-point operations to a table, forward and backward apart; the
 * programs print it at the end (prof_print). Off, each primitive pays one
 * branch. Only calls made outside OpenMP parallel regions are counted (the
 * models call the primitives from one thread; each primitive is parallel
 * inside). */
#ifndef SDLORA_PROFILE_H
#define SDLORA_PROFILE_H

#include <stdio.h>

typedef enum {
    PROF_CONV3,       /* convolutions with a k x k kernel, k > 1 (ResNet, down/upsamplers) */
    PROF_LINEAR,      /* linears and 1x1 convolutions (projections, shortcuts, proj_in/out) */
    PROF_LORA,        /* the adapters' own rank-r products, beside the frozen layer */
    PROF_ATTN,        /* scores, softmax and P V (the q/k/v projections are linears) */
    PROF_NORM,        /* group norm, layer norm */
    PROF_ELEM,        /* SiLU, GELU, GEGLU, upsample, dropout */
    PROF_NKINDS
} prof_kind;

extern int prof_on;
/* read SDLORA_PROFILE once; returns whether profiling is on */
int prof_init(void);
void prof_enable(int on);
void prof_reset(void);
/* a primitive's start (0 when off) and its end, with the flops it did */
double prof_begin(void);
void prof_end(prof_kind k, int backward, double t0, double flops);
/* the table: per kind and direction, seconds, share, GFLOP/s; with the wall
 * time of what was profiled (0: unknown) also the rest, spent outside the
 * primitives (the models' own loops: copies, transposes, residual adds) */
void prof_print(FILE *f, const char *title, double wall);
/* what one kind and direction recorded: seconds, flops, calls */
void prof_get(prof_kind k, int backward, double *seconds, double *nflops, long *ncalls);
/* total seconds recorded so far (both directions) */
double prof_total(void);

#endif
