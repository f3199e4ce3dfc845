#!/usr/bin/env python3
"""./sample against diffusers' StableDiffusionPipeline, and the CI fixture.

Run from the repository root after `make sample`, with the project's venv:
    /work/venv/bin/python tools/check_sample_diffusers.py            # check only
    /work/venv/bin/python tools/check_sample_diffusers.py --fixtures # also rewrite
        tests/fixtures/gen_tiny/, gen_lora.safetensors, gen_expected.safetensors

A tiny random SD1.x-architecture pipeline (no network):
  tokenizer  CLIP byte-level BPE: the 256 byte symbols, the same with </w>, a
             few merges, <|startoftext|> and <|endoftext|> last (as in CLIP's vocab)
  CLIP       3 layers, d 32, quick_gelu (clip skip 2 is meaningful)
  UNet       block_out (8, 16), CrossAttnDownBlock2D + DownBlock2D, heads 2,
             cross_attention_dim 32
  VAE        block_out (8, 8, 8, 8): 8x downsampling as in SD, so 64x64
             images have 8x8 latents
  scheduler  SD1.5's scheduler_config.json, written by hand (so every sampler
             class takes its own default timestep_spacing, as with SD1.5)
saved with save_pretrained. For each sampler diffusers runs the pipeline with
generator=torch.Generator("cpu").manual_seed(seed), output_type="np", and
./sample runs with the same settings; the script prints the largest
difference in 0..255 levels (diffusers' float image * 255, rounded, as its
PIL conversion does). Also a LoRA saved by diffusers' save_lora_weights
(peft adapters on the UNet attention and the text encoder), applied by
diffusers' load_lora_weights with scale 0.8 and by ./sample --lora FILE:0.8
(side branch), with --merge, and as a <lora:name:0.8> prompt tag.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

FIX = "tests/fixtures"
SAMPLE = os.environ.get("SAMPLE", "./sample")

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# (name for ./sample, diffusers class, extra kwargs, karras flag)
SAMPLERS = [
    ("ddim", DDIMScheduler, {}, 0),
    ("ddpm", DDPMScheduler, {}, 0),
    ("euler", EulerDiscreteScheduler, {}, 0),
    ("euler", EulerDiscreteScheduler, {"use_karras_sigmas": True}, 1),
    ("euler_a", EulerAncestralDiscreteScheduler, {}, 0),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}, 0),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, 1),
]


def bytes_to_unicode():
    """GPT-2 / CLIP's reversible byte -> printable symbol map"""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer(d):
    os.makedirs(d, exist_ok=True)
    syms = list(bytes_to_unicode().values())
    vocab = syms + [s + "</w>" for s in syms]
    merges = [("c", "a"), ("ca", "t</w>"), ("r", "e"), ("re", "d</w>"), ("c", "i"),
              ("ci", "r"), ("cir", "c"), ("circ", "l"), ("circl", "e</w>"), ("a", "n"),
              ("an", "d</w>"), ("b", "l"), ("bl", "u"), ("blu", "e</w>"), ("s", "q"),
              ("t", "h"), ("th", "e</w>"), ("o", "n</w>"), ("o", "f</w>"), ("p", "a")]
    for a, b in merges:
        vocab.append(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                         model_max_length=77), len(vocab)


def randomise(model, gen):
    """default inits leave norms at 1/0 and biases small; make every weight
    random so no path is trivial, scaled like the default init"""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def build(folder):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    tdir = os.path.join(tempfile.mkdtemp(), "tok")
    tok, nvocab = write_tokenizer(tdir)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=nvocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=nvocab - 2, eos_token_id=nvocab - 1, pad_token_id=nvocab - 1,
        projection_dim=32))
    randomise(te, gen)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
        cross_attention_dim=32, norm_num_groups=4)
    randomise(unet, gen)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64)
    randomise(vae, gen)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    # SD1.5's scheduler file, not the DDIM one save_pretrained wrote
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD15_SCHEDULER, f, indent=2)
    # transformers 5 saves only tokenizer.json; SD1.5's folder (and tokenizer.c)
    # has the slow tokenizer's vocab.json + merges.txt beside it
    for f in ("vocab.json", "merges.txt"):
        with open(os.path.join(tdir, f)) as src, open(os.path.join(folder, "tokenizer", f), "w") as dst:
            dst.write(src.read())
    # the CLIP tokenizer pads with <|endoftext|>; say so the way SD1.5's folder does
    with open(os.path.join(folder, "tokenizer", "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)


def load(folder, cls, kw):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = cls.from_pretrained(folder, subfolder="scheduler", **kw)
    pipe.set_progress_bar_config(disable=True)
    te = pipe.text_encoder
    if not hasattr(te, "text_model"):
        # transformers 5 flattened CLIPTextModel, but diffusers' clip_skip path
        # still reads text_encoder.text_model.final_layer_norm (not registered
        # as a submodule, so no cycle in state_dict)
        object.__setattr__(te, "text_model", te)
    return pipe


def run_diffusers(pipe, case, **extra):
    g = torch.Generator("cpu").manual_seed(case["seed"])
    texts = dict(prompt=case["prompt"], negative_prompt=case["negative"] or None)
    if case["clip_skip"] > 1:
        # diffusers' clip_skip (ours - 1) reaches only the positive prompt: its
        # encode_prompt encodes the negative with the last layer. A1111, whose
        # "Clip skip" this is, skips layers for both, and so does ./sample; so
        # both embeddings are made here with the skip and handed to the pipeline.
        pos, _ = pipe.encode_prompt(case["prompt"], "cpu", 1, False, clip_skip=case["clip_skip"] - 1)
        neg, _ = pipe.encode_prompt(case["negative"], "cpu", 1, False, clip_skip=case["clip_skip"] - 1)
        texts = dict(prompt_embeds=pos, negative_prompt_embeds=neg)
    out = pipe(**texts, num_inference_steps=case["steps"], guidance_scale=case["cfg"],
               height=case["size"], width=case["size"], num_images_per_prompt=case["batch"],
               generator=g, output_type="np", **extra).images
    return np.round(out * 255).astype(np.int32)          # (B, H, W, 3)


def run_sample(folder, case, sampler, karras, extra_args=()):
    with tempfile.TemporaryDirectory() as d:
        outp = os.path.join(d, "x.png")
        cmd = [SAMPLE, "--model", folder, "--prompt", case["prompt"], "--negative", case["negative"],
               "--steps", str(case["steps"]), "--cfg", str(case["cfg"]), "--seed", str(case["seed"]),
               "--width", str(case["size"]), "--height", str(case["size"]),
               "--batch", str(case["batch"]), "--sampler", sampler, "--clip-skip",
               str(case["clip_skip"]), "--out", outp, "--threads", "1", *extra_args]
        if karras:
            cmd.append("--karras")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"./sample failed: {' '.join(cmd)}\n{r.stderr}")
        imgs = []
        for b in range(case["batch"]):
            p = outp if b == 0 else outp[:-4] + f"-{b}.png"
            imgs.append(np.asarray(Image.open(p).convert("RGB"), dtype=np.int32))
        return np.stack(imgs)


def add_lora(folder, path):
    """a peft LoRA on the UNet attention and the text encoder, random A and B,
    saved with diffusers' save_lora_weights (peft key format)"""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                   requires_safety_checker=False)
    torch.manual_seed(5)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    # (peft directly: transformers 5's add_adapter wants a newer peft than diffusers')
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                            pipe.text_encoder)
    with torch.no_grad():                   # a visible effect: B of the order of W
        for n, p in list(pipe.unet.named_parameters()) + list(pipe.text_encoder.named_parameters()):
            if "lora_B" in n:
                p.mul_(3.0)
    d = os.path.dirname(path)
    StableDiffusionPipeline.save_lora_weights(
        d, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        weight_name=os.path.basename(path), safe_serialization=True)


