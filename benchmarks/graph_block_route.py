"""Entry points by position for the graph search: does starting from the document's most
promising stretches cut the evaluations a Qwen decode query needs? (docs/benchmarks.md, "Why
Qwen's graph reads ~2,000 keys a search".)

    python benchmarks/graph_block_route.py WORK_DIR LAYERS BLOCK CONFIGS    # e.g. WORK 8 128 8x2,16x2,32x1

WORK_DIR is what `benchmarks/graph_variants.py` leaves. The keys are cut into blocks of BLOCK
positions; a decode query scores every block's mean key (one evaluation each, counted), and each
CONFIG MxE adds, as extra entry points of its search, the E keys of each of its M best blocks that
prefill queries selected most. Evaluations for Recall@100 0.95 (one query head at a time, the ef
sweep of `ra bench --recall`) on held-out decode queries 128..223, against no extra entries.
"""

import json
import sys
from pathlib import Path

import numpy as np

from ra_cli.bench.recall import EF_SWEEP, K, HeadsAlone, evaluations_at
from ra_cli.index import IndexParams
from ra_cli.index.flat import FlatLayerIndex
from ra_cli.index.graph import GraphLayerIndex, build_graph_layer

STEPS = 96


def block_hubs(lists: np.ndarray, keys: np.ndarray, block: int, width: int) -> np.ndarray:
    """[KVH, blocks, width] the keys of each block its KV head's prefill queries selected most (-1: none)."""
    kv_heads, n, _ = keys.shape
    blocks, of_block = (n + block - 1) // block, np.arange(n) // block
    hubs = np.full((kv_heads, blocks, width), -1, np.int32)
    per_kv = lists.shape[0] // kv_heads
    for g in range(kv_heads):
        chosen = lists[g * per_kv:(g + 1) * per_kv].ravel()
        counts = np.bincount(chosen[(chosen >= 0) & (chosen < n)], minlength=n)[:n].astype(float)
        order = np.lexsort((-counts, of_block))  # by block, most selected first
        starts = np.searchsorted(of_block[order], np.arange(blocks))
        for b in range(blocks):
            ids = order[starts[b]:starts[b] + width]
            ids = ids[of_block[ids] == b]
            hubs[g, b, :len(ids)] = ids
    return hubs


def main(work: Path, layers: list[int], block: int, configs: list[tuple[int, int]]) -> None:
    for layer in layers:
        lists, queries, knn = (np.load(work / "work" / f"{name}_{layer:03d}.npy") for name in ("lists", "queries", "knn"))
        keys = np.load(work / f"keys_{layer:03d}.npy")
        kv_heads, n, _ = keys.shape
        decode = np.ascontiguousarray(np.load(work / f"decode_queries_{layer:03d}.npy")[:, 128:128 + STEPS])
        heads, per_kv = decode.shape[0], decode.shape[0] // kv_heads
        index = GraphLayerIndex(build_graph_layer(lists, queries, knn, np.load(work / "held_out.npy"), keys,
                                                  IndexParams()), keys, IndexParams())
        truth = FlatLayerIndex(keys).search(decode, K).ids
        starts = np.arange(0, n, block)
        sizes = np.diff(np.append(starts, n))
        means = np.stack([np.add.reduceat(keys[g], starts, axis=0) / sizes[:, None] for g in range(kv_heads)])
        # where the answers lie: how many blocks a query head's exact top-100 touches, and how much of
        # it the best 16 blocks by mean key hold
        touched, held = [], []
        for h in range(heads):
            counts = np.stack([np.bincount(truth[h, t] // block, minlength=len(starts)) for t in range(STEPS)])
            best16 = np.argsort(-(decode[h] @ means[h // per_kv].T), 1)[:, :16]
            touched.append((counts > 0).sum(1).mean())
            held.append(np.take_along_axis(counts, best16, 1).sum(1).mean() / K)
        print(json.dumps({"layer": layer, "block": block, "blocks": len(starts),
                          "blocks_touched_by_a_top_100": round(float(np.mean(touched)), 1),
                          "share_of_the_top_100_in_the_best_16_blocks": round(float(np.mean(held)), 3)}), flush=True)
        hubs = block_hubs(lists, keys, block, max(width for _, width in configs))
        searcher = HeadsAlone(index, kv_heads)
        for best, width in [(0, 0)] + configs:
            extra, routing = None, 0
            if best:
                extra = np.stack([hubs[h // per_kv][np.argsort(-(decode[h] @ means[h // per_kv].T), 1)[:, :best]]
                                  [:, :, :width].reshape(STEPS, -1) for h in range(heads)]).astype(np.int32)
                routing = len(starts)
            curve = []
            for ef in EF_SWEEP:
                hits, evaluations = 0, 0.0
                for t in range(STEPS):
                    result = searcher.search(np.ascontiguousarray(decode[:, t:t + 1]), K, ef,
                                             None if extra is None else np.ascontiguousarray(extra[:, t]))
                    hits += sum(len(np.intersect1d(result.ids[h, 0], truth[h, t])) for h in range(heads))
                    evaluations += result.evaluations.sum()
                curve.append({"ef": ef, "recall": hits / (heads * STEPS * K),
                              "evaluations": evaluations / (heads * STEPS) + routing})
            found = evaluations_at(0.95, curve)
            print(json.dumps({"layer": layer, "block": block, "best_blocks": best, "entries_per_block": width,
                              "routing_evaluations": routing, "evaluations_at_0.95": None if found is None else round(found),
                              "curve": [[c["ef"], round(c["recall"], 4), round(c["evaluations"])] for c in curve[:8]]}),
                  flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3]),
         [tuple(int(y) for y in x.split("x")) for x in sys.argv[4].split(",")])
