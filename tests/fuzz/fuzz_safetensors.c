/* fuzz_safetensors.c: the safetensors reader on a whole file: header,
 * offsets, every tensor converted to float32 and fp16, the metadata looked
 * up by each of its keys, and the single-file checkpoint detection that
 * reads names and shapes (ldm_detect, ldm_infer_file). */
#include "fuzz_util.h"
#include "safetensors.h"
#include "checkpoint.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    const char *path = fuzz_path(0, "f.safetensors");
    fuzz_write(path, data, n);
    st_file f;
    char err[ST_ERR_LEN];
    if (st_open(&f, path, err)) {
        if (!err[0] || strchr(err, '\n')) abort();
        return 0;
    }
    for (int i = 0; i < f.ntensors; i++) {
        const st_tensor *t = &f.tensors[i];
        if (st_find(&f, t->name) != t) abort();
        if (t->numel > (1u << 20)) continue;    /* the bytes are checked to be there; skip big copies */
        float *x = malloc((t->numel ? t->numel : 1) * sizeof *x);
        uint16_t *h = malloc((t->numel ? t->numel : 1) * sizeof *h);
        if (x && h) {
            (void)st_to_f32(t, x, err);
            (void)st_to_f16(t, h, err);
            (void)st_read_f32(&f, t->name, t->ndim, t->shape, x, err);
        }
        free(x); free(h);
    }
    for (int i = 0; i < f.nmeta; i++)
        if (!st_meta(&f, f.meta_keys[i])) abort();
    (void)st_meta(&f, "format");
    (void)st_meta(&f, "lora_adapter_metadata");
    if (ldm_detect(&f, err)) {
        ldm_arch a;
        (void)ldm_infer_file(&f, &a, err);
    }
    st_close(&f);
    return 0;
}
