/* cli.c: the flag parser shared by ./train and ./sample. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cli.h"

void cli_usage(const char *usage, const cli_opt *opts, int nopts) {
    printf("%s\n\noptions:\n", usage);
    for (int i = 0; i < nopts; i++) {
        const cli_opt *o = &opts[i];
        const char *arg = o->kind == OPT_FLAG ? "" : o->kind == OPT_STR || o->kind == OPT_STRLIST ? " S"
                        : o->kind == OPT_CHOICE ? " C" : " N";
        char lhs[64];
        snprintf(lhs, sizeof lhs, "%s%s", o->name, arg);
        printf("  %-22s %s", lhs, o->help);
        if (o->kind == OPT_CHOICE) printf(" [%s]", o->choices);
        if (o->kind == OPT_INT || o->kind == OPT_U64) printf(" (default %lld)",
            o->kind == OPT_INT ? (long long)*(int *)o->dst : (long long)*(uint64_t *)o->dst);
        if (o->kind == OPT_FLOAT) printf(" (default %g)", *(float *)o->dst);
        if ((o->kind == OPT_STR || o->kind == OPT_CHOICE) && *(const char **)o->dst)
            printf(" (default %s)", *(const char **)o->dst);
        printf("\n");
    }
    printf("  %-22s %s\n", "-h, --help", "show this help");
}

static int in_choices(const char *v, const char *choices) {
    size_t n = strlen(v);
    for (const char *p = choices; *p; ) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, v, n) == 0) return 1;
        if (!bar) break;
        p = bar + 1;
    }
    return 0;
}

static int set_value(const cli_opt *o, const char *v) {
    char *end;
    errno = 0;
    switch (o->kind) {
    case OPT_INT: case OPT_U64: {
        long long x = strtoll(v, &end, 10);
        if (*v == '\0' || *end != '\0' || errno) {
            fprintf(stderr, "error: %s: '%s' is not a whole number (give e.g. %s %g)\n", o->name, v, o->name, o->min);
            return 2;
        }
        if ((double)x < o->min || (double)x > o->max) {
            fprintf(stderr, "error: %s: %lld is out of range (use %g to %g)\n", o->name, x, o->min, o->max);
            return 2;
        }
        if (o->kind == OPT_INT) *(int *)o->dst = (int)x; else *(uint64_t *)o->dst = (uint64_t)x;
        return 0;
    }
    case OPT_FLOAT: {
        double x = strtod(v, &end);
        if (*v == '\0' || *end != '\0' || errno || !isfinite(x)) {
            fprintf(stderr, "error: %s: '%s' is not a number (give e.g. %s %g)\n", o->name, v, o->name, o->min);
            return 2;
        }
        if (x < o->min || x > o->max) {
            fprintf(stderr, "error: %s: %g is out of range (use %g to %g)\n", o->name, x, o->min, o->max);
            return 2;
        }
        *(float *)o->dst = (float)x;
        return 0;
    }
    case OPT_CHOICE:
        if (!in_choices(v, o->choices)) {
            fprintf(stderr, "error: %s: unknown value '%s' (use one of %s)\n", o->name, v, o->choices);
            return 2;
        }
        *(const char **)o->dst = v;
        return 0;
    case OPT_STR:
        *(const char **)o->dst = v;
        return 0;
    case OPT_STRLIST: {
        cli_strlist *l = o->dst;
        if (l->n >= CLI_LIST_MAX) {
            fprintf(stderr, "error: %s: given more than %d times (combine the files or merge some first)\n", o->name, CLI_LIST_MAX);
            return 2;
        }
        l->v[l->n++] = v;
        return 0;
    }
    case OPT_FLAG:
        break;
    }
    return 0;
}

int cli_parse(int argc, char **argv, const cli_opt *opts, int nopts,
              const char **pos, int maxpos, int *npos, const char *usage) {
    return cli_parse_at(argc, argv, opts, nopts, pos, maxpos, npos, usage, NULL);
}

int cli_parse_at(int argc, char **argv, const cli_opt *opts, int nopts,
                 const char **pos, int maxpos, int *npos, const char *usage, int *set_at) {
    *npos = 0;
    if (set_at) memset(set_at, 0, sizeof(int) * (size_t)nopts);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) { cli_usage(usage, opts, nopts); return 1; }
        if (a[0] == '-' && a[1] != '\0') {
            /* --name=value or --name value */
            const char *eq = strchr(a, '=');
            size_t n = eq ? (size_t)(eq - a) : strlen(a);
            const cli_opt *o = NULL;
            for (int k = 0; k < nopts; k++)
                if (strlen(opts[k].name) == n && strncmp(opts[k].name, a, n) == 0) { o = &opts[k]; break; }
            if (o && set_at) set_at[o - opts] = i;
            if (!o) {
                fprintf(stderr, "error: unknown flag '%.*s' (see %s --help)\n", (int)n, a, argv[0]);
                return 2;
            }
            if (o->kind == OPT_FLAG) {
                if (eq) { fprintf(stderr, "error: %s takes no value (write just %s)\n", o->name, o->name); return 2; }
                *(int *)o->dst = 1;
                continue;
            }
            const char *v = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
            if (!v) { fprintf(stderr, "error: %s needs a value (see %s --help)\n", o->name, argv[0]); return 2; }
            int rc = set_value(o, v);
            if (rc) return rc;
        } else {
            if (*npos >= maxpos) {
                fprintf(stderr, "error: unexpected argument '%s' (see %s --help)\n", a, argv[0]);
                return 2;
            }
            pos[(*npos)++] = a;
        }
    }
    return 0;
}

