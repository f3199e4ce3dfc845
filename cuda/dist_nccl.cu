// cuda/dist_nccl.cu: dist.c's gradient sum on the GPUs with NCCL (make
// CUDA=1 MPI=1): one GPU per rank, the same fixed-order sum as the MPI path
// (dist.h), so the bytes are the same whichever carries them.
//   reduce-scatter: the n floats in N equal chunks (zero-padded); rank j
//     receives chunk j of every rank (grouped ncclSend / ncclRecv: NCCL's
//     own reductions promise no order) and one kernel adds them to its
//     running sum in rank order, element by element:
//         s = acc (or chunk 0 in the first round); s += chunk 1; ...
//   all-gather: ncclAllGather of the summed chunks.
// NCCL calls are asynchronous: the stream is polled against the same
// deadline as the MPI path, and a communicator that does not finish in time
// is aborted (a rank died or hangs). Compiled to nothing without MPI.
#ifdef SDLORA_MPI
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static ncclComm_t g_comm;
static cudaStream_t g_stream;
static int g_size, g_ready;
static float *d_send, *d_recv, *d_acc, *d_all;   // (N c), (N c), (c), (N c)
static size_t g_chunk, g_cap;                     // c, and the c the buffers hold

#define ERR_LEN 512

static int cuda_fail(cudaError_t e, const char *what, char *err) {
    if (e == cudaSuccess) return 0;
    snprintf(err, ERR_LEN, "%s: %s", what, cudaGetErrorString(e));
    return -1;
}
static int nccl_fail(ncclResult_t r, const char *what, char *err) {
    if (r == ncclSuccess) return 0;
    snprintf(err, ERR_LEN, "%s: %s", what, ncclGetErrorString(r));
    return -1;
}

extern "C" size_t dist_nccl_id_bytes(void) { return sizeof(ncclUniqueId); }

// rank 0 makes the communicator's id, which MPI then broadcasts
extern "C" int dist_nccl_make_id(void *id, char *err) {
    ncclUniqueId u;
    if (nccl_fail(ncclGetUniqueId(&u), "ncclGetUniqueId", err)) return -1;
    memcpy(id, &u, sizeof u);
    return 0;
}

// this rank's GPU (its rank among the ranks of its machine, modulo the GPUs
// there) and its place in the communicator
extern "C" int dist_nccl_init(const void *id, int rank, int size, int local_rank, char *err) {
    int ndev = 0;
    if (cuda_fail(cudaGetDeviceCount(&ndev), "cudaGetDeviceCount", err)) return -1;
    if (ndev < 1) { snprintf(err, ERR_LEN, "no GPU for NCCL"); return -1; }
    if (cuda_fail(cudaSetDevice(local_rank % ndev), "cudaSetDevice", err)) return -1;
    if (cuda_fail(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking), "cudaStreamCreate", err)) return -1;
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    if (nccl_fail(ncclCommInitRank(&g_comm, size, u, rank), "ncclCommInitRank", err)) return -1;
    g_size = size; g_ready = 1;
    (void)rank;
    return 0;
}

// Wait for the stream, at most timeout seconds; a peer that is gone never
// lets it finish, so then the communicator is aborted.
static int wait_stream(double timeout, const char *what, char *err) {
    struct timespec t0, t, nap = {0, 50000};
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        cudaError_t e = cudaStreamQuery(g_stream);
        if (e == cudaSuccess) return 0;
        if (e != cudaErrorNotReady) return cuda_fail(e, what, err);
        ncclResult_t ar = ncclSuccess;
        ncclCommGetAsyncError(g_comm, &ar);
        if (ar != ncclSuccess && ar != ncclInProgress) {
            ncclCommAbort(g_comm); g_ready = 0;
            return nccl_fail(ar, what, err);
        }
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) * 1e-9 > timeout) {
            ncclCommAbort(g_comm); g_ready = 0;
            snprintf(err, ERR_LEN, "no answer from the other ranks' GPUs for %.0f s while %s (a rank died or hangs; "
                     "the last checkpoint is intact: continue with --resume; a slower cluster: raise SDLORA_DIST_TIMEOUT)",
                     timeout, what);
            return -1;
        }
        nanosleep(&nap, NULL);
    }
}

