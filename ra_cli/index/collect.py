"""What the graph learns from, collected during prefill next to the attention, on the compute device.

For every `query_stride`-th prefill query of a global attention layer, and every `final_stride`-th
query of the final window (they see every indexed key, like decode queries, and are the only ones
that can select the last indexed keys): its exact top-k indexed keys (causal: only keys at or before it) and the query; for every new indexed key: its nearest
preceding keys by L2. Everything goes to memory-mapped work files inside the partial store, so a
resumed ingest continues where it stopped and memory stays flat however long the document is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ra_cli.engine.attention import grouped_rows
from ra_cli.engine.device_memory import SCORE_BYTES
from ra_cli.errors import RaError
from ra_cli.files import array_file, write_json_atomic
from ra_cli.index.base import IndexParams, indexed_range
from ra_cli.index.build_kernels import top_k_rows


SCALING = "scaling.json"
HELD_OUT = 64
ROWS_PER_BLOCK = 64  # per KV head: 3 x 64 rows of scores over 8K keys stay in L2


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
        self.scaling: dict[int, float] = {}  # each layer's attention scaling, kept for a resumed build
        self.seconds = 0.0  # time this process spent collecting (ingest's manifest reports it)
        if resume and (self.dir / SCALING).is_file():
            try:
                self.scaling = {int(k): float(v) for k, v in json.loads((self.dir / SCALING).read_text()).items()}
            except (OSError, ValueError, TypeError, AttributeError):
                self.scaling = {}
        for layer in self.layers:
            self.lists[layer] = self._open(f"lists_{layer:03d}.npy", mode, np.int32, (heads, self.n_samples, params.list_size), -1)
            self.queries[layer] = self._open(f"queries_{layer:03d}.npy", mode, np.float16, (heads, self.n_samples, head_dim), 0)
            self.knn[layer] = self._open(f"knn_{layer:03d}.npy", mode, np.int32, (kv_heads, max(1, self.n_indexed), params.knn), -1)

    def _open(self, name: str, mode: str, dtype, shape, fill):
        path = self.dir / name
        if mode == "r+" and path.is_file():
            try:
                array = array_file(path, "r+")
            except ValueError:
                array = None
            if array is None or array.shape != shape or array.dtype != dtype:
                raise RaError(f"{path}: this resumed ingest's work file does not match it; remove {self.dir.parent} "
                              "and ingest again")
            return array
        array = array_file(path, "w+", dtype, shape)
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
        write_json_atomic(self.dir / SCALING, {str(k): v for k, v in self.scaling.items()})

    @torch.inference_mode()
    def observe(self, layer: int, query: torch.Tensor, keys: torch.Tensor, q_offset: int, kv_offset: int, scaling: float,
                attended: torch.Tensor | None = None):
        """`attended` [KVH, L] (ascending positions): a sparse prefill chunk attended only these;
        its sampled queries then rank only them, which keeps the collection linear in length too."""
        if layer not in self.lists or self.n_indexed <= 0:
            return
        if query.is_cuda:  # the work the forward queued before this is the forward's, not the collection's
            torch.cuda.synchronize(query.device)
        began = time.perf_counter()
        self.scaling[layer] = float(scaling)
        self._record_lists(layer, query[0], keys[0], q_offset, kv_offset, attended)
        self._record_neighbours(layer, keys[0], q_offset, q_offset + query.shape[2], kv_offset)
        self.seconds += time.perf_counter() - began  # its results came back to the host: nothing left queued

    def _record_lists(self, layer, query, keys, q_offset, kv_offset, attended=None):
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
        if attended is None:
            candidates = keys[:, self.lo - kv_offset: visible_end - kv_offset]  # [KVH, n, D]
            visible = np.minimum(self.positions[begin:end] + 1, self.hi) - self.lo  # causal prefix per query
        else:
            # the attended positions in [lo, hi), the same count for every KV head (sparse.py)
            row = attended[0].cpu().numpy()
            first, stop = np.searchsorted(row, [self.lo, self.hi])
            index = attended[:, first:stop]
            candidates = torch.gather(keys, 1, index[:, :, None].expand(-1, -1, keys.shape[2]).to(keys.device))
            candidates = candidates.to(query.dtype)  # a sparse chunk's keys may be held narrower (bf16 store)
            visible = np.searchsorted(row[first:stop], self.positions[begin:end], side="right")
        take = min(self.params.list_size, candidates.shape[1])
        rows = grouped_rows(sampled, self.kv_heads)  # [KVH, G*s, D]
        ids = top_lists(rows, candidates, np.tile(visible, self.heads // self.kv_heads), take)  # [KVH, G*s, take]
        if attended is not None:  # candidate ranks -> positions -> ids of the indexed range
            mapped = np.take_along_axis(index.cpu().numpy(), np.maximum(ids, 0).reshape(self.kv_heads, -1), axis=1)
            ids = np.where(ids < 0, -1, mapped.reshape(ids.shape) - self.lo).astype(np.int32)
        lists = self.lists[layer]
        lists[:, slots, :take] = ids.reshape(self.heads, end - begin, take)
        lists[:, slots, take:] = -1

    def _record_neighbours(self, layer, keys, start, end, kv_offset):
        first, last = max(start, self.lo), min(end, self.hi)
        if first >= last:
            return
        ids = banded_neighbours(keys, kv_offset, first, last, self.lo, self.params.knn_window, self.params.knn)
        target = self.knn[layer]
        target[:, first - self.lo: last - self.lo, : ids.shape[-1]] = ids
        target[:, first - self.lo: last - self.lo, ids.shape[-1]:] = -1


def banded_neighbours(keys: torch.Tensor, kv_offset: int, first: int, last: int, lo: int, band: int,
                      count: int) -> np.ndarray:
    """For keys at positions [first, last) (keys [KVH, >= last - kv_offset, D] holds positions from
    kv_offset on): their `count` nearest earlier keys by L2, as ids relative to `lo`, among the
    keys of their band (a run of `band` positions counted from lo) and of the band before. A
    banded distance matrix: the work per key stays constant however long the chunk, and bands
    aligned to lo give a resumed ingest the same lists. Returns [KVH, last - first, count'] int32."""
    block_start = lo + (first - lo) // band * band
    blocks = -(-(last - block_start) // band)
    origin = block_start - band  # position of padded[:, 0]
    kv_heads, _, dim = keys.shape
    padded = keys.new_zeros((kv_heads, (blocks + 1) * band, dim), dtype=torch.float32)
    begin = max(lo, origin)
    padded[:, begin - origin: last - origin] = keys[:, begin - kv_offset: last - kv_offset].float()
    windows = padded.unfold(1, 2 * band, band).transpose(-1, -2)  # [KVH, blocks, 2*band, D]
    new = padded[:, band:].reshape(kv_heads, blocks, band, dim)
    # nearness = 2 a.b - |b|^2 ranks b by L2 distance to a (|a|^2 is the same for the whole row)
    nearness = 2 * torch.matmul(new, windows.transpose(-1, -2)) - (windows * windows).sum(-1)[:, :, None, :]
    if origin < lo:  # the first band of the document has no band before it
        nearness[:, 0, :, :band] = float("-inf")
    take = min(count, 2 * band)
    # row i of a band may use the band before and its own keys before it: a prefix of band + i
    visible = np.tile(band + np.arange(band), kv_heads * blocks)
    ids = top_k_prefix(nearness.reshape(-1, 2 * band), visible, take).reshape(kv_heads, blocks, band, take)
    ids = np.where(ids < 0, -1, ids + (np.arange(blocks)[:, None, None] * band + origin - lo))
    return ids.reshape(kv_heads, blocks * band, take)[:, first - block_start: last - block_start]


def top_k_prefix(scores: torch.Tensor, visible: np.ndarray, take: int, kernel: bool | None = None) -> np.ndarray:
    """Exact top-`take` column ids per row of scores [R, n], best first, counting only each row's
    first visible[r] columns; -1 where fewer. On CPU a numba pass (torch.topk is several times
    slower there), elsewhere torch on the device."""
    if scores.device.type == "cpu" if kernel is None else kernel:
        out = np.empty((scores.shape[0], take), np.int32)
        top_k_rows(scores.float().contiguous().numpy(), np.ascontiguousarray(visible, dtype=np.int64), out)
        return out
    limit = torch.from_numpy(np.asarray(visible)).to(scores.device)
    hidden = torch.arange(scores.shape[-1], device=scores.device)[None, :] >= limit[:, None]
    top = torch.topk(scores.float().masked_fill(hidden, float("-inf")), take, dim=-1, sorted=True)
    return torch.where(torch.isinf(top.values), -1, top.indices).to(torch.int32).cpu().numpy()


def top_lists(rows: torch.Tensor, candidates: torch.Tensor, visible: np.ndarray, take: int,
              kernel: bool | None = None) -> np.ndarray:
    """Each row's exact top-`take` candidates by inner product: rows [KVH, R, D], candidates
    [KVH, n, D], visible [R] (causal prefix of the candidates per row) -> ids [KVH, R, take].
    On CPU the scores are made in blocks of rows that stay in cache while they are ranked."""
    kernel = rows.device.type == "cpu" if kernel is None else kernel
    kv_heads, count, _ = rows.shape
    # on a device, as many rows as keep the scores (and topk's masked copy) within SCORE_BYTES
    block = ROWS_PER_BLOCK if kernel else max(1, SCORE_BYTES // (4 * kv_heads * max(1, candidates.shape[1])))
    ids = np.empty((kv_heads, count, take), np.int32)
    transposed = candidates.transpose(-1, -2)
    for first in range(0, count, block):
        last = min(count, first + block)
        scores = torch.matmul(rows[:, first:last], transposed)
        ids[:, first:last] = top_k_prefix(scores.reshape(-1, scores.shape[-1]), np.tile(visible[first:last], kv_heads),
                                          take, kernel).reshape(kv_heads, last - first, take)
    return ids
