"""`ra bench --decode-step`: the CPU cost of one decode step of one attention layer at a given
number of indexed keys plus ra's static set (128 sinks, a 512-token window) — retrieval as a CPU
decode step runs it (the graph's search and the attention over the static set and the retrieved
keys in one call) against exact attention over every key as ra's dense layers compute it,
measured in the same run.

A 128K-token prefill of the real model takes hours on a CPU, so this benchmark builds a layer of
the model's shape from synthetic data with the structure measured on real keys and queries: a
strong shared key offset that queries point against (the out-of-distribution effect), topics that
recur in contiguous stretches of the document, and queries that seek one topic. The graph is built
by the same code as ingest (the collector's exact top-k lists of sampled prefill queries and banded
L2 neighbours, the graph builder's edges, router and calibrated ef); recall is reported next to the timings so a fast answer cannot hide a wrong one.

Both sides read the KV in the dtype ra keeps it in on a CPU: bfloat16 (a store's dtype for the
default bf16 model), the retrieval side as the store's bits in host memory, the exact side as a
dense layer's bf16 cache buffer; the static set as the device half holds it (float32 on a CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ra_cli.engine.attention import decode_attention, grouped_rows
from ra_cli.index.base import IndexParams, SearchResult, kv_head_of
from ra_cli.index.collect import banded_neighbours, top_lists
from ra_cli.index.flat import FlatLayerIndex
from ra_cli.index.graph import GraphLayerIndex, build_graph_layer, recall
from ra_cli.retrieval.host_path import NO_MASS, SEARCH_COST
from ra_cli.retrieval.kernels import CARRY, attend_retrieved, search_and_attend
from ra_cli.store import kv_to_numpy, widened

COLD_BYTES = 1 << 30

SHAPES = {
    "smollm2": {"heads": 9, "kv_heads": 3, "head_dim": 64},
    "llama3-8b": {"heads": 32, "kv_heads": 8, "head_dim": 128},
}


@dataclass
class DecodeStepConfig:
    keys: int = 131072
    shape: str = "smollm2"
    queries: int = 64  # decode steps timed
    top_k: int = 100
    seed: int = 0
    cold: bool = True  # evict caches between steps, as the rest of a decode step does


def bf16_values(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16, as float32 (what a bf16 store gives back, widened)."""
    return widened(kv_to_numpy(torch.from_numpy(np.ascontiguousarray(x, np.float32)), "bfloat16"))


