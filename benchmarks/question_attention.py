"""A question read after the document: attention of q_len query positions over n cached bf16 keys,
each position seeing the keys up to itself (causal). ra's path (`engine/attention.exact_attention`:
on a CPU, engine/dense_decode.py's float32 kernel with a per-row visible prefix, up to
CPU_KERNEL_QUERY positions) against the two torch paths it replaced — grouped bf16 matmuls with a
float32 softmax (`attention_with_lse`, up to 16 positions) and scaled_dot_product_attention (above)
— in the same run, with each one's largest error against a float64 reference.

    python benchmarks/question_attention.py [KEYS [HEADS KV_HEADS]]   (default: 32768, Qwen2.5's 14 2)
"""

import json
import sys
import time

import torch
import torch.nn.functional as F

from ra_cli.engine.attention import attention_with_lse, causal_mask, exact_attention

n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
heads, kv_heads = (int(x) for x in sys.argv[2:4]) if len(sys.argv) > 3 else (14, 2)
generator = torch.Generator().manual_seed(0)
keys = torch.randn(1, kv_heads, n, 64, generator=generator).to(torch.bfloat16)
values = torch.randn(1, kv_heads, n, 64, generator=generator).to(torch.bfloat16)
for q_len in (1, 8, 15, 32, 64, 128):
    query = torch.randn(1, heads, q_len, 64, generator=generator)
    mask = causal_mask(q_len, n - q_len, n)
    paths = {
        "ra": lambda: exact_attention(query, keys, values, 0.125, n - q_len),
        "bf16_matmuls": lambda: attention_with_lse(query.to(torch.bfloat16), keys, values, 0.125, mask)[0],
        "sdpa": lambda: F.scaled_dot_product_attention(query.to(torch.bfloat16), keys, values, attn_mask=mask,
                                                       scale=0.125, enable_gqa=True),
    }
    reference = F.scaled_dot_product_attention(query.double(), keys.double(), values.double(), attn_mask=mask,
                                               scale=0.125, enable_gqa=True)
    row = {"keys": n, "heads": heads, "kv_heads": kv_heads, "q_len": q_len, "threads": torch.get_num_threads()}
    for turn in range(2):  # alternated twice: this machine is noisy
        for name, attend in paths.items():
            attend()
            began = time.perf_counter()
            for _ in range(4):
                out = attend()
            row[f"{name}_ms" + ("_again" if turn else "")] = round((time.perf_counter() - began) / 4 * 1e3, 2)
            row[f"{name}_max_abs_error"] = float((out.double() - reference).abs().max())
    print(json.dumps(row), flush=True)
