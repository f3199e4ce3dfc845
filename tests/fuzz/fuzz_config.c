/* fuzz_config.c: the model config loaders. The first byte picks the file,
 * the rest is its text: 0 text_encoder/config.json (clip_config_parse),
 * 1 unet/config.json (unet_config_from_json), 2 vae/config.json
 * (vae_config_from_json), 3 scheduler/scheduler_config.json (model.c's
 * load_scheduler, reached by including model.c: the fuzz build links the
 * library without model.o for this harness). Nothing is allocated from a
 * config here: only the parse and the checks. */
#include "fuzz_util.h"
#include "../../model.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    if (n < 1) return 0;
    int kind = data[0] % 4;
    const char *text = (const char *)data + 1;
    size_t len = n - 1;
    char *b = malloc(len ? len : 1);        /* exact size, not NUL-terminated */
    if (!b) return 0;
    if (len) memcpy(b, text, len);
    char err[4096] = "";
    int rc = 0;
    if (kind == 0) {
        clip_config c;
        rc = clip_config_parse(&c, b, len, "config.json", err);
    } else if (kind <= 2) {
        char jerr[256];
        json *j = json_parse(b, len, jerr, sizeof jerr);
        if (j) {
            if (kind == 1) { unet_config c; rc = unet_config_from_json(&c, j, err); }
            else { vae_config c; rc = vae_config_from_json(&c, j, err); }
            json_free(j);
        }
    } else {
        const char *sub = fuzz_path(0, "scheduler");
        mkdir(sub, 0700);
        fuzz_write(fuzz_path(1, "scheduler/scheduler_config.json"), b, len);
        sd_model m;
        memset(&m, 0, sizeof m);
        rc = load_scheduler(&m, fuzz_dir(), err);
        ddpm_free(&m.sched);
    }
    if (rc && (!err[0] || strchr(err, '\n'))) abort();
    free(b);
    return 0;
}
