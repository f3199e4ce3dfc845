/* test_clip.c: the CLIP text model against transformers / diffusers / peft
 * (fixtures from tools/make_clip_fixtures.py), a finite-difference check of
 * the LoRA gradients, and malformed model folders. Full fine-tuning
 * (clip_alloc_grads): every parameter's gradient of clip_a against autograd
 * (clip_a_grads.safetensors), clip_skip and LoRA alongside, and finite
 * differences on single weights of clip_b. */
#include <unistd.h>
#include "testutil.h"
#include "clip.h"

#ifndef FD_H
#define FD_H 3e-3f          /* finite-difference step of the full-grads checks */
#endif

/* ---- helpers ------------------------------------------------------------ */

typedef struct {
    clip_t m;
    st_file io;
    int B, T;
    int *ids;
} fx_model;

static void fx_model_open(fx_model *f, const char *tag) {
    char dir[256], io[64], err[ST_ERR_LEN];
    snprintf(dir, sizeof dir, FIXTURE_DIR "clip_%s", tag);
    snprintf(io, sizeof io, "clip_%s_io.safetensors", tag);
    ck_assert_msg(clip_load_hf(&f->m, dir, err) == 0, "%s", err);
    fx_open(&f->io, io);
    const st_tensor *t = st_find(&f->io, "ids");
    ck_assert(t && t->dtype == ST_I32 && t->ndim == 2);
    f->B = (int)t->shape[0]; f->T = (int)t->shape[1];
    f->ids = malloc(sizeof(int) * t->numel);
    memcpy(f->ids, t->data, sizeof(int) * t->numel);   /* I32 little-endian, as this machine */
}

static void fx_model_close(fx_model *f) {
    clip_free(&f->m);
    st_close(&f->io);
    free(f->ids);
}

static size_t out_numel(const fx_model *f) { return (size_t)f->B * f->T * f->m.config.hidden_size; }

/* LoRA r=2, alpha=4 with A and B copied from the peft fixture */
static void fx_add_lora(fx_model *f, float dropout) {
    char err[ST_ERR_LEN], key[160];
    ck_assert_msg(clip_add_lora(&f->m, 2, 4.0f, dropout, 7, err) == 0, "%s", err);
    ck_assert_int_eq(clip_num_adapters(&f->m), 6 * f->m.config.num_layers);
    for (int i = 0; i < clip_num_adapters(&f->m); i++) {
        clip_adapter *a = clip_adapter_at(&f->m, i);
        lora_t *L = &a->L;
        snprintf(key, sizeof key, "lora.%s.A", a->name);
        float *A = fx_get(&f->io, key, (size_t)L->r * L->in);
        snprintf(key, sizeof key, "lora.%s.B", a->name);
        float *Bm = fx_get(&f->io, key, (size_t)L->out * L->r);
        memcpy(L->A, A, sizeof(float) * L->r * L->in);
        memcpy(L->B, Bm, sizeof(float) * L->out * L->r);
        free(A); free(Bm);
    }
    ck_assert(clip_adapter_at(&f->m, clip_num_adapters(&f->m)) == NULL);
}

/* ---- forward parity ------------------------------------------------------ */

