"""Decode products with int8 weight rows: ra's kernel (engine/int8_decode.py) against torch's
`_weight_int8pack_mm` (the path it replaced on a CPU), in the same run, one row of bf16
activations. Each shape gets enough distinct weight matrices to outgrow the caches, read in turn
as a decode step reads its layers, so the weights come from DRAM.

    python benchmarks/int8_decode.py [K N COPIES …]   (default: Qwen2.5-0.5B's int8 shapes)
"""

import json
import sys
import time

import torch

from ra_cli.engine.int8_decode import int8_matmul

QWEN_INT8 = [(896, 1152, 24), (896, 896, 24), (896, 9728, 24), (4864, 896, 24), (896, 151936, 2)]
args = [int(a) for a in sys.argv[1:]]
shapes = [tuple(args[i:i + 3]) for i in range(0, len(args), 3)] or QWEN_INT8
generator = torch.Generator().manual_seed(0)


def kernel(x, weights, scales):
    """What PackedLinear runs on a CPU for matrices of 1 MiB and more, called here at every size."""
    return int8_matmul(x, weights, scales, smallest=0)


for k, n, copies in shapes:
    weights = [torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8) for _ in range(copies)]
    scales = (torch.rand(n, generator=generator) * 0.01).bfloat16()
    x = torch.randn(1, k, generator=generator).bfloat16()
    row = {"in": k, "out": n, "matrices": copies, "threads": torch.get_num_threads()}
    for name, multiply in (("kernel", kernel), ("torch", torch._weight_int8pack_mm),
                           ("kernel_again", kernel), ("torch_again", torch._weight_int8pack_mm)):
        for w in weights[:2]:  # warm-up (and compilation)
            multiply(x, w, scales)
        times = []
        for _ in range(5):
            began = time.perf_counter()
            for w in weights:
                multiply(x, w, scales)
            times.append((time.perf_counter() - began) / copies)
        seconds = sorted(times)[2]
        row[f"{name}_ms"] = round(seconds * 1e3, 3)
        row[f"{name}_GB_per_s"] = round(n * k / seconds / 1e9, 1)
    print(json.dumps(row), flush=True)
