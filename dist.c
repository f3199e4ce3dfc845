/* dist.c: the ranks of a data-parallel run and the fixed-order gradient sum
 * (dist.h says what and why). Without SDLORA_MPI there is one rank and the
 * same calls fold the micro-batches in place. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "dist.h"
#ifdef SDLORA_MPI
#include <mpi.h>
#endif
#ifdef SDLORA_CUDA
#include "cuda/cuda.h"
#endif

static int g_rank = 0, g_size = 1;
static FILE *g_err;                            /* this rank's own stderr */
static volatile sig_atomic_t g_signalled = 0;

/* the step's sum: this rank's chunk [off[rank], off[rank] + len[rank]) of
 * the n floats, added up over the rounds (all n with one rank) */
static size_t g_n, g_acc_cap;              /* this step's n, and what g_acc holds */
static float *g_acc;
static int g_rounds;

int dist_rank(void) { return g_rank; }
int dist_size(void) { return g_size; }
int dist_is_root(void) { return g_rank == 0; }
FILE *dist_stderr(void) { return g_err ? g_err : stderr; }
void dist_on_signal(int sig) { (void)sig; g_signalled = 1; }

void dist_share(int n, int *lo, int *hi) {
    *lo = (int)((long long)n * g_rank / g_size);
    *hi = (int)((long long)n * (g_rank + 1) / g_size);
}

/* room for the sum of n floats; 0 or -1 */
static int grow_acc(size_t n, char *err) {
    g_n = n;
    if (n <= g_acc_cap && g_acc) return 0;
    float *p = realloc(g_acc, sizeof(float) * (n ? n : 1));
    if (!p) { snprintf(err, DIST_ERR_LEN, "out of memory for the gradient sum (%zu floats)", n); return -1; }
    g_acc = p;
    g_acc_cap = n;
    return 0;
}

#ifndef SDLORA_MPI
/* ------------------------------------------------------------ one process */
int dist_init(int *argc, char ***argv) {
    (void)argc; (void)argv;
    /* under mpirun, a build without MPI would run N independent copies that
     * all write the same files */
    const char *ws = getenv("OMPI_COMM_WORLD_SIZE");
    if (!ws) ws = getenv("PMI_SIZE");
    if (ws && atoi(ws) > 1) {
        fprintf(stderr, "error: this ./train was built without MPI but runs under mpirun with %s processes "
                        "(rebuild with make MPI=1, or run it without mpirun)\n", ws);
        return -1;
    }
    return 0;
}
void dist_finish(int abort_job, int code) { (void)abort_job; (void)code; }

int dist_allgather_rows(float *buf, size_t row_floats, int n, char *err) {
    (void)buf; (void)row_floats; (void)n; (void)err;
    return 0;
}

int dist_begin(size_t n, char *err) {
    g_rounds = 0;
    return grow_acc(n, err);
}

/* one process: acc = g_0, then acc += g_k, micro-batch by micro-batch */
int dist_round(const float *g, float loss_part, double *loss, int *stop, char *err) {
    (void)err;
    if (g_rounds++ == 0) memcpy(g_acc, g, sizeof(float) * g_n);
    else for (size_t i = 0; i < g_n; i++) g_acc[i] += g[i];
    *loss += loss_part;
    *stop = 0;
    return 0;
}

int dist_end(float *G, char *err) {
    (void)err;
    memcpy(G, g_acc, sizeof(float) * g_n);
    return 0;
}

#else
/* ------------------------------------------------------------------- MPI */
static MPI_Comm g_comm = MPI_COMM_NULL;
static double g_timeout = 60.0;
static int *g_cnt, *g_off;                /* the N chunks of the sum: counts, offsets */
static int *g_rcnt, *g_roff;              /* what this rank receives in a round */
static float *g_recv;                     /* (N, len[rank]) chunks of one round */
static size_t g_recv_n;
static int g_nccl;                        /* CUDA=1: the sum runs on the GPUs */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void mpi_msg(int rc, char *b, size_t n) {
    char s[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, s, &len) != MPI_SUCCESS) snprintf(s, sizeof s, "MPI error %d", rc);
    snprintf(b, n, "%s", s);
}

/* Wait for one non-blocking collective, polling, for at most g_timeout
 * seconds: a peer that died or stopped never completes it, and a blocking
 * call would wait forever. */
