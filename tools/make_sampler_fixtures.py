"""make_sampler_fixtures.py: references for torch_rng.c and sampler.c.

Writes two files, read by tests/test_torch_rng.c and tests/test_sampler.c:

tests/fixtures/torch_rng.safetensors
  cpu.<seed>.<n>          torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed)),
                          n in 1 7 15 16 17 100 (and 16384 = 4*64*64 for two seeds)
  rand.<seed>             torch.rand(100, ...) (the mt19937 uniforms alone)
  seq.<seed>              randn(3), randn(5), randn(20), randn(1), randn(33), randn(2)
                          on ONE generator, concatenated (the state and torch's cached
                          second Box-Muller value carry over between calls)
  default.<seed>          torch.manual_seed(seed); torch.randn(40); torch.randn(3)
  libm.<seed>.<n>         as cpu.*, with ATEN_CPU_CAPABILITY=default: torch's portable
                          kernel (libm log/sin/cos), what CPUs without AVX2 or with
                          AVX-512 run
  philox.<seed>           AUTOMATIC1111's modules/rng_philox.py Generator(seed): randn((3, 4)),
                          randn((1, 4, 8, 8)), randn((7,)) concatenated, its numpy
                          code transcribed below (see the note there)

tests/fixtures/sampler.safetensors
  sched.<kind>.<spacing>[.karras].<steps>.{timesteps,sigmas,init_sigma}
                          set_timesteps of the diffusers scheduler in SD1.5's config
  loop.<case>.{timesteps,sigmas,init,latents}
                          the StableDiffusionPipeline denoising loop for 10 (or 20)
                          steps on a (1, 4, 8, 8) latent with a fake model (below),
                          generator=torch.Generator("cpu").manual_seed(seed): `init`
                          is randn * init_noise_sigma, `latents` (steps, 256) the
                          latents after every scheduler.step

The fake model, exactly reproducible in C (float32, each operation rounded):
    eps[j] = x[j] * 0.1 + t * w[j],   w[j] = float((j % 13) - 6) * 1e-6
with x the scaled model input and t the timestep the pipeline passes.

Run from anywhere (about 20 s):
    /work/venv/bin/python tools/make_sampler_fixtures.py
"""
import inspect
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler)

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.normpath(os.path.join(HERE, "..", "tests", "fixtures"))

SEEDS = [0, 1, 42, 2**32 + 5, 123456789]   # 2^32 + 5: torch seeds mt19937 with the low 32 bits
SIZES = [1, 7, 15, 16, 17, 100]
BIG = 4 * 64 * 64
SEQ = [3, 5, 20, 1, 33, 2]


def cpu_randn_part():
    out = {}
    for seed in SEEDS:
        for n in SIZES + ([BIG] if seed in (0, 42) else []):
            g = torch.Generator("cpu").manual_seed(seed)
            out[f"{seed}.{n}"] = torch.randn(n, generator=g)
    return out


# ---------------------------------------------------------------- A1111 Philox
# Transcription of AUTOMATIC1111 stable-diffusion-webui modules/rng_philox.py
# (the "NV" seed source, which reproduces torch.randn(..., device="cuda") with
# a seeded CUDA generator; A1111 checked it against torch on CUDA). We cannot
# run CUDA here, so this is parity with A1111's numpy code, not with torch.
PHILOX_M = [0xD2511F53, 0xCD9E8D57]
PHILOX_W = [0x9E3779B9, 0xBB67AE85]
TWO_POW32_INV = np.array([2.3283064e-10], dtype=np.float32)
TWO_POW32_INV_2PI = np.array([2.3283064e-10 * 6.2831855], dtype=np.float32)


def _u32_pairs(x):
    return x.view(np.uint32).reshape(-1, 2).transpose(1, 0)


def _philox_round(counter, key):
    v1 = _u32_pairs(counter[0].astype(np.uint64) * PHILOX_M[0])
    v2 = _u32_pairs(counter[2].astype(np.uint64) * PHILOX_M[1])
    counter[0] = v2[1] ^ counter[1] ^ key[0]
    counter[1] = v2[0]
    counter[2] = v1[1] ^ counter[3] ^ key[1]
    counter[3] = v1[0]


