/* profile.c: the per-kind time table (see profile.h). */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "profile.h"
#ifdef _OPENMP
#include <omp.h>
#endif

int prof_on = 0;
/* SDLORA_PROFILE=cpu: CPU time (all threads) instead of wall time. On a
 * machine other jobs share, wall time per kind swells with their load; with
 * OMP_NUM_THREADS=1 the CPU time is the kind's own cost, and two builds
 * compare on it even when they cannot run on an idle machine. */
static int prof_cpu = 0;

static double secs[PROF_NKINDS][2], flops[PROF_NKINDS][2];
static long calls[PROF_NKINDS][2];
static const char *kind_name[PROF_NKINDS] = {
    "conv kxk", "linear/1x1", "lora A,B", "attention", "norm", "elementwise"
};

static double now(void) {
    struct timespec ts;
    clock_gettime(prof_cpu ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int prof_init(void) {
    const char *e = getenv("SDLORA_PROFILE");
    if (e && *e && strcmp(e, "0") != 0) prof_on = 1;
    prof_cpu = e && strcmp(e, "cpu") == 0;
    return prof_on;
}

void prof_enable(int on) { prof_on = on != 0; }

void prof_reset(void) {
    memset(secs, 0, sizeof secs);
    memset(flops, 0, sizeof flops);
    memset(calls, 0, sizeof calls);
}

static int counted(void) {
    if (!prof_on) return 0;             /* off: one branch per primitive, nothing more */
#ifdef _OPENMP
    if (omp_in_parallel()) return 0;
#endif
    return 1;
}

double prof_begin(void) { return counted() ? now() : 0.0; }

void prof_end(prof_kind k, int backward, double t0, double f) {
    if (t0 == 0.0 || !counted()) return;
    secs[k][backward != 0] += now() - t0;
    flops[k][backward != 0] += f;
    calls[k][backward != 0]++;
}

void prof_get(prof_kind k, int backward, double *seconds, double *nflops, long *ncalls) {
    int d = backward != 0;
    if (seconds) *seconds = secs[k][d];
    if (nflops) *nflops = flops[k][d];
    if (ncalls) *ncalls = calls[k][d];
}

double prof_total(void) {
    double t = 0;
    for (int k = 0; k < PROF_NKINDS; k++) t += secs[k][0] + secs[k][1];
    return t;
}

void prof_print(FILE *f, const char *title, double wall) {
    double total = prof_total();
    if (total <= 0) return;
    /* the caller's wall time does not compare with CPU seconds: no "other" */
    if (prof_cpu) wall = 0;
    if (wall > total) total = wall;
    fprintf(f, "profile: %s (SDLORA_PROFILE=%s)\n", title, prof_cpu ? "cpu, CPU seconds" : "1");
    fprintf(f, "  %-12s %-8s %8s %10s %7s %9s\n", "kind", "pass", "calls", "seconds", "share", "GFLOP/s");
    for (int d = 0; d < 2; d++)
        for (int k = 0; k < PROF_NKINDS; k++) {
            if (!calls[k][d]) continue;
            double s = secs[k][d];
            fprintf(f, "  %-12s %-8s %8ld %10.3f %6.1f%%", kind_name[k], d ? "backward" : "forward",
                    calls[k][d], s, 100.0 * s / total);
            if (flops[k][d] > 0 && s > 0) fprintf(f, " %9.1f\n", flops[k][d] / s * 1e-9);
            else fprintf(f, " %9s\n", "-");
        }
    if (wall > 0)
        fprintf(f, "  %-12s %-8s %8s %10.3f %6.1f%%\n", "other", "", "", wall - prof_total(),
                100.0 * (wall - prof_total()) / total);
    fprintf(f, "  %-12s %-8s %8s %10.3f\n", "all", "", "", total);
}
