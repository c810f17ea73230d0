"""Append-friendly buffers: one growth policy for every array that gains rows over a chat
(device KV, the static set, host KV, graph adjacency), numpy or torch alike."""

from __future__ import annotations

import numpy as np


def with_room(array, used: int, needed: int, axis: int, minimum: int = 0, fill=None, dtype=None, copy: bool = False,
              pin_memory: bool = False):
    """`array` if it holds `needed` entries along `axis` (and no copy, dtype change or fill is
    asked for), else a new buffer of max(needed, 2x, minimum) entries holding the first `used`
    of the old one (doubling keeps appends amortised O(1)). `fill` initialises the spare room;
    `copy` forces a private buffer (e.g. of a read-only memory map); `pin_memory`: a torch host
    buffer is page-locked (what an accelerator copies from asynchronously)."""
    capacity = array.shape[axis]
    if needed <= capacity and not copy and (dtype is None or dtype == array.dtype):
        return array
    shape = list(array.shape)
    shape[axis] = max(needed, 2 * capacity if needed > capacity else capacity, minimum)
    head = (slice(None),) * axis + (slice(0, used),)
    if isinstance(array, np.ndarray):
        dtype = dtype or array.dtype
        grown = np.empty(shape, dtype) if fill is None else np.full(shape, fill, dtype)
        grown[head] = np.asarray(array[head]).astype(dtype, copy=False)
    else:  # torch
        import torch

        grown = torch.empty(shape, dtype=array.dtype, device=array.device, pin_memory=pin_memory)
        if fill is not None:
            grown.fill_(fill)
        grown[head] = array[head]
    return grown