static void check_forward(const char *tag) {
    fx_model f;
    fx_model_open(&f, tag);
    size_t n = out_numel(&f);
    int C = f.m.config.hidden_size;
    float *out = malloc(sizeof(float) * n), *pooled = malloc(sizeof(float) * f.B * C);

    ck_assert_msg(clip_forward(&f.m, out, f.ids, f.B, f.T, 1) == 0, "%s", f.m.err);
    float *ref = fx_get(&f.io, "last_hidden_state", n);
    double e = rel_err(out, ref, n);
    printf("clip_%s last_hidden_state rel_err %.3g\n", tag, e);
    ck_assert_msg(e < 1e-4, "clip_%s last_hidden_state rel_err %g", tag, e);
    free(ref);

    clip_pooled(&f.m, pooled, out, f.ids, f.B, f.T);
    ref = fx_get(&f.io, "pooled", (size_t)f.B * C);
    e = rel_err(pooled, ref, (size_t)f.B * C);
    printf("clip_%s pooled rel_err %.3g\n", tag, e);
    ck_assert_msg(e < 1e-4, "clip_%s pooled rel_err %g", tag, e);
    free(ref);

    /* ours k == diffusers encode_prompt(clip_skip = k - 1) */
    for (int k = 2; k <= f.m.config.num_layers; k++) {
        char key[16];
        snprintf(key, sizeof key, "skip%d", k);
        if (!st_find(&f.io, key)) continue;
        ck_assert_msg(clip_forward(&f.m, out, f.ids, f.B, f.T, k) == 0, "%s", f.m.err);
        ref = fx_get(&f.io, key, n);
        e = rel_err(out, ref, n);
        printf("clip_%s clip_skip %d rel_err %.3g\n", tag, k, e);
        ck_assert_msg(e < 1e-4, "clip_%s clip_skip %d rel_err %g", tag, k, e);
        /* and it is not just the last layer again */
        float *last = fx_get(&f.io, "last_hidden_state", n);
        ck_assert(rel_err(out, last, n) > 1e-2);
        free(last); free(ref);
    }
    free(out); free(pooled);
    fx_model_close(&f);
}

START_TEST(test_forward_a) { check_forward("a"); }
END_TEST
START_TEST(test_forward_b) { check_forward("b"); }
END_TEST

/* ---- LoRA forward + backward parity with peft ---------------------------- */

static void check_lora(const char *tag, const char *prefix, int clip_skip) {
    fx_model f;
    fx_model_open(&f, tag);
    fx_add_lora(&f, 0.0f);
    size_t n = out_numel(&f);
    float *out = malloc(sizeof(float) * n);
    char key[160];

    ck_assert_msg(clip_forward(&f.m, out, f.ids, f.B, f.T, clip_skip) == 0, "%s", f.m.err);
    snprintf(key, sizeof key, "%s.out", prefix);
    float *ref = fx_get(&f.io, key, n);
    double e = rel_err(out, ref, n);
    printf("clip_%s %s forward rel_err %.3g\n", tag, prefix, e);
    ck_assert_msg(e < 1e-4, "clip_%s %s out rel_err %g", tag, prefix, e);
    free(ref);

    float *dout = fx_get(&f.io, "dout", n);
    clip_zero_grad(&f.m);
    ck_assert_msg(clip_backward(&f.m, dout) == 0, "%s", f.m.err);
    double worst = 0;
    int nzero = 0;
    for (int i = 0; i < clip_num_adapters(&f.m); i++) {
        clip_adapter *a = clip_adapter_at(&f.m, i);
        lora_t *L = &a->L;
        size_t na = (size_t)L->r * L->in, nb = (size_t)L->out * L->r;
        snprintf(key, sizeof key, "%s.%s.dA", prefix, a->name);
        float *dA = fx_get(&f.io, key, na);
        snprintf(key, sizeof key, "%s.%s.dB", prefix, a->name);
        float *dB = fx_get(&f.io, key, nb);
        double ea, eb;
        if (a->layer >= f.m.config.num_layers - clip_skip + 1) {
            /* a skipped layer: the reference is exactly zero and so must we be */
            for (size_t j = 0; j < na; j++) ck_assert(L->dA[j] == 0.0f && dA[j] == 0.0f);
            for (size_t j = 0; j < nb; j++) ck_assert(L->dB[j] == 0.0f && dB[j] == 0.0f);
            ea = eb = 0; nzero++;
        } else {
            ea = rel_err(L->dA, dA, na);
            eb = rel_err(L->dB, dB, nb);
        }
        ck_assert_msg(ea < 1e-3 && eb < 1e-3, "clip_%s %s %s: dA rel_err %g, dB rel_err %g",
                      tag, prefix, a->name, ea, eb);
        if (ea > worst) worst = ea;
        if (eb > worst) worst = eb;
        free(dA); free(dB);
    }
    ck_assert_int_eq(nzero, 6 * (clip_skip - 1));
    printf("clip_%s %s worst LoRA gradient rel_err %.3g over %d adapters\n", tag, prefix, worst,
           clip_num_adapters(&f.m));

    /* backward accumulates: a second call doubles every gradient */
    clip_adapter *a0 = clip_adapter_at(&f.m, 0);
    float g0 = a0->L.dA[1];
    ck_assert_msg(clip_backward(&f.m, dout) == 0, "%s", f.m.err);
    ck_assert(fabsf(a0->L.dA[1] - 2 * g0) <= 1e-6f * fabsf(g0) + 1e-12f);

    free(dout); free(out);
    fx_model_close(&f);
}