static int wait_req(MPI_Request *req, const char *what, char *err) {
    double t0 = now_s();
    struct timespec nap = {0, 50000};       /* 50 us: nothing next to a step */
    for (;;) {
        int done = 0, rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
            char m[256];
            mpi_msg(rc, m, sizeof m);
            snprintf(err, DIST_ERR_LEN, "MPI failed while %s: %s (a rank died? the last checkpoint is intact: "
                     "continue with --resume)", what, m);
            return -1;
        }
        if (done) return 0;
        static int told;
        if (g_signalled && !told && g_rank == 0) {
            told = 1;
            fprintf(stderr, "\nsignal: every rank stops after this step (waiting for the others to finish it)\n");
        }
        if (now_s() - t0 > g_timeout) {
            snprintf(err, DIST_ERR_LEN, "no answer from the other ranks for %.0f s while %s "
                     "(a rank died or hangs; the last checkpoint is intact: continue with --resume; "
                     "a slower cluster: raise SDLORA_DIST_TIMEOUT)", g_timeout, what);
            return -1;
        }
        nanosleep(&nap, NULL);
    }
}

int dist_init(int *argc, char ***argv) {
    int rc = MPI_Init(argc, argv);
    if (rc != MPI_SUCCESS) { fprintf(stderr, "error: MPI_Init failed (run under mpirun, or check the MPI installation)\n"); return -1; }
    MPI_Comm_dup(MPI_COMM_WORLD, &g_comm);
    MPI_Comm_set_errhandler(g_comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(g_comm, &g_rank);
    MPI_Comm_size(g_comm, &g_size);
    const char *t = getenv("SDLORA_DIST_TIMEOUT");
    if (t) {
        char *end;
        errno = 0;
        double v = strtod(t, &end);
        if (*end || errno || !(v > 0)) {
            if (g_rank == 0) fprintf(stderr, "error: SDLORA_DIST_TIMEOUT=%s: not a number of seconds > 0 (e.g. 60)\n", t);
            MPI_Finalize();
            return -1;
        }
        g_timeout = v;
    }
    if (g_rank != 0) {
        /* rank 0 prints; the others keep their stderr for their own errors */
        int fd = dup(2), nul = open("/dev/null", O_WRONLY);
        if (fd >= 0) g_err = fdopen(fd, "w");
        if (nul >= 0) { fflush(stdout); fflush(stderr); dup2(nul, 1); dup2(nul, 2); close(nul); }
    }
    g_cnt = malloc(sizeof(int) * 4 * (size_t)g_size);
    if (!g_cnt) { fprintf(dist_stderr(), "error: out of memory\n"); MPI_Abort(g_comm, 1); }
    g_off = g_cnt + g_size; g_rcnt = g_off + g_size; g_roff = g_rcnt + g_size;
#ifdef SDLORA_CUDA
    /* NCCL when every rank has a GPU: rank 0 makes the id, MPI carries it */
    const char *use = getenv("SDLORA_DIST_NCCL");
    int have = g_size > 1 && !(use && strcmp(use, "0") == 0) && cuda_available(), all = 0;
    MPI_Allreduce(&have, &all, 1, MPI_INT, MPI_MIN, g_comm);
    if (all) {
        char err[DIST_ERR_LEN] = "", id[512];
        MPI_Comm node;
        int local = 0, nrc = 0;
        MPI_Comm_split_type(g_comm, MPI_COMM_TYPE_SHARED, g_rank, MPI_INFO_NULL, &node);
        MPI_Comm_rank(node, &local);
        MPI_Comm_free(&node);
        if (g_rank == 0) nrc = dist_nccl_make_id(id, err);
        MPI_Bcast(&nrc, 1, MPI_INT, 0, g_comm);
        if (nrc == 0) {
            MPI_Bcast(id, (int)dist_nccl_id_bytes(), MPI_BYTE, 0, g_comm);
            nrc = dist_nccl_init(id, g_rank, g_size, local, err);
        }
        if (nrc) {
            if (!err[0]) snprintf(err, sizeof err, "rank 0 could not make the communicator's id");
            fprintf(dist_stderr(), "error: rank %d: NCCL: %s (run with SDLORA_DIST_NCCL=0 to sum over MPI instead)\n", g_rank, err);
            MPI_Abort(g_comm, 1);
        }
        g_nccl = 1;
        if (g_rank == 0) fprintf(stderr, "data parallel: gradients summed on the GPUs with NCCL\n");
    }
#endif
    return 0;
}

void dist_finish(int abort_job, int code) {
    fflush(stdout); fflush(stderr);
    if (g_err) fflush(g_err);
    if (abort_job && g_size > 1) MPI_Abort(g_comm, code ? code : 1);
#ifdef SDLORA_CUDA
    if (g_nccl) dist_nccl_free();
#endif
    MPI_Finalize();
}

int dist_allgather_rows(float *buf, size_t row_floats, int n, char *err) {
    if (g_size == 1) return 0;
    for (int r = 0; r < g_size; r++) {
        long long lo = (long long)n * r / g_size, hi = (long long)n * (r + 1) / g_size;
        if ((hi - lo) * (long long)row_floats > INT32_MAX || lo * (long long)row_floats > INT32_MAX) {
            snprintf(err, DIST_ERR_LEN, "a cache of %d x %zu floats is too large to share between ranks", n, row_floats);
            return -1;
        }
        g_cnt[r] = (int)((hi - lo) * (long long)row_floats);
        g_off[r] = (int)(lo * (long long)row_floats);
    }
    MPI_Request req;
    int rc = MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, g_cnt, g_off, MPI_FLOAT, g_comm, &req);
    if (rc != MPI_SUCCESS) { snprintf(err, DIST_ERR_LEN, "MPI_Iallgatherv failed"); return -1; }
    return wait_req(&req, "sharing the caches", err);
}

