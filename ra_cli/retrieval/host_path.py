"""Retrieval attention where the KV lives in host memory (a CPU): the static set and the indexed
keys are both numpy buffers, so a layer's search and its attention run as one call
(kernels.search_and_attend) for a graph index, or the search and then
kernels.attend_static_and_retrieved for the others; either way one softmax over both halves, no
log-sum-exp merge. A mixin of RetrievalLayer: it reads the layer's static buffers, host KV, index,
settings, token seeds and stats."""

from __future__ import annotations

import time

import numpy as np
import torch

from ra_cli.engine.dense_decode import host_attention_with_lse
from ra_cli.index.base import SearchResult
from ra_cli.retrieval.kernels import CARRY, attend_static_and_retrieved, search_and_attend
from ra_cli.retrieval.token_seeds import LIMIT as SEED_LIMIT, NO_SEEDS

NO_MASS = np.zeros((1, 0), np.float32)  # the kernel's "collect no attention weights"
# What one KV head's search costs against scoring its query heads' static keys, until a step has
# measured both (16K context, every layer searched: ~400K cycles against ~74K)
SEARCH_COST = 5.0


class HostMemoryAttention:
    """RetrievalLayer's attention over host-memory KV (see the module's docstring)."""

    def host_path_state(self) -> None:
        """The state this path keeps between decode steps (set once, in RetrievalLayer.__init__)."""
        self.task_cycles = None  # what search_and_attend's tasks cost the step before (see _task_cycles)
        self._static_views = None
        self._entry_buffer = None  # carried keys and token seeds for search_and_attend (_carried_and_seeds)
        self._seeded = None  # the token seeds copied into it
        self.choice = None  # a retrieval/cost.py MeasuredChoice: this layer times its search against reading every key

    def static_visible(self, q_len: int, q_offset: int) -> np.ndarray:
        """How many static keys each query position sees: the sinks, then window tokens up to it."""
        if q_len == 1:  # a decode step: no arange (this runs for every layer of every token)
            return np.array([min(self.static, self.lo + q_offset + 1 - self.window_start)], np.int64)
        return np.minimum(self.static, self.lo + q_offset + np.arange(1, q_len + 1) - self.window_start).astype(np.int64)

    def _attend_in_host_memory(self, host_query: np.ndarray, q_offset: int, scaling: float) -> torch.Tensor:
        """The layer's attention: searched, or for a decode step of a layer whose search was timed
        slower than reading every key here (self.choice, retrieval/cost.py), every key read."""
        choice = self.choice
        if choice is None or host_query.shape[1] != 1 or not self._searching():
            return self._search_and_attend(host_query, q_offset, scaling)
        every_key = choice.every_key_next()

        def attend() -> torch.Tensor:
            return self._attend_every_key(host_query, scaling) if every_key else \
                self._search_and_attend(host_query, q_offset, scaling)

        if choice.reads_every_key is not None:  # decided: nothing more to time
            return attend()
        began = time.perf_counter()
        out = attend()
        if choice.record(every_key, time.perf_counter() - began):
            self.stats.measured_dense_layers.append(self.layer_idx)
        return out

    def _attend_every_key(self, host_query: np.ndarray, scaling: float) -> torch.Tensor:
        """One decode step's exact attention: dense_decode's kernel over the indexed keys and over
        the static set, merged by log-sum-exp (a decode step sees every key of both)."""
        began = time.perf_counter()
        heads, _, dim = host_query.shape
        kv_heads = self.host.keys.shape[0]
        rows = host_query.reshape(kv_heads, -1, dim)
        floor = None if self.mass is None else self.mass.floor
        static_keys, static_values = self._static_arrays()
        indexed = host_attention_with_lse(rows, self.host.keys, self.host.values, self.n_indexed, scaling, floor)
        static = host_attention_with_lse(rows, static_keys, static_values, self.static, scaling, floor)
        lse = np.logaddexp(indexed[1], static[1])
        shares = [np.exp(part[1] - lse) for part in (indexed, static)]  # [KVH, G] each
        out = indexed[0] * shares[0][..., None] + static[0] * shares[1][..., None]
        if floor is not None:
            groups = heads // kv_heads
            at, weights = static[2]  # the static set's positions: the sinks from 0, the window from window_start
            at = np.where(at < self.lo, at, at - self.lo + self.window_start)
            indexed_at, indexed_weights = indexed[2]
            for g in range(kv_heads):  # each half's weights times its share of the merged attention
                self.mass.add(g * groups, at[g].ravel(), (weights[g] * shares[1][g][:, None]).ravel())
                self.mass.add(g * groups, indexed_at[g].ravel() + self.lo,
                              (indexed_weights[g] * shares[0][g][:, None]).ravel())
        self.stats.attention_seconds += time.perf_counter() - began
        return torch.from_numpy(out.reshape(heads, 1, dim))[None]

    def _search_and_attend(self, host_query: np.ndarray, q_offset: int, scaling: float) -> torch.Tensor:
        heads, q_len, _ = host_query.shape
        out = np.empty((heads, q_len, self.values.shape[3]), np.float32)
        # whole C-contiguous buffers (the visible counts bound what is read): numba vectorizes those
        mass = self.mass.rows if self.mass is not None and q_len == 1 else NO_MASS
        attention = (*self._static_arrays(), self.static_visible(q_len, q_offset), self.host.values)
        weighing = (np.float32(scaling), out, mass, np.float32(self.mass.floor if self.mass else 0.0),
                    self.mass.sinks if self.mass else 0, self.lo, self.window_start)
        if self._searching() and hasattr(self.index, "lockstep_arguments"):
            # the graph's search and the attention in one call (kernels.search_and_attend)
            began = time.perf_counter()
            k = min(self.top_k, self.n_indexed)
            result = SearchResult(np.empty((heads, q_len, k), np.int32), np.empty((heads, q_len, k), np.float32),
                                  np.empty((heads, q_len), np.int64))
            entry_points = self._carried_and_seeds(heads)
            evaluations, searching = search_and_attend(
                *self.index.lockstep_arguments(host_query, k, self.index.beam(self.settings.ef, k), entry_points,
                                               result, CARRY, self._task_cycles(heads)),
                *attention, *weighing, entry_points)
            self.carried = entry_points[:, : 2 * CARRY]
            self._count(evaluations, heads * q_len)
            seconds = time.perf_counter() - began
            self.stats.search_seconds += seconds * searching
            self.stats.attention_seconds += seconds * (1 - searching)
            ids = result.ids
        else:
            if self._searching():
                result = self._search(host_query)
                ids, scores = result.ids, result.scores
            else:
                ids, scores = np.full((heads, q_len, 1), -1, np.int32), np.zeros((heads, q_len, 1), np.float32)
            began = time.perf_counter()
            attend_static_and_retrieved(host_query, *attention, ids, scores, *weighing)
            self.stats.attention_seconds += time.perf_counter() - began
        if self.auditor is not None:
            self.auditor(self, host_query, q_offset, ids, scaling)
        return torch.from_numpy(out)[None]

    def _carried_and_seeds(self, heads: int) -> np.ndarray:
        """search_and_attend's extra entry points [H, 2 CARRY + seeds]: the previous step's carried
        keys, which the kernel itself writes for the next step, then this forward's token seeds
        (copied in once per forward, not once per layer and step)."""
        seeds = self.token_seeds.seeds if self.token_seeds is not None else NO_SEEDS
        buffer = self._entry_buffer
        if buffer is None or buffer.shape[0] != heads or buffer.shape[1] < 2 * CARRY + seeds.shape[1]:
            buffer = np.full((heads, 2 * CARRY + max(seeds.shape[1], SEED_LIMIT)), -1, np.int32)
            if self.carried is not None:
                buffer[:, : self.carried.shape[1]] = self.carried
            self._entry_buffer, self._seeded = buffer, None
        if self._seeded is not seeds:
            buffer[:, 2 * CARRY:] = -1
            buffer[:, 2 * CARRY: 2 * CARRY + seeds.shape[1]] = seeds
            self._seeded = seeds
        return buffer

    def _task_cycles(self, heads: int) -> np.ndarray:
        """Cycles each task of search_and_attend took the step before (the KV heads' searches, their
        static halves, then each query head's retrieved half), by which it balances the next;
        before any step, from SEARCH_COST."""
        kv_heads = self.host.values.shape[0]
        if self.task_cycles is None or self.task_cycles.shape[0] != 2 * kv_heads + heads:
            self.task_cycles = np.array([SEARCH_COST] * kv_heads + [1.0] * (kv_heads + heads))
        return self.task_cycles

    def _static_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The static buffers' [KVH, capacity, D] numpy views, made again only when a buffer grows."""
        views = self._static_views
        if views is None or views[0] is not self.keys or views[1] is not self.values:
            self._static_views = (self.keys, self.values, self.keys[0].numpy(), self.values[0].numpy())
        return self._static_views[2:]

