"""tests/fixtures/locon.safetensors: conv LoRA (LoCon) on a 3x3 convolution,
for tests/test_lora.c (lora_conv_forward / lora_conv_backward).

peft's LoRA Conv2d on an nn.Conv2d(6, 5, 3, stride, padding=1): lora_A is a
3x3 conv down to r channels with the base conv's stride and padding, lora_B a
1x1 conv back up (kohya's LoRAModule builds the same pair for conv_dim). The
script also computes the formula directly with F.conv2d,

    y = conv(x, W0, b) + (alpha / r) * conv1x1(conv(x, A, stride, pad), B)

and checks the two agree, then records x, W0, b, A, B, the output and the
autograd gradients dx, dA, dB for a random dout.

    /work/venv/bin/python tools/make_locon_fixtures.py
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "locon.safetensors")


class OneConv3(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        self.proj = nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=True)

    def forward(self, x):
        return self.proj(x)


def case(fx, name, cin, cout, stride, x_shape, r, alpha):
    model = get_peft_model(OneConv3(cin, cout, stride),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    A = layer.lora_A["default"].weight          # (r, in, 3, 3)
    Bw = layer.lora_B["default"].weight         # (out, r, 1, 1)
    assert tuple(A.shape) == (r, cin, 3, 3) and tuple(Bw.shape) == (cout, r, 1, 1)
    assert layer.lora_A["default"].stride == (stride, stride) and layer.lora_A["default"].padding == (1, 1)
    with torch.no_grad():                      # peft starts B at 0: a random B so dA is not 0
        Bw.copy_(torch.randn_like(Bw) * 0.5)
    x = torch.randn(*x_shape, requires_grad=True)
    y = model(x)
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias
    with torch.no_grad():                      # the formula, written out
        y2 = F.conv2d(x, w0, b0, stride, 1) + (alpha / r) * F.conv2d(F.conv2d(x, A, None, stride, 1), Bw)
    assert torch.allclose(y, y2, rtol=1e-5, atol=1e-6), (y - y2).abs().max()
    dout = torch.randn_like(y)
    dx, dA, dB = torch.autograd.grad(y, [x, A, Bw], dout)
    for k, v in dict(x=x, w0=w0, b0=b0, A=A, B=Bw, dout=dout, out=y, dx=dx, dA=dA, dB=dB).items():
        fx[f"{name}.{k}"] = v.detach().clone().contiguous().float()
    fx[f"{name}.alpha"] = torch.tensor([float(alpha)])
    fx[f"{name}.stride"] = torch.tensor([float(stride)])


def main():
    torch.manual_seed(1717)
    fx = {}
    case(fx, "s1", 6, 5, 1, (2, 6, 5, 4), 3, 6.0)
    case(fx, "s2", 6, 5, 2, (2, 6, 6, 5), 2, 3.0)
    save_file(fx, OUT, metadata={"generator": f"tools/make_locon_fixtures.py, torch {torch.__version__}"})
    print(f"{OUT}: {len(fx)} tensors, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
