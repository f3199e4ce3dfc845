#!/usr/bin/env python3
"""Fixtures for SD2.x single files (checkpoint.c, model.c): a tiny random
SD2-architecture model written in the original LDM single-file layout, and
what diffusers / transformers compute with it.

Run from the repository root with the project's venv:
    /work/venv/bin/python tools/make_sd2_fixtures.py

Writes
  tests/fixtures/sd2_tiny.safetensors   fp16, the SD2 LDM layout:
      model.diffusion_model.*   UNet, linear proj_in / proj_out (2-D), heads
                                64 wide (SD2's num_head_channels), 1024 -> 32 wide context
      first_stage_model.*       VAE (SD1 and SD2 share its layout)
      cond_stage_model.model.*  OpenCLIP text tower: token_embedding,
                                positional_embedding, transformer.resblocks.N
                                (fused attn.in_proj_weight / in_proj_bias,
                                ln_1, ln_2, mlp.c_fc, mlp.c_proj), ln_final,
                                text_projection, logit_scale; one resblock more
                                than the diffusers text encoder has (the
                                penultimate-layer rule: it is never run)
      plus the DDPM schedule buffers a real file carries
  tests/fixtures/sd2_tiny_ref.safetensors   reference values:
      ids (2, 77)      (as float32) the prompts tokenized as diffusers' SD2 pipeline does (pad "!")
      ctx (2, 77, 32)  StableDiffusionPipeline.encode_prompt (no guidance)
      x, t, unet_out   UNet2DConditionModel(x, t, ctx).sample
      x0, eps, t_loss, loss_v   one v-prediction training loss: DDPMScheduler
                       (v_prediction) add_noise and get_velocity, mse(UNet(x_t, t, ctx), v)

The models are random (every norm and bias too, so a tensor read into the
wrong slot shows), rounded to fp16 values so the fp16 file holds them exactly.
The LDM tensors are written from the diffusers ones by this script; the file
is then read back with diffusers' own converters (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_open_clip_checkpoint), every tensor must
come back bit-identical, and the references are computed with the models
built from what diffusers read, so they are "the diffusers model of this file".
The tokenizer is tests/fixtures/gen_tiny/tokenizer (a tiny CLIP BPE, "!" = 0).
  tests/fixtures/sd2_tiny_folder/   the same model's diffusers folder without
      weights: unet/, vae/, text_encoder/ config.json (use_linear_projection,
      attention_head_dim list, upcast_attention; gelu), scheduler/ with
      prediction_type v_prediction, tokenizer/ padding with "!"; test_sd2
      writes the weights into a copy from what it read from the single file
"""
import json
import os
import sys

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, StableDiffusionPipeline, DDIMScheduler, DDPMScheduler
from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                 convert_open_clip_checkpoint)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_ldm_fixtures import unet_to_ldm, vae_to_ldm  # noqa: E402  (the SD1 name tables, same for SD2)

OUT = "tests/fixtures"
TOK = "tests/fixtures/gen_tiny/tokenizer"

# groups 32 and heads 64 wide: what an SD2 single file implies (checkpoint.c
# assumes them); so 32 channels at least, one level, attention only in the
# mid block, to keep the file small
UNET = dict(sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),   # attention: the mid block
            block_out_channels=(32,), layers_per_block=1, attention_head_dim=(1,),
            cross_attention_dim=32, norm_num_groups=32, use_linear_projection=True,
            upcast_attention=True)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
           block_out_channels=(32,), layers_per_block=1, norm_num_groups=32, sample_size=16)
# vocab of the tiny tokenizer; 16 heads x 64 in OpenCLIP-H, here one head of 32 (< 64)
CLIP = dict(vocab_size=534, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
            bos_token_id=532, eos_token_id=533, pad_token_id=0)


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                v = torch.randn(p.shape, generator=g) / max(1.0, fan_in) ** 0.5
            p.copy_(v.half().float())


def openclip_state(clip, extra_seed):
    """transformers CLIPTextModel (L layers) -> open_clip names, L + 1 resblocks"""
    sd = {k.removeprefix("text_model."): v for k, v in clip.state_dict().items()}
    L, d = CLIP["num_hidden_layers"], CLIP["hidden_size"]
    P = "cond_stage_model.model."
    out = {P + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           P + "positional_embedding": sd["embeddings.position_embedding.weight"],
           P + "ln_final.weight": sd["final_layer_norm.weight"], P + "ln_final.bias": sd["final_layer_norm.bias"]}
    g = torch.Generator().manual_seed(extra_seed)
    for l in range(L + 1):
        r = f"{P}transformer.resblocks.{l}."
        if l < L:
            s = lambda n: sd[f"encoder.layers.{l}.{n}"]  # noqa: E731
        else:   # the last resblock: random, never run (a wrong loader that runs it fails the test)
            s = lambda n: (torch.randn(sd[f"encoder.layers.0.{n}"].shape, generator=g) * 0.3).half().float()  # noqa: E731
        for w in ("weight", "bias"):
            out[r + f"attn.in_proj_{w}"] = torch.cat([s(f"self_attn.{p}_proj.{w}") for p in "qkv"], 0)
            out[r + f"attn.out_proj.{w}"] = s(f"self_attn.out_proj.{w}")
            out[r + f"ln_1.{w}"] = s(f"layer_norm1.{w}")
            out[r + f"ln_2.{w}"] = s(f"layer_norm2.{w}")
            out[r + f"mlp.c_fc.{w}"] = s(f"mlp.fc1.{w}")
            out[r + f"mlp.c_proj.{w}"] = s(f"mlp.fc2.{w}")
    out[P + "text_projection"] = (torch.randn(d, d, generator=g) * 0.1).half().float()
    out[P + "logit_scale"] = torch.tensor(4.6052).half().float()
    return out


