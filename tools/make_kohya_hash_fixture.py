"""Write tests/fixtures/kohya_hashes.txt: the sshs_model_hash and
sshs_legacy_hash that kohya's sd-scripts would put in a LoRA file, for a few
small fixed files, so tests/test_caption.c can check st_writer_kohya_hashes.

What kohya does (library/train_util.py, precalculate_safetensors_hashes, with
addnet_hash_safetensors and addnet_hash_legacy), re-implemented here from its
description on top of the real `safetensors` library:
  1. keep only the metadata keys starting with "ss_";
  2. serialise the tensors with that metadata, as safetensors.torch.save does;
  3. model hash:  sha256 of the bytes after the header (8-byte length + header);
     legacy hash: the first 8 hex digits of sha256 of the 0x10000 bytes read
     at offset 0x100000 (fewer, or none, when the file is shorter).

The tensors' values are a formula (multiples of 1/64 below 8, exact in both
float32 and float16), and the C test builds the same tensors from it.

    /work/venv/bin/python tools/make_kohya_hash_fixture.py
"""
import hashlib

import torch
from safetensors.torch import save


def values(n, seed):
    i = torch.arange(n, dtype=torch.int64)
    return (((i * 37 + seed) % 1009) - 504).to(torch.float32) / 64.0


def kohya_hashes(tensors, metadata):
    md = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = save(tensors, md)
    n = int.from_bytes(b[:8], "little")
    model = hashlib.sha256(b[8 + n:]).hexdigest()
    legacy = hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]
    return model, legacy, len(b), 8 + n


# (case name, dtype of the weights, [(name, shape, seed)], metadata)
META = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_tag_frequency": '{"10_style": {"red": 3, "caf\\u00e9": 1}}',
    "ss_comment": 'quote " backslash \\ tab \t newline \n caf\u00e9 \u2603',
    "modelspec.title": "left out of the hash: not ss_",
    "sshs_model_hash": "left out too",
}
BIG = [("lora_unet_a.lora_down.weight", (4, 80000), 1),      # 1.28 MB of f32
       ("lora_unet_a.lora_up.weight", (80000, 4), 2),
       ("lora_unet_b.lora_down.weight", (4, 320), 3)]
CASES = [
    ("f32_big", torch.float32, BIG, META),
    ("f16_big", torch.float16, BIG, META),
    ("f32_small", torch.float32, [("x.lora_down.weight", (4, 320), 5)], META),   # < 1 MiB: legacy of nothing
    ("f32_big_nometa", torch.float32, BIG, {"ss_v2": "False"}),
]

lines = ["# case model_hash legacy_hash file_bytes data_offset (tools/make_kohya_hash_fixture.py)"]
for name, dt, specs, md in CASES:
    t = {}
    for tn, shape, seed in specs:
        numel = shape[0] * shape[1]
        t[tn] = values(numel, seed).reshape(shape).to(dt)
        alpha = tn.split(".")[0] + ".alpha"
        t[alpha] = torch.tensor(2.0, dtype=torch.float32)    # float32 alpha beside f16 weights: dtype order
    m, l, size, off = kohya_hashes(t, md)
    lines.append(f"{name} {m} {l} {size} {off}")
open("tests/fixtures/kohya_hashes.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
