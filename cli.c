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
    *npos = 0;
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
