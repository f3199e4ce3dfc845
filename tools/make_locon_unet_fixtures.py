#!/usr/bin/env python3
"""tests/fixtures/unet_a_locon.safetensors: conv LoRA (LoCon) through a whole
UNet, for tests/test_unet.c (unet_add_lora_conv).

Takes the tiny random model A and its inputs from tools/make_unet_fixtures.py
(tests/fixtures/unet_a, unet_a_io.safetensors) and puts peft adapters on the
modules kohya's conv_dim adds to "qv": attn to_q / to_v and each resnet's
time_emb_proj and conv_shortcut at r = 2, alpha 4; each resnet's conv1 / conv2
and the down/upsamplers' 3x3 conv at r = 3, alpha 6 (peft's LoRA Conv2d: a 3x3
down conv with the layer's stride and padding, a 1x1 up conv). lora_B random.
Saves, for L = sum(out * dout), in float64 like make_unet_fixtures.py:
  locon.out, locon.dx, locon.dctx,
  locon.{A,B,dA,dB}.<module>   A as (r, in * k * k), B as (out, r)

    /work/venv/bin/python tools/make_locon_unet_fixtures.py
"""
import os

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file, save_file

FX = "tests/fixtures"
CONV = r"resnets\.\d+\.conv[12]|(down|up)samplers\.0\.conv"
TARGETS = r".*(attn\d\.to_[qv]|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|samplers\.0\.conv)"


def main():
    torch.set_grad_enabled(True)
    io = load_file(os.path.join(FX, "unet_a_io.safetensors"))
    m = UNet2DConditionModel.from_pretrained(os.path.join(FX, "unet_a")).double().eval()
    m.add_adapter(LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=TARGETS,
                             rank_pattern={CONV: 3}, alpha_pattern={CONV: 6}))
    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    for name, p in m.named_parameters():
        p.requires_grad_("lora_" in name)
    x = io["x"].double().requires_grad_(True)
    ctx = io["ctx"].double().requires_grad_(True)
    out = m(x, io["t"].double(), encoder_hidden_states=ctx).sample
    (out * io["dout"].double()).sum().backward()
    fx = {"locon.out": out.detach(), "locon.dx": x.grad, "locon.dctx": ctx.grad}
    n3 = 0
    for name, p in m.named_parameters():
        if "lora_" not in name:
            continue
        module, rest = name.split(".lora_", 1)
        which = rest[0]
        if which == "A" and p.ndim == 4 and p.shape[2] == 3:
            n3 += 1
        fx[f"locon.{which}.{module}"] = p.detach().reshape(p.shape[0], -1)
        fx[f"locon.d{which}.{module}"] = p.grad.detach().reshape(p.shape[0], -1)
    n = sum(1 for k in fx if k.startswith("locon.A."))
    assert n3 > 0
    fx = {k: v.contiguous().float() for k, v in fx.items()}
    path = os.path.join(FX, "unet_a_locon.safetensors")
    save_file(fx, path, metadata={"generator": f"tools/make_locon_unet_fixtures.py, torch {torch.__version__}"})
    print(f"{path}: {n} adapters ({n3} 3x3), |out - out_base| max {(fx['locon.out'] - io['out']).abs().max():.3g}")


if __name__ == "__main__":
    main()
