/* cli.h: table-driven command-line flags for ./train and ./sample.
 * Every bad flag or number ends in one line "error: <what>: <why> (<fix>)". */
#ifndef SDLORA_CLI_H
#define SDLORA_CLI_H

#include <stdint.h>
#include <stddef.h>
#include <stdio.h>

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
/* cli_parse, also noting in set_at[k] (nopts ints) the index in argv of
 * the flag that last set opts[k], or 0 when none did */
int cli_parse_at(int argc, char **argv, const cli_opt *opts, int nopts,
                 const char **pos, int maxpos, int *npos, const char *usage, int *set_at);
/* "rank 16", "te on", "seed 42": the flag's name and its value now */
void cli_format_value(char *buf, size_t n, const cli_opt *o);
/* The settings and where each came from, a few lines:
 *   settings from FILE: rank 16, te on, ...           (argv[1..nfile] came from FILE)
 *   settings from the command line: steps 10 (over FILE), ...
 *   settings by default: seed 42, ...
 * Strings never set (NULL) are left out. */
void cli_print_sources(FILE *f, const cli_opt *opts, int nopts, const int *set_at, int argc, char **argv,
                       int nfile, const char *file);
void cli_usage(const char *usage, const cli_opt *opts, int nopts);

/* seconds as "m:ss" or "h:mm:ss" for progress lines; "--:--" when unknown
 * (negative, NaN) or past 99 hours */
void cli_fmt_duration(char *b, size_t n, double s);

#endif
