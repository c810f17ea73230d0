"""Whole-model decode ms/token on saved contexts, 60 steps after 4 warm-up (the continuation below,
repeated), with full attention; with retrieval attention as a CPU chat runs it by default (layers
predicted cheaper to read whole read densely, the others time their search against reading every
key in their first steps and keep the faster: retrieval/cost.py), and the same without the timing
(the prediction alone); the default again while collecting the attention weights chat's
citations are made of (`cited`, as `ra chat` runs); and with every retrievable layer searched —
and where a searched step's time goes: search and attention over the answered + static keys, per
token over all layers (on a CPU one call does both: its time is split by the cycles its workers
spent on each), and the retrieval part with its Python glue.

    python benchmarks/decode_speed.py [--model NAME] CTX.idx …
"""

import json
import sys
import time

import numpy as np

from ra_cli.citations import FLOOR, SINKS
from ra_cli.engine.mass import AttentionMass
from ra_cli.retrieval.modes import open_cache
from ra_cli.engine.generate import prefill
from ra_cli.retrieval.layer import RetrievalLayer, RetrievalSettings
from ra_cli.model import load_model
from ra_cli.store import ContextStore

CONTINUATION = (" The license also says that you may copy and distribute the program, provided that you keep"
                " these notices intact and give every recipient a copy")

args = sys.argv[1:]
model = None
if args[:1] == ["--model"]:
    model, args = args[1], args[2:]
loaded = load_model(model)
tokens = (loaded.tokenizer(CONTINUATION, add_special_tokens=False).input_ids[:24] * 3)[:64]
for path in args:
    store = ContextStore.open(path)
    row = {"context": path, "context_tokens": store.n_tokens}
    for mode, settings in (("full", None), ("predicted", RetrievalSettings(exact_margin=0)),
                           ("default", RetrievalSettings(exact_margin=0)), ("cited", RetrievalSettings(exact_margin=0)),
                           ("retrieval", RetrievalSettings(dense_when_cheaper=False, exact_margin=0))):
        cache = open_cache(loaded, store, "full" if settings is None else "retrieval", settings or RetrievalSettings())
        if mode == "predicted":  # the cost model's choice alone: no layer times itself
            for layer in cache.layers:
                if isinstance(layer, RetrievalLayer):
                    layer.choice = None
        for token in tokens[:4]:
            prefill(loaded.model, cache, [token])
        stats = getattr(cache, "retrieval_stats", None)
        if stats:
            stats.search_seconds = stats.attention_seconds = stats.retrieval_seconds = 0.0
        mass = AttentionMass(store.manifest["model_shape"]["heads"], store.n_tokens, SINKS, FLOOR) if mode == "cited" else None
        began = time.perf_counter()
        with cache.collecting(mass):
            for token in tokens[4:]:
                prefill(loaded.model, cache, [token])
        steps = len(tokens[4:])
        row[f"ms_per_token_{mode}"] = round((time.perf_counter() - began) / steps * 1000, 1)
        if mode == "default":
            row["default_dense_layers"] = {"predicted": stats.cheaper_dense_layers, "too_diffuse": sorted(
                set(stats.dense_layers) - set(stats.cheaper_dense_layers)), "timed": stats.measured_dense_layers}
        elif mode == "retrieval" and stats:
            row["search_ms_per_token"] = round(stats.search_seconds / steps * 1000, 2)
            row["retrieved_attention_ms_per_token"] = round(stats.attention_seconds / steps * 1000, 2)
            row["retrieval_ms_per_token"] = round(stats.retrieval_seconds / steps * 1000, 2)  # with the glue
            row["retrieval_stats"] = stats.as_dict()
            # search_and_attend's tasks at the last step: mean cycles per KV head's search and static
            # half, per query head's merge (the cost model's per-key figures come from these)
            cycles = np.array([layer.task_cycles for layer in cache.layers
                               if isinstance(layer, RetrievalLayer) and layer.task_cycles is not None])
            g = store.manifest["model_shape"]["kv_heads"]
            if cycles.size:
                row["task_cycles"] = {"search": round(cycles[:, :g].mean()), "static": round(cycles[:, g:2 * g].mean()),
                                      "merge": round(cycles[:, 2 * g:].mean())}
        del cache
    print(json.dumps(row), flush=True)
