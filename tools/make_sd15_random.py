#!/usr/bin/env python3
"""A full-size SD1.5-architecture model with random weights, for benchmarks
and whole-model parity checks without downloading 4 GB of real weights.

    /work/venv/bin/python tools/make_sd15_random.py [OUTDIR]     (default /tmp/sd15_random)

Writes (nothing of it belongs in the repository: about 2 GB)
  OUTDIR/sd15_random.safetensors   the original LDM single-file layout, fp16
      (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*,
      plus the extras a real v1-5-pruned-emaonly file carries)
  OUTDIR/diffusers/                the same fp16 weights as a diffusers folder
      (unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json)
  OUTDIR/vocab.json, merges.txt    the real CLIP vocabulary (49408 tokens), beside
      the single file where sd_model_load looks for it

The configs are runwayml/stable-diffusion-v1-5's (UNet, VAE) and
openai/clip-vit-large-patch14's text config. Weights are the modules' default
PyTorch initialisation (seeded), which keeps activations O(1) through the
group/layer norms, rounded to fp16 once: every copy written here holds the
same fp16 values, so both sides of a comparison load identical numbers.

The single file is verified, not trusted: diffusers' from_single_file (UNet,
VAE) and its single-file CLIP loader must give back every tensor bit for bit.
"""
import json
import os
import sys

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_ldm_fixtures import SD15_CLIP, SD15_UNET, SD15_VAE, pairs, verify  # noqa: E402
from make_tokenizer_fixtures import VOCAB_GZ, build_hf_files  # noqa: E402

# the keys of runwayml/stable-diffusion-v1-5's configs that make_ldm_fixtures
# leaves at diffusers' defaults, spelled out so the folder says what it is
UNET_CFG = dict(SD15_UNET, act_fn="silu", center_input_sample=False, downsample_padding=1,
                flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5)
VAE_CFG = dict(SD15_VAE, act_fn="silu")
CLIP_CFG = dict(SD15_CLIP, bos_token_id=0, eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5,
                projection_dim=768, torch_dtype="float32")
SCHED_CFG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None)


def ldm_extras(sd, max_pos):
    """What else a real SD1.x single file holds and loaders must skip."""
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(max_pos, dtype=torch.int64)[None]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    sched = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": torch.cat([ac.new_ones(1), ac[:-1]]),
             "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
             "log_one_minus_alphas_cumprod": (1 - ac).log(), "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
             "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt()}
    for k, v in sched.items():
        sd[k] = v.to(torch.float32)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/sd15_random"
    dfolder = os.path.join(out, "diffusers")
    os.makedirs(dfolder, exist_ok=True)

    # default init, seeded; then round to fp16 once so every copy agrees
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CFG)
    torch.manual_seed(1)
    vae = AutoencoderKL(**VAE_CFG)
    torch.manual_seed(2)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_CFG))
    for m in (unet, vae, clip):
        m.half()
    n = sum(p.numel() for p in unet.parameters())
    print(f"unet {n:,} parameters, vae {sum(p.numel() for p in vae.parameters()):,}, "
          f"clip {sum(p.numel() for p in clip.parameters()):,}")
    assert n == 859_520_964, n

    # the diffusers folder (fp16 tensors, config.json of each part)
    unet.save_pretrained(os.path.join(dfolder, "unet"))
    vae.save_pretrained(os.path.join(dfolder, "vae"))
    clip.save_pretrained(os.path.join(dfolder, "text_encoder"))
    PNDMScheduler(**SCHED_CFG).save_pretrained(os.path.join(dfolder, "scheduler"))
    tokdir = os.path.join(dfolder, "tokenizer")
    os.makedirs(tokdir, exist_ok=True)
    build_hf_files(VOCAB_GZ, tokdir)
    build_hf_files(VOCAB_GZ, out)          # beside the single file too
    with open(os.path.join(dfolder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
                   "feature_extractor": [None, None], "safety_checker": [None, None],
                   "requires_safety_checker": False,
                   "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"]}, f, indent=2)

    # the LDM single file, fp16
    rows = pairs(unet, vae, clip, SD15_UNET, SD15_VAE)
    dsd = {**unet.state_dict(), **vae.state_dict()}
    csd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in clip.state_dict().items()}
    sd = {}
    for d, l, ls, _ in rows:
        t = csd[d] if d.startswith("text_model.") else dsd[d]
        sd[l] = t.detach().reshape(ls).to(torch.float16).contiguous()
    ldm_extras(sd, SD15_CLIP["max_position_embeddings"])
    path = os.path.join(out, "sd15_random.safetensors")
    save_file(sd, path, metadata={"format": "pt"})
    print(f"{path}: {len(sd)} tensors, {os.path.getsize(path) / 2**20:.0f} MiB")
    del sd, dsd, csd

    # float32 copies for the comparison (from_single_file gives float32)
    for m in (unet, vae, clip):
        m.float()
    verify(path, dfolder, unet, vae, clip)


if __name__ == "__main__":
    sys.exit(main())
