"""Retrieval attention at decode (RetrievalAttention, Liu et al. 2024).

Each global layer keeps a small static set on the compute device — the first `lo` tokens (sinks)
and every token from `hi` on (the recent window, which grows with the conversation) — and finds
the rest by searching its CPU-side index with each query head. The two partial attentions are
merged exactly by their log-sum-exp, so with a retrieval budget that covers every indexed key the
output is full attention (up to rounding).

When the window outgrows its budget, its oldest tokens move into the index (the graph gets their
keys, linked in by search), so nothing said in a long conversation is lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ra_cli.buffers import with_room
from ra_cli.choices import EXACT_MARGIN
from ra_cli.engine.attention import attention_with_lse, grouped_scores, merge_partial
from ra_cli.engine.cache import AttentionLayer
from ra_cli.engine.dense_decode import host_attention_with_lse
from ra_cli.index.base import kv_head_of
from ra_cli.retrieval.budget import question_budget
from ra_cli.retrieval.host_kv import HostKV
from ra_cli.retrieval.host_path import HostMemoryAttention
from ra_cli.retrieval.kernels import CARRY, attend_retrieved
from ra_cli.store import widened

EVICT_BATCH = 64  # tokens moved from the window into the index at a time


@dataclass
class RetrievalSettings:
    top_k: int | None = None  # None: the per-layer budget chosen at ingest (100 when none was)
    ef: int | None = None  # None: the per-layer ef calibrated at ingest
    window: int = 512  # recent tokens kept on the device before eviction into the index
    # Per-layer budget: the smallest top-k whose static + exact top-k keys held this much softmax
    # mass on held-out prefill queries at ingest (attention is not equally sparse everywhere).
    coverage: float = 0.97
    # Layers where even the largest budget held less than this attend densely: too spread out.
    dense_below: float = 0.8
    # On a CPU, layers whose search would read so many keys that dense attention is faster attend
    # densely too (retrieval/cost.py); False searches every retrievable layer.
    dense_when_cheaper: bool = True
    # A forward whose two likeliest next tokens are closer than this many nats (when every layer
    # searches; in proportion to the layers that do) is run again with exact attention, and
    # questions are read exactly (engine/generate.py prefill); 0: retrieval alone.
    exact_margin: float = EXACT_MARGIN


@dataclass
class RetrievalStats:
    """What decoding cost, for /stats and `ra eval`."""

    steps: int = 0  # query positions searched (per layer)
    evaluations: int = 0  # distance evaluations, summed over heads and layers
    searches: int = 0  # (query head, position, layer) searches
    retrieval_seconds: float = 0.0  # everything a retrieval layer's attention took
    search_seconds: float = 0.0  # of which: index search
    attention_seconds: float = 0.0  # of which: attention over the retrieved (and, on CPU, static) keys
    wait_seconds: float = 0.0  # of which, on an accelerator: waiting for the device to hand over the query
    evicted: int = 0
    indexed_keys: int = 0
    dense_layers: list = field(default_factory=list)  # every layer attending densely, of which:
    cheaper_dense_layers: list = field(default_factory=list)  # those dense because it is faster here
    measured_dense_layers: list = field(default_factory=list)  # searched ones that read every key: timed faster
    budgets: dict = field(default_factory=dict)
    per_layer_evaluations: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "keys_scanned_per_search": round(self.evaluations / self.searches, 1) if self.searches else 0.0,
            "retrieval_ms_per_token": round(1000 * self.retrieval_seconds / self.steps, 3) if self.steps else 0.0,
            "searches": self.searches, "evicted_into_index": self.evicted, "dense_layers": self.dense_layers,
            "cheaper_dense_layers": self.cheaper_dense_layers, "measured_dense_layers": self.measured_dense_layers,
        }


class RetrievalLayer(HostMemoryAttention, AttentionLayer):
    """KV of one global layer for retrieval attention: static set on the device, the rest indexed."""

    is_sliding = False

    def __init__(self, layer_idx: int, index, host: HostKV, n_indexed: int, lo: int, sink_k, sink_v, window_k, window_v,
                 settings: RetrievalSettings, stats: RetrievalStats, token_seeds=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.index = index
        self.host = host  # keys/values of positions [lo, lo + host.count); the first n_indexed are indexed
        self.n_indexed = n_indexed
        self.lo = lo
        self.settings = settings
        self.stats = stats
        self.device = sink_k.device
        # static buffer: sinks [0, lo) then window tokens [lo + n_indexed, ...) in order
        capacity = sink_k.shape[2] + window_k.shape[2] + settings.window + 2 * EVICT_BATCH + 64
        shape = (1, sink_k.shape[1], capacity, sink_k.shape[3])
        self.keys = sink_k.new_empty(shape)
        self.values = sink_v.new_empty(shape[:3] + (sink_v.shape[3],))
        self.static = 0
        self._append(sink_k, sink_v)
        self._append(window_k, window_v)
        self.is_initialized = True
        self.observer = None
        self.counts_steps = False  # exactly one layer counts decoded positions in the stats
        self.kv_of_head = None
        self.auditor = None  # ra eval: checks each search against exact attention
        self.top_k = settings.top_k or 100
        self.budgets: tuple[int, ...] = ()  # measured budgets a question may raise top_k to (retrieval/budget.py)
        self.ingest_top_k = self.top_k
        self.carried = None  # [H, 2 * CARRY] entry points from the previous step
        self.token_seeds = token_seeds  # a TokenSeeds shared by the cache's layers: entry points from the text
        self.mass = None  # an AttentionMass collecting decode steps' weights (chat's citations)
        self.exact = False  # attend to every key (ContextCache.exactly: a forward redone exactly)
        self.staging = None  # page-locked buffer the retrieved half goes to the accelerator from
        # an accelerator's path: the static set's attention on the device beside the retrieved keys'
        # on the CPU, merged by log-sum-exp. Where the static set is in host memory (a CPU, or a GPU
        # machine's static_on_host cache) all of it runs there in one call
        self.split = self.device.type != "cpu"
        self.host_path_state()

    # -- storage ---------------------------------------------------------------------------------
    @property
    def window_start(self) -> int:
        """Absolute position of the first window token."""
        return self.lo + self.n_indexed

    @property
    def length(self) -> int:
        return self.window_start + (self.static - self.lo)

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = self.static + keys.shape[2]
        self.keys = with_room(self.keys, self.static, end, axis=2)
        self.values = with_room(self.values, self.static, end, axis=2)
        self.keys[:, :, self.static:end] = keys
        self.values[:, :, self.static:end] = values
        self.static = end

    def lazy_initialization(self, key_states, value_states) -> None:  # built ready in __init__
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self._append(key_states, value_states)
        return self.keys[:, :, : self.static], self.values[:, :, : self.static]

    def evict(self) -> None:
        """Move the window's oldest tokens into the index once it exceeds its budget."""
        window = self.static - self.lo
        if window <= self.settings.window + EVICT_BATCH:
            return
        count = window - self.settings.window
        start = self.lo
        keys = self.keys[0, :, start:start + count].float().cpu().numpy()
        values = self.values[0, :, start:start + count].float().cpu().numpy()
        first = self.n_indexed
        if self.host.count < first + count:
            self.host.append(keys[:, self.host.count - first:], values[:, self.host.count - first:])
        self.index.grow(self.host.keys, first + count)
        self.n_indexed += count
        if self.token_seeds is not None:
            self.token_seeds.indexed_end = self.window_start
        self.keys[:, :, start:self.static - count] = self.keys[:, :, start + count:self.static].clone()
        self.values[:, :, start:self.static - count] = self.values[:, :, start + count:self.static].clone()
        self.static -= count
        self.stats.evicted += count

    def crop(self, tokens_to_remove: int) -> None:
        self._check_crop(tokens_to_remove)
        keep_window = max(0, self.static - self.lo + tokens_to_remove)
        if keep_window == 0 and self.static - self.lo + tokens_to_remove < 0:
            raise ValueError("cannot forget tokens that were already moved into the index")
        self.static = self.lo + keep_window

    # -- attention -------------------------------------------------------------------------------
    def attend(self, query, scaling, sliding_window=None, softcap=None):
        q_len = query.shape[2]
        q_offset = self.length - q_len
        if self.exact:
            return self._attend_exact(query, q_offset, scaling, softcap).to(query.device, query.dtype)
        if self.observer is not None:
            self.observer(self.layer_idx, query, self.keys[:, :, : self.static], q_offset, 0, scaling)
        began = time.perf_counter()
        # on a GPU, a sync point: the device finishes this layer's projections (and anything queued
        # before them) before the CPU can search
        host_query = np.ascontiguousarray(query[0].detach().float().cpu().numpy())
        if query.is_cuda:
            self.stats.wait_seconds += time.perf_counter() - began
        if not self.split and softcap is None:
            out = self._attend_in_host_memory(host_query, q_offset, scaling)
        else:
            out = self._attend_split(query, host_query, q_offset, scaling, softcap)
        if self.counts_steps:
            self.stats.steps += q_len
        self.stats.retrieval_seconds += time.perf_counter() - began
        return out.to(query.device, query.dtype)  # from host memory when the static set is kept there

    def _search(self, host_query: np.ndarray):
        """Top-k indexed keys of every query head and position; remembers the last position's best
        keys and their successors as the next step's extra entry points."""
        began = time.perf_counter()
        result = self.index.search(host_query, min(self.top_k, self.n_indexed), self.settings.ef,
                                   self._entry_points(host_query.shape[0]), ordered=CARRY)
        last = result.ids[:, -1, :CARRY]
        successors = np.where((last >= 0) & (last + 1 < self.n_indexed), last + 1, -1)
        self.carried = np.ascontiguousarray(np.concatenate([last, successors], axis=1), dtype=np.int32)
        self._count(int(result.evaluations.sum()), result.evaluations.size)
        self.stats.search_seconds += time.perf_counter() - began
        return result

    def _count(self, evaluations: int, searches: int) -> None:
        self.stats.evaluations += evaluations
        self.stats.searches += searches
        per_layer = self.stats.per_layer_evaluations
        per_layer[self.layer_idx] = per_layer.get(self.layer_idx, 0) + evaluations

    def _entry_points(self, heads: int) -> np.ndarray | None:
        """Extra entry points [H, X]: the previous step's carried keys and this forward's token seeds."""
        seeds = None if self.token_seeds is None or self.token_seeds.seeds.size == 0 else self.token_seeds.seeds
        if seeds is None:
            return self.carried
        seeds = np.broadcast_to(seeds, (heads, seeds.shape[1]))
        return np.ascontiguousarray(seeds if self.carried is None else np.concatenate([self.carried, seeds], axis=1))

    def _searching(self) -> bool:
        return self.n_indexed > 0 and self.top_k > 0

    def static_positions(self) -> torch.Tensor:
        """Positions of the static set's keys: the sinks [0, lo), then the window from window_start."""
        return torch.cat([torch.arange(self.lo, device=self.device),
                          torch.arange(self.window_start, self.length, device=self.device)])

    def static_attention(self, query: torch.Tensor, q_offset: int, scaling: float, softcap=None, widen: bool = False):
        """(output, log-sum-exp) of attention over the static set alone, causally masked; `widen`:
        in float32 (query and keys), not the keys' dtype."""
        query = query.to(self.device)  # the static set may be kept in host memory on a GPU machine
        mask = None
        if query.shape[2] > 1:
            positions = self.static_positions()
            query_positions = torch.arange(q_offset, self.length, device=self.device)
            mask = positions[None, :] <= query_positions[:, None]
        keys, values = self.keys[:, :, : self.static], self.values[:, :, : self.static]
        if widen:
            query, keys, values = query.float(), keys.float(), values.float()
        return attention_with_lse(query, keys, values, scaling, mask, softcap)

    def _attend_split(self, query, host_query, q_offset, scaling, softcap):
        """Accelerator path: the static set's attention on the device, the retrieved keys' on the
        CPU, merged exactly by log-sum-exp."""
        query = query.to(self.device)  # where the static set is (host memory, for static_on_host)
        static_out, static_lse = self.static_attention(query, q_offset, scaling, softcap)
        heads, q_len, _ = host_query.shape
        retrieved_out = np.zeros((heads, q_len, self.values.shape[3]), np.float32)
        retrieved_lse = np.full((heads, q_len), -np.inf, np.float32)
        ids = np.full((heads, q_len, 1), -1, np.int32)
        scores = np.zeros((heads, q_len, 1), np.float32)
        if self._searching():
            result = self._search(host_query)
            ids, scores = result.ids, result.scores
            began = time.perf_counter()
            if self.kv_of_head is None:
                self.kv_of_head = kv_head_of(heads, self.host.keys.shape[0])
            attend_retrieved(host_query, self.host.keys, self.host.values, self.kv_of_head, ids, np.float32(scaling),
                             retrieved_out, retrieved_lse)
            self.stats.attention_seconds += time.perf_counter() - began
        if self.auditor is not None:
            self.auditor(self, host_query, q_offset, ids, scaling)
        retrieved = self._to_device(retrieved_out, retrieved_lse)
        merged, total = merge_partial([static_out, retrieved[None, :, :, :-1]], [static_lse, retrieved[None, :, :, -1]])
        if self.mass is not None and q_len == 1:
            self._collect_split_mass(query, total[0, :, 0], ids[:, 0], scores[:, 0], scaling)
        return merged

    def _to_device(self, out: np.ndarray, lse: np.ndarray) -> torch.Tensor:
        """The retrieved half [H, q, Dv] and its log-sum-exp [H, q] as one [H, q, Dv + 1] tensor on
        the device: one asynchronous copy from a page-locked buffer of this layer's. The buffer is
        rewritten only after this layer's next query has come back, which waits for the copy."""
        heads, q_len, dim = out.shape
        if self.device.type == "cpu":
            return torch.from_numpy(np.concatenate([out, lse[..., None]], axis=-1))
        if self.staging is None or self.staging.shape != (heads, q_len, dim + 1):
            self.staging = torch.empty((heads, q_len, dim + 1), dtype=torch.float32, pin_memory=True)
        staged = self.staging.numpy()
        staged[..., :dim] = out
        staged[..., dim] = lse
        return self.staging.to(self.device, non_blocking=True)

    def _attend_exact(self, query, q_offset, scaling, softcap):
        """Full attention: the static set's, and every indexed key's in one pass over host memory
        (every indexed key precedes every query), merged by log-sum-exp."""
        static_out, static_lse = self.static_attention(query, q_offset, scaling, softcap, widen=True)
        if self.n_indexed == 0:
            return static_out
        larger = tuple(k for k in self.budgets if k >= self.ingest_top_k)
        if len(larger) > 1 and query.shape[2] > 1:  # a question: its attention sets the answer's budget
            asked = self.top_k
            self.top_k = question_budget(query, self.keys[:, :, : self.static], self.static_positions(), q_offset,
                                         self.host.keys, self.n_indexed, scaling, larger, self.settings.coverage)
            self.stats.budgets[self.layer_idx] = self.top_k
            if self.choice is not None and self.top_k != asked:  # the search reads more or less: time it again
                self.choice.restart()
        keys, values = self.host.keys, self.host.values
        _, heads, q_len, dim = query.shape
        kv_heads = keys.shape[0]
        if softcap is None and keys.shape == values.shape and keys.flags.c_contiguous and values.flags.c_contiguous:
            rows = np.ascontiguousarray(query[0].detach().float().cpu().numpy()).reshape(kv_heads, -1, dim)
            out, lse, _ = host_attention_with_lse(rows, keys, values, self.n_indexed, scaling)
            indexed_out = torch.from_numpy(out).reshape(1, heads, q_len, -1).to(self.device)
            indexed_lse = torch.from_numpy(lse).reshape(1, heads, q_len).to(self.device)
        else:  # a softcap (or unusual layout): torch over the widened keys
            indexed_k = torch.from_numpy(widened(keys[:, : self.n_indexed]))[None].to(self.device)
            indexed_v = torch.from_numpy(widened(values[:, : self.n_indexed]))[None].to(self.device)
            indexed_out, indexed_lse = attention_with_lse(query.float(), indexed_k, indexed_v, scaling, None, softcap)
        merged, _ = merge_partial([static_out, indexed_out], [static_lse, indexed_lse])
        return merged

    def _collect_split_mass(self, query, total_lse, ids, scores, scaling) -> None:
        """The weights of one decode step's keys once both halves are merged: exp(score - lse)."""
        static_scores = grouped_scores(query[:, :, -1:], self.keys[:, :, : self.static])[0, :, 0].float() * scaling
        static_weights = torch.exp(static_scores - total_lse[:, None]).cpu().numpy()
        # static keys: the sinks (positions 0..lo), then the window from window_start
        positions = np.concatenate([np.arange(self.lo), np.arange(self.window_start, self.window_start + self.static - self.lo)])
        lse = total_lse.cpu().numpy()
        for h in range(ids.shape[0]):
            self.mass.add(h, positions, static_weights[h])
            found = ids[h] >= 0
            self.mass.add(h, self.lo + ids[h][found], np.exp(scores[h][found] * scaling - lse[h]))