def _philox4_32(counter, key, rounds=10):
    for _ in range(rounds - 1):
        _philox_round(counter, key)
        key[0] = key[0] + PHILOX_W[0]
        key[1] = key[1] + PHILOX_W[1]
    _philox_round(counter, key)
    return counter


def _box_muller(x, y):
    u = x * TWO_POW32_INV + TWO_POW32_INV / 2
    v = y * TWO_POW32_INV_2PI + TWO_POW32_INV_2PI / 2
    s = np.sqrt(-2.0 * np.log(u))
    return (s * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    def __init__(self, seed):
        self.seed = seed
        self.offset = 0

    def randn(self, shape):
        n = int(np.prod(shape))
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        key = np.empty(n, dtype=np.uint64)
        key.fill(self.seed)
        key = _u32_pairs(key)
        g = _philox4_32(counter, key)
        return _box_muller(g[0], g[1]).reshape(shape)


def make_torch_rng():
    fx = {}
    for k, v in cpu_randn_part().items():
        fx["cpu." + k] = v
    for seed in SEEDS:
        g = torch.Generator("cpu").manual_seed(seed)
        fx[f"rand.{seed}"] = torch.rand(100, generator=g)
        g = torch.Generator("cpu").manual_seed(seed)
        fx[f"seq.{seed}"] = torch.cat([torch.randn(n, generator=g) for n in SEQ])
        torch.manual_seed(seed)
        fx[f"default.{seed}"] = torch.cat([torch.randn(40), torch.randn(3)])
        ph = PhiloxGenerator(seed)
        fx[f"philox.{seed}"] = torch.from_numpy(np.concatenate(
            [ph.randn((3, 4)).ravel(), ph.randn((1, 4, 8, 8)).ravel(), ph.randn((7,)).ravel()]))
    # torch's portable kernel, in a child process (the capability is fixed at start-up)
    tmp = os.path.join(FIX, ".libm_part.safetensors")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--libm-part", tmp], env=env, check=True)
    from safetensors.torch import load_file
    for k, v in load_file(tmp).items():
        fx["libm." + k] = v
    os.remove(tmp)
    meta = {"torch": torch.__version__, "numpy": np.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "seq_sizes": " ".join(map(str, SEQ))}
    save_file({k: v.contiguous() for k, v in fx.items()}, os.path.join(FIX, "torch_rng.safetensors"), meta)
    print("torch_rng.safetensors:", len(fx), "tensors")


# ---------------------------------------------------------------- samplers
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, prediction_type="epsilon")
CLASSES = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
           "euler_a": EulerAncestralDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


def make_scheduler(kind, spacing=None, karras=False, prediction="epsilon"):
    cfg = dict(SD15, prediction_type=prediction)
    if kind in ("ddim", "ddpm"):
        cfg.update(clip_sample=False)
    if kind == "ddim":
        cfg.update(set_alpha_to_one=False)
    if kind == "ddpm":
        cfg.update(variance_type="fixed_small")
    if kind == "dpmpp_2m":
        cfg.update(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                   lower_order_final=True, use_karras_sigmas=karras)
    if kind == "euler":
        cfg.update(use_karras_sigmas=karras)
    if spacing is not None:
        cfg.update(timestep_spacing=spacing)
    return CLASSES[kind](**cfg)


def default_spacing(kind):
    # SD1.5's scheduler_config.json names none: each class's own default
    return inspect.signature(CLASSES[kind].__init__).parameters["timestep_spacing"].default


def fake_model(x, t):
    n = x.numel()
    w = (((torch.arange(n) % 13) - 6).to(torch.float32) * 1e-6).reshape(x.shape)
    return x * 0.1 + t * w


