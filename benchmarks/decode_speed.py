"""Whole-model decode ms/token with full and retrieval attention on saved contexts (20 steps after 4 warm-up)."""

import json
import sys
import time

from ra_cli.retrieval.modes import open_cache
from ra_cli.engine.generate import prefill
from ra_cli.retrieval.layer import RetrievalSettings
from ra_cli.model import load_model
from ra_cli.store import ContextStore

CONTINUATION = (" The license also says that you may copy and distribute the program, provided that you keep"
                " these notices intact and give every recipient a copy")

loaded = load_model()
tokens = loaded.tokenizer(CONTINUATION, add_special_tokens=False).input_ids[:24]
for path in sys.argv[1:]:
    store = ContextStore.open(path)
    row = {"context": path, "context_tokens": store.n_tokens}
    for mode in ("full", "retrieval"):
        cache = open_cache(loaded, store, mode, RetrievalSettings(dense_when_cheaper=False))
        for token in tokens[:4]:
            prefill(loaded.model, cache, [token])
        began = time.perf_counter()
        for token in tokens[4:]:
            prefill(loaded.model, cache, [token])
        row[f"ms_per_token_{mode}"] = round((time.perf_counter() - began) / len(tokens[4:]) * 1000, 1)
        stats = getattr(cache, "retrieval_stats", None)
        if stats:
            row["retrieval_stats"] = stats.as_dict()
        del cache
    print(json.dumps(row), flush=True)