START_TEST(test_lora_a) { check_lora("a", "lora", 1); }
END_TEST
START_TEST(test_lora_a_skip2) { check_lora("a", "lora_skip2", 2); }
END_TEST
START_TEST(test_lora_b) { check_lora("b", "lora", 1); }
END_TEST

/* ---- finite differences -------------------------------------------------- */

typedef struct { fx_model *f; float *out, *R; size_t n; int clip_skip; } fd_ctx;

static double fd_loss(void *p) {
    fd_ctx *c = p;
    ck_assert(clip_forward(&c->f->m, c->out, c->f->ids, c->f->B, c->f->T, c->clip_skip) == 0);
    return dot_d(c->out, c->R, c->n);
}

START_TEST(test_lora_gradcheck) {
    /* config b (gelu), independent of any fixture gradient: L = sum(out * R) */
    fx_model f;
    fx_model_open(&f, "b");
    fx_add_lora(&f, 0.0f);
    size_t n = out_numel(&f);
    fd_ctx c = {&f, malloc(sizeof(float) * n), malloc(sizeof(float) * n), n, 1};
    fill_uniform(c.R, n, -1, 1, 99);
    fd_loss(&c);
    clip_zero_grad(&f.m);
    ck_assert(clip_backward(&f.m, c.R) == 0);
    /* first layer's q_proj (deepest path), a middle one, the last fc2 */
    int which[3] = {CLIP_Q, CLIP_NPROJ + CLIP_O, clip_num_adapters(&f.m) - 1};
    /* eps: layer 0's q_proj A bends the loss through two softmaxes and a
     * layer norm; its central difference has truncation error 0.01 at
     * eps = 1e-2 and 0.09 at 3e-2, while below ~1e-3 float32 rounding of
     * the loss (about 36 here) dominates. 3e-3 sits between the two. */
    double worst = 0;
    for (int w = 0; w < 3; w++) {
        lora_t *L = &clip_adapter_at(&f.m, which[w])->L;
        double ea = grad_check(L->A, L->dA, (size_t)L->r * L->in, fd_loss, &c, 3e-3f, 1e-2, 6);
        double eb = grad_check(L->B, L->dB, (size_t)L->out * L->r, fd_loss, &c, 3e-3f, 1e-2, 6);
        if (ea > worst) worst = ea;
        if (eb > worst) worst = eb;
    }
    printf("clip_b LoRA finite-difference worst error %.3g\n", worst);
    ck_assert_msg(worst < 2e-2, "finite-difference error %g", worst);
    free(c.out); free(c.R);
    fx_model_close(&f);
}
END_TEST

/* ---- dropout: off in inference, on (and seeded) in training ---------------- */

START_TEST(test_lora_dropout) {
    fx_model f;
    fx_model_open(&f, "b");
    fx_add_lora(&f, 0.5f);
    size_t n = out_numel(&f);
    float *o1 = malloc(sizeof(float) * n), *o2 = malloc(sizeof(float) * n);
    float *ref = fx_get(&f.io, "lora.out", n);
    f.m.training = 0;
    ck_assert(clip_forward(&f.m, o1, f.ids, f.B, f.T, 1) == 0);
    ck_assert(rel_err(o1, ref, n) < 1e-4);          /* no dropout outside training */
    f.m.training = 1;
    ck_assert(clip_forward(&f.m, o2, f.ids, f.B, f.T, 1) == 0);
    ck_assert(rel_err(o2, ref, n) > 1e-3);          /* dropout changed the LoRA branch */
    float *dout = fx_get(&f.io, "dout", n);
    clip_zero_grad(&f.m);
    ck_assert(clip_backward(&f.m, dout) == 0);
    for (size_t i = 0; i < f.m.num_lora_params; i++) ck_assert(isfinite(f.m.lora_grads[i]));
    free(dout); free(ref); free(o1); free(o2);
    fx_model_close(&f);
}
END_TEST