def synthetic_layer(config: DecodeStepConfig, n: int | None = None):
    """(keys, values [KVH, n, D] (n: config.keys) float32 holding bf16 values, queries_for(positions)
    -> [H, len, D], heads, topic_of [n]: the topic each position's key was drawn around)."""
    shape = SHAPES[config.shape]
    heads, kv_heads, dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
    n = n or config.keys
    rng = np.random.default_rng(config.seed)
    offset = rng.standard_normal(dim).astype(np.float32)
    offset *= 4.0 / np.linalg.norm(offset)
    topics = max(16, n // 256)
    centers = rng.standard_normal((kv_heads, topics, dim)).astype(np.float32)
    run = 128  # tokens per stretch of one topic
    topic_of = rng.integers(0, topics, size=(n + run - 1) // run).repeat(run)[:n]
    keys = offset + centers[:, topic_of] + 1.25 * rng.standard_normal((kv_heads, n, dim)).astype(np.float32)
    values = rng.standard_normal((kv_heads, n, dim)).astype(np.float32)
    groups = heads // kv_heads

    def queries_for(positions):
        # each query seeks a topic it has seen: half the time a recent one, else any earlier one;
        # all point against the key offset (queries are out of distribution for keys)
        recent = rng.random(len(positions)) < 0.5
        back = np.where(recent, rng.integers(0, 512, len(positions)), rng.integers(0, np.maximum(1, positions)))
        sought = topic_of[np.clip(positions - back, 0, n - 1)]
        q = -0.5 * offset + centers[:, sought] + 1.25 * rng.standard_normal((kv_heads, len(positions), dim))
        return np.repeat(q, groups, axis=0).astype(np.float32) + 0.3 * rng.standard_normal((heads, len(positions), dim)).astype(np.float32)

    return bf16_values(keys), bf16_values(values), queries_for, heads, topic_of


def build_index(keys: np.ndarray, queries_for, heads: int, params: IndexParams, search_keys: np.ndarray | None = None):
    """Everything ingest would collect, made by the collector's own functions over the whole
    layer at once: causal top-k lists of every query_stride-th prefill query and of the held-out
    tail, banded L2 neighbours of every key. search_keys: the keys the index searches (default:
    keys; e.g. their bf16 bits, as a store holds them)."""
    kv_heads, n, dim = keys.shape
    positions = np.concatenate([np.arange(0, n, params.query_stride), np.arange(n - 256, n)])
    queries = queries_for(positions)
    key_tensor = torch.from_numpy(keys)
    rows = grouped_rows(torch.from_numpy(queries), kv_heads)
    visible = np.tile(np.minimum(positions + 1, n), heads // kv_heads)
    lists = top_lists(rows, key_tensor, visible, params.list_size).reshape(heads, len(positions), params.list_size)
    knn = banded_neighbours(key_tensor, 0, 0, n, 0, params.knn_window, params.knn)
    held_out = np.zeros(len(positions), bool)
    held_out[-32:] = True
    layer = build_graph_layer(lists, queries.astype(np.float16), knn, held_out, keys, params)
    return GraphLayerIndex(layer, keys if search_keys is None else search_keys, params)


def exact_step(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of one decode position [H, 1, D] over all keys [KVH, N, D] (grouped-query), as
    ra's own dense layers compute it (on a CPU, engine/dense_decode.py's kernel)."""
    return decode_attention(query[None], keys[None], values[None], scaling)[0]


class RetrievalStep:
    """One decode step of a retrieval layer as ra runs it on a CPU: the graph's search and the
    attention over the static set (sinks and window) and the retrieved keys in one call
    (retrieval/kernels.search_and_attend), no carried entry points (the bench's decode queries
    are independent draws)."""

    def __init__(self, index: GraphLayerIndex, static_keys: np.ndarray, static_values: np.ndarray,
                 values: np.ndarray, heads: int, k: int):
        self.index, self.values, self.k = index, values, k
        self.static_keys, self.static_values = static_keys, static_values
        self.visible = np.array([static_keys.shape[1]], np.int64)
        kv_heads, self.dim = static_keys.shape[0], static_keys.shape[2]
        self.costs = np.array([SEARCH_COST] * kv_heads + [1.0] * (kv_heads + heads))
        self.entry_points = np.full((heads, 2 * CARRY), -1, np.int32)
        self.result = SearchResult(np.empty((heads, 1, k), np.int32), np.empty((heads, 1, k), np.float32),
                                   np.empty((heads, 1), np.int64))

    def __call__(self, q: np.ndarray, scaling: float) -> np.ndarray:
        """q [H, 1, D] float32 contiguous -> attention output [H, 1, D]; self.result: the search."""
        out = np.empty((q.shape[0], 1, self.dim), np.float32)
        self.entry_points[:] = -1
        search_and_attend(*self.index.lockstep_arguments(q, self.k, self.index.beam(None, self.k), self.entry_points,
                                                         self.result, CARRY, self.costs),
                          self.static_keys, self.static_values, self.visible, self.values, np.float32(scaling), out,
                          NO_MASS, np.float32(0.0), 0, 0, 0, self.entry_points)
        return out


def run_decode_step_bench(config: DecodeStepConfig, status=print) -> dict:
    params = IndexParams()
    status(f"building a synthetic {config.shape} layer with {config.keys:,} indexed keys per KV head")
    sinks, window = params.sinks, params.window
    n = config.keys
    all_keys, all_values, queries_for, heads, _ = synthetic_layer(config, sinks + n + window)
    indexed = slice(sinks, sinks + n)  # positions [sinks, sinks + n) are indexed; the rest is the static set
    keys = np.ascontiguousarray(all_keys[:, indexed])
    # the indexed KV in host memory as a store's bf16 bits (what retrieval layers search and read)
    host_keys, host_values = (kv_to_numpy(torch.from_numpy(a[:, indexed]), "bfloat16") for a in (all_keys, all_values))
    started = time.perf_counter()
    index = build_index(keys, queries_for, heads, params, host_keys)
    build_seconds = time.perf_counter() - started
    decode = queries_for(np.full(config.queries, sinks + n + window - 1))
    scaling = keys.shape[2] ** -0.5
    # a dense layer's bf16 cache buffer (contiguous rows per KV head)
    key_t, value_t = (torch.from_numpy(a).to(torch.bfloat16).contiguous() for a in (all_keys, all_values))
    static = [np.ascontiguousarray(np.concatenate([a[:, :sinks], a[:, sinks + n:]], axis=1)) for a in (all_keys, all_values)]
    retrieval = RetrievalStep(index, *static, host_values, heads, config.top_k)
    kv_of_head = kv_head_of(heads, keys.shape[0])
    out = np.zeros((heads, 1, keys.shape[2]), np.float32)
    lse = np.zeros((heads, 1), np.float32)

    def retrieval_step(i):
        return retrieval(np.ascontiguousarray(decode[:, i:i + 1]), scaling)

    def flat_step(i):
        q = np.ascontiguousarray(decode[:, i:i + 1])
        result = FlatLayerIndex(host_keys).search(q, config.top_k)
        attend_retrieved(q, host_keys, host_values, kv_of_head, result.ids, np.float32(scaling), out, lse)
        return result

    # In a real decode step the other layers' KV and weights have streamed through the caches
    # since this layer last ran: sweep a buffer larger than the last-level cache between steps
    # (untimed), so neither method is measured with this layer's data still cached.
    sweep = np.ones(COLD_BYTES // 4, np.float32)
    timings = {}
    for name, step in (("exact", lambda i: exact_step(torch.from_numpy(decode[:, i:i + 1]), key_t, value_t, scaling)),
                       ("retrieval", retrieval_step), ("flat_topk", flat_step)):
        step(0)  # warm up (and compile)
        total = 0.0
        for i in range(config.queries):
            if config.cold:
                sweep += 1.0
            began = time.perf_counter()
            step(i)
            total += time.perf_counter() - began
        timings[name] = total / config.queries
    truth = FlatLayerIndex(keys).search(decode, config.top_k).ids
    found = index.search(decode, config.top_k)
    return {
        "shape": config.shape, "heads": heads, "kv_heads": keys.shape[0], "head_dim": keys.shape[2],
        "indexed_keys": n, "static_keys": sinks + window, "top_k": config.top_k, "decode_steps": config.queries,
        "graph_build_seconds": round(build_seconds, 1), "ef": index.default_ef,
        "recall_at_k": round(recall(found.ids, truth), 4),
        "evaluations_per_query": round(float(found.evaluations.mean()), 1),
        "ms_exact": round(1000 * timings["exact"], 3),
        "ms_retrieval": round(1000 * timings["retrieval"], 3),
        "ms_flat_topk": round(1000 * timings["flat_topk"], 3),
        "speedup_vs_exact": round(timings["exact"] / timings["retrieval"], 1),
        "cold_caches": config.cold, "kv_dtype": "bfloat16",
        "data": "synthetic keys/queries with a shared key offset, topical stretches and OOD queries",
    }
