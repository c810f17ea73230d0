"""The index stage of a store: build every global layer's index into a store being written, and
open one layer's index of a complete store (files checked against the model's shape first)."""

from __future__ import annotations

import numpy as np

from ra_cli.errors import RaError
from ra_cli.index.base import IndexParams, indexed_range
from ra_cli.index.flat import FlatLayerIndex
from ra_cli.index.graph import GraphLayer, GraphLayerIndex, attention_coverage, build_graph_layer
from ra_cli.index.hnsw import HnswLayerIndex, build_hnsw_file, parse_hnsw_file
from ra_cli.store import float32_keys


COVERAGE_QUERIES = 32


def index_files(kind: str, layer: int, kv_heads: int) -> dict[str, str]:
    if kind == "graph":
        return {name: f"index/{name}_{layer:03d}.npy" for name in ("graph", "router", "entries")}
    if kind == "hnsw":
        return {f"hnsw{g}": f"index/hnsw_{layer:03d}_{g}.bin" for g in range(kv_heads)}
    return {}


def layer_keys(store, layer: int, lo: int, hi: int) -> np.ndarray:
    return float32_keys(store.keys(layer)[:, lo:hi], store.kv_dtype)


def build_store_indexes(writer, collector, params: IndexParams, heads: int, on_layer=None) -> dict:
    """Build the index of every global layer from the written KV (and, for graph, the collector's
    work files) into the writer's directory. Returns the manifest's "index" section."""
    lo, hi = indexed_range(writer.n_tokens, params)
    section = {"kind": params.kind, "params": params.as_dict(), "lo": lo, "hi": hi, "layers": {}}
    global_layers = [i for i, shape in enumerate(writer.layers) if shape.sliding_window is None]
    held_out = collector.held_out() if params.kind == "graph" else None
    ef_hint = None
    for count, layer in enumerate(global_layers):
        all_keys = float32_keys(np.asarray(writer.keys[layer]), writer.kv_dtype)  # read (and converted) once
        keys = all_keys[:, lo:hi]
        entry: dict = {}
        files = index_files(params.kind, layer, keys.shape[0])
        if params.kind == "graph":
            built = build_graph_layer(collector.lists[layer], collector.queries[layer], collector.knn[layer],
                                      held_out, keys, params, ef_hint)
            ef_hint = built.ef
            np.save(writer.add_file(files["graph"]), built.adjacency)
            np.save(writer.add_file(files["router"]), built.centroids)
            np.save(writer.add_file(files["entries"]), built.entries)
            entry = {"ef": built.ef, "validation_recall": built.validation_recall,
                     "validation_evaluations": built.validation_evaluations,
                     "build_seconds": round(built.build_seconds, 3)}
            if held_out.any() and layer in collector.scaling:
                # How much softmax mass static + top-k can hold here: sets this layer's retrieval
                # budget, or makes it dense at chat time when no budget is enough.
                coverage = attention_coverage(
                    all_keys,
                    collector.queries[layer][:, held_out][:, -COVERAGE_QUERIES:],
                    collector.sample_positions()[held_out][-COVERAGE_QUERIES:], lo, hi, params.budgets,
                    collector.scaling[layer])
                entry["coverage"] = {str(k): round(v, 4) for k, v in coverage.items()}
        elif params.kind == "hnsw":
            seconds = sum(build_hnsw_file(keys[g], writer.add_file(files[f"hnsw{g}"]), params)
                          for g in range(keys.shape[0]))
            entry = {"ef": 128, "build_seconds": round(seconds, 3)}
        entry["files"] = files
        section["layers"][str(layer)] = entry
        if on_layer is not None:
            on_layer(count + 1, len(global_layers))
    return section


def open_layer_index(store, layer: int, keys: np.ndarray | None = None):
    """The search index of one layer of a store, or None for sliding-window layers. `keys`
    [KVH, >= hi - lo, D] float32 replaces the memory-mapped stored keys (e.g. a RAM copy)."""
    section = store.manifest.get("index")
    if section is None:
        raise RaError(f"{store.path}: this context has no search index; ingest it again with `--index graph`")
    entry = section["layers"].get(str(layer))
    if entry is None:
        return None
    params = IndexParams.from_dict(section["params"])
    n = section["hi"] - section["lo"]
    # Kernels read whole C-contiguous buffers (ids < n): a sliced view would stop their dot
    # products from vectorizing.
    keys = np.ascontiguousarray(layer_keys(store, layer, section["lo"], section["hi"]) if keys is None else keys)
    heads = store.manifest["model_shape"]["heads"]
    kind = section["kind"]
    if kind == "flat":
        return FlatLayerIndex(keys, n)
    files = entry["files"]
    if kind == "graph":
        graph = GraphLayer(
            adjacency=_load(store, files["graph"], mmap=True),
            centroids=_load(store, files["router"]),
            entries=_load(store, files["entries"]),
            ef=int(entry["ef"]),
        )
        _check_graph(store, graph, keys.shape[0], n)
        return GraphLayerIndex(graph, keys, params, n)
    if kind == "hnsw":
        graphs = [parse_hnsw_file(store.file(files[f"hnsw{g}"]), keys.shape[2]) for g in range(keys.shape[0])]
        return HnswLayerIndex(graphs, keys, heads, int(entry["ef"]), n)
    raise RaError(f"{store.path}: unknown index kind {kind!r}; ingest again")


def _load(store, relative: str, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(store.file(relative), mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RaError(f"{store.path}: cannot read {relative} ({exc}); ingest again")


def _check_graph(store, graph: GraphLayer, heads: int, n: int) -> None:
    """`heads`: graphs expected, one per KV head."""
    adjacency = graph.adjacency
    if adjacency.ndim != 3 or adjacency.shape[:2] != (heads, n):
        raise RaError(f"{store.path}: graph has shape {adjacency.shape}, expected ({heads}, {n}, M); ingest again")
    if graph.entries.shape[0] != heads or graph.centroids.shape[0] != heads:
        raise RaError(f"{store.path}: graph router does not match the model's {heads} heads; ingest again")
    if graph.entries.size and (graph.entries.max() >= n):
        raise RaError(f"{store.path}: graph entry ids out of range; the index is damaged — ingest again")
