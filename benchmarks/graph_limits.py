"""Where a graph's evaluations go on a context, and what more or better training lists would buy:
the evidence behind the Qwen2.5 recall figures in docs/benchmarks.md.

    python benchmarks/graph_limits.py WORK_DIR [structure] [data] [per-head]

WORK_DIR is what `benchmarks/graph_variants.py` leaves (the prefill lists, keys and 256 held-out
decode queries of layers 0, 4, 8, …); every second of those layers is used here. One JSON line
per measurement:

- structure: per decode query's exact top-100, how many pieces the graph's edges split it into
  (connected components of the answer's induced subgraph), the share of an answer key's edges
  that lead to another answer key, and how many distinct keys the top-100s of one KV head's query
  heads make together;
- data: evaluations per query head for Recall@100 0.95 (lockstep and one query head at a time, as
  `ra bench --recall` counts them) when the graph learns from half the sampled prefill queries,
  from lists cut to 32 keys, or from the exact top lists of the first half of the decode queries
  themselves (tested on the second half, against the plain graph on that half): how much more
  or better training data could buy;
- per-head: one graph per query head, built from that head's lists alone, searched by it alone.
"""

import json
import sys
from pathlib import Path

import numpy as np

from ra_cli.bench.recall import EF_SWEEP, K, HeadsAlone, _pooled, evaluations_at
from ra_cli.index import IndexParams
from ra_cli.index.flat import FlatLayerIndex
from ra_cli.index.graph import NO_NEIGHBOR_16, GraphLayerIndex, build_graph_layer

work = Path(sys.argv[1])
parts = sys.argv[2:] or ["structure", "data", "per-head"]
held_out = np.load(work / "held_out.npy")
layers = sorted(int(path.stem.rsplit("_", 1)[1]) for path in work.glob("decode_queries_*.npy"))[::2]
params = IndexParams()


def load(layer):
    files = {name: np.load(work / "work" / f"{name}_{layer:03d}.npy") for name in ("lists", "queries", "knn")}
    return (np.load(work / f"keys_{layer:03d}.npy"), np.load(work / f"decode_queries_{layer:03d}.npy"),
            files["lists"], files["queries"], files["knn"])


def at_095(sweep):
    curve = [{"ef": ef, "recall": _pooled(sweep[ef])[0], "evaluations": _pooled(sweep[ef])[2]} for ef in EF_SWEEP]
    found = evaluations_at(0.95, curve)
    return None if found is None else round(found, 1)


def measure(name, transform):
    """Evaluations for Recall@100 0.95 with the graph built from transform(...)'s lists."""
    sweeps = {protocol: {ef: [] for ef in EF_SWEEP} for protocol in ("lockstep", "heads_alone")}
    for layer in layers:
        keys, decode, lists, queries, knn = load(layer)
        lists, queries, held, test = transform(lists, queries, held_out, keys, decode)
        truth = FlatLayerIndex(keys).search(test, K).ids
        index = GraphLayerIndex(build_graph_layer(lists, queries, knn, held, keys, params), keys, params)
        for protocol, searcher in (("lockstep", index), ("heads_alone", HeadsAlone(index, keys.shape[0]))):
            for ef in EF_SWEEP:
                result = searcher.search(test, K, ef)
                sweeps[protocol][ef].append((result.ids, truth, result.evaluations))
    print(json.dumps({"variant": name, "layers": layers, **{f"{protocol}_evaluations_at_0.95": at_095(sweep)
                                                             for protocol, sweep in sweeps.items()}}), flush=True)


def top_lists(keys, queries, size):
    groups = queries.shape[0] // keys.shape[0]
    scores = np.einsum("hqd,hnd->hqn", queries, np.repeat(keys, groups, axis=0))
    return np.argsort(-scores, axis=-1)[..., :size].astype(np.int32)


