/* cli.h: table-driven command-line flags for ./train and ./sample.
 * Every bad flag or number ends in one line "error: <what>: <why> (<fix>)". */
#ifndef SDLORA_CLI_H
#define SDLORA_CLI_H

#include <stdint.h>
#include <stddef.h>

typedef enum { OPT_FLAG, OPT_INT, OPT_FLOAT, OPT_U64, OPT_STR, OPT_CHOICE, OPT_STRLIST } opt_kind;

/* OPT_STRLIST: a flag that may be given several times (./sample --lora) */
#define CLI_LIST_MAX 32
typedef struct { const char *v[CLI_LIST_MAX]; int n; } cli_strlist;

typedef struct {
    const char *name;     /* "--rank" */
    opt_kind kind;
    void *dst;            /* int*, float*, uint64_t*, const char**, cli_strlist* */
    double min, max;      /* accepted range for numbers */
    const char *choices;  /* OPT_CHOICE: "a|b|c" */
    const char *help;
} cli_opt;

/* Parse argv against opts. Positional arguments go to pos[0..maxpos-1].
 * Returns 0 on success, 1 when --help was asked (usage printed), or 2 on a
 * bad flag (one-line error printed to stderr). */
int cli_parse(int argc, char **argv, const cli_opt *opts, int nopts,
              const char **pos, int maxpos, int *npos, const char *usage);
void cli_usage(const char *usage, const cli_opt *opts, int nopts);

#endif
