"""Decode products with packed weights: ra's numba kernels against the torch kernels they replaced
on a CPU, in the same run, one row of bf16 activations — int8 rows (engine/int8_decode.py against
`_weight_int8pack_mm`) or int4 groups (engine/int4_decode.py against `_weight_int4pack_mm_for_cpu`).
Each shape gets enough distinct weight matrices to outgrow the caches, read in turn as a decode
step reads its layers, so the weights come from DRAM. Timed as PackedLinear calls them (the
kernels' array views made once, as PackedLinear keeps them).

    python benchmarks/decode_weights.py int8|int4 [K N COPIES …]
    (defaults: Qwen2.5-0.5B's int8 shapes; SmolLM2-135M's int4 shapes)
"""

import json
import sys
import time

import torch

import numpy as np

from ra_cli.engine.int4_decode import TILE, int4_matmul, int4_tiles_matmul, int4_views, pack_int4_tiles
from ra_cli.engine.int8_decode import int8_matmul, int8_rows_matmul, int8_views

DEFAULTS = {"int8": [(896, 1152, 64), (896, 896, 64), (896, 9728, 24), (4864, 896, 24), (896, 151936, 2)],
            "int4": [(576, 960, 256), (576, 576, 256), (576, 3072, 96), (1536, 576, 256)]}
kind, args = sys.argv[1], [int(a) for a in sys.argv[2:]]
shapes = [tuple(args[i:i + 3]) for i in range(0, len(args), 3)] or DEFAULTS[kind]
generator = torch.Generator().manual_seed(0)


def int8_case(k, n):
    weights = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    scales = (torch.rand(n, generator=generator) * 0.01).bfloat16()
    views = int8_views(weights, scales)
    out = np.empty((1, n), np.float32)
    return (lambda x: int8_rows_matmul(x, *views, out),
            lambda x: int8_matmul(x, weights, scales, smallest=0, views=views),  # every size: PackedLinear's >= 1 MiB
            lambda x: torch._weight_int8pack_mm(x, weights, scales))


def int4_case(k, n):
    q = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.int32)
    step = torch.rand(n, k // 32, generator=generator) * 0.01
    low = -8 * step
    views = int4_views(*pack_int4_tiles(q, step, low))
    out = np.empty((1, -(-n // TILE) * TILE), np.float32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_zeros = torch.stack([step, low + 8 * step], -1).transpose(0, 1).contiguous().bfloat16()
    return (lambda x: int4_tiles_matmul(x, *views, out),
            lambda x: int4_matmul(x, views, n),
            lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros))


for k, n, copies in shapes:
    cases = [(int8_case if kind == "int8" else int4_case)(k, n) for _ in range(copies)]
    x = torch.randn(1, k, generator=generator).bfloat16()
    inputs = (x.float().numpy(), x, x)  # the kernel's as a decode step has it: float32 already
    row = {"kind": kind, "in": k, "out": n, "matrices": copies, "threads": torch.get_num_threads()}
    for name, which in (("kernel", 0), ("call", 1), ("torch", 2), ("kernel_again", 0), ("call_again", 1),
                        ("torch_again", 2)):
        for case in cases[:2]:  # warm-up (and compilation)
            case[which](inputs[which])
        times = []
        for _ in range(5):
            began = time.perf_counter()
            for case in cases:
                case[which](inputs[which])
            times.append((time.perf_counter() - began) / copies)
        seconds = sorted(times)[2]
        row[f"{name}_ms"] = round(seconds * 1e3, 3)
        row[f"{name}_weights_G_per_s"] = round(n * k / seconds / 1e9, 2)
    print(json.dumps(row), flush=True)
