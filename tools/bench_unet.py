#!/usr/bin/env python3
"""The PyTorch side of the UNet-step benchmark (tools/bench_unet.sh runs it).

    bench_unet.py prepare DIR INPUTS [SIDE]     fixed inputs for both sides
    bench_unet.py infer   DIR INPUTS OUT [bf16] one UNet forward, torch.no_grad()
    bench_unet.py train   DIR INPUTS OUT [bf16] LoRA (peft) forward + backward
    bench_unet.py train-tf DIR INPUTS OUT [bf16] the same, LoRA "transformer" r16
                          bf16: under torch.autocast("cpu", torch.bfloat16), as
                          kohya's --mixed_precision bf16 (weights stay fp32)
    bench_unet.py l2      FP32_OUT BF16_OUT [MODE]   relative L2 of a bf16 step against fp32
    bench_unet.py compare C_OUT PY_OUT [MODE]   max|a-b| / max|b| of eps (and gradients)
                          (MODE: the label of the result line, default infer
                          or train from what the files hold)
    bench_unet.py same    C_OUT C16_OUT         max|a-b| of the fp32-held and fp16-held sdlora runs
    bench_unet.py report  LOG...                the table, from the "result" lines

DIR is the diffusers folder of tools/make_sd15_random.py (fp16 weights, loaded
as float32: the same fp16-rounded numbers the C side converts). The model is
loaded as StableDiffusion pipelines hold it (UNet, VAE, text encoder, all
float32 on the CPU), because the C side's sd_model_load holds all three too.

infer: unet(x, t=500, ctx) under torch.no_grad(). train: peft LoRA rank 4,
alpha 4, no dropout, on to_q, to_k, to_v, to_out.0 (every attn1 and attn2),
base weights frozen, A and B set from INPUTS; loss = mse(eps, target);
loss.backward(). train-tf: peft LoRA rank 16, alpha 16, on the attn targets
and proj_in, proj_out, ff.net.0.proj, ff.net.2 of every transformer (the C
side's --targets transformer), A and B from INPUTS' "lora16." tensors.
All: one warm-up run, then best of REPS (3,
SDLORA_BENCH_REPS) runs. Threads: torch.set_num_threads(OMP_NUM_THREADS or
every core). One measurement per process, so ru_maxrss is its own peak;
the peak of the steps alone is measured after resetting the kernel's
high-water mark (Linux /proc/self/clear_refs), as the C side does.
"""
import math
import os
import re
import resource
import sys
import time

import torch


def threads():
    n = os.environ.get("OMP_NUM_THREADS")
    return int(n) if n else os.cpu_count()


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: kB


