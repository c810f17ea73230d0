"""Could a decode query be answered from the exact top lists of the prefill queries most like it?
Queries are in distribution with queries (decode queries are not with keys), so finding similar
prefill queries is easy; this measures what their stored lists hold.

    python benchmarks/query_neighbour_lists.py WORK_DIR

WORK_DIR is what `benchmarks/graph_variants.py` leaves (keys, the prefill queries' lists and the
256 held-out decode queries of layers 0, 4, 8, …). Per layer and m (1 … 64), one JSON line: for
each decode query, the m prefill queries of its KV head (any of its query heads) nearest by
cosine, the union of their lists, and the share of the decode query's exact top-100 in that union
(`coverage`) against its size (`candidates`, keys that would all need scoring).
"""

import json
import sys
from pathlib import Path

import numpy as np

work = Path(sys.argv[1])
NEAREST = (1, 4, 16, 64)
K = 100
layers = sorted(int(path.stem.rsplit("_", 1)[1]) for path in work.glob("decode_queries_*.npy"))


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


for layer in layers:
    keys = np.load(work / f"keys_{layer:03d}.npy")  # [KVH, n, D]
    decode = np.load(work / f"decode_queries_{layer:03d}.npy")  # [H, q, D]
    lists = np.load(work / "work" / f"lists_{layer:03d}.npy")  # [H, prefill queries, list size]
    prefill = np.load(work / "work" / f"queries_{layer:03d}.npy").astype(np.float32)
    heads, kv_heads = decode.shape[0], keys.shape[0]
    group = heads // kv_heads
    coverage = {m: [] for m in NEAREST}
    candidates = {m: [] for m in NEAREST}
    for g in range(kv_heads):
        own = range(g * group, (g + 1) * group)
        pool = unit_rows(np.concatenate([prefill[h] for h in own]))
        pool_lists = np.concatenate([lists[h] for h in own])
        for h in own:
            truth = np.argsort(-(decode[h] @ keys[g].T), axis=1)[:, :K]
            nearest = np.argsort(-(unit_rows(decode[h]) @ pool.T), axis=1)
            for m in NEAREST:
                for i in range(decode.shape[1]):
                    union = np.unique(pool_lists[nearest[i, :m]])
                    union = union[union >= 0]
                    coverage[m].append(np.isin(truth[i], union).mean())
                    candidates[m].append(len(union))
    for m in NEAREST:
        print(json.dumps({"layer": layer, "nearest_queries": m, "coverage": round(float(np.mean(coverage[m])), 3),
                          "candidates": round(float(np.mean(candidates[m])), 1), "keys": int(keys.shape[1]),
                          "list_size": int(lists.shape[2])}), flush=True)
