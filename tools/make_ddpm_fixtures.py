"""make_ddpm_fixtures.py: diffusers reference for ddpm.c (the training half).

Writes tests/fixtures/ddpm.safetensors, read by tests/test_ddpm.c:

  {scaled_linear,linear}.betas, .alphas_cumprod   (1000)  DDPMScheduler buffers
  noise.x0, noise.eps (B, C, H, W), noise.t (B)           inputs (t as float32)
  noise.xt_scaled, noise.xt_linear                        scheduler.add_noise
  noise.v_scaled                                          scheduler.get_velocity
  snr.t, snr.value                                        training_utils.compute_snr
  minsnr.gamma, minsnr.w_eps, minsnr.w_v                  train_text_to_image.py weights
  loss.pred, loss.target, loss.w (= minsnr.w_eps)         inputs
  loss.value_w, loss.grad_w                               weighted loss, torch autograd
  loss.value, loss.grad                                   plain F.mse_loss, torch autograd

The Min-SNR weights and the weighted loss are written out here exactly as
diffusers' examples/text_to_image/train_text_to_image.py computes them
(diffusers does not export that code as a function). The diffusers and torch
versions are stored in the file's metadata.

Float32 on the CPU, fixed seed. Run from anywhere:
    /work/venv/bin/python tools/make_ddpm_fixtures.py
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import diffusers
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

torch.set_num_threads(1)
OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "..", "tests", "fixtures", "ddpm.safetensors"))

T, BETA_START, BETA_END = 1000, 0.00085, 0.012   # SD1.x scheduler_config.json
B, C, H, W = 5, 4, 3, 3
GAMMA = 5.0


def main():
    g = torch.Generator().manual_seed(1234)
    sched = {name: DDPMScheduler(num_train_timesteps=T, beta_start=BETA_START, beta_end=BETA_END,
                                 beta_schedule=name)
             for name in ("scaled_linear", "linear")}
    fx = {}
    for name, s in sched.items():
        fx[f"{name}.betas"] = s.betas.clone()
        fx[f"{name}.alphas_cumprod"] = s.alphas_cumprod.clone()

    # forward process at both ends of the schedule and in between
    t = torch.tensor([0, 999, 1, 500, 250], dtype=torch.long)
    x0 = torch.randn(B, C, H, W, generator=g)
    eps = torch.randn(B, C, H, W, generator=g)
    fx["noise.x0"], fx["noise.eps"], fx["noise.t"] = x0, eps, t.float()
    fx["noise.xt_scaled"] = sched["scaled_linear"].add_noise(x0, eps, t)
    fx["noise.xt_linear"] = sched["linear"].add_noise(x0, eps, t)
    fx["noise.v_scaled"] = sched["scaled_linear"].get_velocity(x0, eps, t)

    s = sched["scaled_linear"]
    ts = torch.tensor([0, 1, 10, 100, 200, 300, 500, 750, 999], dtype=torch.long)
    fx["snr.t"], fx["snr.value"] = ts.float(), compute_snr(s, ts)

    # Min-SNR-gamma weights, as train_text_to_image.py (gamma = args.snr_gamma)
    snr = compute_snr(s, t)
    m = torch.stack([snr, GAMMA * torch.ones_like(t)], dim=1).min(dim=1)[0]
    fx["minsnr.gamma"] = torch.tensor([GAMMA])
    fx["minsnr.w_eps"] = m / snr            # prediction_type == "epsilon"
    fx["minsnr.w_v"] = m / (snr + 1)        # prediction_type == "v_prediction"

    # the loss and its gradient, weighted (as the script with --snr_gamma) and not
    pred = torch.randn(B, C, H, W, generator=g)
    target = eps
    fx["loss.pred"], fx["loss.target"], fx["loss.w"] = pred.clone(), target.clone(), fx["minsnr.w_eps"].clone()

    p = pred.clone().requires_grad_(True)
    loss = F.mse_loss(p.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * fx["minsnr.w_eps"]
    loss = loss.mean()
    loss.backward()
    fx["loss.value_w"], fx["loss.grad_w"] = loss.detach().reshape(1), p.grad.clone()

    p = pred.clone().requires_grad_(True)
    loss = F.mse_loss(p.float(), target.float(), reduction="mean")
    loss.backward()
    fx["loss.value"], fx["loss.grad"] = loss.detach().reshape(1), p.grad.clone()

    fx = {k: v.detach().to(torch.float32).contiguous() for k, v in fx.items()}
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__,
            "made_by": "tools/make_ddpm_fixtures.py"}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(fx, OUT, metadata=meta)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes, {len(fx)} tensors, "
          f"diffusers {diffusers.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
