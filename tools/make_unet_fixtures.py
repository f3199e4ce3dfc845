#!/usr/bin/env python3
"""Reference fixtures for unet.c, from diffusers' UNet2DConditionModel and peft.

Run from the repository root with the project's venv:
    /work/venv/bin/python tools/make_unet_fixtures.py

Two tiny random-weight models with different shapes:
  A: block_out (8, 16), one layer per block, attention_head_dim 2 (= heads),
     1x1-conv proj_in/proj_out, cross_attention_dim 16
  B: block_out (8, 8, 8), two layers per block, attention_head_dim (2, 4, 8)
     per block (checks which block's head count each up block takes),
     transformer_layers_per_block (1, 2, 1), use_linear_projection,
     cross_attention_dim 24, freq_shift 1, flip_sin_to_cos False
(The channel counts are tiny so each weight file stays under 400 KB.)
Each is saved with save_pretrained into tests/fixtures/unet_X/ and its
inputs, output and autograd gradients into tests/fixtures/unet_X_io.safetensors:
  x (2, 4, 8, 8), t (2), ctx (2, 5, cross_dim), out, dout (random), dx, dctx
  for the plain model, with L = sum(out * dout), and for each LoRA variant V
  (peft adapters, r = 2, lora_alpha = 4, lora_B randomised):
  V.out, V.dx, V.dctx, V.A.<module>, V.B.<module>, V.dA.<module>, V.dB.<module>
  (A, B and their gradients flattened to (r, in) and (out, r)).
Every weight is random (norms around 1, conv_out and proj_out included), so no
path through the network is zero.
For model A only, tests/fixtures/unet_a_grads.safetensors holds the autograd
gradient of the same L with respect to every parameter of the plain model
(full fine-tuning), under the parameter's diffusers name (52,004 floats).
"""
import copy
import json
import os

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import save_file

OUT = "tests/fixtures"

TARGETS = {
    "qv": ["to_q", "to_v"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                    "ff.net.0.proj", "ff.net.2"],
}


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:   # group / layer norm scale
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:               # roughly unit-variance activations
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def run(model, x, t, ctx, dout, dtype=torch.float64):
    """out and autograd's dL/dx, dL/dctx for L = sum(out * dout), by default
    in float64: the weights and inputs are the float32 values saved in the
    files, carried exactly into float64, so the reference carries no rounding
    of its own and the tests measure only the C code's float32 error. (main
    prints how far torch's own float32 run is from it, for comparison.)"""
    model = model.to(dtype)
    x = x.detach().to(dtype).clone().requires_grad_(True)
    ctx = ctx.detach().to(dtype).clone().requires_grad_(True)
    t, dout = t.to(dtype), dout.to(dtype)
    out = model(x, t, encoder_hidden_states=ctx).sample
    (out * dout).sum().backward()
    return out.detach(), x.grad.detach(), ctx.grad.detach()


def full_grads(model, x, t, ctx, dout, dtype=torch.float64):
    """dL/dW for every parameter, L = sum(out * dout), as run() computes it"""
    model = model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    out = model(x.to(dtype), t.to(dtype), encoder_hidden_states=ctx.to(dtype)).sample
    (out * dout.to(dtype)).sum().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def lora_grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if "lora_" in n}


