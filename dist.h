/* dist.h: data-parallel training over MPI (make MPI=1; mpirun -np N ./train).
 *
 * Every rank holds the whole model and the same LoRA. An optimizer step of
 * K = N * accum micro-batches gives micro-batch k to rank k % N; each rank
 * computes its micro-batches' LoRA gradients, the ranks combine them, and
 * every rank runs the same AdamW update on the same sum, so the LoRAs stay
 * identical without ever being sent.
 *
 * The sum is the one a single process takes over its --accum micro-batches,
 *     G = ((g_0 + g_1) + g_2) + ... + g_{K-1}      (each g_k from zero)
 * in that order, element by element, so N ranks at --batch b --accum a write
 * the same bytes as one process at --batch b --accum N*a. MPI_Allreduce
 * promises no order, so the sum is built from two collectives that move the
 * same bytes a ring all-reduce does, 2 n (N-1)/N floats per rank:
 *   reduce-scatter: the gradient is cut into N chunks; rank j receives chunk
 *     j of every rank's g (Alltoallv) and adds them up in rank order;
 *   all-gather: every rank receives every summed chunk (Allgatherv).
 * With accum > 1 each round of N micro-batches (k = jN .. jN+N-1) is one
 * reduce-scatter, added onto the rounds before it.
 *
 * Faults: every collective is non-blocking and polled against a deadline
 * (SDLORA_DIST_TIMEOUT seconds, default 60): a rank that died or hangs makes
 * the others print one line and abort the job instead of waiting forever.
 * Files are written by rank 0 only, each through a temporary name, so the
 * last checkpoint is whole whatever happens.
 *
 * The default build has no MPI: one rank, and the same calls fold the
 * micro-batches locally. */
#ifndef SDLORA_DIST_H
#define SDLORA_DIST_H

#include <stddef.h>
#include <stdio.h>

#define DIST_ERR_LEN 512

/* Start (MPI_Init under mpirun; nothing without MPI). On ranks other than 0
 * stdout and stderr go to /dev/null: they would repeat rank 0's lines;
 * dist_stderr() is the rank's real stderr for its own errors. */
int dist_init(int *argc, char ***argv);
int dist_rank(void);
int dist_size(void);
int dist_is_root(void);            /* rank 0: the one that writes files and prints */
FILE *dist_stderr(void);
/* the end: MPI_Finalize after success or an error every rank shares
 * (abort = 0), MPI_Abort otherwise (the other ranks may be waiting) */
void dist_finish(int abort_job, int code);

/* Ctrl-C / SIGTERM under MPI only set a flag here; dist_round passes it to
 * every rank so that all stop after the same step */
void dist_on_signal(int sig);

/* the rows [lo, hi) of n that this rank computes when a cache is shared out */
void dist_share(int n, int *lo, int *hi);
/* after each rank has filled its share (dist_share) of rows of row_floats
 * floats in buf: every rank gets all n rows. 0, or -1 with err. */
int dist_allgather_rows(float *buf, size_t row_floats, int n, char *err);

/* The step's gradient sum over n floats. dist_begin, then one dist_round
 * per round of N micro-batches with this rank's gradient g (its micro-batch
 * k = round * N + rank), its share of the loss and its stop flag; then
 * dist_end writes the sum into G. dist_round adds the ranks' losses into
 * *loss in rank order (as a single process adds its micro-batches') and
 * ORs the stop flags into *stop. 0, or -1 with err (timeout, MPI error). */
int dist_begin(size_t n, char *err);
int dist_round(const float *g, float loss_part, double *loss, int *stop, char *err);
int dist_end(float *G, char *err);

/* make CUDA=1 MPI=1: the same sum on the GPUs (cuda/dist_nccl.cu), one
 * GPU per rank, used when every rank has one (SDLORA_DIST_NCCL=0: MPI) */
#if defined(SDLORA_MPI) && defined(SDLORA_CUDA)
size_t dist_nccl_id_bytes(void);
int dist_nccl_make_id(void *id, char *err);
int dist_nccl_init(const void *id, int rank, int size, int local_rank, char *err);
int dist_nccl_round(const float *g, size_t n, int first, double timeout, char *err);
int dist_nccl_end(float *G, size_t n, double timeout, char *err);
void dist_nccl_free(void);
#endif

#endif
