"""Write tests/fixtures/st_python.safetensors with the real Python
`safetensors` library, so tests/test_safetensors.c can check that our reader
agrees with it (and that our writer produces the same bytes).

The float16 / bfloat16 tensors are torch's own rounding of `src`, and the
*_as_f32 tensors are torch's conversion of those back to float32: the C test
compares its converters against both, bit for bit.

    /work/venv/bin/python tools/make_st_fixture.py
"""
import math

import torch
from safetensors.torch import save_file

torch.manual_seed(0)

# values that exercise rounding: ties, subnormals, overflow, specials
special = [
    0.0, -0.0, 1.0, -2.5, 0.1, 1.0 / 3.0, math.pi,
    65504.0, 65519.0, 65520.0, -65520.0, 1e6,          # largest half, last below the inf tie, the tie, beyond
    2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -25, 2.0 ** -26, 5e-8, -1e-7, 6.0e-5,
    1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8,   # f16 / bf16 ties
    3.3895314e38, 3.4028235e38, 1e-40, -1e-45,           # near bf16 max, f32 max, f32 subnormals
    float("inf"), float("-inf"), float("nan"),
]
src = torch.cat([
    torch.tensor(special, dtype=torch.float32),
    torch.randn(64) * torch.logspace(-9, 5, 64),          # magnitudes from 1e-9 to 1e5
])

tensors = {
    "f32": (torch.arange(6, dtype=torch.float32) * 0.25 - 1.0).reshape(2, 3),
    "src": src,
    "src_f16": src.half(),
    "src_f16_as_f32": src.half().float(),
    "src_bf16": src.bfloat16(),
    "src_bf16_as_f32": src.bfloat16().float(),
    "f64": torch.tensor([1.5, -2.0 ** -30, 1e300], dtype=torch.float64),
    "i64": torch.tensor([-1, 0, 2 ** 40], dtype=torch.int64),
    "conv.weight": torch.randn(4, 2, 3, 3),
    "scalar": torch.tensor(7.25),
    "empty": torch.zeros(0, 3),
    "odd.f16": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float16),   # 6 bytes: later tensors sit unaligned
    "u8": torch.tensor([1, 2, 255], dtype=torch.uint8),
}
save_file(tensors, "tests/fixtures/st_python.safetensors",
          metadata={"format": "pt", "note": "h\u00e9llo \"q\"\n\\"})
print({k: (str(v.dtype), list(v.shape)) for k, v in tensors.items()})
