"""Where attention went: softmax weight per context position, summed over layers, query heads and
decode steps. Chat's citations are this, aggregated by page or line: grounded in the model's own
attention, not in a separate embedding search.

Each attention layer adds the weights it computes anyway (the CPU retrieval kernel's, the CPU
dense kernel's keys at or above the floor — picked inside the kernel, so a dense layer never
writes a weight per key — or on an accelerator the softmax rows and the static and retrieved
halves' after their merge), so tracking costs a scatter-add per counted key, and nothing when no
one is tracking.
"""

from __future__ import annotations

import numpy as np
import torch


class AttentionMass:
    """Weights of positions [0, limit) (the document), one row per query head so that heads
    running in parallel never write the same cell; positions below `sinks` are not collected."""

    def __init__(self, heads: int, limit: int, sinks: int, floor: float = 0.0):
        self.rows = np.zeros((heads, limit), np.float32)
        self.sinks = sinks
        self.floor = floor  # weights below it are not collected

    @property
    def limit(self) -> int:
        return self.rows.shape[1]

    def reset(self) -> None:
        self.rows[:] = 0.0

    def add_dense(self, head: int, weights: torch.Tensor, offset: int = 0) -> None:
        """Softmax weights [rows, n] of keys at positions offset..offset+n (rows: query heads and
        positions of one KV head), into query head `head`'s row: the torch path's whole rows (an
        accelerator, or a layout the CPU kernel cannot read); the CPU kernel's picks go to `add`."""
        start, end = max(offset, self.sinks), min(offset + weights.shape[-1], self.limit)
        if end > start:
            part = weights[:, start - offset:end - offset].float()
            if self.floor > 0:
                part = torch.where(part >= self.floor, part, 0.0)
            torch.from_numpy(self.rows[head, start:end]).add_(part.sum(0).cpu())

    def add(self, head: int, positions: np.ndarray, weights: np.ndarray) -> None:
        """Weights of keys at absolute `positions` (any order; out-of-range ones are skipped)."""
        keep = (positions >= self.sinks) & (positions < self.limit) & (weights >= self.floor)
        np.add.at(self.rows[head], positions[keep], weights[keep])

    def by_position(self) -> np.ndarray:
        """[limit] float64: total weight per position."""
        return self.rows.sum(0, dtype=np.float64)