// s = first ? c_0 : acc + c_0, then s += c_r for r = 1 .. N-1: the order of
// dist.c's host loop, one element per thread (adds only, so no contraction)
__global__ void fold_chunks(float *acc, const float *recv, int nranks, size_t chunk, int first) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= chunk) return;
    float s = first ? recv[i] : acc[i] + recv[i];
    for (int r = 1; r < nranks; r++) s = s + recv[(size_t)r * chunk + i];
    acc[i] = s;
}

static int grow(size_t n, char *err) {
    size_t c = (n + g_size - 1) / g_size;
    g_chunk = c;
    if (c <= g_cap && d_send) return 0;
    cudaFree(d_send); cudaFree(d_recv); cudaFree(d_acc); cudaFree(d_all);
    d_send = d_recv = d_acc = d_all = NULL;
    size_t all = (size_t)g_size * c * sizeof(float);
    if (cuda_fail(cudaMalloc(&d_send, all), "cudaMalloc", err) || cuda_fail(cudaMalloc(&d_recv, all), "cudaMalloc", err) ||
        cuda_fail(cudaMalloc(&d_acc, c * sizeof(float)), "cudaMalloc", err) || cuda_fail(cudaMalloc(&d_all, all), "cudaMalloc", err))
        return -1;
    g_cap = c;
    // the padding past n is sent as zeros and never read back
    return cuda_fail(cudaMemset(d_send, 0, all), "cudaMemset", err);
}

// one round: this rank's gradient g (n floats, host) into the running sum
extern "C" int dist_nccl_round(const float *g, size_t n, int first, double timeout, char *err) {
    if (!g_ready) { snprintf(err, ERR_LEN, "NCCL is not set up"); return -1; }
    if (first && grow(n, err)) return -1;
    size_t c = g_chunk;
    if (cuda_fail(cudaMemcpyAsync(d_send, g, n * sizeof(float), cudaMemcpyHostToDevice, g_stream), "upload", err)) return -1;
    ncclGroupStart();
    for (int r = 0; r < g_size; r++) {
        ncclSend(d_send + (size_t)r * c, c, ncclFloat, r, g_comm, g_stream);
        ncclRecv(d_recv + (size_t)r * c, c, ncclFloat, r, g_comm, g_stream);
    }
    if (nccl_fail(ncclGroupEnd(), "ncclGroupEnd", err)) return -1;
    fold_chunks<<<(unsigned)((c + 255) / 256), 256, 0, g_stream>>>(d_acc, d_recv, g_size, c, first);
    if (cuda_fail(cudaGetLastError(), "fold_chunks", err)) return -1;
    return wait_stream(timeout, "summing the gradients (NCCL)", err);
}

// the summed chunks to every rank, into G (n floats, host)
extern "C" int dist_nccl_end(float *G, size_t n, double timeout, char *err) {
    if (nccl_fail(ncclAllGather(d_acc, d_all, g_chunk, ncclFloat, g_comm, g_stream), "ncclAllGather", err)) return -1;
    if (cuda_fail(cudaMemcpyAsync(G, d_all, n * sizeof(float), cudaMemcpyDeviceToHost, g_stream), "download", err)) return -1;
    return wait_stream(timeout, "sharing the summed gradients (NCCL)", err);
}

extern "C" void dist_nccl_free(void) {
    if (g_ready) ncclCommDestroy(g_comm);
    g_ready = 0;
    cudaFree(d_send); cudaFree(d_recv); cudaFree(d_acc); cudaFree(d_all);
    d_send = d_recv = d_acc = d_all = NULL;
    g_cap = 0;
}
#endif
