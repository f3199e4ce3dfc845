#!/usr/bin/env python3
"""torch.optim.AdamW steps, diffusers' learning-rate schedules and
clip_grad_norm_ on small tensors, for tests/test_optim.c.

    python tools/make_optim_fixtures.py
"""
import os

import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "optim.safetensors")
torch.manual_seed(0)
t = {}

# AdamW: 6 steps with changing gradients and learning rates
p = torch.randn(37)
t["adamw.p0"] = p.clone()
p = torch.nn.Parameter(p)
opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
grads, lrs, after = [], [], []
for s in range(6):
    g = torch.randn(37) * (0.1 * (s + 1))
    lr = 1e-2 * (0.5 ** s)
    for group in opt.param_groups:
        group["lr"] = lr
    p.grad = g.clone()
    opt.step()
    grads.append(g); lrs.append(lr); after.append(p.detach().clone())
t["adamw.grads"] = torch.stack(grads)
t["adamw.lrs"] = torch.tensor(lrs, dtype=torch.float32)
t["adamw.params"] = torch.stack(after)

# schedules: 30 steps, 7 warm-up
for name in ["constant", "constant_with_warmup", "linear", "cosine"]:
    q = torch.nn.Parameter(torch.zeros(1))
    o = torch.optim.SGD([q], lr=3e-4)
    sch = get_scheduler(name, optimizer=o, num_warmup_steps=7, num_training_steps=30)
    vals = []
    for _ in range(30):
        vals.append(o.param_groups[0]["lr"])
        o.step(); sch.step()
    t[f"sched.{name}"] = torch.tensor(vals, dtype=torch.float32)

# gradient clipping
g = torch.randn(100) * 3
t["clip.g"] = g.clone()
q = torch.nn.Parameter(torch.zeros(100)); q.grad = g.clone()
norm = torch.nn.utils.clip_grad_norm_([q], max_norm=1.0)
t["clip.norm"] = norm.reshape(1).float()
t["clip.out"] = q.grad.clone()

save_file({k: v.contiguous().float() for k, v in t.items()}, OUT, metadata={"torch": torch.__version__})
print("wrote", OUT)
