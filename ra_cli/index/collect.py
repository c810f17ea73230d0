"""What the graph learns from, collected during prefill next to the attention, on the compute device.

For every `query_stride`-th prefill query of a global attention layer, and every `final_stride`-th
query of the final window (they see every indexed key, like decode queries, and are the only ones
that can select the last indexed keys): its exact top-k indexed keys (causal: only keys at or before it) and the query; for every new indexed key: its nearest
preceding keys by L2. Everything goes to memory-mapped work files inside the partial store, so a
resumed ingest continues where it stopped and memory stays flat however long the document is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ra_cli.index.base import IndexParams, indexed_range


HELD_OUT = 64


class PrefillCollector:
    def __init__(self, work_dir: Path, n_tokens: int, windows: list[int | None], heads: int, kv_heads: int,
                 head_dim: int, params: IndexParams, resume: bool):
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.params = params
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.lo, self.hi = indexed_range(n_tokens, params)
        self.n_indexed = self.hi - self.lo
        self.positions = np.concatenate([np.arange(self.lo, self.hi, params.query_stride),
                                         np.arange(self.hi, n_tokens, params.final_stride)]).astype(np.int64)
        self.n_samples = len(self.positions)
        self.layers = [i for i, window in enumerate(windows) if window is None]
        mode = "r+" if resume else "w+"
        self.lists, self.queries, self.knn = {}, {}, {}
        self.scaling: dict[int, float] = {}
        for layer in self.layers:
            self.lists[layer] = self._open(f"lists_{layer:03d}.npy", mode, np.int32, (heads, self.n_samples, params.list_size), -1)
            self.queries[layer] = self._open(f"queries_{layer:03d}.npy", mode, np.float16, (heads, self.n_samples, head_dim), 0)
            self.knn[layer] = self._open(f"knn_{layer:03d}.npy", mode, np.int32, (kv_heads, max(1, self.n_indexed), params.knn), -1)

    def _open(self, name: str, mode: str, dtype, shape, fill):
        path = self.dir / name
        if mode == "r+" and path.is_file():
            return np.lib.format.open_memmap(path, mode="r+")
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        array[...] = fill
        return array

    def sample_positions(self) -> np.ndarray:
        return self.positions

    def held_out(self) -> np.ndarray:
        """Samples kept out of training to calibrate search and budgets: the last HELD_OUT queries
        of the document, the ones most like decode queries (interleaved hold-outs would sit
        between near-identical training neighbours and make the search look easier than it is)."""
        held = np.zeros(self.n_samples, bool)
        final = np.nonzero(self.positions >= self.hi)[0]
        if len(final) >= 4:
            held[final[-min(HELD_OUT, len(final) // 4):]] = True
        return held

    def flush(self) -> None:
        for group in (self.lists, self.queries, self.knn):
            for array in group.values():
                array.flush()

    @torch.inference_mode()
    def observe(self, layer: int, query: torch.Tensor, keys: torch.Tensor, q_offset: int, kv_offset: int, scaling: float):
        if layer not in self.lists or self.n_indexed <= 0:
            return
        self.scaling[layer] = float(scaling)
        self._record_lists(layer, query[0], keys[0], q_offset, kv_offset)
        self._record_neighbours(layer, keys[0], q_offset, q_offset + query.shape[2], kv_offset)

    def _record_lists(self, layer, query, keys, q_offset, kv_offset):
        q_len = query.shape[1]
        begin, end = np.searchsorted(self.positions, [q_offset, q_offset + q_len])
        if begin == end:
            return
        slots = np.arange(begin, end)
        positions = torch.from_numpy(self.positions[begin:end])
        sampled = query[:, positions - q_offset]  # [H, s, D]
        self.queries[layer][:, slots] = sampled.to("cpu", torch.float16).numpy()
        visible_end = min(self.hi, int(positions[-1]) + 1)
        if visible_end <= self.lo:
            return
        candidates = keys[:, self.lo - kv_offset: visible_end - kv_offset]  # [KVH, n, D]
        groups = self.heads // self.kv_heads
        count = positions.numel()
        scores = torch.matmul(sampled.reshape(self.kv_heads, groups * count, -1), candidates.transpose(-1, -2))
        scores = scores.float().reshape(self.heads, count, -1)
        # Only keys of this chunk can lie after a sampled query; mask just that tail.
        tail = max(self.lo, q_offset)
        if tail < visible_end:
            key_positions = torch.arange(tail, visible_end, device=scores.device)
            scores[..., tail - self.lo:].masked_fill_(
                key_positions[None, None, :] > positions.to(scores.device)[None, :, None], float("-inf"))
        take = min(self.params.list_size, scores.shape[-1])
        top = torch.topk(scores, take, dim=-1, sorted=True)
        ids = torch.where(torch.isinf(top.values), -1, top.indices).to(torch.int32).cpu().numpy()
        rows = self.lists[layer]
        rows[:, slots, :take] = ids
        rows[:, slots, take:] = -1

    def _record_neighbours(self, layer, keys, start, end, kv_offset):
        first, last = max(start, self.lo), min(end, self.hi)
        if first >= last:
            return
        window_start = max(self.lo, first - self.params.knn_window)
        reference = keys[:, window_start - kv_offset: last - kv_offset].float()  # [KVH, r, D]
        new = keys[:, first - kv_offset: last - kv_offset].float()  # [KVH, m, D]
        distances = (new * new).sum(-1)[..., None] + (reference * reference).sum(-1)[:, None, :] \
            - 2 * torch.matmul(new, reference.transpose(-1, -2))
        new_positions = torch.arange(first, last, device=distances.device)
        ref_positions = torch.arange(window_start, last, device=distances.device)
        # only earlier keys: later ones do not exist yet when a chunk streams in
        distances.masked_fill_(ref_positions[None, None, :] >= new_positions[None, :, None], float("inf"))
        take = min(self.params.knn, distances.shape[-1])
        nearest = torch.topk(distances, take, dim=-1, largest=False)
        ids = torch.where(torch.isinf(nearest.values), -1, nearest.indices + (window_start - self.lo))
        target = self.knn[layer]
        target[:, first - self.lo: last - self.lo, :take] = ids.to(torch.int32).cpu().numpy()
        target[:, first - self.lo: last - self.lo, take:] = -1
