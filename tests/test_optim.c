/* test_optim.c: AdamW, learning-rate schedules and gradient clipping against
 * torch.optim.AdamW, diffusers' get_scheduler and clip_grad_norm_
 * (tests/fixtures/optim.safetensors, tools/make_optim_fixtures.py). */
#include "testutil.h"
#include "optim.h"

START_TEST(test_adamw_torch) {
    st_file f; fx_open(&f, "optim.safetensors");
    float *p = fx_get(&f, "adamw.p0", 37), *g = fx_get(&f, "adamw.grads", 6 * 37);
    float *lrs = fx_get(&f, "adamw.lrs", 6), *want = fx_get(&f, "adamw.params", 6 * 37);
    adamw_t o;
    ck_assert(adamw_init(&o, 37, 1e-2f, 0.9f, 0.99f, 1e-8f, 0.05f) == 0);
    for (int s = 0; s < 6; s++) {
        adamw_step(&o, p, g + s * 37, lrs[s]);
        double e = rel_err(p, want + s * 37, 37);
        ck_assert_msg(e < 1e-6, "AdamW step %d: rel err %g", s + 1, e);
    }
    ck_assert_int_eq(o.step, 6);
    adamw_free(&o);
    free(p); free(g); free(lrs); free(want);
    st_close(&f);
}
END_TEST

START_TEST(test_schedules_diffusers) {
    st_file f; fx_open(&f, "optim.safetensors");
    const char *names[] = {"constant", "constant_with_warmup", "linear", "cosine"};
    for (int k = 0; k < 4; k++) {
        char key[64]; snprintf(key, sizeof key, "sched.%s", names[k]);
        float *want = fx_get(&f, key, 30);
        lr_schedule s;
        ck_assert(lr_schedule_from_name(names[k], &s) == 0);
        for (int i = 0; i < 30; i++)
            ck_assert_msg(fabsf(lr_at(s, 3e-4f, i, 7, 30) - want[i]) <= 1e-7f * 3e-4f + 1e-12f,
                          "%s step %d: %g vs %g", names[k], i, lr_at(s, 3e-4f, i, 7, 30), want[i]);
        free(want);
    }
    lr_schedule s;
    ck_assert(lr_schedule_from_name("polynomial", &s) != 0);
    st_close(&f);
}
END_TEST

START_TEST(test_clip_torch) {
    st_file f; fx_open(&f, "optim.safetensors");
    float *g = fx_get(&f, "clip.g", 100), *want = fx_get(&f, "clip.out", 100);
    float norm = clip_grad_norm(g, 100, 1.0f);
    ck_assert_float_eq_tol(norm, fx_scalar(&f, "clip.norm"), 1e-5f * norm);
    ck_assert_double_lt(rel_err(g, want, 100), 1e-6);
    /* below the limit nothing changes; max_norm 0 is off */
    float h[3] = {0.1f, 0.2f, 0.2f};
    ck_assert_float_eq_tol(clip_grad_norm(h, 3, 1.0f), 0.3f, 1e-6f);
    ck_assert(h[0] == 0.1f && h[2] == 0.2f);
    ck_assert_float_eq_tol(clip_grad_norm(g, 100, 0.0f), 1.0f, 1e-5f);
    free(g); free(want);
    st_close(&f);
}
END_TEST

static Suite *optim_suite(void) {
    Suite *s = suite_create("optim");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_adamw_torch);
    tcase_add_test(tc, test_schedules_diffusers);
    tcase_add_test(tc, test_clip_torch);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(optim_suite)
