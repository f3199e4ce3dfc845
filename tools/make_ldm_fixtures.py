#!/usr/bin/env python3
"""Fixtures for checkpoint.c: the original LDM single-file layout of SD1.x
(model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*)
and its correspondence with the diffusers / transformers module names.

Run from the repository root with the project's venv:
    /work/venv/bin/python tools/make_ldm_fixtures.py

Writes
  tests/fixtures/ldm_tiny.safetensors   a tiny random SD1.x-architecture model, fp16
      (UNet + VAE + CLIP text model) in the single-file layout, plus the
      extras a real v1-5-pruned-emaonly file carries (the DDPM schedule
      buffers, model_ema.decay/num_updates, CLIP's int64 position_ids)
  tests/fixtures/ldm_tiny_names.txt     one line per weight tensor:
      diffusers_name <TAB> ldm_name <TAB> ldm_shape <TAB> diffusers_shape
  tests/fixtures/ldm_sd15_names.txt     the same for the real SD1.5 sizes
      (models built on the meta device: names and shapes, no weights)
  tests/fixtures/ldm_tiny_arch.txt      the tiny configs' values that the
      single-file shapes determine (key value lines), for the C test

Shapes are written "d0,d1,..". CLIP names are written with transformers'
"text_model." module prefix (the state-dict key of transformers < 5.6).

The diffusers -> LDM table below is written from the structure of the two
UNet layouts (diffusers' convert_ldm_*_checkpoint go the other way). It is
verified, not trusted: the single file is loaded back with diffusers' own
UNet2DConditionModel.from_single_file / AutoencoderKL.from_single_file and
transformers' CLIPTextModel through diffusers' single-file CLIP loader, and
every tensor must come back bit-identical and nothing may be missing.
"""
import json
import os
import re
import sys
import tempfile

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

OUT = "tests/fixtures"

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16, 16), layers_per_block=1,
    transformer_layers_per_block=(1, 2, 1),
    attention_head_dim=8, cross_attention_dim=32, norm_num_groups=4,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
)
TINY_CLIP = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=1, max_position_embeddings=12, hidden_act="quick_gelu",
                 bos_token_id=0, eos_token_id=1, pad_token_id=1)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    sample_size=512,
)
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")

# the ResNet block's submodules: diffusers name -> LDM name
UNET_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(name, cfg):
    """diffusers UNet2DConditionModel name -> LDM UNetModel name.
    LDM numbers every block of the down path in one list, input_blocks:
    [conv_in] then per level L resnet(+attention) blocks, then the downsampler
    (all levels but the last); output_blocks holds L+1 blocks per level, the
    upsampler riding in the last block of each level (but the last) after
    the resnet (.1) or after the resnet and attention (.2)."""
    L = cfg["layers_per_block"]
    n = len(cfg["block_out_channels"])
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    mod, leaf = name.rsplit(".", 1)
    if mod in fixed:
        return f"{fixed[mod]}.{leaf}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", name)
    if m:
        path, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if path == "down":
            idx = 1 + b * (L + 1) + (L if kind == "downsamplers" else j)
            if kind == "resnets":
                sub, leaf2 = rest.rsplit(".", 1)
                return f"input_blocks.{idx}.0.{UNET_RES[sub]}.{leaf2}"
            if kind == "attentions":
                return f"input_blocks.{idx}.1.{rest}"
            assert rest.startswith("conv.")
            return f"input_blocks.{idx}.0.op.{rest[5:]}"
        idx = b * (L + 1) + (L if kind == "upsamplers" else j)
        if kind == "resnets":
            sub, leaf2 = rest.rsplit(".", 1)
            return f"output_blocks.{idx}.0.{UNET_RES[sub]}.{leaf2}"
        if kind == "attentions":
            return f"output_blocks.{idx}.1.{rest}"
        has_attn = cfg["up_block_types"][b].startswith("CrossAttn")
        return f"output_blocks.{idx}.{2 if has_attn else 1}.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        k, rest = int(m.group(2)), m.group(3)
        if m.group(1) == "attentions":
            return f"middle_block.{2 * k + 1}.{rest}"
        sub, leaf2 = rest.rsplit(".", 1)
        return f"middle_block.{2 * k}.{UNET_RES[sub]}.{leaf2}"
    raise ValueError("unmapped unet name " + name)


def vae_to_ldm(name, cfg):
    """diffusers AutoencoderKL name -> LDM AutoencoderKL name. The decoder's
    up levels are numbered by resolution in LDM (up.0 is the full-size one),
    the reverse of diffusers' up_blocks order."""
    n = len(cfg["block_out_channels"])
    for a, b in (("conv_norm_out", "norm_out"),):
        name = name.replace(f"coder.{a}.", f"coder.{b}.")
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", name)
    if m:
        part, path, i, kind, j, rest = m.groups()
        i = int(i)
        lvl = i if path == "down" else n - 1 - i
        if kind == "resnets":
            rest = rest.replace("conv_shortcut", "nin_shortcut")
            return f"{part}.{path}.{lvl}.block.{j}.{rest}"
        return f"{part}.{path}.{lvl}.{'downsample' if path == 'down' else 'upsample'}.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        part, kind, k, rest = m.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(k) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        mod, leaf = rest.rsplit(".", 1)
        return f"{part}.mid.attn_1.{VAE_ATTN[mod]}.{leaf}"
    return name   # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def pairs(unet, vae, clip, ucfg, vcfg):
    """(diffusers_name, ldm_name, ldm_shape, diffusers_shape) for every weight."""
    out = []
    for k, v in unet.state_dict().items():
        out.append((k, "model.diffusion_model." + unet_to_ldm(k, ucfg), tuple(v.shape), tuple(v.shape)))
    for k, v in vae.state_dict().items():
        ldm = vae_to_ldm(k, vcfg)
        shape = tuple(v.shape)
        # LDM's AttnBlock uses 1x1 convs where diffusers has linears
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm):
            shape = shape + (1, 1)
        out.append((k, "first_stage_model." + ldm, shape, tuple(v.shape)))
    for k, v in clip.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        if k.endswith("position_ids"):
            continue          # a buffer, not a weight
        out.append((k, "cond_stage_model.transformer." + k, tuple(v.shape), tuple(v.shape)))
    ldm = [p[1] for p in out]
    assert len(set(ldm)) == len(ldm), "two diffusers names map to one LDM name"
    return out


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            # fp16-representable values: the file stores fp16, and the round
            # trip must then be exact
            p.copy_((torch.randn(p.shape, generator=g) * 0.5).half().float())


