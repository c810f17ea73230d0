"""The accelerator's split path against the host path, both on this CPU: what each costs a decode
step around its search (the GPU's choice between them: retrieval vs static-on-host). Every
retrievable layer searches; the two alternate, twice, on the same cached context.

    RA_CACHE_DIR=... python benchmarks/split_vs_host.py CONTEXT.idx [STEPS]

Prints one JSON line per run: ms/token (median), and per token the retrieval layers' time split
into search, attention over the retrieved (and, on the host path, static) keys, and glue."""

import json
import statistics
import sys
import time

from ra_cli.engine.generate import prefill
from ra_cli.model import load_model
from ra_cli.retrieval.layer import RetrievalLayer
from ra_cli.retrieval.modes import open_cache, settings_for
from ra_cli.store import ContextStore

loaded = load_model()
store = ContextStore.open(sys.argv[1], loaded.fingerprint)
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 24
settings = settings_for(store, dense_when_cheaper=False, exact_margin=0.0)
tokens = [int(t) for t in store.tokens[100: 100 + 4 + steps]]  # the document's own tokens, teacher-forced
for split in (False, True, False, True):
    cache = open_cache(loaded, store, "retrieval", settings)
    layers = [layer for layer in cache.layers if isinstance(layer, RetrievalLayer)]
    for layer in layers:
        layer.split = split
    for token in tokens[:4]:
        prefill(loaded.model, cache, [token])
    stats = cache.retrieval_stats
    stats.retrieval_seconds = stats.search_seconds = stats.attention_seconds = 0.0
    times = []
    for token in tokens[4:]:
        began = time.perf_counter()
        prefill(loaded.model, cache, [token])
        times.append(time.perf_counter() - began)
    per_token = lambda seconds: round(1000 * seconds / len(times), 2)  # noqa: E731
    search, attention = per_token(stats.search_seconds), per_token(stats.attention_seconds)
    print(json.dumps({"path": "split" if split else "host", "layers_searched": len(layers),
                      "ms_per_token": round(1000 * statistics.median(times), 2), "search_ms": search,
                      "attention_ms": attention,
                      "glue_ms": round(per_token(stats.retrieval_seconds) - search - attention, 2)}), flush=True)
