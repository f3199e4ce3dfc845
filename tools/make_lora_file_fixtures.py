#!/usr/bin/env python3
"""LoRA files in the formats other tools write, for tests/test_lora.c.

Writes tests/fixtures/lorafile_*.safetensors from a tiny random UNet and CLIP
text encoder with peft adapters, saved by diffusers' own save_lora_weights
(the "unet.<module>.lora_A.weight" format, with lora_adapter_metadata) and
converted by peft/diffusers to kohya's format, plus a JSON list of the
expected (kohya name, r, in, out, conv, alpha) for each adapter.

    python tools/make_lora_file_fixtures.py
"""
import json
import os

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft  # noqa: F401
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
torch.manual_seed(0)

unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                            cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
te = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16))

unet.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights=True,
                            target_modules=["to_q", "to_v", "proj_in", "proj_out"]))
# transformers' add_adapter wants a newer peft than the pinned one; peft's own injector does the same
te = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, init_lora_weights=True,
                                        target_modules=["q_proj", "v_proj", "fc1"]), te)
with torch.no_grad():
    for m in (unet, te):
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)

unet_sd = get_peft_model_state_dict(unet)
te_sd = get_peft_model_state_dict(te)

# 1. diffusers' own writer
StableDiffusionPipeline.save_lora_weights(
    OUT, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
    unet_lora_adapter_metadata={"r": 2, "lora_alpha": 4},
    text_encoder_lora_adapter_metadata={"r": 3, "lora_alpha": 6},
    weight_name="lorafile_diffusers.safetensors", safe_serialization=True)

# 2. kohya's format, through diffusers' converter (peft keys -> kohya keys + alpha)
full = {f"unet.{k}": v for k, v in unet_sd.items()}
full.update({f"text_encoder.{k}": v for k, v in te_sd.items()})
kohya = convert_state_dict_to_kohya(full)
for k in list(kohya):
    if k.endswith(".lora_down.weight"):
        base = k[: -len(".lora_down.weight")]
        r = kohya[k].shape[0]
        kohya[base + ".alpha"] = torch.tensor(4.0 if base.startswith("lora_unet") else 6.0)
        assert r in (2, 3)
save_file({k: v.contiguous() for k, v in kohya.items()}, os.path.join(OUT, "lorafile_kohya.safetensors"),
          metadata={"ss_network_module": "networks.lora"})

# expected entries
exp = []
for k, v in sorted(kohya.items()):
    if not k.endswith(".lora_down.weight"):
        continue
    base = k[: -len(".lora_down.weight")]
    up = kohya[base + ".lora_up.weight"]
    exp.append({"name": base, "r": v.shape[0], "in": v.shape[1], "out": up.shape[0],
                "conv": int(v.dim() == 4), "alpha": float(kohya[base + ".alpha"]),
                "down0": float(v.flatten()[0]), "up0": float(up.flatten()[0])})
with open(os.path.join(OUT, "lorafile_expected.json"), "w") as f:
    json.dump(exp, f, indent=1)
print(len(exp), "adapters")
