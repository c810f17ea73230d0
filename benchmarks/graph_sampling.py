"""For each QS,FS: ingest TOKENS tokens of DOC (env RA_BENCH_DOC, default the shipped sample) with
the graph trained on every QS-th prefill query and every FS-th final-window query, then report
ingest seconds and the evaluations needed for Recall@100 0.95 on held-out decode queries
(layers 0, 4, ..., 28; the protocol of `ra bench --recall`)."""

import json
import os
import sys
from pathlib import Path

import numpy as np

from ra_cli.bench.corpus import bench_text, cached_context
from ra_cli.bench.recall import EF_SWEEP, K, TARGET, RecallBenchConfig, _pooled, capture_decode_queries, evaluations_at
from ra_cli.index import IndexParams, open_layer_index
from ra_cli.store import float32_keys
from ra_cli.index.flat import FlatLayerIndex
from ra_cli.model import load_model

loaded = load_model()
document = os.environ.get("RA_BENCH_DOC")
name, text = bench_text(Path(document) if document else None)
for spec in sys.argv[2:]:
    query_stride, final_stride = map(int, spec.split(","))
    config = RecallBenchConfig(context=int(sys.argv[1]),
                               params=IndexParams(query_stride=query_stride, final_stride=final_stride))
    bench = cached_context(loaded, name, text, config.context, config.queries, config.params)
    store, held_out = bench.store, bench.continuation
    section = store.manifest["index"]
    lo, hi = section["lo"], section["hi"]
    layers = list(range(0, 30, 4))
    queries, _ = capture_decode_queries(loaded, store, held_out, layers, hi, lo)
    sweep = {ef: [] for ef in EF_SWEEP}
    for layer in layers:
        keys = float32_keys(np.asarray(store.keys(layer)[:, lo:hi]), store.kv_dtype)
        truth = FlatLayerIndex(keys).search(queries[layer], K).ids
        index = open_layer_index(store, layer)
        for ef in EF_SWEEP:
            result = index.search(queries[layer], K, ef)
            sweep[ef].append((result.ids, truth, result.evaluations))
    curve = [{"ef": ef, "recall": _pooled(sweep[ef])[0], "evaluations": _pooled(sweep[ef])[2]} for ef in EF_SWEEP]
    print(json.dumps({"context": config.context, "query_stride": query_stride, "final_stride": final_stride,
                      "ingest_seconds": store.manifest["ingest"]["seconds"],
                      "evaluations_at_0.95": evaluations_at(TARGET, curve)}), flush=True)
