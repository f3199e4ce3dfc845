#!/usr/bin/env python3
"""Run the article's library calls against the pinned reference stack
(tools/requirements.txt) and print what happens. NOTES.md cites this output.

    python tools/check_article.py
"""
import math
import diffusers
import peft
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model

print("versions: torch", torch.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__)

# a tiny UNet with SD1.x's block structure (random weights; names are what matter)
unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
names = [n for n, _ in unet.named_modules()]

# article 3.2: target_modules=["q_proj", "v_proj"], task_type="IMAGE_GENERATION"
print("3.2  UNet has modules named *q_proj:", any(n.endswith("q_proj") for n in names),
      "| *to_q:", any(n.endswith("to_q") for n in names))
print("3.2  peft task types:", [t.value for t in peft.TaskType])
try:
    LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
               bias="none", task_type="IMAGE_GENERATION")
    print("3.2  LoraConfig(task_type='IMAGE_GENERATION'): accepted")
except Exception as e:  # noqa: BLE001 - we print whatever the library says
    print("3.2  LoraConfig(task_type='IMAGE_GENERATION'):", type(e).__name__, str(e)[:120])
try:
    get_peft_model(unet, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    print("3.2  get_peft_model with q_proj/v_proj: accepted")
except Exception as e:  # noqa: BLE001
    print("3.2  get_peft_model with q_proj/v_proj:", type(e).__name__, str(e)[:120])

# article 5.3.1 / 5.4.2 imports
print("5.3.1 diffusers.CLIPTextModel exists:", hasattr(diffusers, "CLIPTextModel"))
print("5.4.2 diffusers.DataLoader exists:", hasattr(diffusers, "DataLoader"))

# article 2.2: "new parameters 2rdk" vs r(d+k)
d = k = 4096; r = 4
print(f"2.2  d=k=4096, r=4: 2rdk = {2*r*d*k:,} (more than dk = {d*k:,});"
      f" r(d+k) = {r*(d+k):,} = {100*r*(d+k)/(d*k):.3f}% of dk")

# article 4.1/4.2: alpha is not a parameter of peft's LoRA layer
m = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
trainable = [n for n, p in m.named_parameters() if p.requires_grad]
print("4.1  peft trainable tensors:", trainable)
print("4.1  scaling (a float, not a Parameter):", m.base_model.model[0].scaling)
