"""Graph search cost per distance evaluation at several beam widths, on the decode-step bench's
synthetic layer with KEYS indexed keys per KV head (caches left warm: no sweep between steps),
searched as a store holds them (bf16 bits; `--float32`: float32 keys).

    python benchmarks/search_cost.py [--float32] [KEYS]

Per thread: the searches run on one thread, and the cost is that thread's time over every query
head's evaluations (a KV head's query heads search in lockstep: each scores every key the group
reads). Timing two threads instead and dividing by a share of the query heads would mix in how
the KV heads split over the threads (3 on 2: one thread searches two of them). The step on two
threads is printed beside it."""

import json
import sys
import time

import numba
import numpy as np
import torch

from ra_cli.bench.decode import DecodeStepConfig, build_index, synthetic_layer
from ra_cli.index.base import IndexParams
from ra_cli.store import kv_to_numpy

args = sys.argv[1:]
float32 = "--float32" in args
args = [a for a in args if a != "--float32"]
n = int(args[0]) if args else 131072
keys, values, queries_for, heads, _ = synthetic_layer(DecodeStepConfig(keys=n))
index = build_index(keys, queries_for, heads, IndexParams(), None if float32 else kv_to_numpy(torch.from_numpy(keys), "bfloat16"))
decode = queries_for(np.full(64, n - 1))
threads = numba.get_num_threads()
for ef in (128, 256, 512, 1024):
    row = {"keys": n, "ef": ef, "key_dtype": "float32" if float32 else "bfloat16"}
    for used in sorted({1, threads}):
        numba.set_num_threads(used)
        index.search(np.ascontiguousarray(decode[:, :1]), 100, ef)
        total, evaluations = 0.0, 0.0
        for i in range(decode.shape[1]):
            query = np.ascontiguousarray(decode[:, i:i + 1])
            began = time.perf_counter()
            result = index.search(query, 100, ef)
            total += time.perf_counter() - began
            evaluations += result.evaluations.sum()
        steps = decode.shape[1]
        row[f"ms_per_step_{used}_threads"] = round(total / steps * 1e3, 3)
        if used == 1:
            row["evaluations_per_head"] = round(evaluations / steps / heads)
            row["ns_per_evaluation_per_thread"] = round(total * 1e9 / evaluations, 1)
    numba.set_num_threads(threads)
    print(json.dumps(row), flush=True)