/* ---- full fine-tuning: a gradient for every parameter -------------------- */

START_TEST(test_full_grads_a) {
    fx_model f;
    fx_model_open(&f, "a");
    clip_t *m = &f.m;
    size_t n = out_numel(&f), np = m->num_params;
    float *out = malloc(sizeof(float) * n), *dout = fx_get(&f.io, "dout", n);
    ck_assert(m->grads == NULL);
    ck_assert_msg(clip_alloc_grads(m) == 0, "%s", m->err);
    clip_zero_grads(m);
    /* no LoRA needed now: the weights train */
    ck_assert(clip_forward(m, out, f.ids, f.B, f.T, 1) == 0);
    ck_assert_msg(clip_backward(m, dout) == 0, "%s", m->err);

    st_file gf;
    fx_open(&gf, "clip_a_grads.safetensors");
    ck_assert_int_eq(gf.ntensors, m->ntable);
    double worst = 0;
    const char *worst_name = "";
    for (int i = 0; i < m->ntable; i++) {
        const clip_param *p = &m->table[i];
        float *ref = fx_get(&gf, p->name, p->numel);
        double e = rel_err(m->grads + p->offset, ref, p->numel);
        if (i == 0) {
            /* token embedding: exactly zero on the rows of ids never seen */
            int C = m->config.hidden_size, seen_rows = 0;
            for (int v = 0; v < m->config.vocab_size; v++) {
                int seen = 0;
                for (int k = 0; k < f.B * f.T; k++) seen |= f.ids[k] == v;
                seen_rows += seen;
                for (int j = 0; j < C && !seen; j++)
                    ck_assert(m->grads[p->offset + (size_t)v * C + j] == 0.0f && ref[(size_t)v * C + j] == 0.0f);
            }
            printf("clip_a token embedding: %d of %d rows seen\n", seen_rows, m->config.vocab_size);
        }
        if (strstr(p->name, "k_proj.bias")) {
            /* softmax(q (k_j + b)) = softmax(q k_j): a key bias does not change
             * attention, its true gradient is 0 and both sides hold rounding
             * only (the float64 reference up to 1.4e-6). Compare its size with
             * the layer's q_proj.bias gradient (two tensors before it). */
            const clip_param *qb = &m->table[i - 2];
            ck_assert(strstr(qb->name, "q_proj.bias") != NULL);
            double mk = 0, mq = 0;
            for (size_t j = 0; j < p->numel; j++) mk = fmax(mk, fabs(m->grads[p->offset + j]));
            for (size_t j = 0; j < qb->numel; j++) mq = fmax(mq, fabs(m->grads[qb->offset + j]));
            printf("  %-40s max |g| %.3g (q_proj.bias %.3g)\n", p->name, mk, mq);
            ck_assert_msg(mk < 1e-4 * mq, "%s: %g", p->name, mk);
            free(ref);
            continue;
        }
        free(ref);
        if (!(e <= worst)) { worst = e; worst_name = p->name; }
        ck_assert_msg(e < 1e-3, "%s: rel_err %g", p->name, e);
    }
    printf("clip_a all %d weight gradients (but k_proj.bias): worst rel_err %.3g (%s)\n", m->ntable, worst,
           worst_name);
    st_close(&gf);

    /* backward accumulates: a second call doubles every gradient */
    float *g1 = malloc(sizeof(float) * np), *g2 = malloc(sizeof(float) * np);
    memcpy(g1, m->grads, sizeof(float) * np);
    ck_assert(clip_backward(m, dout) == 0);
    for (size_t i = 0; i < np; i++) g2[i] = 2.0f * g1[i];
    ck_assert(rel_err(m->grads, g2, np) < 1e-6);

    /* clip_skip 2: the last layer is not run and gets nothing; every other
     * tensor gets a gradient */
    clip_zero_grads(m);
    ck_assert(clip_forward(m, out, f.ids, f.B, f.T, 2) == 0);
    ck_assert(clip_backward(m, dout) == 0);
    int last = m->config.num_layers - 1;
    char prefix[64];
    snprintf(prefix, sizeof prefix, "encoder.layers.%d.", last);
    for (int i = 0; i < m->ntable; i++) {
        const clip_param *p = &m->table[i];
        double s = 0;
        for (size_t j = 0; j < p->numel; j++) s += fabsf(m->grads[p->offset + j]);
        if (strncmp(p->name, prefix, strlen(prefix)) == 0) ck_assert_msg(s == 0, "%s", p->name);
        else ck_assert_msg(s > 0, "%s has no gradient", p->name);
    }

    /* with LoRA as well: the adapters' gradients are those of LoRA alone
     * (computed first with the weights frozen again) */
    free(m->grads);
    m->grads = NULL;
    fx_add_lora(&f, 0.0f);
    ck_assert(clip_forward(m, out, f.ids, f.B, f.T, 1) == 0);
    clip_zero_grad(m);
    ck_assert(clip_backward(m, dout) == 0);
    float *dl = malloc(sizeof(float) * m->num_lora_params);
    memcpy(dl, m->lora_grads, sizeof(float) * m->num_lora_params);
    ck_assert(clip_alloc_grads(m) == 0);
    clip_zero_grad(m);
    ck_assert(clip_forward(m, out, f.ids, f.B, f.T, 1) == 0);
    ck_assert(clip_backward(m, dout) == 0);
    ck_assert(memcmp(dl, m->lora_grads, sizeof(float) * m->num_lora_params) == 0);
    /* and the weights' gradients now differ from the plain model's (the
     * adapters change the function) but are finite */
    double d = rel_err(m->grads, g1, np);
    printf("clip_a full grads with LoRA vs without: rel diff %.3g\n", d);
    ck_assert(d > 1e-3 && isfinite(d));

    free(dl); free(g1); free(g2); free(out); free(dout);
    fx_model_close(&f);
}
END_TEST