def make(tag, cfg, seed, variants):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**cfg).float().eval()
    randomize(model, seed)
    d = os.path.join(OUT, "unet_" + tag)
    model.save_pretrained(d, safe_serialization=True)

    g = torch.Generator().manual_seed(seed + 1)
    B, h = 2, 8
    x = torch.randn(B, cfg["in_channels"], h, h, generator=g)
    t = torch.tensor([37.0, 801.0])
    ctx = torch.randn(B, 5, cfg["cross_attention_dim"], generator=g)
    dout = torch.randn(B, cfg["out_channels"], h, h, generator=g)
    out, dx, dctx = run(copy.deepcopy(model), x, t, ctx, dout)
    o32, dx32, dc32 = run(copy.deepcopy(model), x, t, ctx, dout, torch.float32)
    print(f"unet_{tag}: torch float32 vs float64: out {rel(o32, out):.2g}, dx {rel(dx32, dx):.2g}, "
          f"dctx {rel(dc32, dctx):.2g}")
    io = {"x": x, "t": t, "ctx": ctx, "dout": dout, "out": out, "dx": dx, "dctx": dctx}

    if tag == "a":
        gw = full_grads(copy.deepcopy(model), x, t, ctx, dout)
        gw32 = full_grads(copy.deepcopy(model), x, t, ctx, dout, torch.float32)
        worst = max(gw, key=lambda k: rel(gw32[k], gw[k]))
        print(f"unet_{tag}: {len(gw)} weight gradients, torch float32 vs float64 worst "
              f"{rel(gw32[worst], gw[worst]):.2g} ({worst})")
        save_file({k: v.contiguous().float() for k, v in gw.items()},
                  os.path.join(OUT, f"unet_{tag}_grads.safetensors"))

    for v in variants:
        m = copy.deepcopy(model)
        m.add_adapter(LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=TARGETS[v]))
        # B = 0 would leave A without a gradient; 0.1 keeps the adapters a
        # perturbation of the model, as trained ones are
        gl = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gl))
        for name, p in m.named_parameters():
            p.requires_grad_("lora_" in name)
        m32 = copy.deepcopy(m)
        o32, dx32, dc32 = run(m32, x, t, ctx, dout, torch.float32)
        g32 = lora_grads(m32)
        out_l, dx_l, dctx_l = run(m, x, t, ctx, dout)
        g64 = lora_grads(m)
        print(f"  {tag}/{v}: torch float32 vs float64: out {rel(o32, out_l):.2g}, dx {rel(dx32, dx_l):.2g}, "
              f"dctx {rel(dc32, dctx_l):.2g}, worst lora grad "
              f"{max(rel(g32[k], g64[k]) for k in g64):.2g}")
        io[v + ".out"], io[v + ".dx"], io[v + ".dctx"] = out_l, dx_l, dctx_l
        n = 0
        for name, p in m.named_parameters():
            if "lora_" not in name:
                continue
            # "<module>.lora_A.default.weight" -> V.A.<module>
            module, rest = name.split(".lora_", 1)
            which = rest[0]
            io[f"{v}.{which}.{module}"] = p.detach().reshape(p.shape[0], p.shape[1])
            io[f"{v}.d{which}.{module}"] = p.grad.detach().reshape(p.shape[0], p.shape[1])
            n += 1
        print(f"  {tag}/{v}: {n // 2} adapters, |out - out_base| max "
              f"{(out_l - out).abs().max().item():.3g}")

    io = {k: v.contiguous().float() for k, v in io.items()}
    save_file(io, os.path.join(OUT, f"unet_{tag}_io.safetensors"))
    nparam = sum(p.numel() for p in model.parameters())
    blk = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    print(f"unet_{tag}: {nparam} parameters, down_blocks.0 attn1 heads={blk.heads}, "
          f"|out| max {out.abs().max().item():.3g}")


COMMON = dict(in_channels=4, out_channels=4, sample_size=8, flip_sin_to_cos=True, freq_shift=0,
              norm_eps=1e-5)

CFG_A = dict(COMMON,
             block_out_channels=(8, 16), layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             attention_head_dim=2, cross_attention_dim=16, norm_num_groups=4)

CFG_B = dict(COMMON,
             block_out_channels=(8, 8, 8), layers_per_block=2,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
             attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 1),
             cross_attention_dim=24, norm_num_groups=4, use_linear_projection=True,
             freq_shift=1, flip_sin_to_cos=False)

if __name__ == "__main__":
    torch.set_grad_enabled(True)
    make("a", CFG_A, 1234, ["qv", "transformer"])
    make("b", CFG_B, 4321, ["transformer"])
