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
        return {name: f"index/{name}_{layer:03d}.npy" for name in ("graph", "router", "entries", "selected")}
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
            np.save(writer.add_file(files["selected"]), built.selected)
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
            selected=_load(store, files["selected"]),
        )
        _check_graph(store, graph, keys.shape[0], n, keys.shape[2])
        return GraphLayerIndex(graph, keys, params, n)
    if kind == "hnsw":
        graphs = [parse_hnsw_file(store.file(files[f"hnsw{g}"]), keys.shape[2]) for g in range(keys.shape[0])]
        return HnswLayerIndex(graphs, keys, heads, int(entry["ef"]), n)
    raise RaError(f"{store.path}: unknown index kind {kind!r}; ingest again")


def _load(store, relative: str, mmap: bool = False) -> np.ndarray:
    """mmap: mapped copy-on-write, not read-only. Nothing writes to it (and a write would stay in
    this process's memory, the file untouched), but numba compiles a kernel once per argument type
    and read-only is a type of its own: a read-only int32 graph (documents past 65,535 indexed keys) cost its
    first answer ~16 s of compiling the search that setup.sh had already compiled for writable
    ones (measured on a 128K-token store: 18.4 s against 2.3 s for the next answer)."""
    try:
        return np.load(store.file(relative), mmap_mode="c" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RaError(f"{store.path}: cannot read {relative} ({exc}); ingest again")


def _check_graph(store, graph: GraphLayer, kv_heads: int, n: int, dim: int) -> None:
    """A stored graph is untrusted input: every shape, dtype and id the kernels rely on is checked
    before they read it (one graph per KV head; router centroids of the keys' dimension)."""
    adjacency, centroids, entries, selected = graph.adjacency, graph.centroids, graph.entries, graph.selected

    def bad(what: str):
        raise RaError(f"{store.path}: the graph index {what}; the context is damaged — ingest again")

    if adjacency.ndim != 3 or adjacency.shape[:2] != (kv_heads, n) or adjacency.shape[2] < 1:
        bad(f"has shape {adjacency.shape}, expected ({kv_heads}, {n}, M)")
    if adjacency.dtype not in (np.uint16, np.int32) or (adjacency.dtype == np.uint16 and n >= 65535):
        bad(f"has ids of type {adjacency.dtype} for {n} keys")
    empty = 65535 if adjacency.dtype == np.uint16 else -1
    if adjacency.size and (int(adjacency.min()) < min(empty, 0) or int(np.where(adjacency == empty, 0, adjacency).max()) >= n):
        bad("has neighbour ids out of range")
    if centroids.ndim != 3 or centroids.shape[0] != kv_heads or centroids.shape[2] != dim or centroids.shape[1] < 1 \
            or centroids.dtype != np.float32:
        bad(f"router has shape {centroids.shape} ({centroids.dtype}), expected ({kv_heads}, C, {dim}) float32")
    if entries.ndim != 3 or entries.shape[:2] != centroids.shape[:2] or entries.dtype != np.int32:
        bad(f"entries have shape {entries.shape} ({entries.dtype}), expected {centroids.shape[:2] + ('E',)} int32")
    if entries.size and (int(entries.max()) >= n or int(entries.min()) < -1):
        bad("has entry ids out of range")
    if selected is None or selected.shape != (kv_heads, (n + 7) // 8) or selected.dtype != np.uint8:
        bad("has a malformed selected-keys mask")
