"""Ingest TOKENS tokens of DOC (default: the shipped sample, repeated) with `graph` or `flat`;
print total / prefill / index seconds and the time of each graph-building step (and of widening
the store's bf16 KV for attention, `widen`)."""

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ra_cli.engine.cache as cache
import ra_cli.index.collect as collect
import ra_cli.index.graph as graph
import ra_cli.index.stored as stored
from ra_cli.bench.corpus import bench_text, context_tokens
from ra_cli.document import Document
from ra_cli.index import IndexParams
from ra_cli.ingest import IngestOptions, store_header, write_context
from ra_cli.model import load_model

seconds: dict[str, float] = {}


def timed(owner, name):
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - began

    setattr(owner, name, wrapper)


for owner, name in ((cache.WideningScratch, "widen"), (collect.PrefillCollector, "_record_lists"), (collect.PrefillCollector, "_record_neighbours"),
                    (collect.PrefillCollector, "flush"), (graph, "co_selection"), (graph, "assemble_adjacency"),
                    (graph, "kmeans_router"), (graph, "calibrate_ef"), (stored, "attention_coverage")):
    timed(owner, name)

total = int(sys.argv[1])
kind = sys.argv[2] if len(sys.argv) > 2 else "graph"
loaded = load_model()
name, text = bench_text(Path(sys.argv[3]) if len(sys.argv) > 3 else None)
tokens, layout = context_tokens(loaded, text, total)
options = IngestOptions(index=IndexParams(kind=kind))
document = Document(name=name, sha256="profile", kind="text", text="")
out = Path(tempfile.mkdtemp(prefix="ra-profile-")) / "p.idx"
try:
    result = write_context(loaded, tokens, [0] * len(tokens), store_header(loaded, document, options, layout), out, options)
finally:
    shutil.rmtree(out.parent, ignore_errors=True)
print(json.dumps({"tokens": total, "index": kind, "seconds": round(result.seconds, 2),
                  "prefill_seconds": round(result.prefill_seconds, 2), "index_seconds": round(result.index_seconds, 2),
                  "steps": {step: round(value, 2) for step, value in seconds.items()}}))