/* Finite differences on clip_b (gelu, independent of any fixture gradient),
 * plain and with LoRA: for a tensor of every kind, its largest-gradient
 * entry, error |a - n| / (|a| + |n| + 1): the loss (about 36) rounds at
 * ~1e-5, which the atol of 1 keeps out of the measure for small entries. */
static void check_full_fd(int with_lora) {
    fx_model f;
    fx_model_open(&f, "b");
    if (with_lora) {
        fx_add_lora(&f, 0.0f);
    }
    clip_t *m = &f.m;
    size_t n = out_numel(&f);
    fd_ctx c = {&f, malloc(sizeof(float) * n), malloc(sizeof(float) * n), n, 1};
    fill_uniform(c.R, n, -1, 1, 99);
    ck_assert(clip_alloc_grads(m) == 0);
    clip_zero_grads(m);
    fd_loss(&c);
    ck_assert(clip_backward(m, c.R) == 0);
    float *g = malloc(sizeof(float) * m->num_params);
    memcpy(g, m->grads, sizeof(float) * m->num_params);
    static const char *names[] = {
        "embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
        "encoder.layers.0.layer_norm1.weight", "encoder.layers.0.self_attn.q_proj.weight",
        "encoder.layers.0.self_attn.k_proj.weight", "encoder.layers.1.self_attn.v_proj.bias",
        "encoder.layers.0.self_attn.v_proj.weight",
        "encoder.layers.0.self_attn.out_proj.weight", "encoder.layers.0.layer_norm2.bias",
        "encoder.layers.0.mlp.fc1.weight", "encoder.layers.1.mlp.fc1.bias",
        "encoder.layers.1.mlp.fc2.weight", "final_layer_norm.weight", "final_layer_norm.bias",
    };
    double worst = 0;
    for (size_t k = 0; k < sizeof names / sizeof *names; k++) {
        const clip_param *p = NULL;
        for (int i = 0; i < m->ntable; i++) if (strcmp(m->table[i].name, names[k]) == 0) p = &m->table[i];
        ck_assert_msg(p != NULL, "%s", names[k]);
        const float *gt = g + p->offset;
        size_t best = 0;
        for (size_t i = 1; i < p->numel; i++) if (fabsf(gt[i]) > fabsf(gt[best])) best = i;
        double num = entry_fd(m->params + p->offset + best, fd_loss, &c, FD_H);
        double e = fabs(gt[best] - num) / (fabs(gt[best]) + fabs(num) + 1.0);
        printf("  %-44s [%5zu] %9.4f vs %9.4f: %.2g\n", names[k], best, gt[best], num, e);
        if (e > worst) worst = e;
    }
    printf("clip_b full grads%s, finite differences: worst %.3g\n", with_lora ? " with LoRA" : "", worst);
    ck_assert_msg(worst < 1e-2, "finite-difference error %g", worst);
    free(g); free(c.out); free(c.R);
    fx_model_close(&f);
}

