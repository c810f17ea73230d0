"""`hnsw`: the key-only baseline, built by hnswlib (space='ip'), one graph per KV head.

hnswlib does not report how many distances a search computes, so we read its saved graph (the
file format of hnswlib 0.8's HierarchicalNSW::saveIndex) and run the same algorithm — greedy
descent through the upper layers, then a beam search of width ef on layer 0 — with our counted
kernel. Keys may be mean-centred before building: q·(k−μ) = q·k − q·μ ranks keys exactly as q·k
for every query, so search can use the raw keys while the graph was built on centred ones.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ra_cli.errors import RaError
from ra_cli.buffers import with_room
from ra_cli.index.base import IndexParams, LayerIndex, SearchBuffers, SearchResult, kv_head_of
from ra_cli.index.build_kernels import insert_nodes
from ra_cli.index.search_kernels import search_heads_hnsw

_HEADER = struct.Struct("<QQQQQQiIQQQdQ")


def build_hnsw_file(keys: np.ndarray, path: Path, params: IndexParams, threads: int = 1) -> float:
    """Build an hnswlib index over keys [n, D] float32 and save it; returns seconds."""
    import hnswlib

    started = time.perf_counter()
    data = keys - keys.mean(axis=0, keepdims=True) if params.hnsw_centered else keys
    index = hnswlib.Index(space="ip", dim=keys.shape[1])
    index.init_index(max_elements=max(1, keys.shape[0]), M=params.hnsw_m, ef_construction=params.hnsw_ef_construction,
                     random_seed=100)
    index.set_num_threads(threads)
    if keys.shape[0]:
        index.add_items(np.ascontiguousarray(data, dtype=np.float32), np.arange(keys.shape[0]))
    index.save_index(str(path))
    return time.perf_counter() - started


@dataclass
class ParsedHnsw:
    entry_point: int
    base_links: np.ndarray  # [n, maxM0] int32, -1 padded, in label order
    levels: np.ndarray  # [n] int32
    upper_rows: np.ndarray  # [n] int32 row into upper_links, -1 for level-0-only nodes
    upper_links: np.ndarray  # [rows, max_level, maxM] int32


MAX_LINKS = 4096  # hnswlib's M is tens; a header claiming more is damage


def parse_hnsw_file(path: Path, dim: int) -> ParsedHnsw:
    raw = np.fromfile(path, dtype=np.uint8)
    try:
        (offset_level0, max_elements, count, size_per_element, label_offset, offset_data, max_level, entry,
         max_m, max_m0, _m, _mult, _efc) = _HEADER.unpack_from(raw, 0)
        position = _HEADER.size
        # every header value bounds what is allocated or indexed below: check before use
        if not (0 < max_m0 <= MAX_LINKS and 0 < max_m <= MAX_LINKS and count <= max_elements
                and 0 < count * size_per_element <= raw.size and size_per_element >= label_offset + 8):
            raise ValueError("header values out of range")
        level0 = raw[position: position + count * size_per_element].reshape(count, size_per_element)
        position += count * size_per_element
        if level0.shape[0] != count or offset_data != 4 + 4 * max_m0 or label_offset != offset_data + 4 * dim:
            raise ValueError("unexpected hnswlib layout")
        link_counts = level0[:, :4].copy().view(np.uint32)[:, 0] & 0xFFFF
        links = level0[:, 4: 4 + 4 * max_m0].copy().view(np.uint32).astype(np.int64)
        labels = level0[:, label_offset: label_offset + 8].copy().view(np.uint64)[:, 0].astype(np.int64)
        upper_sizes = np.zeros(count, np.int64)
        upper_blobs = []
        for i in range(count):
            (size,) = struct.unpack_from("<I", raw, position)
            position += 4
            upper_sizes[i] = size
            if size % (4 + 4 * max_m) or position + size > raw.size:
                raise ValueError(f"element {i} has a malformed upper-level block")
            upper_blobs.append(raw[position: position + size])
            position += size
        if count and (not 0 <= entry < count or np.any(np.sort(labels) != np.arange(count))
                      or np.any(link_counts > max_m0) or np.any(links[np.arange(max_m0)[None, :] < link_counts[:, None]] >= count)):
            raise ValueError("ids out of range")
        for blob in upper_blobs:
            rows = blob.view(np.uint32).reshape(-1, 1 + max_m)
            sizes = rows[:, 0] & 0xFFFF
            if np.any(sizes > max_m) or np.any(rows[:, 1:][np.arange(max_m)[None, :] < sizes[:, None]] >= count):
                raise ValueError("upper-level ids out of range")
    except (struct.error, ValueError) as exc:
        raise RaError(f"{path}: not a readable hnswlib index ({exc}); ingest again")
    # internal id -> label (we add items with label = indexed id)
    internal_to_label = labels
    n = count
    base = np.full((n, max_m0), -1, np.int32)
    mask = np.arange(max_m0)[None, :] < link_counts[:, None]
    mapped = np.where(mask, internal_to_label[np.minimum(links, n - 1)], -1)
    base[internal_to_label] = mapped
    link_bytes = 4 + 4 * max_m
    levels = np.zeros(n, np.int32)
    upper_rows = np.full(n, -1, np.int32)
    tall = [i for i in range(n) if upper_sizes[i] > 0]
    top = max([upper_sizes[i] // link_bytes for i in tall], default=0)
    upper = np.full((max(1, len(tall)), max(1, top), max_m), -1, np.int32)
    for row, i in enumerate(tall):
        label = internal_to_label[i]
        node_levels = upper_sizes[i] // link_bytes
        levels[label] = node_levels
        upper_rows[label] = row
        blob = upper_blobs[i].view(np.uint32).reshape(node_levels, 1 + max_m)
        for level in range(node_levels):
            size = blob[level, 0] & 0xFFFF
            upper[row, level, :size] = internal_to_label[blob[level, 1: 1 + size].astype(np.int64)]
    return ParsedHnsw(int(internal_to_label[entry]) if n else 0, base, levels, upper_rows, upper)


class HnswLayerIndex(LayerIndex):
    """Counted search over the hnswlib graphs of one layer (one per KV head)."""

    kind = "hnsw"

    def __init__(self, graphs: list[ParsedHnsw], keys: np.ndarray, heads: int, default_ef: int = 128, n: int | None = None):
        self.keys = keys
        self.n = keys.shape[1] if n is None else n
        self.heads = heads
        self.default_ef = default_ef
        self.kv_of_head = kv_head_of(heads, keys.shape[0])
        width0 = max(g.base_links.shape[1] for g in graphs)
        rows = max(g.upper_links.shape[0] for g in graphs)
        depth = max(g.upper_links.shape[1] for g in graphs)
        width = max(g.upper_links.shape[2] for g in graphs)
        self.base = np.full((len(graphs), self.n, width0), -1, np.int32)
        self.upper = np.full((len(graphs), rows, depth, width), -1, np.int32)
        self.levels = np.zeros((len(graphs), self.n), np.int32)
        self.upper_rows = np.full((len(graphs), self.n), -1, np.int32)
        self.entry = np.zeros(len(graphs), np.int32)
        for g, graph in enumerate(graphs):
            self.base[g, :, : graph.base_links.shape[1]] = graph.base_links
            u = graph.upper_links
            self.upper[g, : u.shape[0], : u.shape[1], : u.shape[2]] = u
            self.levels[g] = graph.levels
            self.upper_rows[g] = graph.upper_rows
            self.entry[g] = graph.entry_point
        self.buffers = SearchBuffers(heads, self.n)

    def _insert(self, keys: np.ndarray, n: int) -> None:
        """New keys join layer 0 only (as hnswlib inserts would, at level 0 for most keys)."""
        self.base = with_room(self.base, self.n, n, axis=1, minimum=1024, fill=-1)
        self.levels = with_room(self.levels, self.n, n, axis=1, minimum=1024, fill=0)
        self.upper_rows = with_room(self.upper_rows, self.n, n, axis=1, minimum=1024, fill=-1)
        self.buffers.grow(n)
        graph_buffers = SearchBuffers(self.base.shape[0], n)
        insert_nodes(keys, np.arange(self.base.shape[0], dtype=np.int64), self.base, self.n, n, 64,
                     graph_buffers.visited)

    def _search(self, queries, k, ef, extra, result: SearchResult, ordered: int) -> None:
        """hnswlib's algorithm starts from its own entry point only; `extra` is ignored."""
        search_heads_hnsw(queries, self.keys, self.kv_of_head, self.base, self.n, self.entry, self.levels,
                          self.upper_rows, self.upper, ef, k, self.buffers.visited, result.ids, result.scores,
                          result.evaluations)
