"""make_fixtures.py: PyTorch reference fixtures for the C primitives.

Writes
  tests/fixtures/nn.safetensors    every primitive of nn.h (read by tests/test_parity.c)
  tests/fixtures/lora.safetensors  the peft LoRA layer (read by tests/test_lora.c)

For each primitive: the inputs and weights, a random upstream gradient
"<case>.dout", the forward output "<case>.out", and the gradients that torch
autograd gives for L = sum(out * dout) ("<case>.dx", ".dw", ".db", ...).
The reference is the library module itself wherever one exists (torch.nn,
diffusers, transformers, peft), so the fixtures pin what those libraries do,
not what we think they do.

Dimensions are not stored in nn.safetensors: they are the constants below and
the same constants in tests/test_parity.c, which checks every tensor's element
count, so a mismatch fails loudly. lora.safetensors also stores alpha and r.

Everything is float32 on the CPU with fixed seeds; rerunning gives the same
files. Run from the repository root:
    /work/venv/bin/python tools/make_fixtures.py
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import get_timestep_embedding
from transformers.activations import QuickGELUActivation
from peft import LoraConfig, get_peft_model

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)   # one summation order, whatever the machine

OUT_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))


def grads(out, dout, tensors):
    """d(sum(out * dout)) / d tensors, i.e. backward with upstream gradient dout."""
    return torch.autograd.grad(out, tensors, grad_outputs=dout)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def put(d, prefix, **tensors):
    for k, v in tensors.items():
        d[f"{prefix}.{k}"] = v.detach().contiguous().to(torch.float32).clone()


# ---------------------------------------------------------------------------
def make_nn():
    torch.manual_seed(1234)
    fx = {}

    # linear: x (N, in) -> (N, out)
    N, IN, OUT = 6, 10, 7
    lin = nn.Linear(IN, OUT)
    x = torch.randn(N, IN, requires_grad=True)
    y = lin(x)
    dout = torch.randn_like(y)
    dx, dw, db = grads(y, dout, [x, lin.weight, lin.bias])
    put(fx, "linear", x=x, w=lin.weight, b=lin.bias, dout=dout, out=y, dx=dx, dw=dw, db=db)

    # conv2d: (B, C, H, W) -> (B, O, Ho, Wo); the three shapes SD uses:
    # 3x3 same (ResNet conv1/conv2), 3x3 stride 2 (diffusers Downsample2D: pad 1),
    # 1x1 (proj_in/out, conv_shortcut)
    B, C, H, W, O = 2, 4, 6, 5, 5
    for name, k, stride, pad in [("conv3", 3, 1, 1), ("conv3s2", 3, 2, 1), ("conv1", 1, 1, 0)]:
        conv = nn.Conv2d(C, O, k, stride=stride, padding=pad)
        x = torch.randn(B, C, H, W, requires_grad=True)
        y = conv(x)
        dout = torch.randn_like(y)
        dx, dw, db = grads(y, dout, [x, conv.weight, conv.bias])
        put(fx, name, x=x, w=conv.weight, b=conv.bias, dout=dout, out=y, dx=dx, dw=dw, db=db)

    # group norm: UNet (32 groups, eps 1e-5) and VAE-like (eps 1e-6) settings.
    # Non-trivial affine weights so dw, db and the w-scaling of dx are exercised;
    # an offset mean so a one-pass variance would show its cancellation. The
    # second batch item is scaled down until its variance is a few eps, so
    # using the wrong eps (or adding it in the wrong place) shows well above
    # the bounds; the first item has variance ~4, where eps does not matter.
    for name, (B, C, H, W, G, eps, small) in {"gn32": (2, 64, 4, 4, 32, 1e-5, 3e-3),
                                               "gn4": (2, 12, 5, 5, 4, 1e-6, 1e-3)}.items():
        gn = nn.GroupNorm(G, C, eps=eps)
        with torch.no_grad():
            gn.weight.copy_(1 + 0.5 * torch.randn(C))
            gn.bias.copy_(0.5 * torch.randn(C))
        x = torch.randn(B, C, H, W) * 2 + 3
        x[1] *= small
        x.requires_grad_(True)
        y = gn(x)
        dout = torch.randn_like(y)
        dx, dw, db = grads(y, dout, [x, gn.weight, gn.bias])
        put(fx, name, x=x, w=gn.weight, b=gn.bias, dout=dout, out=y, dx=dx, dw=dw, db=db)

    # layer norm over the last dim: (N, C), eps 1e-5 (UNet transformer and CLIP)
    N, C = 14, 32
    ln = nn.LayerNorm(C, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.5 * torch.randn(C))
        ln.bias.copy_(0.5 * torch.randn(C))
    x = torch.randn(N, C) * 1.5 - 1
    x[N // 2:] *= 3e-3          # variance ~2e-5, comparable to eps (see group norm)
    x.requires_grad_(True)
    y = ln(x)
    dout = torch.randn_like(y)
    dx, dw, db = grads(y, dout, [x, ln.weight, ln.bias])
    put(fx, "layernorm", x=x, w=ln.weight, b=ln.bias, dout=dout, out=y, dx=dx, dw=dw, db=db)

    # pointwise activations, n = 256 values spread over [-8, 8] with a few extremes
    n = 256
    base = torch.cat([torch.randn(n - 6) * 3, torch.tensor([0.0, -20.0, 20.0, -8.0, 8.0, 1e-4])])
    for name, fn in [("silu", F.silu),
                     ("gelu", lambda t: F.gelu(t)),           # exact erf form (approximate="none")
                     ("quickgelu", QuickGELUActivation())]:
        x = leaf(base)
        y = fn(x)
        dout = torch.randn_like(y)
        (dx,) = grads(y, dout, [x])
        put(fx, name, x=x, dout=dout, out=y, dx=dx)

    # GEGLU (diffusers): proj = Linear(dim, 2*dim_out), then value * gelu(gate).
    # "h" is the projection output, the input of geglu_forward; the whole module
    # (x -> out) is recorded too so the test can chain linear + geglu.
    N, DIN, DOUT = 10, 16, 24
    geglu = GEGLU(DIN, DOUT)
    x = torch.randn(N, DIN, requires_grad=True)
    seen = {}
    hook = geglu.proj.register_forward_hook(lambda mod, inp, out: seen.setdefault("h", out))
    y = geglu(x)                       # the module's own forward
    hook.remove()
    h = seen["h"]                      # its projection output, inside the same graph
    hv, gate = h.chunk(2, dim=-1)
    assert torch.equal(y, hv * F.gelu(gate))
    dout = torch.randn_like(y)
    dx, dh, dw, db = grads(y, dout, [x, h, geglu.proj.weight, geglu.proj.bias])
    put(fx, "geglu", x=x, w=geglu.proj.weight, b=geglu.proj.bias, h=h, dout=dout, out=y,
        dh=dh, dx=dx, dw=dw, db=db)

    # nearest 2x upsample (diffusers Upsample2D): (B, C, H, W) -> (B, C, 2H, 2W)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = F.interpolate(x, scale_factor=2.0, mode="nearest")
    dout = torch.randn_like(y)
    (dx,) = grads(y, dout, [x])
    put(fx, "upsample", x=x, dout=dout, out=y, dx=dx)

    # timestep embedding: SD's UNet uses flip_sin_to_cos=True, freq_shift=0;
    # the DDPM default is False/1; an odd dim gets a zero column at the end.
    t = torch.tensor([0.0, 1.0, 10.0, 250.0, 500.0, 999.0])
    fx["temb.t"] = t.clone()
    for name, dim, flip, shift in [("temb_sd", 32, True, 0.0), ("temb_ddpm", 32, False, 1.0),
                                   ("temb_odd", 33, True, 0.0)]:
        fx[f"{name}.out"] = get_timestep_embedding(t, dim, flip_sin_to_cos=flip,
                                                   downscale_freq_shift=shift,
                                                   max_period=10000).contiguous()

    # softmax attention through torch's SDPA. Tensors are tokens-major
    # (B, T, H*Dh) as to_q/to_k/to_v produce them; SDPA wants (B, H, T, Dh).
    B, H, DH = 2, 2, 8
    for name, TQ, TK, causal in [("attn_self", 16, 16, False), ("attn_cross", 16, 7, False),
                                 ("attn_causal", 16, 16, True)]:
        q = torch.randn(B, TQ, H * DH, requires_grad=True)
        k = torch.randn(B, TK, H * DH, requires_grad=True)
        v = torch.randn(B, TK, H * DH, requires_grad=True)

        def heads(t):
            return t.view(B, -1, H, DH).transpose(1, 2)
        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=causal)
        y = o.transpose(1, 2).reshape(B, TQ, H * DH)
        dout = torch.randn_like(y)
        dq, dk, dv = grads(y, dout, [q, k, v])
        put(fx, name, q=q, k=k, v=v, dout=dout, out=y, dq=dq, dk=dk, dv=dv)

    # the diffusers Attention module itself (what the UNet's attn1/attn2 are):
    # to_q/to_k/to_v without bias, SDPA, to_out[0] with bias, to_out[1] dropout (eval).
    B, TQ, TK, QD, CD, H, DH = 2, 9, 5, 16, 12, 2, 8
    for name, cross in [("mattn_cross", True), ("mattn_self", False)]:
        m = Attention(query_dim=QD, cross_attention_dim=CD if cross else None, heads=H, dim_head=DH)
        m.eval()
        x = torch.randn(B, TQ, QD, requires_grad=True)
        ctx = torch.randn(B, TK, CD, requires_grad=True) if cross else None
        y = m(x, encoder_hidden_states=ctx)
        dout = torch.randn_like(y)
        ins = [x] + ([ctx] if cross else [])
        params = [m.to_q.weight, m.to_k.weight, m.to_v.weight, m.to_out[0].weight, m.to_out[0].bias]
        g = grads(y, dout, ins + params)
        rec = dict(x=x, wq=m.to_q.weight, wk=m.to_k.weight, wv=m.to_v.weight,
                   wo=m.to_out[0].weight, bo=m.to_out[0].bias, dout=dout, out=y, dx=g[0])
        if cross:
            rec.update(ctx=ctx, dctx=g[1])
        rec.update(dwq=g[-5], dwk=g[-4], dwv=g[-3], dwo=g[-2], dbo=g[-1])
        put(fx, name, **rec)

    return fx


# ---------------------------------------------------------------------------
class OneLinear(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.proj = nn.Linear(i, o, bias=True)

    def forward(self, x):
        return self.proj(x)


class OneConv(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.proj = nn.Conv2d(i, o, 1, bias=True)

    def forward(self, x):
        return self.proj(x)


def lora_case(fx, prefix, base, x, r, alpha, rslora):
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0,
                     init_lora_weights=True, use_rslora=rslora)
    model = get_peft_model(base, cfg)
    layer = model.base_model.model.proj
    A = layer.lora_A["default"].weight
    Bw = layer.lora_B["default"].weight
    # peft starts B at zero; a random B makes dA non-zero so the test sees it
    with torch.no_grad():
        Bw.copy_(torch.randn_like(Bw) * 0.5)
    assert not layer.base_layer.weight.requires_grad   # frozen W0, as in training
    x = leaf(x)
    y = model(x)
    dout = torch.randn_like(y)
    dx, dA, dB = grads(y, dout, [x, A, Bw])
    w0 = layer.base_layer.weight
    b0 = layer.base_layer.bias
    put(fx, prefix, x=x, w0=w0, b0=b0, A=A, B=Bw, dout=dout, out=y, dx=dx, dA=dA, dB=dB)
    fx[f"{prefix}.alpha"] = torch.tensor([float(alpha)])
    fx[f"{prefix}.r"] = torch.tensor([float(r)])
    # the scale peft really used, so the test does not have to trust our formula
    fx[f"{prefix}.scale"] = torch.tensor([float(layer.scaling["default"])])
    with torch.no_grad():
        Bw.zero_()
        y0 = model(x)
        ref = layer.base_layer(x)
    assert torch.equal(y0, ref)
    put(fx, prefix, out_b0=y0)


def make_lora():
    torch.manual_seed(4321)
    fx = {}
    r, alpha = 4, 8

    lora_case(fx, "lora", OneLinear(24, 16), torch.randn(5, 24), r, alpha, rslora=False)
    lora_case(fx, "lora_rs", OneLinear(24, 16), torch.randn(5, 24), r, alpha, rslora=True)
    lora_case(fx, "loraconv", OneConv(6, 5), torch.randn(2, 6, 3, 3), r, alpha, rslora=False)

    # Kaiming-uniform init of A (peft: kaiming_uniform_(A, a=sqrt(5))):
    # gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in),
    # so A ~ U(-bound, bound) with std bound / sqrt(3).
    # "lora.A_init" has the layer's own shape (r x 24); "lora.A_init_big"
    # (8 x 256) has enough samples (2048) for a tight std check.
    for suffix, (i, o, rr) in {"": (24, 16, r), "_big": (256, 16, 8)}.items():
        model = get_peft_model(OneLinear(i, o), LoraConfig(r=rr, lora_alpha=alpha, target_modules=["proj"],
                                                          lora_dropout=0.0, init_lora_weights=True))
        A0 = model.base_model.model.proj.lora_A["default"].weight
        bound = math.sqrt(2.0 / (1.0 + 5.0)) * math.sqrt(3.0 / i)
        assert abs(bound - 1.0 / math.sqrt(i)) < 1e-12
        assert float(A0.detach().abs().max()) <= bound
        fx[f"lora.A_init{suffix}"] = A0.detach().clone()
        fx[f"lora.init_bound{suffix}"] = torch.tensor([bound], dtype=torch.float32)
    return fx


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    for fname, fx, meta in [("nn.safetensors", make_nn(), "nn.h primitives"),
                            ("lora.safetensors", make_lora(), "peft LoRA layer")]:
        path = os.path.join(OUT_DIR, fname)
        # one metadata key: safetensors writes a dict's keys in hash order,
        # and a single key keeps the file byte-for-byte reproducible
        save_file(fx, path, metadata={"generator": f"tools/make_fixtures.py: {meta}, torch {torch.__version__}"})
        print(f"{path}: {len(fx)} tensors, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