def reset_peak_rss():
    """Linux: 5 into /proc/self/clear_refs resets the peak RSS to the current one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


ATTN = r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
# the transformer targets: attn's, and the projections and feed-forwards of
# every transformer (proj_in/proj_out are 1x1 convolutions in SD1.5)
TRANSFORMER = r"(\.attn[12]\.(to_q|to_k|to_v|to_out\.0)|\.attentions\.\d+\.(proj_in|proj_out)|\.ff\.net\.(0\.proj|2))$"


def lora_sites(unet, pattern=ATTN):
    """(diffusers module name, in, out) of every LoRA target, in module order
    (the C side's unet_add_lora "attn" / "transformer" covers the same set)."""
    out = []
    for name, m in unet.named_modules():
        if re.search(pattern, name):
            if isinstance(m, torch.nn.Conv2d):
                out.append((name, m.in_channels, m.out_channels))
            else:
                out.append((name, m.in_features, m.out_features))
    return out


def prepare(folder, path, side=64):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    cfg = UNet2DConditionModel.load_config(os.path.join(folder, "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    g = torch.Generator().manual_seed(42)
    t = {
        "x": torch.randn(1, cfg["in_channels"], side, side, generator=g),
        "t": torch.tensor([500.0]),
        "ctx": torch.randn(1, 77, cfg["cross_attention_dim"], generator=g),
        "target": torch.randn(1, cfg["out_channels"], side, side, generator=g),
    }
    # A as peft/kohya initialise it (Kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in)));
    # B small but nonzero, so the adapters change the output and both
    # gradients are nonzero (a fresh B = 0 would leave dA = 0)
    r = 4
    sites = lora_sites(unet)
    for name, i, o in sites:
        t[f"lora.{name}.A"] = (torch.rand(r, i, generator=g) * 2 - 1) / math.sqrt(i)
        t[f"lora.{name}.B"] = torch.randn(o, r, generator=g) * 0.02
    # train-tf: rank 16 on the transformer targets, drawn the same way
    sites16 = lora_sites(unet, TRANSFORMER)
    for name, i, o in sites16:
        t[f"lora16.{name}.A"] = (torch.rand(16, i, generator=g) * 2 - 1) / math.sqrt(i)
        t[f"lora16.{name}.B"] = torch.randn(o, 16, generator=g) * 0.02
    save_file(t, path)
    print(f"{path}: x {tuple(t['x'].shape)}, t 500, ctx {tuple(t['ctx'].shape)}, {len(sites)} adapters "
          f"(attn r4), {len(sites16)} (transformer r16)")


def load(folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    kw = dict(torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw)
    return unet, vae, te


def step(folder, inputs, out, train, bf16=False, tf=False):
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(threads())
    reps = int(os.environ.get("SDLORA_BENCH_REPS", "3"))
    t0 = time.perf_counter()
    unet, vae, te = load(folder)
    load_s = time.perf_counter() - t0
    print(f"loaded {folder} in {load_s:.1f} s, RSS {rss_mb():.0f} MB, {torch.get_num_threads()} threads")
    inp = load_file(inputs)
    x, t, ctx = inp["x"], inp["t"], inp["ctx"]
    mode = ("train-tf" if tf else "train") if train else "infer"
    import contextlib
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if train:
        from peft import LoraConfig
        unet.requires_grad_(False)
        # peft matches a string target as a whole-name regex: ".*" + the pattern less its "$"
        r, pattern, prefix = (16, TRANSFORMER, "lora16") if tf else (4, ATTN, "lora")
        unet.add_adapter(LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, init_lora_weights=True,
                                    target_modules=".*" + pattern[:-1] if tf else ["to_q", "to_k", "to_v", "to_out.0"]))
        n = 0
        with torch.no_grad():
            for name, m in unet.named_modules():
                if hasattr(m, "lora_A") and len(m.lora_A):
                    k = next(iter(m.lora_A.keys()))
                    wa, wb = m.lora_A[k].weight, m.lora_B[k].weight   # (r, in[, 1, 1]), (out, r[, 1, 1])
                    wa.copy_(inp[f"{prefix}.{name}.A"].reshape(wa.shape))
                    wb.copy_(inp[f"{prefix}.{name}.B"].reshape(wb.shape))
                    n += 1
        sites = lora_sites(unet, pattern)
        assert n == len(sites), (n, len(sites))
        trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        print(f"peft LoRA {'transformer' if tf else 'attn'} rank {r}: {n} adapters, {trainable} trainable parameters")
        unet.train()
    else:
        unet.eval()

    load_rss, load_peak = rss_mb(), peak_rss_mb()
    step_known = reset_peak_rss()
    best = best_f = best_b = best_cpu = math.inf
    for rep in range(reps + 1):          # rep 0 warms up
        a, ca = time.perf_counter(), time.process_time()
        if train:
            unet.zero_grad(set_to_none=True)
            with amp:
                eps = unet(x, t, ctx).sample
            b = time.perf_counter()
            loss = torch.nn.functional.mse_loss(eps.float(), inp["target"])
            loss.backward()
        else:
            with torch.no_grad(), amp:
                eps = unet(x, t, ctx).sample
            b = time.perf_counter()
        c, cc = time.perf_counter(), time.process_time() - ca
        if rep:
            best_cpu = min(best_cpu, cc)
        extra = f" (forward {b - a:.3f} s, backward {c - b:.3f} s, loss {loss.item():.6f})" if train else ""
        print(f"  {'run' if rep else 'warm-up'} {rep}: {c - a:.3f} s (CPU {cc:.3f} s){extra}", flush=True)
        if rep and c - a < best:
            best, best_f, best_b = c - a, b - a, c - b

    res = {"eps": eps.detach().float().contiguous()}
    if train:
        for name, m in unet.named_modules():
            if hasattr(m, "lora_A") and len(m.lora_A):
                k = next(iter(m.lora_A.keys()))
                ga, gb = m.lora_A[k].weight.grad, m.lora_B[k].weight.grad   # as 2-D (r x in, out x r), as the C side
                res[f"grad.{name}.A"] = ga.float().reshape(ga.shape[0], -1).contiguous()
                res[f"grad.{name}.B"] = gb.float().reshape(gb.shape[0], -1).contiguous()
    save_file(res, out)
    step_peak = peak_rss_mb() if step_known else -1
    peak = max(step_peak, load_peak)
    print(f"best of {reps}: {best:.3f} s, peak RSS {peak:.0f} MB (after loading {load_rss:.0f} MB, "
          f"peak during the steps {step_peak:.0f} MB)")
    print(f"result pytorch{'-bf16' if bf16 else ''} {mode} time_s={best:.4f} fwd_s={best_f:.4f} bwd_s={best_b if train else 0:.4f} "
          f"peak_rss_mb={peak:.0f} load_rss_mb={load_rss:.0f} step_peak_rss_mb={step_peak:.0f} "
          f"threads={torch.get_num_threads()} load_s={load_s:.1f} cpu_s={best_cpu:.3f}")


def relerr(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def compare(c_path, py_path, label=None, tol=1e-3):
    """max|a - b| / max|b| per tensor (b = PyTorch); eps and, for a training
    step, the worst over all LoRA gradients."""
    from safetensors.torch import load_file
    c, p = load_file(c_path), load_file(py_path)
    e = relerr(c["eps"], p["eps"])
    grads = [k for k in p if k.startswith("grad.")]
    missing = [k for k in grads if k not in c]
    if missing:
        raise SystemExit(f"compare: {c_path} lacks {missing[0]} (and {len(missing) - 1} more)")
    worst, wk = 0.0, ""
    for k in grads:
        r = relerr(c[k], p[k])
        if r > worst:
            worst, wk = r, k
    ok = e <= tol and worst <= tol
    what = label or ("train" if grads else "infer")
    line = f"result parity {what} eps_rel={e:.3e}"
    if grads:
        line += f" grad_rel={worst:.3e} grad_worst={wk} ngrads={len(grads)}"
    print(line + f" tol={tol:g} status={'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


def l2(f32_path, bf16_path, label=None):
    """||bf16 - fp32|| / ||fp32|| of eps and of all LoRA gradients together:
    what a bf16 step changes against the fp32 step of the same program."""
    from safetensors.torch import load_file
    a, b = load_file(f32_path), load_file(bf16_path)
    def rel(keys):
        d = sum(((b[k].double() - a[k].double()) ** 2).sum().item() for k in keys)
        n = sum((a[k].double() ** 2).sum().item() for k in keys)
        return math.sqrt(d / n) if n > 0 else math.sqrt(d)
    grads = [k for k in a if k.startswith("grad.")]
    mode = label or ("train" if grads else "infer")
    line = f"result l2 {mode} eps_rel_l2={rel(['eps']):.3e}"
    if grads:
        line += f" grad_rel_l2={rel(grads):.3e}"
    print(line)
    return 0


def same(a_path, b_path):
    """max|a - b| over eps and every LoRA gradient: the fp32-held and the
    fp16-held runs (from an fp16 file they must be 0)."""
    from safetensors.torch import load_file
    a, b = load_file(a_path), load_file(b_path)
    worst, wk = 0.0, "eps"
    for k in a:
        d = (a[k].double() - b[k].double()).abs().max().item()
        if d > worst:
            worst, wk = d, k
    eps = (a["eps"].double() - b["eps"].double()).abs().max().item()
    mode = "train" if any(k.startswith("grad.") for k in a) else "infer"
    print(f"result fp16diff {mode} eps_max_abs={eps:.3e} max_abs={worst:.3e} worst={wk}")
    return 0


def report(logs):
    r = {}
    for path in logs:
        with open(path) as f:
            for line in f:
                if line.startswith("result "):
                    w = line.split()
                    r[(w[1], w[2])] = dict(kv.split("=", 1) for kv in w[3:])
    def row(label, mode):
        c, p = r.get(("sdlora", mode)), r.get(("pytorch", mode))
        if not c or not p:
            print(f"{label}: missing ({'sdlora' if not c else 'pytorch'} did not finish)")
            return
        tc, tp = float(c["time_s"]), float(p["time_s"])
        print(f"{label}: sdlora {tc:.2f} s, PyTorch {tp:.2f} s, ratio {tc / tp:.2f}x "
              f"(sdlora/PyTorch); peak RSS {c['peak_rss_mb']} MB vs {p['peak_rss_mb']} MB")
        if "step_peak_rss_mb" in c and "step_peak_rss_mb" in p:
            print(f"    RSS after loading {c['load_rss_mb']} MB vs {p['load_rss_mb']} MB; "
                  f"peak during the steps {c['step_peak_rss_mb']} MB vs {p['step_peak_rss_mb']} MB")
        if mode != "infer":
            print(f"    forward {float(c['fwd_s']):.2f} s + backward {float(c['bwd_s']):.2f} s  vs  "
                  f"forward {float(p['fwd_s']):.2f} s + backward {float(p['bwd_s']):.2f} s")
    row("UNet step 64x64 (inference)            ", "infer")
    tmode = "train-ckpt" if ("sdlora", "train-ckpt") in r and ("sdlora", "train") not in r else "train"
    if tmode == "train-ckpt":
        r[("pytorch", "train-ckpt")] = r.get(("pytorch", "train"))
    row("UNet step 64x64 (LoRA attn r4 training)" + (" [sdlora with gradient checkpointing]" if tmode != "train" else ""), tmode)
    if ("sdlora", "train-tf") in r or ("pytorch", "train-tf") in r:
        row("UNet step 64x64 (LoRA transformer r16) ", "train-tf")
    pykey = {"infer": "infer", tmode: "train", "train-tf": "train-tf"}   # PyTorch's label for each sdlora mode
    for mode in ("infer", tmode):
        c, h = r.get(("sdlora", mode)), r.get(("sdlora-fp16", mode))
        if c and h:
            d = r.get(("fp16diff", "infer" if mode == "infer" else "train"))
            print(f"--weight-dtype fp16, {mode}: {float(h['time_s']):.2f} s vs fp32 {float(c['time_s']):.2f} s; "
                  f"peak RSS {h['peak_rss_mb']} vs {c['peak_rss_mb']} MB (loading {h.get('load_peak_rss_mb', '?')} vs "
                  f"{c.get('load_peak_rss_mb', '?')} MB, steps {h['step_peak_rss_mb']} vs {c['step_peak_rss_mb']} MB)"
                  + (f"; max|fp16-held - fp32-held| {float(d['max_abs']):.1e} (eps {float(d['eps_max_abs']):.1e})" if d else ""))
    for mode in ("infer", tmode, "train-tf"):
        c, h = r.get(("sdlora", mode)), r.get(("sdlora-bf16", mode))
        pb, pf = r.get(("pytorch-bf16", pykey[mode])), r.get(("pytorch", pykey[mode]))
        if not h:
            continue
        tb, t32 = float(h["time_s"]), float(h["f32_time_s"])
        line = (f"--compute bf16, {mode} ({h['kernel']}): sdlora bf16 {tb:.2f} s vs sdlora fp32 {t32:.2f} s "
                f"(same process, alternating): {t32 / tb:.2f}x faster")
        if mode != "infer":
            line += (f" [forward {float(h['fwd_s']):.2f} + backward {float(h['bwd_s']):.2f} s vs "
                     f"{float(h['f32_fwd_s']):.2f} + {float(h['f32_bwd_s']):.2f} s]")
        print(line)
        if "cpu_s" in h:
            print(f"    CPU seconds (both threads; what a busy machine does not inflate): "
                  f"{float(h['cpu_s']):.2f} vs {float(h['f32_cpu_s']):.2f}: {float(h['f32_cpu_s']) / float(h['cpu_s']):.2f}x")
        if pb and "cpu_s" in pb and "cpu_s" in h:
            print(f"    PyTorch bf16 autocast CPU seconds {float(pb['cpu_s']):.2f}"
                  + (f" (its fp32 {float(pf['cpu_s']):.2f})" if pf and "cpu_s" in pf else "")
                  + f": sdlora bf16 / PyTorch bf16 = {float(h['cpu_s']) / float(pb['cpu_s']):.2f}x (CPU time)")
        if pb:
            print(f"    PyTorch bf16 autocast {float(pb['time_s']):.2f} s"
                  + (f" (its fp32 {float(pf['time_s']):.2f} s)" if pf else "")
                  + f": sdlora bf16 / PyTorch bf16 = {tb / float(pb['time_s']):.2f}x; peak RSS {h['peak_rss_mb']} vs {pb['peak_rss_mb']} MB")
        pl = r.get(("l2", pykey[mode]))
        err = f"    error of the bf16 step against fp32 (relative L2): sdlora eps {float(h['eps_rel_l2']):.2e}"
        if mode != "infer":
            err += f", LoRA gradients {float(h['grad_rel_l2']):.2e} (worst single {float(h['grad_worst_rel_l2']):.2e})"
        if pl:
            err += f"; PyTorch autocast eps {float(pl['eps_rel_l2']):.2e}"
            if "grad_rel_l2" in pl:
                err += f", gradients {float(pl['grad_rel_l2']):.2e}"
        print(err)
    for mode in ("infer", "train", "train-tf"):
        p = r.get(("parity", mode))
        if p:
            g = f", LoRA gradients {float(p['grad_rel']):.2e} (worst {p['grad_worst']})" if "grad_rel" in p else ""
            print(f"parity {mode}: max|sdlora - diffusers| / max|diffusers|: eps {float(p['eps_rel']):.2e}{g} "
                  f"(tolerance {p['tol']}: {p['status']})")


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    a = sys.argv[2:]
    if cmd == "prepare" and len(a) in (2, 3):
        prepare(a[0], a[1], int(a[2]) if len(a) == 3 else 64)
    elif cmd in ("infer", "train", "train-tf") and (len(a) == 3 or (len(a) == 4 and a[3] == "bf16")):
        step(a[0], a[1], a[2], cmd != "infer", len(a) == 4, cmd == "train-tf")
    elif cmd == "l2" and len(a) in (2, 3):
        return l2(*a)
    elif cmd == "compare" and len(a) in (2, 3):
        return compare(*a)
    elif cmd == "same" and len(a) == 2:
        return same(a[0], a[1])
    elif cmd == "report" and a:
        report(a)
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
