"""What the previous decode step's answer buys a graph search, and when a search has found its
answer: the evidence behind "the previous step's answer as entry points" in docs/benchmarks.md.

    python benchmarks/graph_carry.py WORK_DIR overlap [LAYERS]       # e.g. 0,8,16
    python benchmarks/graph_carry.py WORK_DIR carry [LAYERS]
    python benchmarks/graph_carry.py WORK_DIR found LAYER [EF] [PATIENCE]

WORK_DIR is what `benchmarks/graph_variants.py` leaves (prefill lists, keys and 256 held-out
decode queries per layer). The first 128 decode queries are searched *in order*, one decode step
at a time, as a chat decodes them:

- overlap: the share of a query head's exact top-100 that the previous step's exact top-100 holds;
- carry: evaluations per query head for Recall@100 0.95 (ef swept as `ra bench --recall` sweeps
  it; one query head at a time and lockstep) when each step's search also starts from nothing
  more, from the previous step's best 8 keys, or from its whole top-100;
- found: a best-first search written out in Python (the same entry points, beam and termination
  as the kernel, which its evaluation count matches) records when the running top-100 first held
  95 of the exact top-100, against when the beam's rule stopped it; PATIENCE (evaluations without
  a change to the top-100) is an alternative stopping rule.
"""

import heapq
import json
import sys
from pathlib import Path

import numpy as np

from ra_cli.bench.recall import EF_SWEEP, K, HeadsAlone, evaluations_at
from ra_cli.index import IndexParams
from ra_cli.index.flat import FlatLayerIndex
from ra_cli.index.graph import RECENT_ENTRIES, GraphLayerIndex, build_graph_layer

STEPS = 128
CARRIED = {"none": 0, "best 8": 8, "top-100": 100}


def load(work: Path, layer: int):
    lists, queries, knn = (np.load(work / "work" / f"{name}_{layer:03d}.npy") for name in ("lists", "queries", "knn"))
    keys = np.load(work / f"keys_{layer:03d}.npy")
    decode = np.ascontiguousarray(np.load(work / f"decode_queries_{layer:03d}.npy")[:, :STEPS])  # [H, T, D]
    index = GraphLayerIndex(build_graph_layer(lists, queries, knn, np.load(work / "held_out.npy"), keys, IndexParams()),
                            keys, IndexParams())
    return keys, decode, index, FlatLayerIndex(keys).search(decode, K).ids


def overlap(work: Path, layers: list[int]) -> None:
    for layer in layers:
        keys = np.load(work / f"keys_{layer:03d}.npy")
        decode = np.ascontiguousarray(np.load(work / f"decode_queries_{layer:03d}.npy")[:, :STEPS])
        truth = FlatLayerIndex(keys).search(decode, K).ids
        shared = [len(np.intersect1d(truth[h, t], truth[h, t - 1])) / K
                  for h in range(truth.shape[0]) for t in range(1, truth.shape[1])]
        print(json.dumps({"layer": layer, "previous_step_share_of_the_top_100": round(float(np.mean(shared)), 3)}))


def carry(work: Path, layers: list[int]) -> None:
    for layer in layers:
        keys, decode, index, truth = load(work, layer)
        heads = decode.shape[0]
        for protocol, searcher in (("heads_alone", HeadsAlone(index, keys.shape[0])), ("lockstep", index)):
            for name, width in CARRIED.items():
                curve = []
                for ef in EF_SWEEP:
                    previous, hits, evaluations = None, 0, 0.0
                    for t in range(decode.shape[1]):
                        extra = None if not width or previous is None else np.ascontiguousarray(previous[:, 0, :width],
                                                                                                dtype=np.int32)
                        result = searcher.search(np.ascontiguousarray(decode[:, t:t + 1]), K, ef, extra)
                        previous = ids = result.ids
                        hits += sum(len(np.intersect1d(ids[h, 0], truth[h, t])) for h in range(heads))
                        evaluations += result.evaluations.sum()
                    steps = heads * decode.shape[1]
                    curve.append({"ef": ef, "recall": hits / (steps * K), "evaluations": evaluations / steps})
                found = evaluations_at(0.95, curve)
                print(json.dumps({"layer": layer, "protocol": protocol, "carried": name,
                                  "evaluations_at_0.95": None if found is None else round(found),
                                  "curve": [[c["ef"], round(c["recall"], 4), round(c["evaluations"])] for c in curve]}),
                      flush=True)


