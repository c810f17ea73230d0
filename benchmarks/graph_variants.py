"""How the graph's build rules trade evaluations for recall, on a real context: ablations of
`link_span`, `occlusion` and `slots` (IndexParams) measured as `ra bench --recall` measures.

    python benchmarks/graph_variants.py [--model NAME] DOCUMENT CONTEXT_TOKENS WORK_DIR [NAME:JSON …]

The first run ingests the document's first CONTEXT_TOKENS tokens as `ra bench --recall` does (the
same cached context, built with the work files kept in WORK_DIR) and captures the 256 held-out
decode queries of layers 0, 4, 8, …; later runs reuse WORK_DIR. Then each variant (default: the
current rules and the rules before them, e.g. `chain:{"link_span": 1, "occlusion": 0}`) rebuilds
the graphs of those layers from the same prefill lists and prints one JSON line: evaluations per
query head for Recall@100 0.95 along the bench's ef sweep, with the KV head's query heads searched
in lockstep (what decode runs) and one at a time, plus the build seconds.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

args = sys.argv[1:]
model = None
if args[:1] == ["--model"]:
    model, args = args[1], args[2:]
document, context, work = Path(args[0]), int(args[1]), Path(args[2])
variants = [spec.partition(":") for spec in args[3:]] or [("current", ":", "{}"),
                                                          ("before", ":", '{"link_span": 1, "occlusion": 0, "slots": 32}')]

import ra_cli.ingest as ingest_module  # noqa: E402
from ra_cli.bench.recall import EF_SWEEP, K, HeadsAlone, _pooled, capture_decode_queries, evaluations_at  # noqa: E402
from ra_cli.index import IndexParams  # noqa: E402
from ra_cli.index.flat import FlatLayerIndex  # noqa: E402
from ra_cli.index.graph import GraphLayerIndex, build_graph_layer  # noqa: E402

if not (work / "held_out.npy").is_file():
    from ra_cli.bench.corpus import bench_text, cached_context
    from ra_cli.model import load_model
    from ra_cli.store import float32_keys

    build_indexes = ingest_module.build_store_indexes

    def keep_work_files(writer, collector, *rest, **options):
        shutil.copytree(writer.dir / "work", work / "work", dirs_exist_ok=True)
        np.save(work / "held_out.npy", collector.held_out())
        return build_indexes(writer, collector, *rest, **options)

    ingest_module.build_store_indexes = keep_work_files
    loaded = load_model(model)
    name, text = bench_text(document)
    bench = cached_context(loaded, name, text, context, 256, IndexParams())
    if not (work / "held_out.npy").is_file():
        sys.exit(f"the {context}-token context of {document} was cached already: point RA_CACHE_DIR at an empty folder")
    section = bench.store.manifest["index"]
    lo, hi = section["lo"], section["hi"]
    layers = [int(layer) for layer in section["layers"]][::4]
    queries, _ = capture_decode_queries(loaded, bench.store, bench.continuation, layers, hi, lo)
    for layer in layers:
        np.save(work / f"keys_{layer:03d}.npy", float32_keys(np.asarray(bench.store.keys(layer)[:, lo:hi]),
                                                               bench.store.kv_dtype))
        np.save(work / f"decode_queries_{layer:03d}.npy", queries[layer])

layers = sorted(int(path.stem.rsplit("_", 1)[1]) for path in work.glob("decode_queries_*.npy"))
held_out = np.load(work / "held_out.npy")
for name, _, options in variants:
    params = IndexParams(**json.loads(options or "{}"))
    sweeps = {"lockstep": {ef: [] for ef in EF_SWEEP}, "heads_alone": {ef: [] for ef in EF_SWEEP}}
    build_seconds = 0.0
    for layer in layers:
        keys = np.load(work / f"keys_{layer:03d}.npy")
        queries = np.load(work / f"decode_queries_{layer:03d}.npy")
        truth = FlatLayerIndex(keys).search(queries, K).ids
        began = time.perf_counter()
        graph = build_graph_layer(np.load(work / "work" / f"lists_{layer:03d}.npy"),
                                  np.load(work / "work" / f"queries_{layer:03d}.npy"),
                                  np.load(work / "work" / f"knn_{layer:03d}.npy"), held_out, keys, params)
        build_seconds += time.perf_counter() - began
        index = GraphLayerIndex(graph, keys, params)
        for protocol, searcher in (("lockstep", index), ("heads_alone", HeadsAlone(index, keys.shape[0]))):
            for ef in EF_SWEEP:
                result = searcher.search(queries, K, ef)
                sweeps[protocol][ef].append((result.ids, truth, result.evaluations))
    row = {"variant": name, "params": json.loads(options or "{}"), "layers": layers,
           "build_seconds": round(build_seconds, 2)}
    for protocol, sweep in sweeps.items():
        curve = []
        for ef in EF_SWEEP:
            recall, _, evaluations = _pooled(sweep[ef])
            curve.append({"ef": ef, "recall": recall, "evaluations": evaluations})
        at = evaluations_at(0.95, curve)
        row[f"{protocol}_evaluations_at_0.95"] = None if at is None else round(at, 1)
    print(json.dumps(row), flush=True)