int dist_begin(size_t n, char *err) {
    g_rounds = 0;
    if (n > INT32_MAX) { snprintf(err, DIST_ERR_LEN, "%zu trainable floats: more than one MPI message holds", n); return -1; }
    for (int r = 0; r < g_size; r++) {
        g_off[r] = (int)(n * (size_t)r / (size_t)g_size);
        g_cnt[r] = (int)(n * (size_t)(r + 1) / (size_t)g_size) - g_off[r];
    }
    size_t mine = (size_t)g_cnt[g_rank];
    if (grow_acc(n, err)) return -1;        /* n: dist_end gathers into it too */
    if ((size_t)g_size * mine > g_recv_n || !g_recv) {
        float *p = realloc(g_recv, sizeof(float) * ((size_t)g_size * mine + 1));
        if (!p) { snprintf(err, DIST_ERR_LEN, "out of memory for the gradient exchange"); return -1; }
        g_recv = p;
        g_recv_n = (size_t)g_size * mine;
    }
    for (int r = 0; r < g_size; r++) { g_rcnt[r] = (int)mine; g_roff[r] = r * (int)mine; }
    return 0;
}

/* Reduce-scatter in rank order: rank j gets chunk j of every rank's g and
 * adds them to its running sum, g from rank 0 first. The losses and stop
 * flags travel with it (an all-gather of two floats per rank). */
int dist_round(const float *g, float loss_part, double *loss, int *stop, char *err) {
    float mine[2] = {loss_part, g_signalled ? 1.0f : 0.0f};
    float *all = malloc(sizeof(float) * 2 * (size_t)g_size);
    if (!all) { snprintf(err, DIST_ERR_LEN, "out of memory"); return -1; }
    MPI_Request req[2];
    int rc = MPI_Iallgather(mine, 2, MPI_FLOAT, all, 2, MPI_FLOAT, g_comm, &req[1]);
    if (rc == MPI_SUCCESS && !g_nccl) rc = MPI_Ialltoallv(g, g_cnt, g_off, MPI_FLOAT, g_recv, g_rcnt, g_roff, MPI_FLOAT, g_comm, &req[0]);
    if (rc != MPI_SUCCESS) { free(all); snprintf(err, DIST_ERR_LEN, "starting the gradient exchange failed"); return -1; }
#ifdef SDLORA_CUDA
    if (g_nccl && dist_nccl_round(g, g_n, g_rounds == 0, g_timeout, err)) { free(all); return -1; }
#endif
    if ((!g_nccl && wait_req(&req[0], "summing the gradients", err)) || wait_req(&req[1], "summing the gradients", err)) { free(all); return -1; }
    int len = g_cnt[g_rank];
    for (int r = 0; r < g_size; r++) {
        const float *c = g_recv + (size_t)r * len;
        if (!g_nccl) {
            if (g_rounds == 0 && r == 0) memcpy(g_acc, c, sizeof(float) * len);
            else for (int i = 0; i < len; i++) g_acc[i] += c[i];
        }
        *loss += all[2 * r];
    }
    *stop = 0;
    for (int r = 0; r < g_size; r++) if (all[2 * r + 1] != 0.0f) *stop = 1;
    g_rounds++;
    free(all);
    return 0;
}

int dist_end(float *G, char *err) {
#ifdef SDLORA_CUDA
    if (g_nccl) return dist_nccl_end(G, g_n, g_timeout, err);
#endif
    MPI_Request req;
    int rc = MPI_Iallgatherv(g_acc, g_cnt[g_rank], MPI_FLOAT, G, g_cnt, g_off, MPI_FLOAT, g_comm, &req);
    if (rc != MPI_SUCCESS) { snprintf(err, DIST_ERR_LEN, "MPI_Iallgatherv failed"); return -1; }
    return wait_req(&req, "sharing the summed gradients", err);
}
#endif
