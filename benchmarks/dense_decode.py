"""Dense decode attention, one token over every key of every layer: the CPU kernel
(engine/dense_decode.py) against torch's bf16 matmuls + softmax (the path it replaced), in the same
run, on random bf16 KV of a model's shape. Each layer's KV is its own buffer, read in turn as a
decode step reads them, so a step's KV comes from DRAM once it outgrows the caches.

    python benchmarks/dense_decode.py KEYS [HEADS KV_HEADS LAYERS]   (default: SmolLM2 9 3 30)

Besides GB/s it prints the kernel's float32 multiply-adds per second (2 x 64 per query head and
key: the score and the weighted value) next to what a large float32 matmul reaches on the same
threads (BLAS): how close the kernel's arithmetic is to its floor.
"""

import json
import sys
import time

import torch

from ra_cli.engine.attention import grouped_rows, matmul_decode_attention
from ra_cli.engine.dense_decode import cpu_decode_attention

n = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
heads, kv_heads, layers = (int(x) for x in sys.argv[2:5]) if len(sys.argv) > 4 else (9, 3, 30)
dim, steps = 64, 8
generator = torch.Generator().manual_seed(0)
keys = [torch.randn(kv_heads, n, dim, generator=generator).to(torch.bfloat16) for _ in range(layers)]
values = [torch.randn(kv_heads, n, dim, generator=generator).to(torch.bfloat16) for _ in range(layers)]
rows = grouped_rows(torch.randn(heads, 1, dim, generator=generator), kv_heads)  # [KVH, G, D]


def peak_multiply_adds_per_s() -> float:
    """float32 multiply-adds per second of a large square matmul (BLAS, every thread): what this
    machine's vector units reach when memory is not in the way."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    began = time.perf_counter()
    for _ in range(4):
        torch.mm(a, b)
    return 4 * 2048 ** 3 / (time.perf_counter() - began)


def torch_matmuls(rows, k, v, scaling):
    """The previous CPU path, still the path off a CPU: bf16 q k^T, float32 softmax, bf16 weights x V."""
    return matmul_decode_attention(rows, k, v, scaling)[0]


def kernel(rows, k, v, scaling):
    return cpu_decode_attention(rows, k, v, scaling)[0]


row = {"keys": n, "heads": heads, "kv_heads": kv_heads, "layers": layers, "threads": torch.get_num_threads()}
for name, attend in (("kernel", kernel), ("torch", torch_matmuls), ("kernel_again", kernel), ("torch_again", torch_matmuls)):
    for k, v in zip(keys, values):  # warm-up (and compilation)
        attend(rows, k, v, 0.125)
    began = time.perf_counter()
    for _ in range(steps):
        for k, v in zip(keys, values):
            attend(rows, k, v, 0.125)
    seconds = (time.perf_counter() - began) / steps
    row[f"{name}_ms_per_token"] = round(seconds * 1e3, 2)
    row[f"{name}_GB_per_s"] = round(layers * kv_heads * n * dim * 2 * 2 / seconds / 1e9, 1)
    row[f"{name}_GFMA_per_s"] = round(layers * heads * n * dim * 2 / seconds / 1e9, 1)
row["peak_GFMA_per_s"] = round(peak_multiply_adds_per_s() / 1e9, 1)
reference = torch.softmax(rows.double() @ keys[0].double().transpose(1, 2) * 0.125, -1) @ values[0].double()
row["kernel_max_abs_error"] = float((kernel(rows, keys[0], values[0], 0.125).double() - reference).abs().max())
row["torch_max_abs_error"] = float((torch_matmuls(rows, keys[0], values[0], 0.125).double() - reference).abs().max())
print(json.dumps(row), flush=True)