START_TEST(test_full_grads_fd) { check_full_fd(0); }
END_TEST
START_TEST(test_full_grads_fd_lora) { check_full_fd(1); }
END_TEST

/* ---- fp16 weights: the same model with every weight rounded to fp16 ------- */

static void write_model(const char *dir, const clip_t *m, st_dtype dt, int skip, int bad_shape) {
    char path[512], err[ST_ERR_LEN];
    st_writer *w = st_writer_new();
    ck_assert(w);
    for (int i = 0; i < m->ntable; i++) {
        const clip_param *p = &m->table[i];
        if (i == skip) continue;
        char name[128];
        snprintf(name, sizeof name, "text_model.%s", p->name);
        int64_t shape[2] = {p->shape[0], p->shape[1]};
        if (i == bad_shape) { shape[0] = p->shape[1]; shape[1] = p->shape[0]; }   /* transposed */
        ck_assert(st_writer_add_f32(w, name, dt, p->ndim, shape, m->params + p->offset) == 0);
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ck_assert_msg(st_writer_save(w, path, err) == 0, "%s", err);
    st_writer_free(w);
}

static void write_text(const char *dir, const char *file, const char *text, size_t len) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *fp = fopen(path, "wb");
    ck_assert(fp);
    ck_assert(fwrite(text, 1, len, fp) == len);
    fclose(fp);
}

static char *slurp(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    ck_assert(fp);
    fseek(fp, 0, SEEK_END);
    *len = (size_t)ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *b = malloc(*len + 1);
    ck_assert(fread(b, 1, *len, fp) == *len);
    fclose(fp);
    return b;
}

static void rm_dir(const char *dir) {
    char path[512];
    const char *files[] = {"config.json", "model.safetensors", "model.safetensors.tmp"};
    for (int i = 0; i < 3; i++) { snprintf(path, sizeof path, "%s/%s", dir, files[i]); unlink(path); }
    rmdir(dir);
}

START_TEST(test_fp16_weights) {
    fx_model f;
    fx_model_open(&f, "b");
    char dir[] = "/tmp/test_clip_XXXXXX", err[ST_ERR_LEN];
    ck_assert(mkdtemp(dir));
    size_t len;
    char *cfg = slurp(FIXTURE_DIR "clip_b/config.json", &len);
    write_text(dir, "config.json", cfg, len);
    free(cfg);
    write_model(dir, &f.m, ST_F16, -1, -1);
    clip_t h;
    ck_assert_msg(clip_load_hf(&h, dir, err) == 0, "%s", err);
    /* the expected model: the fp32 one rounded through fp16 here */
    for (size_t i = 0; i < f.m.num_params; i++) f.m.params[i] = st_f16_to_f32(st_f32_to_f16(f.m.params[i]));
    size_t n = out_numel(&f);
    float *o1 = malloc(sizeof(float) * n), *o2 = malloc(sizeof(float) * n);
    ck_assert(clip_forward(&f.m, o1, f.ids, f.B, f.T, 1) == 0);
    ck_assert(clip_forward(&h, o2, f.ids, f.B, f.T, 1) == 0);
    ck_assert_msg(memcmp(o1, o2, sizeof(float) * n) == 0, "fp16 load differs: rel_err %g", rel_err(o2, o1, n));
    float *ref = fx_get(&f.io, "last_hidden_state", n);
    double e = rel_err(o2, ref, n);
    printf("clip_b with fp16 weights vs fp32 reference rel_err %.3g\n", e);
    ck_assert(e > 0 && e < 2e-2);   /* close, but really rounded */
    free(ref); free(o1); free(o2);
    clip_free(&h);
    rm_dir(dir);
    fx_model_close(&f);
}
END_TEST