def main():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).eval()
    vae = AutoencoderKL(**VAE).eval()
    clip = CLIPTextModel(CLIPTextConfig(**CLIP)).eval()
    randomize(unet, 1)
    randomize(vae, 2)
    randomize(clip, 3)
    ucfg, vcfg = dict(unet.config), dict(vae.config)

    ckpt = {}
    for n, v in unet.state_dict().items():
        ckpt["model.diffusion_model." + unet_to_ldm(n, ucfg)] = v
    for n, v in vae.state_dict().items():
        ln = "first_stage_model." + vae_to_ldm(n, vcfg)
        ckpt[ln] = v.reshape(*v.shape, 1, 1) if ("mid.attn_1." in ln and v.ndim == 2) else v
    ckpt.update(openclip_state(clip, 4))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ckpt["betas"] = betas.float()
    ckpt["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    assert ckpt["model.diffusion_model.middle_block.1.proj_in.weight"].ndim == 2   # SD2: linear

    # read back with diffusers' converters: every tensor bit-identical
    u_sd = convert_ldm_unet_checkpoint(ckpt, ucfg)
    v_sd = convert_ldm_vae_checkpoint(ckpt, vcfg)
    c_sd = convert_open_clip_checkpoint(clip, ckpt)
    # transformers >= 5.6 state dicts have no "text_model." level; diffusers writes it
    c_sd = {k.removeprefix("text_model."): v for k, v in c_sd.items()
            if not k.startswith(f"text_model.encoder.layers.{CLIP['num_hidden_layers']}.")
            and k != "text_projection.weight"}
    for name, model, sd in (("unet", unet, u_sd), ("vae", vae, v_sd), ("clip", clip, c_sd)):
        own = model.state_dict()
        own = {k.removeprefix("text_model."): v for k, v in own.items() if not k.endswith("position_ids")}
        assert set(own) == set(sd), (name, set(own) ^ set(sd))
        for k in own:
            assert torch.equal(own[k], sd[k].reshape(own[k].shape)), (name, k)
    unet2 = UNet2DConditionModel(**UNET).eval(); unet2.load_state_dict(u_sd)
    vae2 = AutoencoderKL(**VAE).eval(); vae2.load_state_dict(v_sd)
    clip2 = CLIPTextModel(CLIPTextConfig(**CLIP)).eval(); clip2.load_state_dict(c_sd)
    print(f"verified: {len(u_sd) + len(v_sd) + len(c_sd)} tensors identical after diffusers' converters")

    f16 = {k: (v.half() if v.is_floating_point() and k not in ("betas", "alphas_cumprod") else v).contiguous()
           for k, v in ckpt.items()}
    for k, v in ckpt.items():
        if v.is_floating_point() and k not in ("betas", "alphas_cumprod") and k.startswith(("model.", "first", "cond")):
            assert torch.equal(f16[k].float(), v), k     # fp16 holds the values exactly
    save_file(f16, os.path.join(OUT, "sd2_tiny.safetensors"))

    # references, with the models diffusers read from the file
    tok = CLIPTokenizer.from_pretrained(TOK, pad_token="!")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                          steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae2, text_encoder=clip2, tokenizer=tok, unet=unet2, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    prompts = ["a red cat", "a small blue house by the sea"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.tensor([999, 321])
        out = unet2(x, t, encoder_hidden_states=ctx).sample
        # one v-prediction training loss, as diffusers' train_text_to_image.py
        # computes it: target = get_velocity(x0, eps, t), mse over everything
        ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             num_train_timesteps=1000, prediction_type="v_prediction")
        x0 = torch.randn(2, 4, 8, 8, generator=g)
        eps = torch.randn(2, 4, 8, 8, generator=g)
        tl = torch.tensor([50, 700])
        noisy = ddpm.add_noise(x0, eps, tl)
        target = ddpm.get_velocity(x0, eps, tl)
        pred = unet2(noisy, tl, encoder_hidden_states=ctx).sample
        loss_v = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    assert ids[0, -1].item() == 0, "SD2 pads with '!' (id 0)"
    save_file({"ids": ids.float().contiguous(), "ctx": ctx.contiguous(), "x": x,
               "t": t.float(), "unet_out": out.contiguous(),
               "x0": x0, "eps": eps, "t_loss": tl.float(), "loss_v": loss_v.reshape(1)},
              os.path.join(OUT, "sd2_tiny_ref.safetensors"))
    # the same model as a diffusers folder, without its weights (test_sd2 writes
    # them from the single file): configs, the SD2-style tokenizer, the scheduler
    F = os.path.join(OUT, "sd2_tiny_folder")
    unet2.save_config(os.path.join(F, "unet"))
    vae2.save_config(os.path.join(F, "vae"))
    clip2.config.save_pretrained(os.path.join(F, "text_encoder"))
    sched.save_config(os.path.join(F, "scheduler"))
    os.makedirs(os.path.join(F, "tokenizer"), exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(TOK, name), "rb") as src, open(os.path.join(F, "tokenizer", name), "wb") as dst:
            dst.write(src.read())
    with open(os.path.join(F, "tokenizer", "special_tokens_map.json"), "w") as fh:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
                   "unk_token": "<|endoftext|>"}, fh)
    with open(os.path.join(F, "model_index.json"), "w") as fh:
        json.dump({"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, fh, indent=1)
    n = sum(v.numel() for v in ckpt.values())
    print(f"sd2_tiny: {n} numbers, |ctx| max {ctx.abs().max():.3g}, |unet_out| max {out.abs().max():.3g}")


if __name__ == "__main__":
    main()