def fmt(shape):
    return ",".join(str(d) for d in shape)


def write_names(path, rows):
    with open(path, "w") as f:
        for d, l, ls, ds in rows:
            f.write(f"{d}\t{l}\t{fmt(ls)}\t{fmt(ds)}\n")


def verify(path, tmp, unet, vae, clip):
    """Load the single file back with diffusers' own converters and compare."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file
    u2 = UNet2DConditionModel.from_single_file(path, config=tmp, subfolder="unet", local_files_only=True)
    v2 = AutoencoderKL.from_single_file(path, config=tmp, subfolder="vae", local_files_only=True)
    c2 = create_diffusers_clip_model_from_ldm(CLIPTextModel, load_file(path), subfolder="text_encoder",
                                              config=tmp, local_files_only=True)
    n = 0
    for a, b, what in ((unet, u2, "unet"), (vae, v2, "vae"), (clip, c2, "clip")):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), what
        for k in sa:
            if k.endswith("position_ids"):
                continue
            if sb[k].device.type == "meta" or not torch.equal(sa[k].float(), sb[k].float()):
                raise SystemExit(f"verify: {what} {k} differs after the round trip")
            n += 1
    print(f"verified: {n} tensors identical after diffusers' from_single_file")


def main():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    clip = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    for i, m in enumerate((unet, vae, clip)):
        randomize(m, 100 + i)
    rows = pairs(unet, vae, clip, TINY_UNET, TINY_VAE)

    sd = {}
    dsd = {**{k: v for k, v in unet.state_dict().items()}, **{k: v for k, v in vae.state_dict().items()}}
    csd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in clip.state_dict().items()}
    for d, l, ls, _ in rows:
        t = (csd[d] if d.startswith("text_model.") else dsd[d]).detach().clone()
        sd[l] = t.reshape(ls).half().contiguous()
    # what else a real SD1.x single file holds, which loaders must skip
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(TINY_CLIP["max_position_embeddings"], dtype=torch.int64)[None]
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

    path = os.path.join(OUT, "ldm_tiny.safetensors")
    save_file(sd, path, metadata={"format": "pt"})
    size = os.path.getsize(path)
    print(f"{path}: {len(sd)} tensors, {size} bytes")
    assert size < 500_000

    with tempfile.TemporaryDirectory() as tmp:
        unet.save_pretrained(os.path.join(tmp, "unet"))
        vae.save_pretrained(os.path.join(tmp, "vae"))
        clip.save_pretrained(os.path.join(tmp, "text_encoder"))
        verify(path, tmp, unet, vae, clip)

    write_names(os.path.join(OUT, "ldm_tiny_names.txt"), rows)
    arch = {
        "unet.in_channels": 4, "unet.out_channels": 4, "unet.nlevels": 3,
        "unet.block_out": "8,16,16", "unet.layers": "1,1,1", "unet.down_attn": "1,1,0",
        "unet.up_attn": "0,1,1", "unet.tlayers": "1,2,1", "unet.cross_dim": 32,
        "unet.linear_proj": 0, "unet.time_embed_dim": 32,
        "vae.in_channels": 3, "vae.out_channels": 3, "vae.latent_channels": 4, "vae.nlevels": 3,
        "vae.block_out": "8,8,16", "vae.layers": 1,
        "clip.vocab_size": 64, "clip.hidden_size": 32, "clip.intermediate_size": 48,
        "clip.num_layers": 2, "clip.max_pos": 12,
    }
    with open(os.path.join(OUT, "ldm_tiny_arch.txt"), "w") as f:
        for k, v in arch.items():
            f.write(f"{k} {v}\n")
    # the values above are the configs' own: check them against the models
    assert unet.time_embedding.linear_1.out_features == arch["unet.time_embed_dim"]

    # the real SD1.5 sizes, on the meta device (no memory, no weights)
    with torch.device("meta"):
        u = UNet2DConditionModel(**SD15_UNET)
        v = AutoencoderKL(**SD15_VAE)
        c = CLIPTextModel(CLIPTextConfig(**SD15_CLIP))
    big = pairs(u, v, c, SD15_UNET, SD15_VAE)
    nu = sum(r[1].startswith("model.") for r in big)
    nv = sum(r[1].startswith("first_stage_model.") for r in big)
    nc = sum(r[1].startswith("cond_stage_model.") for r in big)
    print(f"sd15: {len(big)} tensors (unet {nu}, vae {nv}, clip {nc})")
    write_names(os.path.join(OUT, "ldm_sd15_names.txt"), big)


if __name__ == "__main__":
    sys.exit(main())