/* ---- malformed inputs ------------------------------------------------------ */

/* load dir, expect failure with every one of the phrases in the message */
static void expect_fail(const char *dir, const char *must1, const char *must2) {
    clip_t m;
    char err[ST_ERR_LEN] = "";
    ck_assert_int_eq(clip_load_hf(&m, dir, err), -1);
    ck_assert_msg(err[0] != 0, "empty error message");
    ck_assert_msg(!must1 || strstr(err, must1), "error \"%s\" lacks \"%s\"", err, must1);
    ck_assert_msg(!must2 || strstr(err, must2), "error \"%s\" lacks \"%s\"", err, must2);
    ck_assert(m.params == NULL);   /* nothing leaks (ASan would see it too) */
}

START_TEST(test_bad_config) {
    char dir[] = "/tmp/test_clip_XXXXXX";
    ck_assert(mkdtemp(dir));
    expect_fail(dir, "config.json", "cannot open");        /* no config.json at all */
    size_t len;
    char *cfg = slurp(FIXTURE_DIR "clip_a/config.json", &len);
    for (size_t cut = 0; cut < len; cut += 37) {            /* truncated JSON */
        write_text(dir, "config.json", cfg, cut);
        expect_fail(dir, "config.json", NULL);
    }
    static const struct { const char *json, *must; } bad[] = {
        {"{\"hidden_size\": 30, \"num_attention_heads\": 4}", "multiple"},
        {"{\"hidden_act\": \"relu\"}", "hidden_act"},
        {"{\"hidden_act\": 3}", "hidden_act"},
        {"{\"num_hidden_layers\": -1}", "num_hidden_layers"},
        {"{\"vocab_size\": \"1000\"}", "vocab_size"},
        {"{\"hidden_size\": 1e30}", "hidden_size"},
        {"{\"intermediate_size\": 64.5}", "intermediate_size"},
        {"{\"layer_norm_eps\": -1}", "layer_norm_eps"},
        {"[1, 2]", "object"},
        {"{\"a\": 1} trailing", "JSON"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_text(dir, "config.json", bad[i].json, strlen(bad[i].json));
        expect_fail(dir, bad[i].must, NULL);
    }
    /* a good config but no weights */
    write_text(dir, "config.json", cfg, len);
    expect_fail(dir, "model.safetensors", NULL);
    free(cfg);
    rm_dir(dir);
}
END_TEST

START_TEST(test_bad_weights) {
    fx_model f;
    fx_model_open(&f, "a");
    char dir[] = "/tmp/test_clip_XXXXXX";
    ck_assert(mkdtemp(dir));
    size_t len;
    char *cfg = slurp(FIXTURE_DIR "clip_a/config.json", &len);
    write_text(dir, "config.json", cfg, len);
    free(cfg);
    /* a missing tensor: the error names it */
    int miss = 2 + 16 + 12;     /* layer 1 mlp.fc1.weight */
    write_model(dir, &f.m, ST_F32, miss, -1);
    expect_fail(dir, "encoder.layers.1.mlp.fc1.weight", "missing");
    /* a misshapen tensor (fc2 transposed: right size, wrong shape) */
    int bad = 2 + 16 * 2 + 14;  /* layer 2 mlp.fc2.weight */
    write_model(dir, &f.m, ST_F32, -1, bad);
    expect_fail(dir, "encoder.layers.2.mlp.fc2.weight", "shape");
    /* the good file loads */
    write_model(dir, &f.m, ST_F32, -1, -1);
    clip_t h;
    char err[ST_ERR_LEN];
    ck_assert_msg(clip_load_hf(&h, dir, err) == 0, "%s", err);
    ck_assert(memcmp(h.params, f.m.params, sizeof(float) * h.num_params) == 0);
    clip_free(&h);
    /* truncated: every cut of the header, a spread of cuts through the data */
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    char *full = slurp(FIXTURE_DIR "clip_a/model.safetensors", &len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | (uint8_t)full[i];
    for (size_t cut = 0; cut < len; cut = cut < 8 + hlen ? cut + 97 : cut + len / 13) {
        FILE *fp = fopen(path, "wb");
        ck_assert(fp && fwrite(full, 1, cut, fp) == cut);
        fclose(fp);
        expect_fail(dir, "model.safetensors", NULL);
    }
    free(full);
    rm_dir(dir);
    fx_model_close(&f);
}
END_TEST

START_TEST(test_bad_forward_args) {
    fx_model f;
    fx_model_open(&f, "b");
    size_t n = out_numel(&f);
    float *out = malloc(sizeof(float) * n);
    int T = f.T;
    ck_assert_int_eq(clip_forward(&f.m, out, f.ids, f.B, T, 0), -1);           /* clip_skip 0 */
    ck_assert_int_eq(clip_forward(&f.m, out, f.ids, f.B, T, 3), -1);           /* > layers */
    ck_assert_int_eq(clip_forward(&f.m, out, f.ids, 1, 17, 1), -1);            /* T > max_pos 16 */
    int save = f.ids[3];
    f.ids[3] = 500;                                                             /* = vocab */
    ck_assert_int_eq(clip_forward(&f.m, out, f.ids, f.B, T, 1), -1);
    ck_assert(strstr(f.m.err, "vocabulary"));
    f.ids[3] = -1;
    ck_assert_int_eq(clip_forward(&f.m, out, f.ids, f.B, T, 1), -1);
    f.ids[3] = save;
    /* backward without LoRA, or without a forward after adding it */
    ck_assert(clip_forward(&f.m, out, f.ids, f.B, T, 1) == 0);
    ck_assert_int_eq(clip_backward(&f.m, out), -1);
    char err[ST_ERR_LEN];
    ck_assert(clip_add_lora(&f.m, 2, 4.0f, 0.0f, 1, err) == 0);
    ck_assert_int_eq(clip_add_lora(&f.m, 2, 4.0f, 0.0f, 1, err), -1);
    ck_assert_int_eq(clip_backward(&f.m, out), -1);
    /* a shorter sequence after a longer one reuses the arena */
    ck_assert(clip_forward(&f.m, out, f.ids, 1, 5, 1) == 0);
    ck_assert(clip_backward(&f.m, out) == 0);
    /* names kohya maps to lora_te_text_model_encoder_layers_1_mlp_fc2 */
    ck_assert_str_eq(clip_adapter_at(&f.m, 0)->name, "text_model.encoder.layers.0.self_attn.q_proj");
    ck_assert_str_eq(clip_adapter_at(&f.m, 11)->name, "text_model.encoder.layers.1.mlp.fc2");
    free(out);
    fx_model_close(&f);
}
END_TEST

static Suite *clip_suite(void) {
    Suite *s = suite_create("clip");
    TCase *tc = tcase_create("clip");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_forward_a);
    tcase_add_test(tc, test_forward_b);
    tcase_add_test(tc, test_lora_a);
    tcase_add_test(tc, test_lora_a_skip2);
    tcase_add_test(tc, test_lora_b);
    tcase_add_test(tc, test_lora_gradcheck);
    tcase_add_test(tc, test_lora_dropout);
    tcase_add_test(tc, test_full_grads_a);
    tcase_add_test(tc, test_full_grads_fd);
    tcase_add_test(tc, test_full_grads_fd_lora);
    tcase_add_test(tc, test_fp16_weights);
    tcase_add_test(tc, test_bad_config);
    tcase_add_test(tc, test_bad_weights);
    tcase_add_test(tc, test_bad_forward_args);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(clip_suite)
