#!/usr/bin/env python3
"""A LoRA trained by ./train, loaded by diffusers' load_lora_weights, gives
the same image as ./sample --lora (issue: "the files other tools read").

    make && /work/venv/bin/python tools/check_train_lora_diffusers.py [MODEL] [--te] [--conv]

MODEL is a diffusers folder (default tests/fixtures/gen_tiny). ./train runs a
few steps on a small data set drawn here (with --targets transformer, so
proj_in/proj_out 1x1 convs and the feed-forward are in the file too, and a
large --lr so the LoRA changes the image visibly); then the kohya-format file
it wrote is loaded by diffusers (which converts kohya keys itself) and both
generate with the Euler sampler, torch CPU generator, same seed. Prints the
largest difference in 0..255 levels and how much the LoRA changed the image.
--conv trains with --conv-rank 4 --conv-alpha 2 as well (LoCon: 3x3
lora_down on the resnets' conv1/conv2 and the samplers' conv, plus
time_emb_proj and conv_shortcut), checks that every adapter of the file
became a LoRA layer in diffusers' UNet with no key left unused, and compares
./sample --lora both as side branches and with --merge.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
TE = ["--te"] if "--te" in sys.argv else []
CONV = ["--conv-rank", "4", "--conv-alpha", "2"] if "--conv" in sys.argv else []
MODEL = ARGS[0] if ARGS else "tests/fixtures/gen_tiny"


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return r.stderr


def main():
    work = tempfile.mkdtemp()
    data = os.path.join(work, "data")
    os.makedirs(data)
    rng = np.random.default_rng(0)
    for i in range(6):
        img = np.zeros((64, 64, 3), np.uint8)
        img[:] = (30, 60, 200)
        x0, y0 = rng.integers(4, 30, 2)
        img[y0:y0 + 28, x0:x0 + 28] = (220, 40 * i, 40)
        Image.fromarray(img).save(os.path.join(data, f"{i}.png"))
        with open(os.path.join(data, f"{i}.txt"), "w") as f:
            f.write(f"a red square {i}")
    out = os.path.join(work, "out")
    run(["./train", data, "--model", MODEL, "--steps", "30", "--lr", "3e-2", "--rank", "4", "--alpha", "4",
         "--targets", "transformer", "--out", out, "--seed", "1", *TE, *CONV])
    lora = os.path.join(out, "lora.safetensors")
    from safetensors import safe_open
    with safe_open(lora, "pt") as f:
        keys = list(f.keys())
        n3 = sum(1 for k in keys if k.endswith("lora_down.weight") and len(f.get_slice(k).get_shape()) == 4
                 and f.get_slice(k).get_shape()[2] == 3)
    unet_names = sorted({k.split(".")[0] for k in keys if k.startswith("lora_unet_")})
    print(f"{lora}: {len(unet_names)} UNet adapters, {n3} of them 3x3 conv LoRA (LoCon)")

    prompt, seed, steps = "a red square", 3, 8
    png = os.path.join(work, "c.png")
    png0 = os.path.join(work, "c0.png")
    common = ["--model", MODEL, "--prompt", prompt, "--steps", str(steps), "--seed", str(seed),
              "--sampler", "euler", "--cfg", "7", "--threads", "1"]
    run(["./sample", *common, "--lora", lora, "--out", png])
    run(["./sample", *common, "--out", png0])
    pngm = os.path.join(work, "cm.png")
    run(["./sample", *common, "--lora", lora, "--merge", "--out", pngm])
    ours = np.asarray(Image.open(png).convert("RGB"), np.int32)
    oursm = np.asarray(Image.open(pngm).convert("RGB"), np.int32)
    print(f"./sample --lora side branches vs --merge: max difference {np.abs(ours - oursm).max()} levels")
    ours0 = np.asarray(Image.open(png0).convert("RGB"), np.int32)

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_pretrained(MODEL, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    # first the base model alone, then with the LoRA
    g = torch.Generator("cpu").manual_seed(seed)
    ref0 = pipe(prompt, num_inference_steps=steps, guidance_scale=7.0, height=64, width=64,
                generator=g, output_type="np").images[0]
    ref0 = np.round(ref0 * 255).astype(np.int32)
    d0 = np.abs(ours0 - ref0).max()
    print(f"base model: max |./sample - diffusers| = {d0} levels")
    # every warning diffusers / peft log while loading (unexpected or unused keys)
    import logging
    seen = []

    class Grab(logging.Handler):
        def emit(self, rec):
            # (the note that a UNet-only file has no text-encoder keys is not one)
            if rec.levelno >= logging.WARNING and not rec.getMessage().startswith("No LoRA keys associated"):
                seen.append(rec.getMessage())
    for name in ("diffusers", "peft"):
        logging.getLogger(name).addHandler(Grab())
    import warnings
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        pipe.load_lora_weights(lora)
    seen += [str(w.message) for w in ws if "unexpected" in str(w.message).lower() or "unused" in str(w.message).lower()]
    layers = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0]
    print(f"diffusers load_lora_weights: {len(layers)} LoRA layers in the UNet for the file's {len(unet_names)} "
          f"UNet adapters; warnings: {seen if seen else 'none'}")
    ok_keys = len(layers) == len(unet_names) and not seen
    g = torch.Generator("cpu").manual_seed(seed)
    ref = pipe(prompt, num_inference_steps=steps, guidance_scale=7.0, height=64, width=64,
               generator=g, output_type="np").images[0]
    ref = np.round(ref * 255).astype(np.int32)
    d = np.abs(ours - ref).max()
    print(f"with the LoRA trained by ./train, loaded by diffusers load_lora_weights: max |./sample - diffusers| = {d} levels; "
          f"the LoRA moves ./sample's image by up to {np.abs(ours - ours0).max()} levels")
    sys.exit(0 if d <= 1 and d0 <= 1 and ok_keys else 1)


if __name__ == "__main__":
    main()