def found(work: Path, layer: int, ef: int, patience: int) -> None:
    keys, decode, index, truth = load(work, layer)
    adjacency = np.asarray(index.layer.adjacency).astype(np.int64)
    centroids, entries = index.layer.centroids, np.asarray(index.layer.entries)
    heads, steps = decode.shape[:2]
    per_kv, n = heads // keys.shape[0], keys.shape[1]
    rows = []
    for h in range(heads):
        g, previous = h // per_kv, []
        for t in range(steps):
            query, want = decode[h, t], set(truth[h, t].tolist())
            routed = np.argsort(-(centroids[g] @ query))[:index.params.route]
            evaluations = centroids.shape[1]
            starts = list(entries[g][routed].reshape(-1)) + list(range(n - RECENT_ENTRIES, n)) + previous
            seen, todo, kept, top = set(), [], [], []  # heaps: candidates (max), beam (min), answer (min)
            found_at, changed = None, 0

            def score(node):
                nonlocal evaluations, found_at, changed
                seen.add(node)
                evaluations += 1
                value = float(keys[g, node] @ query)
                if len(top) < K or value > top[0][0]:
                    (heapq.heappush if len(top) < K else heapq.heapreplace)(top, (value, node))
                    changed = evaluations
                    if found_at is None and len(top) == K and len(want & {i for _, i in top}) >= 95:
                        found_at = evaluations
                return value

            for node in starts:
                node = int(node)
                if 0 <= node < n and node not in seen:
                    value = score(node)
                    heapq.heappush(todo, (-value, node))
                    (heapq.heappush if len(kept) < ef else heapq.heappushpop)(kept, (value, node))
            while todo:
                value, node = heapq.heappop(todo)
                if (len(kept) == ef and -value < kept[0][0]) or evaluations - changed > patience:
                    break
                for neighbour in adjacency[g, node]:
                    neighbour = int(neighbour)
                    if neighbour < 0 or neighbour >= n:
                        break
                    if neighbour in seen:
                        continue
                    value = score(neighbour)
                    if len(kept) < ef or value > kept[0][0]:
                        heapq.heappush(todo, (-value, neighbour))
                        (heapq.heappush if len(kept) < ef else heapq.heapreplace)(kept, (value, neighbour))
            previous = [i for _, i in top]
            rows.append((evaluations, found_at, len(want & set(previous)) / K))
    total = np.array([r[0] for r in rows], float)
    at = np.array([np.nan if r[1] is None else r[1] for r in rows])
    reached = ~np.isnan(at)
    print(json.dumps({"layer": layer, "ef": ef, "patience": patience, "carried": "top-100",
                      "evaluations": round(total.mean()), "recall": round(float(np.mean([r[2] for r in rows])), 4),
                      "share_reaching_0.95": round(float(reached.mean()), 3),
                      "median_evaluation_reaching_0.95": float(np.median(at[reached])) if reached.any() else None,
                      "mean_share_of_the_search_spent_by_then": round(float(np.mean(at[reached] / total[reached])), 3)
                      if reached.any() else None}), flush=True)


if __name__ == "__main__":
    work_dir = Path(sys.argv[1])
    if sys.argv[2] in ("carry", "overlap"):
        chosen = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "0,8,16").split(",")]
        (carry if sys.argv[2] == "carry" else overlap)(work_dir, chosen)
    else:
        found(work_dir, int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 256,
              int(sys.argv[5]) if len(sys.argv) > 5 else 10**9)
