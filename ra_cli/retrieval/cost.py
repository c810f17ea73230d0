"""Which layers a CPU should attend densely because searching their index would cost more than
reading every key.

On a CPU both halves of attention read the same host memory, so an index only pays while its
search reads few enough keys. Dense attention (engine/dense_decode.py) streams each KV head's keys
once and scores them for its G query heads; the graph search reads random rows, scores each for
the G query heads of its KV head and pools it; retrieval then attends each query head to its
answered and static keys. Both run in one call per layer (retrieval/kernels.search_and_attend):
the KV heads' searches go to the threads first, the attention fills in around them, so a layer
takes the longer of its searches' rounds and all of its work spread over the threads. Measured on
the dev box with the current kernels, per thread:
- dense: 18.5 ns per key and KV head with G = 3 (SmolLM2, 16K: 13.6 ms over 30 layers), 28.9 with
  G = 7 (Qwen2.5, 32K: 22.7 ms over 24 layers) (`benchmarks/dense_decode.py`; docs/benchmarks.md,
  "Dense attention as one float32 pass"), as a constant plus a part per query head;
- search: 166 ns per key scanned with G = 3 (SmolLM2 at 16K, every layer searched: ~400K cycles
  at 2.6 GHz for a KV head's ~940 keys, the kernel's own count: `benchmarks/decode_speed.py
  CTX.idx` prints it as task_cycles), plus 5 ns per query head (the slope between G = 3 and G = 7
  measured before: 192 and 213 ns);
- attention to the answered and static keys: ~12 ns per query head and key (the static halves'
  ~70K cycles per KV head over 3 x 640 keys, the merges' ~16K per head over ~700);
- and a searched layer's own cost beyond those, ~20 us: the Python around the call (~12 us) and
  the last heads' merges after the last search (at 16K, every layer searched, 9.6-9.7 ms a
  token for 29 layers against 2 rounds x 155 us; `ra bench --context 16k --modes search-all
  --exact-margin 0`).
How many keys a search reads was measured at ingest (the ef calibration), and grows about
linearly with ef.

That prediction can miss: decode queries may read more keys than the calibration's held-out
prefill queries did (Qwen2.5 at 63K tokens: 7,080 a search against 5,183 over its 4 searched
layers, two of whose calibrations never reached their recall).
So a layer the prediction lets search also times itself while it decodes (MeasuredChoice): its
first steps alternate its search with reading every key, and the slower way is dropped.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

DENSE_KEY_NS, DENSE_HEAD_NS = 10.7, 2.6  # dense attention, per key and KV head: + per query head
READ_NS, READ_HEAD_NS = 151.0, 5.0  # one key read by the graph search: + per query head scoring it
ATTEND_NS = 12.0  # one query head attending to one answered or static key
SEARCHED_LAYER_NS = 20_000.0  # a searched layer's call and last merges, once per layer whatever the threads


def search_is_cheaper(reads: float, total_keys: int, attended: int, kv_heads: int, heads: int, threads: int) -> bool:
    """Whether a layer's retrieval (a search reading `reads` keys per KV head, then attention of
    each query head to `attended` keys: answered plus static) beats dense attention over
    `total_keys`, in time on `threads` CPU threads."""
    groups = heads / kv_heads
    threads = max(1, threads)
    search = reads * (READ_NS + READ_HEAD_NS * groups)  # one KV head's
    rounds = -(-kv_heads // threads)  # the searches are whole tasks: 3 KV heads on 2 threads take 2 rounds
    retrieval = SEARCHED_LAYER_NS + max(rounds * search, (kv_heads * search + heads * attended * ATTEND_NS) / threads)
    dense = total_keys * kv_heads * (DENSE_KEY_NS + DENSE_HEAD_NS * groups) / threads
    return retrieval < dense


def expected_reads(entry: dict, ef: int | None) -> float | None:
    """Keys one search reads at beam width `ef` (None: the calibrated one), from the ingest's
    calibration of this layer; None when the store did not measure it."""
    measured, calibrated = entry.get("validation_evaluations"), entry.get("ef")
    if measured is None or not calibrated:
        return None
    return measured * (ef / calibrated if ef else 1.0)


# Decode steps a layer runs before it is timed: the first after a question run cold (caches, numba
# dispatch); then PAIRS steps of its search alternated with as many reading every key (alternated,
# so a burst of load elsewhere on the machine slows both ways alike).
WARM_UP_STEPS, PAIRS = 2, 3


@dataclass
class MeasuredChoice:
    """A searched layer's choice between its search and reading every key, from timings of both on
    this machine during its first decode steps. Reading every key is exact, so either way is a
    correct attention; only the time differs."""

    search: list = field(default_factory=list)  # seconds of timed steps, each way
    every_key: list = field(default_factory=list)
    warm_up: int = WARM_UP_STEPS
    reads_every_key: bool | None = None  # None: still measuring

    def every_key_next(self) -> bool:
        """Whether the next decode step reads every key."""
        if self.reads_every_key is not None:
            return self.reads_every_key
        return self.warm_up == 0 and len(self.every_key) < len(self.search)

    def record(self, every_key: bool, seconds: float) -> bool:
        """Note one decode step's time; True when this step decided that the layer reads every key."""
        if self.reads_every_key is not None:
            return False
        if self.warm_up:
            self.warm_up -= 1
            return False
        (self.every_key if every_key else self.search).append(seconds)
        if len(self.every_key) < PAIRS:
            return False
        self.reads_every_key = statistics.median(self.every_key) < statistics.median(self.search)
        return self.reads_every_key

    def restart(self) -> None:
        """Measure again (a question changed what the search reads), unless reading every key won:
        it does not depend on the budget."""
        if not self.reads_every_key:
            self.search, self.every_key, self.warm_up, self.reads_every_key = [], [], WARM_UP_STEPS, None