def main():
    write_fix = "--fixtures" in sys.argv
    work = tempfile.mkdtemp()
    folder = os.path.join(FIX, "gen_tiny") if write_fix else os.path.join(work, "gen_tiny")
    build(folder)
    lora_path = os.path.join(FIX if write_fix else work, "gen_lora.safetensors")
    add_lora(folder, lora_path)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
    print(f"model folder {folder}: {size} bytes; LoRA {os.path.getsize(lora_path)} bytes")

    base = dict(prompt="a red circle and the blue cat", negative="", steps=8, cfg=7.5,
                seed=42, size=64, batch=1, clip_skip=1)
    cases = []
    for name, cls, kw, karras in SAMPLERS:
        c = dict(base)
        if name == "euler_a":
            c.update(batch=2, negative="blue square", seed=7)
        if name == "ddim":
            c.update(clip_skip=2, steps=10)
        if name == "ddpm":
            c.update(cfg=1.0)             # no guidance: the single-batch UNet path
        cases.append((name, cls, kw, karras, c))

    expected = {}
    worst = 0
    for name, cls, kw, karras, c in cases:
        ref = run_diffusers(load(folder, cls, kw), c)
        got = run_sample(folder, c, name, karras)
        diff = int(np.abs(ref - got).max())
        worst = max(worst, diff)
        tag = name + ("_karras" if karras else "")
        print(f"{tag:16s} steps {c['steps']:2d} cfg {c['cfg']:4.1f} batch {c['batch']} clip_skip "
              f"{c['clip_skip']}: max |diff| = {diff} levels (image range {ref.min()}..{ref.max()}, "
              f"{int((ref != got).sum())} of {ref.size} values differ)")
        expected[tag] = ref

    # LoRA: diffusers' side-branch adapters with scale 0.8 (UNet and text encoder)
    c = dict(base, seed=3)
    pipe = load(folder, EulerDiscreteScheduler, {})
    pipe.load_lora_weights(os.path.dirname(lora_path), weight_name=os.path.basename(lora_path))
    ref = run_diffusers(pipe, c, cross_attention_kwargs={"scale": 0.8})
    plain = run_diffusers(load(folder, EulerDiscreteScheduler, {}), c)
    print(f"LoRA effect on the image: max |with - without| = {int(np.abs(ref - plain).max())} levels")
    for label, args, prompt in [
            ("lora side branch", ["--lora", lora_path + ":0.8"], c["prompt"]),
            ("lora --merge", ["--lora", lora_path + ":0.8", "--merge"], c["prompt"]),
            ("lora prompt tag", ["--lora-dir", os.path.dirname(lora_path)],
             c["prompt"] + " <lora:gen_lora:0.8>")]:
        got = run_sample(folder, dict(c, prompt=prompt), "euler", 0, args)
        diff = int(np.abs(ref - got).max())
        worst = max(worst, diff)
        print(f"{label:16s}: max |diff| = {diff} levels")
    expected["lora_euler"] = ref

    if write_fix:
        t = {k: torch.from_numpy(np.ascontiguousarray(v.astype(np.uint8))) for k, v in expected.items()}
        meta = {k: json.dumps(c) for (name, _, _, karras, c) in cases
                for k in [name + ("_karras" if karras else "")]}
        meta["lora_euler"] = json.dumps(dict(c, lora_scale=0.8))
        save_file(t, os.path.join(FIX, "gen_expected.safetensors"), metadata=meta)
        print("wrote", os.path.join(FIX, "gen_expected.safetensors"))
    print(f"worst: {worst} levels")
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