void cli_format_value(char *buf, size_t n, const cli_opt *o) {
    const char *name = o->name + (strncmp(o->name, "--", 2) == 0 ? 2 : 0);
    switch (o->kind) {
    case OPT_FLAG:  snprintf(buf, n, "%s %s", name, *(int *)o->dst ? "on" : "off"); break;
    case OPT_INT:   snprintf(buf, n, "%s %d", name, *(int *)o->dst); break;
    case OPT_U64:   snprintf(buf, n, "%s %llu", name, (unsigned long long)*(uint64_t *)o->dst); break;
    case OPT_FLOAT: snprintf(buf, n, "%s %g", name, *(float *)o->dst); break;
    case OPT_STR: case OPT_CHOICE: {
        const char *v = *(const char **)o->dst;
        if (!v) snprintf(buf, n, "%s (none)", name);
        else snprintf(buf, n, strpbrk(v, " \t") ? "%s \"%s\"" : "%s %s", name, v);
        break;
    }
    case OPT_STRLIST: {
        const cli_strlist *l = o->dst;
        size_t k = (size_t)snprintf(buf, n, "%s", name);
        for (int i = 0; i < l->n && k < n; i++) k += (size_t)snprintf(buf + k, n - k, " %s", l->v[i]);
        break;
    }
    }
}

/* one group: "LABEL: a 1, b 2, ..." wrapped under 100 columns */
static void print_group(FILE *f, const char *label, const cli_opt *opts, int nopts, const int *set_at,
                        int lo, int hi, char **argv, int nfile, const char *file) {
    int col = 0;
    for (int k = 0; k < nopts; k++) {
        const cli_opt *o = &opts[k];
        if (set_at[k] < lo || set_at[k] > hi) continue;
        if ((o->kind == OPT_STR || o->kind == OPT_CHOICE) && !*(const char **)o->dst) continue;
        if (o->kind == OPT_STRLIST && ((const cli_strlist *)o->dst)->n == 0) continue;
        char item[600];
        cli_format_value(item, sizeof item, o);
        /* a command-line flag that the file also set says so */
        for (int i = 1; file && set_at[k] > nfile && i <= nfile; i++) {
            size_t len = strlen(o->name);
            if (strncmp(argv[i], o->name, len) == 0 && (argv[i][len] == 0 || argv[i][len] == '=')) {
                size_t l = strlen(item);
                snprintf(item + l, sizeof item - l, " (over %s)", file);
                break;
            }
        }
        int w = (int)strlen(item);
        if (col == 0) col = fprintf(f, "%s: %s", label, item);
        else if (col + 2 + w > 100) col = fprintf(f, ",\n    %s", item) - 2;
        else col += fprintf(f, ", %s", item);
    }
    if (col) fputc('\n', f);
}

void cli_print_sources(FILE *f, const cli_opt *opts, int nopts, const int *set_at, int argc, char **argv,
                       int nfile, const char *file) {
    char label[1100];
    if (file && nfile > 0) {
        snprintf(label, sizeof label, "settings from %.1000s", file);
        print_group(f, label, opts, nopts, set_at, 1, nfile, argv, nfile, file);
    }
    print_group(f, "settings from the command line", opts, nopts, set_at, nfile + 1, argc, argv, nfile, file);
    print_group(f, "settings by default", opts, nopts, set_at, 0, 0, argv, nfile, file);
}

void cli_fmt_duration(char *b, size_t n, double s) {
    if (!(s >= 0) || s > 359999) { snprintf(b, n, "--:--"); return; }
    int si = (int)(s + 0.5);
    if (si >= 3600) snprintf(b, n, "%d:%02d:%02d", si / 3600, si / 60 % 60, si % 60);
    else snprintf(b, n, "%d:%02d", si / 60, si % 60);
}
