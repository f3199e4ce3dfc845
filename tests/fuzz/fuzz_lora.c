/* fuzz_lora.c: a LoRA file (lora_file_load): kohya and diffusers / peft key
 * names, pairs, shapes, alphas (float or integer scalars), and peft's alpha
 * in the "lora_adapter_metadata" JSON. A loaded file's numbers are all read. */
#include "fuzz_util.h"
#include "lora.h"
#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    const char *path = fuzz_path(0, "l.safetensors");
    fuzz_write(path, data, n);
    lora_file lf;
    char err[ST_ERR_LEN];
    if (lora_file_load(path, &lf, err)) {
        if (!err[0] || strchr(err, '\n')) abort();
        return 0;
    }
    volatile float s = 0;
    for (int i = 0; i < lf.n; i++) {
        const lora_entry *e = &lf.e[i];
        if (e->r < 1 || e->in < 1 || e->out < 1 || lora_file_find(&lf, e->name) == NULL) abort();
        for (size_t k = 0; k < (size_t)e->r * (size_t)e->in; k++) s += e->A[k];
        for (size_t k = 0; k < (size_t)e->out * (size_t)e->r; k++) s += e->B[k];
        s += e->alpha;
    }
    lora_file_free(&lf);
    return 0;
}
