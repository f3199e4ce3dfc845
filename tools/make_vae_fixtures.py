"""make_vae_fixtures.py: PyTorch reference fixtures for vae.c (diffusers AutoencoderKL).

Writes, for two tiny random-weight AutoencoderKL configs:
  tests/fixtures/vae_a/{config.json, diffusion_pytorch_model.safetensors}   save_pretrained, fp32
  tests/fixtures/vae_b/...
  tests/fixtures/vae_a_io.safetensors, vae_b_io.safetensors:
    x           (2, 3, H, W)   image in [-1, 1]
    mean        (2, 4, h, w)   posterior mean
    logvar      (2, 4, h, w)   posterior logvar (clamped to [-30, 20])
    noise       (2, 4, h, w)   fixed N(0, 1)
    sample      (2, 4, h, w)   mean + exp(0.5 logvar) * noise, as DiagonalGaussianDistribution.sample
    r_mean, r_logvar           random upstream gradients of mean and logvar
    dx          (2, 3, H, W)   d(sum(mean * r_mean) + sum(logvar * r_logvar)) / dx
    egrad.<p>                  the same loss's gradient for a few encoder parameters p
    z           (2, 4, zh, zw) decoder input (raw latent, before any scaling)
    dec         (2, 3, 8zh, 8zw) vae.decode(z).sample  (factor 2 for A, 4 for B)
    r_dec                      random upstream gradient of dec
    dz                         d(sum(dec * r_dec)) / dz
    dgrad.<p>                  the same loss's gradient for a few decoder parameters p

Config A: block_out_channels (8, 16), layers_per_block 1, norm_num_groups 4,
  16x16 images.
Config B: block_out_channels (8, 8, 16), layers_per_block 2, norm_num_groups 2,
  18x20 images (the second downsample sees an odd side, 9 -> 4, where the
  asymmetric (0, 1, 0, 1) pad matters most), decoder on a 5x4 latent (non-
  square so a swapped H/W shows). One logvar channel has its quant_conv bias
  pushed to +24, so the clamp at 20 is active there (its gradient is 0).

Every parameter, the group norms' included, is randomised with a fixed seed.
A is saved in fp32, B in fp16 (which keeps it under 200 KB and tests the F16
path of the loader); the reference is then computed in float64 from
those very fp32 weights, so the fixtures hold the exact result of the stored
model (up to one final rounding) and the test measures only the C code's
float32 error. Run from the repository root:
    /work/venv/bin/python tools/make_vae_fixtures.py
"""
import os

import torch
from safetensors.torch import save_file
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

FX = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))

CONFIGS = {
    "a": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
              H=16, W=16, zh=4, zw=4, seed=101, clamp_channel=None, dtype=torch.float32,
              egrads=["encoder.conv_in.weight", "encoder.mid_block.attentions.0.to_q.weight",
                      "encoder.down_blocks.0.downsamplers.0.conv.weight",
                      "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                      "encoder.down_blocks.0.resnets.0.norm1.weight", "quant_conv.bias"],
              dgrads=["decoder.conv_in.weight", "post_quant_conv.weight",
                      "decoder.mid_block.attentions.0.to_k.weight",
                      "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
                      "decoder.up_blocks.0.upsamplers.0.conv.bias", "decoder.conv_norm_out.weight"]),
    "b": dict(block_out_channels=(8, 8, 16), layers_per_block=2, norm_num_groups=2,
              H=18, W=20, zh=5, zw=4, seed=202, clamp_channel=3, dtype=torch.float16,
              egrads=["encoder.conv_in.bias", "encoder.down_blocks.1.downsamplers.0.conv.weight",
                      "encoder.mid_block.attentions.0.to_v.weight", "encoder.mid_block.attentions.0.group_norm.bias",
                      "encoder.conv_out.weight", "quant_conv.weight"],
              dgrads=["decoder.conv_in.weight", "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
                      "decoder.up_blocks.1.upsamplers.0.conv.weight", "decoder.mid_block.attentions.0.to_out.0.weight",
                      "decoder.up_blocks.0.resnets.2.norm2.weight", "decoder.conv_out.bias"]),
}


def build(cfg):
    torch.manual_seed(cfg["seed"])
    n = len(cfg["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=cfg["block_out_channels"],
                        layers_per_block=cfg["layers_per_block"],
                        norm_num_groups=cfg["norm_num_groups"],
                        latent_channels=4, sample_size=cfg["H"])
    # default init leaves norms at 1/0 and biases small: randomise everything
    # so a swapped or ignored parameter shows
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in ** 0.5)
        if cfg["clamp_channel"] is not None:
            vae.quant_conv.bias[4 + cfg["clamp_channel"]] = 24.0
    return vae


def main():
    for tag, cfg in CONFIGS.items():
        vae = build(cfg)
        out_dir = os.path.join(FX, "vae_" + tag)
        vae = vae.to(cfg["dtype"])
        vae.save_pretrained(out_dir, safe_serialization=True)
        vae = vae.double()   # the same stored numbers, computed in float64
        vae.set_default_attn_processor()
        g = torch.Generator().manual_seed(cfg["seed"] + 1)
        B, H, W = 2, cfg["H"], cfg["W"]
        x = (torch.rand(B, 3, H, W, generator=g, dtype=torch.float64) * 2 - 1).float().double()
        x.requires_grad_(True)
        post = vae.encode(x).latent_dist
        mean, logvar = post.mean, post.logvar
        noise = torch.randn(mean.shape, generator=g, dtype=torch.float64).float().double()
        # DiagonalGaussianDistribution.sample: mean + std * randn, std = exp(0.5 logvar)
        sample = post.mean + post.std * noise
        r_mean = torch.randn(mean.shape, generator=g, dtype=torch.float64).float().double()
        r_logvar = torch.randn(mean.shape, generator=g, dtype=torch.float64).float().double()
        vae.zero_grad()
        ((mean * r_mean).sum() + (logvar * r_logvar).sum()).backward()
        params = dict(vae.named_parameters())
        io = {
            "x": x.detach(), "mean": mean.detach(), "logvar": logvar.detach(), "noise": noise,
            "sample": sample.detach(), "r_mean": r_mean, "r_logvar": r_logvar, "dx": x.grad,
        }
        for p in cfg["egrads"]:
            io["egrad." + p] = params[p].grad.clone()
        if cfg["clamp_channel"] is not None:
            c = cfg["clamp_channel"]
            raw = vae.quant_conv(vae.encoder(x))[:, 4 + c]
            assert raw.min().item() > 20.5, "clamp channel not clamped"

        z = torch.randn(B, 4, cfg["zh"], cfg["zw"], generator=g, dtype=torch.float64).float().double()
        z.requires_grad_(True)
        vae.zero_grad()
        dec = vae.decode(z).sample
        r_dec = torch.randn(dec.shape, generator=g, dtype=torch.float64).float().double()
        (dec * r_dec).sum().backward()
        io.update({"z": z.detach(), "dec": dec.detach(), "r_dec": r_dec, "dz": z.grad})
        for p in cfg["dgrads"]:
            io["dgrad." + p] = params[p].grad.clone()

        io = {k: v.detach().float().contiguous() for k, v in io.items()}
        save_file(io, os.path.join(FX, "vae_%s_io.safetensors" % tag))
        print(tag, "params", sum(p.numel() for p in vae.parameters()),
              "mean", tuple(mean.shape), "dec", tuple(dec.shape),
              "logvar range", logvar.min().item(), logvar.max().item())


if __name__ == "__main__":
    main()
