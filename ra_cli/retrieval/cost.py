"""Which layers a CPU should attend densely because searching their index would cost more than
reading every key.

On a CPU both halves of attention read the same host memory, so an index only pays while its
search reads few enough keys. Dense attention (engine/dense_decode.py) streams each KV head's keys
once and scores them for its G query heads; the graph search reads random rows, scores each for
the G query heads of its KV head and pools it; retrieval then attends each query head to its
answered and static keys. Costs per thread, measured on the dev box with the current kernels
(docs/benchmarks.md, "Dense attention as one float32 pass"), as a constant
plus a part per query head, since both scoring loops run once per query head:
- dense: 18.5 ns per key and KV head with G = 3 (SmolLM2, 16K: 13.6 ms over 30 layers), 28.9 with
  G = 7 (Qwen2.5, 32K: 22.7 ms over 24 layers) (`benchmarks/dense_decode.py`);
- search: ~192 ns per key scanned with G = 3 (SmolLM2 at 16K: 9.7 ms over 29 layers x 1.5 rounds x
  1,158 keys), ~213 with G = 7 (Qwen2.5 at 16K: 26.4 ms over 24 layers x 5,161 keys);
- attention to the answered and static keys: ~18 ns per query head and key (3.0 ms; 4.0 ms)
  (search and attention: `benchmarks/decode_speed.py [--model M] CTX.idx`, every layer searched);
- and a searched layer's own glue (the Python around its search: entry seeds, the threads' plan,
  the answer's bookkeeping), ~28 us: the whole model at 16K, every layer searched, takes
  ~0.8 ms a token more than the search, attention and dense kernels' figures above add up to
  (same command, full attention beside it: 17.8-17.9 against 17.1-18.0 ms/token).
A layer's searches run one KV head per thread, spread by how much each read last time
(index/graph.worker_plan), so 3 KV heads on 2 threads take about 1.5 rounds; dense attention
splits its work evenly. How many keys a search reads was measured at ingest (the ef
calibration), and grows about linearly with ef.
"""

from __future__ import annotations

DENSE_KEY_NS, DENSE_HEAD_NS = 10.7, 2.6  # dense attention, per key and KV head: + per query head
READ_NS, READ_HEAD_NS = 177.0, 5.0  # one key read by the graph search: + per query head scoring it
ATTEND_NS = 18.0  # one query head attending to one answered or static key
SEARCHED_LAYER_NS = 28_000.0  # a searched layer's glue, once per layer whatever the threads


def search_is_cheaper(reads: float, total_keys: int, attended: int, kv_heads: int, heads: int, threads: int) -> bool:
    """Whether a layer's retrieval (a search reading `reads` keys per KV head, then attention of
    each query head to `attended` keys: answered plus static) beats dense attention over
    `total_keys`, in time on `threads` CPU threads."""
    groups = heads / kv_heads
    rounds = max(1.0, kv_heads / max(1, threads))
    search = (SEARCHED_LAYER_NS + rounds * reads * (READ_NS + READ_HEAD_NS * groups)
              + heads * attended * ATTEND_NS / threads)
    dense = total_keys * kv_heads * (DENSE_KEY_NS + DENSE_HEAD_NS * groups) / threads
    return search < dense


def expected_reads(entry: dict, ef: int | None) -> float | None:
    """Keys one search reads at beam width `ef` (None: the calibrated one), from the ingest's
    calibration of this layer; None when the store did not measure it."""
    measured, calibrated = entry.get("validation_evaluations"), entry.get("ef")
    if measured is None or not calibrated:
        return None
    return measured * (ef / calibrated if ef else 1.0)
