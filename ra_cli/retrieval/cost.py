"""Which layers a CPU should attend densely because searching their index would cost more than
reading every key.

On a CPU both halves of attention read the same host memory, so an index only pays while its
search reads few enough keys. A key the graph search reads is a random row, scored for each query
head of its KV head and pooled; dense attention streams the KV in order. Measured on the dev box
(docs/benchmarks.md, "Dense where cheaper"): one key read by the search costs about
SEARCH_READ_COST times what one key costs dense attention — 4.8x with 3 query heads per KV head
(SmolLM2 at 16K: 219 vs 46 ns per thread), 5.2x with 7 (Qwen2.5 at 16K: 295 vs 57 ns); and
again with budgets up to 1600 and KV heads balanced over threads (283 ns per read at 1.5 rounds
vs 49.5 ns per key: 5.7x). A layer's searches run one KV head per thread, spread by how much each
read last time (index/graph.worker_plan), so 3 KV heads on 2 threads take about 1.5
rounds; dense attention splits its work evenly. Attending to the answered keys (at most the keys
the search read) and the static ones costs about one unit per query head and key (measured 0.92).
How many keys a search reads was measured at ingest (the ef calibration), and grows about
linearly with ef.
"""

from __future__ import annotations

SEARCH_READ_COST = 5.0  # one key read by the graph search, in keys streamed by dense attention


def search_is_cheaper(reads: float, total_keys: int, attended: int, kv_heads: int, heads: int, threads: int) -> bool:
    """Whether a layer's retrieval (a search reading `reads` keys per KV head, then attention of
    each query head to `attended` keys: answered plus static) beats dense attention over
    `total_keys`, in time on `threads` CPU threads."""
    rounds = max(1.0, kv_heads / max(1, threads))
    search = rounds * reads * SEARCH_READ_COST + heads * attended / threads
    dense = total_keys * kv_heads / threads
    return search < dense


def expected_reads(entry: dict, ef: int | None) -> float | None:
    """Keys one search reads at beam width `ef` (None: the calibrated one), from the ingest's
    calibration of this layer; None when the store did not measure it."""
    measured, calibrated = entry.get("validation_evaluations"), entry.get("ef")
    if measured is None or not calibrated:
        return None
    return measured * (ef / calibrated if ef else 1.0)
