"""make_clip_fixtures.py: PyTorch reference fixtures for clip.c (CLIP text model).

Writes, for two tiny random-weight transformers CLIPTextModel configs:
  tests/fixtures/clip_a/{config.json, model.safetensors}   save_pretrained, fp32
  tests/fixtures/clip_b/{config.json, model.safetensors}
  tests/fixtures/clip_a_io.safetensors, clip_b_io.safetensors:
    ids                 (B, T) int32, SD-style: bos, tokens, eos, eos-padding
    last_hidden_state   (B, T, d)  the SD1.x conditioning for clip_skip 1
    skip2, skip3        (B, T, d)  diffusers' StableDiffusionPipeline.encode_prompt
                                   with clip_skip=1 / 2 (ours is that + 1: A1111's count)
    pooled              (B, d)     CLIPTextModel's pooler_output
    dout                (B, T, d)  random upstream gradient
    lora.out            (B, T, d)  last_hidden_state with peft LoRA (r=2, alpha=4) on
                                   q_proj, k_proj, v_proj, out_proj, fc1, fc2 of every layer
    lora.<module>.A/.B  the adapter weights (lora_B randomised, else it is 0 and
                        the test would not see the up-projection)
    lora.<module>.dA/.dB  d(sum(lora.out * dout)) / d A, B
    lora_skip2.*        the same through clip_skip=2 (A only): the last layer's
                        adapters get exactly zero gradient
  <module> is the transformers module path, e.g. text_model.encoder.layers.0.self_attn.q_proj.
  tests/fixtures/clip_a_grads.safetensors (A only): d(sum(last_hidden_state * dout)) / dW
    for every parameter of the plain model (full fine-tuning), named as clip.c's
    table (no "text_model." prefix); the token embedding's rows of unused ids are 0.

Config A: quick_gelu, eos_token_id = vocab-1 (pooled = first eos position).
Config B: gelu, eos_token_id = 2, transformers' legacy rule (pooled = argmax id);
its ids contain a token 2 so the two rules give different answers.

The model weights are saved in fp32; the reference is then computed in float64
from those very fp32 weights, so the fixtures hold the exact result of the
stored model (up to one final rounding) and the test measures only the C code's
float32 error. Run from the repository root:
    /work/venv/bin/python tools/make_clip_fixtures.py
"""
import json
import os
import types

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

FX = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

CONFIGS = {
    "a": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
              layer_norm_eps=1e-5, bos_token_id=998, eos_token_id=999, pad_token_id=1, T=77, seed=11),
    "b": dict(vocab_size=500, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu",
              layer_norm_eps=1e-5, bos_token_id=498, eos_token_id=2, pad_token_id=1, T=16, seed=22),
}


