"""Graph search cost per distance evaluation at several beam widths, on the decode-step bench's
synthetic layer with KEYS indexed keys per KV head (caches left warm: no sweep between steps)."""

import json
import sys
import time

import numpy as np

from ra_cli.bench.decode import DecodeStepConfig, build_index, synthetic_layer
from ra_cli.index.base import IndexParams

n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
keys, values, queries_for, heads = synthetic_layer(DecodeStepConfig(keys=n))
index = build_index(keys, queries_for, heads, IndexParams())
decode = queries_for(np.full(64, n - 1))
critical_path = -(-heads // 2)  # searches per thread on 2 threads
for ef in (128, 256, 512, 1024):
    index.search(np.ascontiguousarray(decode[:, :1]), 100, ef)
    total, evaluations = 0.0, 0.0
    for i in range(decode.shape[1]):
        query = np.ascontiguousarray(decode[:, i:i + 1])
        began = time.perf_counter()
        result = index.search(query, 100, ef)
        total += time.perf_counter() - began
        evaluations += result.evaluations.mean()
    ms = total / decode.shape[1] * 1e3
    evaluations /= decode.shape[1]
    print(json.dumps({"keys": n, "ef": ef, "ms_per_step": round(ms, 3), "evaluations_per_head": round(evaluations),
                      "ns_per_evaluation_per_thread": round(ms * 1e6 / (critical_path * evaluations))}), flush=True)
