"""KV caches that plug into transformers' Cache API and own the attention of their layer.

`ContextCache` is one object per conversation. Each of its layers both stores KV (transformers
calls `update`) and computes attention (our registered attention function calls `attend`), so a
layer type *is* an attention mode: `DeviceKVLayer` is exact full attention over KV kept on the
compute device; the retrieval layer of retrieval/layer.py keeps only a static set there.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ra_cli.buffers import with_room
from ra_cli.engine.attention import SMALL_QUERY, exact_attention
from ra_cli.engine.sparse import BlockMeans, SparsePrefill, sparse_chunk_attention


def layer_windows(config) -> list[int | None]:
    """Sliding-window size per decoder layer (None for global layers), from a transformers config."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    count = config.num_hidden_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * count
    window = getattr(config, "sliding_window", None)
    return [window if kind in ("sliding_attention", "chunked_attention") and window else None for kind in types]


@dataclass
class AttentionTimer:
    """Seconds the full-attention layers of a cache spent attending (benchmarks split a decode
    step into model body and attention with it)."""

    seconds: float = 0.0
    # on an accelerator, wait for the device around each attention, so that the seconds are its
    # kernels' and not the queueing of them (a benchmark's choice: it costs two waits a layer)
    synchronize: bool = False

    def start(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    def stop(self, began: float) -> None:
        if self.synchronize:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - began


class AttentionLayer(CacheLayerMixin):
    """What every ra cache layer shares: a logical length (tokens seen) and no maximum."""

    is_croppable = True

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @staticmethod
    def _check_crop(tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")


class DeviceKVLayer(AttentionLayer):
    """All KV of one layer on the compute device, in a buffer that grows by doubling.

    transformers' DynamicLayer concatenates on every step, which copies the whole cache per token;
    an in-place write into spare capacity keeps a decode step O(new tokens) in memory traffic.
    """

    is_sliding = False

    def __init__(self, layer_idx: int, sliding_window: int | None = None, capacity: int = 256, dtype=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.capacity = capacity  # first allocation, in tokens
        self.dtype = dtype  # of the buffers; None: that of the first keys written
        self.length = 0
        self.observer: Callable | None = None
        self.timer: AttentionTimer | None = None
        self.sparse = None  # a SparsePrefill policy: prefill chunks attend to selected blocks only
        self.block_means = None
        self.mass = None  # an AttentionMass collecting decode steps' weights (chat's citations)
        # engine/dense_decode.py's numba kernel for small queries; off where a result must not depend
        # on the build: a kernel compiled afresh and one loaded from numba's cache can round
        # differently (measured: 1e-7), and a resumed ingest must store exactly what an uninterrupted one does
        self.kernels = True
        # an ingest's KV kept in the store's bf16 memory map: keys and values are widened, exactly,
        # into a WideningScratch shared by the layers before attention reads them
        self.widening = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        dtype = self.dtype or key_states.dtype
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[3]), dtype=dtype)
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[3]), dtype=dtype)
        self.is_initialized = True

    def reserve(self, tokens: int) -> None:
        self.keys = with_room(self.keys, self.length, tokens, axis=2, minimum=self.capacity)
        self.values = with_room(self.values, self.length, tokens, axis=2, minimum=self.capacity)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        self.reserve(end)
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def load(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fill an empty layer with stored KV [B,KVH,n,D]."""
        self.lazy_initialization(keys, values)
        self.update(keys, values)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int, widening: "WideningScratch | None") -> None:
        """Use `keys`/`values` [B,KVH,capacity,D] (views of a store's memory map) as this layer's
        buffers, their first `length` tokens already written: new tokens are written into them,
        and attention reads them widened by `widening` (None: as they are). An ingest keeps its KV
        once, in the store, instead of also in a float32 copy twice its size."""
        self.device = keys.device
        self.keys, self.values, self.length = keys, values, length
        self.widening = widening
        self.is_initialized = True

    def kv_from(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [start, length), where attention reads them."""
        return self.keys[:, :, start: self.length], self.values[:, :, start: self.length]

    def attend(self, query, scaling, sliding_window=None, softcap=None):
        q_offset = self.length - query.shape[2]
        kv_offset = 0
        if sliding_window is not None and q_offset + 1 > sliding_window:
            # Keys older than the first query's window are invisible to every query: skip them.
            kv_offset = q_offset + 1 - sliding_window
        began = self.timer.start() if self.timer is not None else 0.0
        keys, values = self.kv_from(kv_offset)
        if self.sparse is not None and query.shape[2] > SMALL_QUERY and kv_offset == 0 and softcap is None:
            # the chunk's selection is widened, not the whole cache: linear work per chunk
            out, positions = sparse_chunk_attention(query, keys, values, scaling, q_offset, self.block_means, self.sparse)
            if out is not None:
                if self.observer is not None:
                    self.observer(self.layer_idx, query, keys, q_offset, kv_offset, scaling, positions)
                if self.timer is not None:
                    self.timer.stop(began)
                return out
        if self.widening is not None:
            keys, values = self.widening.widen(keys, values)
        if self.observer is not None:
            self.observer(self.layer_idx, query, keys, q_offset, kv_offset, scaling)
        out = exact_attention(query, keys, values, scaling, q_offset, kv_offset, sliding_window, softcap,
                              self.mass if query.shape[2] == 1 else None, self.kernels)
        if self.timer is not None:
            self.timer.stop(began)
        return out

    def crop(self, tokens_to_remove: int) -> None:
        self._check_crop(tokens_to_remove)
        self.length = max(0, self.length + tokens_to_remove)

    def reset(self) -> None:
        self.length = 0


class WideningScratch:
    """float32 copies of one layer's KV at a time, for the layers of a cache whose buffers are
    narrower (bf16): written into buffers kept from layer to layer, laid out as a float32 cache
    buffer is, so the attention reading them computes exactly what it does over a float32 cache —
    and fresh arrays per layer and chunk would fault their pages in (1.46 s of a 16K prefill; this:
    `widen` in benchmarks/ingest_profile.py, 0.34 s)."""

    def __init__(self, dtype, capacity: int):
        self.dtype, self.capacity = dtype, capacity
        self.keys = self.values = None

    def widen(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values [B, KVH, n, D] -> float32 views [B, KVH, n, D], valid until the next call."""
        if self.keys is None or self.keys.shape[:2] != keys.shape[:2] or self.keys.shape[3] != keys.shape[3]:
            shape = (*keys.shape[:2], self.capacity, keys.shape[3])
            self.keys, self.values = keys.new_empty(shape, dtype=self.dtype), keys.new_empty(shape, dtype=self.dtype)
        count = keys.shape[2]
        wide_keys, wide_values = self.keys[:, :, :count], self.values[:, :, :count]
        wide_keys.copy_(keys)
        wide_values.copy_(values)
        return wide_keys, wide_values


class HostKVLayer(DeviceKVLayer):
    """All KV of a layer in host memory, page-locked on a GPU machine, streamed to the compute
    device whenever the layer attends: exact attention when the KV does not fit on the accelerator
    — what long contexts fall back to without retrieval, and the layers a GPU prefill cannot keep
    on the device (engine/device_memory.py). On a CPU it is DeviceKVLayer."""

    def __init__(self, layer_idx: int, device, sliding_window: int | None = None, capacity: int = 256, dtype=None):
        super().__init__(layer_idx, sliding_window, capacity, dtype)
        self.compute_device = torch.device(device)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        dtype = self.dtype or key_states.dtype
        self.device = torch.device("cpu")
        self.keys = torch.empty((*key_states.shape[:2], 0, key_states.shape[3]), dtype=dtype)
        self.values = torch.empty((*value_states.shape[:2], 0, value_states.shape[3]), dtype=dtype)
        self.is_initialized = True

    def reserve(self, tokens: int) -> None:
        # new tokens are written from the device straight into these (DeviceKVLayer.update)
        pinned = self.compute_device.type == "cuda"
        self.keys = with_room(self.keys, self.length, tokens, axis=2, minimum=self.capacity, pin_memory=pinned)
        self.values = with_room(self.values, self.length, tokens, axis=2, minimum=self.capacity, pin_memory=pinned)

    def kv_from(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compute_device.type == "cpu":
            return super().kv_from(start)
        # one asynchronous copy per KV head: a head's run of positions is contiguous in the
        # page-locked buffer (the [B, KVH, n, D] slice as a whole is not, and would be staged
        # through pageable memory)
        shape = (self.keys.shape[0], self.keys.shape[1], self.length - start, self.keys.shape[3])
        keys = torch.empty(shape, dtype=self.keys.dtype, device=self.compute_device)
        values = torch.empty(shape[:3] + (self.values.shape[3],), dtype=self.values.dtype, device=self.compute_device)
        for b in range(shape[0]):
            for head in range(shape[1]):
                keys[b, head].copy_(self.keys[b, head, start: self.length], non_blocking=True)
                values[b, head].copy_(self.values[b, head, start: self.length], non_blocking=True)
        return keys, values


class ContextCache(Cache):
    """The KV of one conversation: stored document prefix + everything said since."""

    token_seeds = None  # retrieval caches: reads each forward's tokens (retrieval/token_seeds.py)
    # Retrieval caches: a forward whose two likeliest next tokens are closer than this many nats is
    # run again with exact attention, and questions are read exactly (engine/generate.py); 0 = never.
    exact_margin = 0.0

    def __init__(self, layers: list[CacheLayerMixin]):
        super().__init__(layers=layers)
        self.attention_timer = AttentionTimer()
        self.exact_steps = 0  # forwards run again exactly
        self.exact_seconds = 0.0  # the time those second runs took (whole forwards)
        for layer in layers:
            if isinstance(layer, DeviceKVLayer):
                layer.timer = self.attention_timer

    def use_sparse_prefill(self, policy: SparsePrefill) -> None:
        """Prefill chunks of full-attention layers attend to sinks, window and selected blocks."""
        for layer in self.layers:
            if isinstance(layer, DeviceKVLayer) and layer.sliding_window is None:
                layer.sparse, layer.block_means = policy, BlockMeans()

    @classmethod
    def full(cls, config, capacity: int = 256, dtype=None) -> "ContextCache":
        """Exact attention over all KV on the compute device; `capacity` tokens allocated up front."""
        return cls([DeviceKVLayer(i, window, capacity, dtype) for i, window in enumerate(layer_windows(config))])

    @property
    def length(self) -> int:
        return self.layers[0].get_seq_length()

    def feed(self, ids: torch.Tensor) -> None:
        """Before a forward: the token ids [1, T] it runs, for layers that look them up."""
        if self.token_seeds is not None:
            self.token_seeds.feed(ids.reshape(-1).cpu().numpy(), self.length)

    def uncertain(self, logits: torch.Tensor) -> bool:
        """Whether next-token logits leave the choice to an error retrieval can make: the top two
        closer than `exact_margin`."""
        if self.exact_margin <= 0 or logits.shape[-1] < 2:
            return False
        first, second = torch.topk(logits, 2).values.tolist()
        return first - second < self.exact_margin

    @contextlib.contextmanager
    def exactly(self):
        """Meanwhile every layer attends to all its keys, and the attention timers stop: the time
        of an exact forward is counted whole, in `exact_seconds`."""
        layers = [layer for layer in self.layers if hasattr(layer, "exact")]
        for layer in layers:
            layer.exact = True
        timed = self.attention_timer.seconds
        try:
            yield
        finally:
            for layer in layers:
                layer.exact = False
            self.attention_timer.seconds = timed

    @contextlib.contextmanager
    def collecting(self, mass):
        """Every layer adds its decode steps' attention weights to `mass` meanwhile."""
        for layer in self.layers:
            layer.mass = mass
        try:
            yield mass
        finally:
            for layer in self.layers:
                layer.mass = None

    def settle(self) -> None:
        """After a whole forward: let layers that move tokens into their index do so now, never
        mid-forward, so an interrupted forward can always be rolled back by `truncate`."""
        for layer in self.layers:
            evict = getattr(layer, "evict", None)
            if evict is not None:
                evict()

    def truncate(self, length: int) -> None:
        """Forget every token at position >= length in every layer (/clear keeps only the document;
        an interrupted forward may have reached only some layers)."""
        for layer in self.layers:
            excess = layer.get_seq_length() - length
            if excess > 0:
                layer.crop(-excess)
