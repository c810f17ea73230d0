"""The indexed part of a retrieval layer's KV in host memory, in the dtype the search and
attention kernels read: what the CPU side of retrieval attention works on."""

from __future__ import annotations

import numpy as np
import torch

from ra_cli.buffers import with_room
from ra_cli.store import float32_keys, kv_to_numpy


def host_kv(array: np.ndarray, kv_dtype: str) -> np.ndarray:
    """Stored KV [KVH, n, D] as a RAM copy the numba kernels read: bfloat16 as its bits (uint16,
    widened exactly in the kernels: half the bytes of float32), any other dtype as float32."""
    if kv_dtype == "bfloat16":
        return np.array(array, dtype=np.uint16)
    return np.array(float32_keys(array, kv_dtype), dtype=np.float32)


def as_host_dtype(array: np.ndarray, dtype) -> np.ndarray:
    """float32 KV (e.g. evicted from the device window) in a host array's dtype (uint16: bf16 bits)."""
    if dtype == np.uint16:
        return kv_to_numpy(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), "bfloat16")
    return np.asarray(array, dtype=dtype)


class HostKV:
    """The indexed part of one layer's KV in CPU memory, positions [lo, n_stored) and conversation
    tokens evicted later: [KVH, n, D] in the dtype the kernels read (bf16 bits as uint16 for a
    bf16 store, else float32; host_kv)."""

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        self.keys = keys
        self.values = values
        self.count = keys.shape[1]
        self.owned = False

    def append(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add float32 keys/values [KVH, c, D] (rounded to bf16 when the host KV is bf16)."""
        keys, values = as_host_dtype(keys, self.keys.dtype), as_host_dtype(values, self.values.dtype)
        needed = self.count + keys.shape[1]
        self.keys = with_room(self.keys, self.count, needed, axis=1, minimum=1024, dtype=self.keys.dtype,
                              copy=not self.owned)
        self.values = with_room(self.values, self.count, needed, axis=1, minimum=1024, dtype=self.values.dtype,
                                copy=not self.owned)
        self.owned = True
        self.keys[:, self.count:needed] = keys
        self.values[:, self.count:needed] = values
        self.count = needed
