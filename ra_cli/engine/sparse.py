"""Sparse prefill: each chunk attends exactly to the sinks, a local window and the top blocks of
the earlier KV, chosen per KV head by block representatives (the InfLLM / Quest family).

Full prefill is quadratic: chunk c attends to all c * chunk earlier tokens, so 128K tokens cost
~64x what 16K do. Here a chunk attends to sinks + `blocks` x `block` selected tokens + the window +
itself, the same at 8K and at 128K; choosing the blocks costs one dot product per block and
sub-chunk (a block's representative is its mean key; a sub-chunk's is its mean query, per query
head, and a block scores the best of its KV head's queries). When sinks, selected blocks and
window cover every earlier token this is exactly full attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ra_cli.engine.attention import grouped_scores


@dataclass(frozen=True)
class SparsePrefill:
    sinks: int = 128
    # Budget measured (benchmarks/sparse_prefill.py, docs/benchmarks.md): on Qwen2.5-Coder-0.5B at
    # 16K, window 1024 + 32 blocks gave top-1 agreement 0.88 with full prefill, 2048 + 64 blocks
    # 0.94, 2048 + 112 blocks 0.95, 2048 + 128 blocks 0.96; the embedded model's 128K ingest took
    # 15.0 minutes with 128 blocks, and attention cost grows with the budget
    window: int = 2048  # most recent earlier tokens every chunk sees
    block: int = 64  # tokens per selectable block
    blocks: int = 112  # blocks each chunk attends to, per KV head
    sub_chunk: int = 64  # queries whose mean ranks the blocks together

    @property
    def span(self) -> int:
        """The most keys a token attends to."""
        return self.sinks + self.window + self.blocks * self.block

    def as_dict(self) -> dict:
        return {"sinks": self.sinks, "window": self.window, "block": self.block, "blocks": self.blocks,
                "sub_chunk": self.sub_chunk}


class BlockMeans:
    """Mean key of every complete block of a layer's cache, kept up to date as chunks arrive."""

    def __init__(self):
        self.means = None  # [KVH, nb, D] float32
        self.count = 0

    def update(self, keys: torch.Tensor, length: int, block: int) -> torch.Tensor:
        """keys [KVH, >= length, D]; returns the means of blocks [0, length // block)."""
        complete = length // block
        if complete > self.count:
            fresh = keys[:, self.count * block: complete * block].float()
            fresh = fresh.reshape(keys.shape[0], complete - self.count, block, keys.shape[2]).mean(2)
            self.means = fresh if self.means is None else torch.cat([self.means, fresh], dim=1)
            self.count = complete
        return self.means[:, :complete] if self.means is not None else keys.new_zeros((keys.shape[0], 0, keys.shape[2]))


def selected_positions(query: torch.Tensor, means: torch.Tensor, first_block: int, last_block: int,
                       config: SparsePrefill) -> torch.Tensor:
    """Start positions of the `blocks` best blocks in [first_block, last_block) per KV head, by
    the best score of any query head's sub-chunk mean against the block's mean key: [KVH, T]."""
    heads, count, dim = query.shape[1], query.shape[2], query.shape[3]
    kv_heads = means.shape[0]
    pieces = -(-count // config.sub_chunk)
    padded = F.pad(query[0].float(), (0, 0, 0, pieces * config.sub_chunk - count))
    centres = padded.reshape(heads, pieces, config.sub_chunk, dim).sum(2)  # mean up to a positive factor
    candidates = means[:, first_block:last_block]
    scores = grouped_scores(centres, candidates)  # [H, pieces, nb]
    best = scores.reshape(kv_heads, -1, candidates.shape[1]).amax(1)  # [KVH, nb]
    take = min(config.blocks, candidates.shape[1])
    chosen = torch.topk(best, take, dim=-1).indices + first_block
    return torch.sort(chosen, dim=-1).values * config.block


def sparse_chunk_attention(query, keys, values, scaling: float, q_offset: int, means: BlockMeans,
                           config: SparsePrefill) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Attention of a prefill chunk query [1, H, C, D] at positions q_offset.. over keys/values
    [1, KVH, >= q_offset + C, D]. Positions split at block boundaries: everything before the
    first block after the sinks, the chosen blocks, and everything from the last block before the
    window on (the chunk included, causally). Returns (output [1, H, C, D], the positions attended
    [KVH, L], ascending), or (None, None) when the budget covers every earlier token."""
    count = query.shape[2]
    first_block = -(-config.sinks // config.block)
    last_block = max(first_block, (q_offset - config.window) // config.block)
    if last_block - first_block <= config.blocks:
        return None, None
    block_means = means.update(keys[0], last_block * config.block, config.block)
    starts = selected_positions(query, block_means, first_block, last_block, config)  # [KVH, T]
    kv_heads = starts.shape[0]
    device = starts.device
    picked = (starts[:, :, None] + torch.arange(config.block, device=device)).reshape(kv_heads, -1)
    head = torch.arange(first_block * config.block, device=device).expand(kv_heads, -1)
    tail = torch.arange(last_block * config.block, q_offset + count, device=device).expand(kv_heads, -1)
    index = torch.cat([head, picked, tail], dim=1)  # [KVH, L], ascending
    gather = index[None, :, :, None]
    # in the query's dtype: KV held narrower (an ingest's bf16 store) is widened exactly, and only the selection
    chosen_keys = torch.gather(keys, 2, gather.expand(1, -1, -1, keys.shape[3])).to(query.dtype)
    chosen_values = torch.gather(values, 2, gather.expand(1, -1, -1, values.shape[3])).to(query.dtype)
    # causal: head and chosen blocks precede every query; the tail is the same for every KV head
    query_positions = torch.arange(q_offset, q_offset + count, device=device)
    mask = index[0][None, :] <= query_positions[:, None]
    out = F.scaled_dot_product_attention(query, chosen_keys, chosen_values, attn_mask=mask, scale=scaling,
                                         enable_gqa=query.shape[1] != keys.shape[1])
    return out, index
