/* train.c: ./train DIR — LoRA fine-tuning of a Stable Diffusion 1.x model
 * on a folder of captioned images (article section 5).
 *
 * Data flow (see DESIGN.md): images -> VAE latents (cached) ; captions ->
 * CLIP context ; x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps ; loss =
 * mean((UNet(x_t, t, c) - eps)^2) ; gradients for LoRA A, B only ; AdamW.
 *
 * Status: flags are parsed and checked; the training loop arrives with the
 * programs issue (it needs the UNet, text encoder and VAE). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "cli.h"

typedef struct {
    const char *model, *out, *targets, *sched, *resume, *sample_prompt, *tokenizer;
    int rank, res, batch, accum, steps, epochs, warmup, save_every, sample_every, te, flip,
        random_crop, grad_ckpt, threads;
    float alpha, dropout, lr, te_lr, beta1, beta2, adam_eps, wd, clip, min_snr, noise_offset;
    uint64_t seed;
} train_args;

int main(int argc, char **argv) {
    train_args a = {
        .model = NULL, .out = "out", .targets = "qv", .sched = "constant",
        .rank = 4, .res = 0, .batch = 1, .accum = 1, .steps = 0, .epochs = 0, .warmup = 0,
        .save_every = 0, .sample_every = 0,
        .alpha = 4.0f, .dropout = 0.0f, .lr = 1e-4f, .te_lr = 5e-5f,
        .beta1 = 0.9f, .beta2 = 0.999f, .adam_eps = 1e-8f, .wd = 1e-2f, .clip = 1.0f,
        .min_snr = 0.0f, .noise_offset = 0.0f, .seed = 42,
    };
    const cli_opt opts[] = {
        {"--model", OPT_STR, &a.model, 0, 0, NULL, "base model: SD1.x .safetensors or diffusers folder (default: models/tiny)"},
        {"--tokenizer", OPT_STR, &a.tokenizer, 0, 0, NULL, "folder with vocab.json + merges.txt (single-file checkpoints)"},
        {"--out", OPT_STR, &a.out, 0, 0, NULL, "output folder for the LoRA, loss.csv, plots, state"},
        {"--targets", OPT_CHOICE, &a.targets, 0, 0, "qv|attn|transformer", "UNet layers that get a LoRA"},
        {"--te", OPT_FLAG, &a.te, 0, 0, NULL, "also train LoRA on the text encoder"},
        {"--rank", OPT_INT, &a.rank, 1, 1024, NULL, "LoRA rank r"},
        {"--alpha", OPT_FLOAT, &a.alpha, 1e-6, 1e6, NULL, "LoRA alpha (scale = alpha / rank)"},
        {"--dropout", OPT_FLOAT, &a.dropout, 0, 0.99, NULL, "dropout on the LoRA branch"},
        {"--res", OPT_INT, &a.res, 0, 4096, NULL, "training resolution, multiple of 8 (0: the model's)"},
        {"--flip", OPT_FLAG, &a.flip, 0, 0, NULL, "random horizontal flips"},
        {"--random-crop", OPT_FLAG, &a.random_crop, 0, 0, NULL, "random instead of centre crop"},
        {"--batch", OPT_INT, &a.batch, 1, 1024, NULL, "images per step"},
        {"--accum", OPT_INT, &a.accum, 1, 1024, NULL, "gradient accumulation steps"},
        {"--steps", OPT_INT, &a.steps, 0, 100000000, NULL, "optimizer steps (0: from --epochs)"},
        {"--epochs", OPT_INT, &a.epochs, 0, 1000000, NULL, "passes over the data set"},
        {"--lr", OPT_FLOAT, &a.lr, 0, 10, NULL, "UNet LoRA learning rate"},
        {"--te-lr", OPT_FLOAT, &a.te_lr, 0, 10, NULL, "text-encoder LoRA learning rate"},
        {"--scheduler", OPT_CHOICE, &a.sched, 0, 0, "constant|constant_with_warmup|cosine|linear", "learning-rate schedule"},
        {"--warmup", OPT_INT, &a.warmup, 0, 100000000, NULL, "warm-up steps"},
        {"--beta1", OPT_FLOAT, &a.beta1, 0, 0.999999, NULL, "AdamW beta1"},
        {"--beta2", OPT_FLOAT, &a.beta2, 0, 0.999999, NULL, "AdamW beta2"},
        {"--adam-eps", OPT_FLOAT, &a.adam_eps, 0, 1, NULL, "AdamW epsilon"},
        {"--weight-decay", OPT_FLOAT, &a.wd, 0, 10, NULL, "AdamW weight decay"},
        {"--clip-grad", OPT_FLOAT, &a.clip, 0, 1e9, NULL, "gradient-norm clipping (0: off)"},
        {"--min-snr-gamma", OPT_FLOAT, &a.min_snr, 0, 1e6, NULL, "min-SNR loss weighting gamma (0: off)"},
        {"--noise-offset", OPT_FLOAT, &a.noise_offset, 0, 10, NULL, "noise offset"},
        {"--seed", OPT_U64, &a.seed, 0, 9.2e18, NULL, "random seed"},
        {"--grad-checkpoint", OPT_FLAG, &a.grad_ckpt, 0, 0, NULL, "recompute activations in backward (less memory)"},
        {"--save-every", OPT_INT, &a.save_every, 0, 100000000, NULL, "save the LoRA and state every N steps (0: only at the end)"},
        {"--sample-every", OPT_INT, &a.sample_every, 0, 100000000, NULL, "sample grid every N steps"},
        {"--sample-prompt", OPT_STR, &a.sample_prompt, 0, 0, NULL, "prompt(s) for the sample grid, separated by '|'"},
        {"--resume", OPT_STR, &a.resume, 0, 0, NULL, "training state to resume from"},
        {"--threads", OPT_INT, &a.threads, 0, 4096, NULL, "CPU threads (0: all)"},
    };
    const char *pos[1]; int npos;
    int rc = cli_parse(argc, argv, opts, (int)(sizeof opts / sizeof opts[0]), pos, 1, &npos,
                       "usage: ./train DIR [options]\n"
                       "Trains a LoRA for a Stable Diffusion 1.x model on the captioned images in DIR.");
    if (rc == 1) return 0;
    if (rc) return rc;
    if (npos != 1) {
        fprintf(stderr, "error: no data folder given (run ./train DIR, e.g. ./train data/; see ./train --help)\n");
        return 2;
    }
    struct stat st;
    if (stat(pos[0], &st) != 0 || !S_ISDIR(st.st_mode)) {
        fprintf(stderr, "error: %s: not a folder (give the folder that holds your images and captions)\n", pos[0]);
        return 2;
    }
    fprintf(stderr, "error: training is not implemented in this build yet (the UNet, text encoder and VAE land first; see README.md)\n");
    return 1;
}