def half_the_queries(lists, queries, held, keys, test):
    keep = held.copy()
    keep[np.nonzero(~held)[0][::2]] = True
    return lists[:, keep], queries[:, keep], held[keep], test


def lists_of_32(lists, queries, held, keys, test):
    lists = lists.copy()
    lists[:, :, 32:] = -1
    return lists, queries, held, test


def second_half(lists, queries, held, keys, test):
    return lists, queries, held, np.ascontiguousarray(test[:, test.shape[1] // 2:])


def with_decode_lists(lists, queries, held, keys, test):
    first = test[:, : test.shape[1] // 2]
    lists = np.concatenate([top_lists(keys, first, lists.shape[2]), lists], axis=1)
    queries = np.concatenate([first.astype(queries.dtype), queries], axis=1)
    held = np.concatenate([np.zeros(first.shape[1], bool), held])
    return lists, queries, held, np.ascontiguousarray(test[:, test.shape[1] // 2:])


def structure():
    for layer in layers:
        keys, decode, lists, queries, knn = load(layer)
        adjacency = np.asarray(build_graph_layer(lists, queries, knn, held_out, keys, params).adjacency).astype(np.int64)
        adjacency[adjacency == NO_NEIGHBOR_16] = -1
        kv_heads, groups = keys.shape[0], decode.shape[0] // keys.shape[0]
        tops = top_lists(keys, decode, K)  # [H, q, K]
        pieces, inside = [], []
        for h in range(decode.shape[0]):
            for answer in tops[h]:
                members = set(answer.tolist())
                parent = {key: key for key in members}

                def root(key):
                    while parent[key] != key:
                        parent[key] = parent[parent[key]]
                        key = parent[key]
                    return key

                edges = linked = 0
                for key in members:
                    row = adjacency[h // groups, key]
                    row = row[row >= 0]
                    edges += len(row)
                    for other in row.tolist():
                        if other in members:
                            linked += 1
                            parent[root(key)] = root(other)
                pieces.append(len({root(key) for key in members}))
                inside.append(linked / max(edges, 1))
        union = [len(np.unique(tops[g * groups:(g + 1) * groups, i])) for g in range(kv_heads) for i in range(tops.shape[1])]
        print(json.dumps({"layer": layer, "answer_components": round(float(np.mean(pieces)), 2),
                          "edges_within_answer": round(float(np.mean(inside)), 3),
                          "keys_in_the_kv_heads_top100s": round(float(np.mean(union)), 1), "query_heads_per_kv_head": groups}),
              flush=True)


def per_head():
    sweep = {ef: [] for ef in EF_SWEEP}
    for layer in layers:
        keys, decode, lists, queries, knn = load(layer)
        groups = decode.shape[0] // keys.shape[0]
        for h in range(0, decode.shape[0], 2):
            own_keys, own_queries = np.ascontiguousarray(keys[h // groups][None]), np.ascontiguousarray(decode[h:h + 1])
            graph = build_graph_layer(lists[h:h + 1], queries[h:h + 1], knn[h // groups][None], held_out, own_keys, params)
            index = GraphLayerIndex(graph, own_keys, params)
            truth = FlatLayerIndex(own_keys).search(own_queries, K).ids
            for ef in EF_SWEEP:
                result = index.search(own_queries, K, ef)
                sweep[ef].append((result.ids, truth, result.evaluations))
    print(json.dumps({"variant": "one graph per query head (every 2nd head)", "layers": layers,
                      "heads_alone_evaluations_at_0.95": at_095(sweep)}), flush=True)


if "structure" in parts:
    structure()
if "data" in parts:
    for name, transform in (("all lists (as built)", lambda *a: a[:3] + a[4:]), ("half the sampled queries", half_the_queries),
                            ("lists cut to 32 keys", lists_of_32), ("as built, second half of the decode queries", second_half),
                            ("+ the first half's own top lists, second half", with_decode_lists)):
        measure(name, transform)
if "per-head" in parts:
    per_head()