def make_ids(vocab, T, lengths, g, extra_two=False):
    """SD tokenizer layout: <bos> words <eos> <eos> ... (padded with eos)."""
    bos, eos = vocab - 2, vocab - 1
    ids = torch.full((len(lengths), T), eos, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, 0] = bos
        ids[b, 1:1 + n] = torch.randint(3, vocab - 2, (n,), generator=g)
        if extra_two:
            ids[b, 1 + n // 2] = 2      # a token equal to the (legacy) eos_token_id
    return ids


def randomise(model, g):
    """Non-trivial values everywhere (layer norms and biases too), so a tensor
    loaded into the wrong slot changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def encode_prompt_diffusers(model, ids, clip_skip, inner=None):
    """Run diffusers' own StableDiffusionPipeline.encode_prompt with a stand-in
    pipeline whose tokenizer returns our ids, so the clip_skip indexing and
    the final layer norm are diffusers' code, not a copy of it.
    diffusers 0.42 reaches the layer norm as text_encoder.text_model.final_layer_norm,
    a path transformers 5 removed from CLIPTextModel (it is now
    text_encoder.final_layer_norm), so the stand-in text encoder offers both."""
    inner = inner if inner is not None else model

    class TE:
        text_model = inner
        config = inner.config
        dtype = inner.dtype

        def __call__(self, *a, **kw):
            return model(*a, **kw)
    class Tok:
        model_max_length = ids.shape[1]

        def __call__(self, prompt, **kw):
            return types.SimpleNamespace(input_ids=ids.clone(), attention_mask=torch.ones_like(ids))
    pipe = types.SimpleNamespace(tokenizer=Tok(), text_encoder=TE(), unet=None)
    emb, _ = StableDiffusionPipeline.encode_prompt(
        pipe, ["x"] * ids.shape[0], torch.device("cpu"), 1, False, clip_skip=clip_skip)
    return emb


def build(tag, cfg):
    cfg = dict(cfg)
    T, seed = cfg.pop("T"), cfg.pop("seed")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)     # the model's and peft's own inits use the global generator
    config = CLIPTextConfig(**cfg, attn_implementation="eager")
    model = CLIPTextModel(config).eval()
    randomise(model, g)
    d, n = cfg["hidden_size"], cfg["num_hidden_layers"]

    out_dir = os.path.join(FX, f"clip_{tag}")
    model.save_pretrained(out_dir, safe_serialization=True)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if tag == "a":
        # transformers 5 saves CLIPTextModel without the "text_model." prefix
        # that every SD1.x text_encoder/model.safetensors (transformers 4) has;
        # A keeps the old names, B the new ones, and clip.c must read both.
        path = os.path.join(out_dir, "model.safetensors")
        save_file({"text_model." + k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})
    # reload the saved fp32 model and compute in float64
    model = CLIPTextModel.from_pretrained(out_dir, attn_implementation="eager").double().eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v.float(), sd[k]), k

    lengths = [5, T - 3] if T > 8 else [3, T - 3]
    ids = make_ids(cfg["vocab_size"], T, lengths, g, extra_two=(tag == "b"))
    fx = {"ids": ids.to(torch.int32)}

    with torch.no_grad():
        o = model(ids, output_hidden_states=True)
        hs = o.hidden_states
        assert len(hs) == n + 1, "hidden_states: embeddings + one per layer"
        assert torch.allclose(model.final_layer_norm(hs[-1]), o.last_hidden_state)
        fx["last_hidden_state"] = o.last_hidden_state
        fx["pooled"] = o.pooler_output
        # ours clip_skip k  ==  diffusers clip_skip k-1  ==  final_layer_norm(hidden_states[-k])
        for k in (2, 3):
            if k > n:
                continue
            ref = encode_prompt_diffusers(model, ids, clip_skip=k - 1)
            alt = model.final_layer_norm(hs[-k])
            assert torch.equal(ref, alt)
            fx[f"skip{k}"] = ref
        # the pooled rule really differs from the other one on these ids
        eos_pos = (ids == cfg["eos_token_id"]).int().argmax(-1)
        arg_pos = ids.int().argmax(-1)
        if tag == "b":
            assert not torch.equal(eos_pos, arg_pos)

    dout = torch.randn((ids.shape[0], T, d), generator=g, dtype=torch.float64)
    fx["dout"] = dout

    if tag == "a":
        # every parameter's gradient, before peft wraps the model (uses no generator)
        names, params = zip(*model.named_parameters())
        out = model(ids).last_hidden_state
        grads = torch.autograd.grad(out, params, grad_outputs=dout)
        gw = {n.removeprefix("text_model."): gr.detach().to(torch.float32).contiguous()
              for n, gr in zip(names, grads)}
        save_file(gw, os.path.join(FX, f"clip_{tag}_grads.safetensors"))
        print(tag, "full grads:", len(gw), "tensors,", sum(v.numel() for v in gw.values()), "floats")

    # LoRA through peft
    lcfg = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=TARGETS)
    pm = get_peft_model(model, lcfg)
    adapters = []
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                mod.lora_B["default"].weight.copy_(0.3 * torch.randn(mod.lora_B["default"].weight.shape,
                                                                     generator=g, dtype=torch.float64))
                # round A and B to fp32 so the C side sees the same numbers
                for w in (mod.lora_A["default"].weight, mod.lora_B["default"].weight):
                    w.copy_(w.float().double())
                # kohya's module path (transformers 4's tree); transformers 5 has
                # no "text_model." level in CLIPTextModel any more
                key = name.split("base_model.model.", 1)[1]
                key = key if key.startswith("text_model.") else "text_model." + key
                adapters.append((key, mod))
    assert len(adapters) == 6 * n, len(adapters)

    runs = [("lora", None)] + ([("lora_skip2", 1)] if tag == "a" else [])
    for prefix, dclip in runs:
        params = []
        for _, mod in adapters:
            params += [mod.lora_A["default"].weight, mod.lora_B["default"].weight]
        pm.zero_grad()
        if dclip is None:
            out = pm(ids).last_hidden_state
        else:
            out = encode_prompt_diffusers(pm, ids, clip_skip=dclip, inner=pm.base_model.model)
        grads = torch.autograd.grad(out, params, grad_outputs=dout, allow_unused=True)
        # the adapters of a skipped layer are not in the graph: their gradient is 0
        assert sum(gr is None for gr in grads) == (0 if dclip is None else 12)
        grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
        fx[f"{prefix}.out"] = out.detach()
        for i, (key, mod) in enumerate(adapters):
            if prefix == "lora":
                fx[f"lora.{key}.A"] = mod.lora_A["default"].weight.detach()
                fx[f"lora.{key}.B"] = mod.lora_B["default"].weight.detach()
            fx[f"{prefix}.{key}.dA"] = grads[2 * i]
            fx[f"{prefix}.{key}.dB"] = grads[2 * i + 1]

    fx = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in fx.items()}
    save_file(fx, os.path.join(FX, f"clip_{tag}_io.safetensors"))
    with open(os.path.join(out_dir, "config.json")) as fh:
        print(tag, "config:", {k: v for k, v in json.load(fh).items() if k in cfg})
    print(tag, "tensors:", len(fx), "sizes:",
          os.path.getsize(os.path.join(out_dir, "model.safetensors")),
          os.path.getsize(os.path.join(FX, f"clip_{tag}_io.safetensors")))


if __name__ == "__main__":
    for tag, cfg in CONFIGS.items():
        build(tag, cfg)