def run_loop(sched, steps, seed, eta=0.0):
    """StableDiffusionPipeline.__call__'s order of operations, model replaced"""
    g = torch.Generator("cpu").manual_seed(seed)
    sched.set_timesteps(steps)
    latents = torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float32)   # prepare_latents
    latents = latents * sched.init_noise_sigma
    init = latents.clone()
    params = set(inspect.signature(sched.step).parameters.keys())
    extra = {}
    if "eta" in params:
        extra["eta"] = eta
    if "generator" in params:
        extra["generator"] = g
    out = []
    for t in sched.timesteps:
        inp = sched.scale_model_input(latents, t)
        eps = fake_model(inp, t)
        latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
        out.append(latents.clone().reshape(-1))
    return init, torch.stack(out)


# (case, kind, spacing or None for the default, karras, prediction, steps, seed, eta)
LOOPS = [
    ("ddim", "ddim", None, False, "epsilon", 10, 42, 0.0),
    ("ddim_eta1", "ddim", None, False, "epsilon", 10, 7, 1.0),
    ("ddpm", "ddpm", None, False, "epsilon", 10, 42, 0.0),
    ("euler", "euler", None, False, "epsilon", 10, 42, 0.0),
    ("euler_karras", "euler", None, True, "epsilon", 10, 42, 0.0),
    ("euler_leading", "euler", "leading", False, "epsilon", 10, 3, 0.0),
    ("euler_a", "euler_a", None, False, "epsilon", 10, 42, 0.0),
    ("dpmpp_2m", "dpmpp_2m", None, False, "epsilon", 10, 42, 0.0),
    ("dpmpp_2m_karras", "dpmpp_2m", None, True, "epsilon", 10, 42, 0.0),
    ("dpmpp_2m_trailing20", "dpmpp_2m", "trailing", False, "epsilon", 20, 5, 0.0),
    ("ddim_v", "ddim", None, False, "v_prediction", 10, 11, 0.0),
    ("ddpm_v", "ddpm", None, False, "v_prediction", 10, 11, 0.0),
    ("euler_v", "euler", None, False, "v_prediction", 10, 11, 0.0),
    ("euler_a_v", "euler_a", None, False, "v_prediction", 10, 11, 0.0),
    ("dpmpp_2m_v", "dpmpp_2m", None, False, "v_prediction", 10, 11, 0.0),
]

SCHED_STEPS = [1, 3, 7, 10, 20, 50]


def make_sampler():
    fx = {}
    for kind in CLASSES:
        for spacing in ("leading", "trailing", "linspace"):
            for karras in ((False, True) if kind in ("euler", "dpmpp_2m") else (False,)):
                for steps in SCHED_STEPS:
                    s = make_scheduler(kind, spacing, karras)
                    s.set_timesteps(steps)
                    key = f"sched.{kind}.{spacing}{'.karras' if karras else ''}.{steps}"
                    fx[key + ".timesteps"] = s.timesteps.to(torch.float32)
                    if hasattr(s, "sigmas") and kind != "ddim" and kind != "ddpm":
                        fx[key + ".sigmas"] = s.sigmas.to(torch.float32)
                    fx[key + ".init_sigma"] = torch.tensor([float(s.init_noise_sigma)], dtype=torch.float32)
    for case, kind, spacing, karras, pred, steps, seed, eta in LOOPS:
        s = make_scheduler(kind, spacing, karras, pred)
        init, lat = run_loop(s, steps, seed, eta)
        fx[f"loop.{case}.timesteps"] = s.timesteps.to(torch.float32)
        if kind not in ("ddim", "ddpm"):
            fx[f"loop.{case}.sigmas"] = s.sigmas.to(torch.float32)
        fx[f"loop.{case}.init"] = init.reshape(-1)
        fx[f"loop.{case}.latents"] = lat
    meta = {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__,
            "default_spacing": " ".join(f"{k}={default_spacing(k)}" for k in CLASSES)}
    save_file({k: v.contiguous() for k, v in fx.items()}, os.path.join(FIX, "sampler.safetensors"), meta)
    print("sampler.safetensors:", len(fx), "tensors;", meta["default_spacing"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--libm-part":
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        save_file({k: v.contiguous() for k, v in cpu_randn_part().items()}, sys.argv[2])
        sys.exit(0)
    make_torch_rng()
    make_sampler()
