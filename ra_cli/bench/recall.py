"""`ra bench --recall`: how well each index finds decode queries' exact top-100 keys, and at what cost.

Protocol (docs/benchmarks.md): a real document is cut to `context` tokens and ingested with the
graph index, exactly as `ra ingest` does. The next `queries` tokens of the same text are then run
through the model with full attention over the stored context; their post-RoPE queries are the
held-out decode-time queries (never seen by any index). For the chosen layers, every index
searches them and is compared with the exact top-100 by inner product over the indexed keys.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ra_cli.engine.attention import grouped_scores, static_and_top_mass
from ra_cli.engine.generate import prefill
from ra_cli.errors import RaError
from ra_cli.index import IndexParams, indexed_range, open_layer_index
from ra_cli.index.base import SearchResult
from ra_cli.index.flat import FlatLayerIndex
from ra_cli.index.graph import recall
from ra_cli.bench.corpus import bench_text, cached_context, context_tokens
from ra_cli.bench.reach import measure_reach
from ra_cli.index.hnsw import HnswLayerIndex, build_hnsw_file, parse_hnsw_file
from ra_cli.ingest import IngestOptions, model_shape, store_header, write_context
from ra_cli.retrieval.modes import full_attention_cache
from ra_cli.store import ContextStore, float32_keys

K = 100
EF_SWEEP = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
TARGET = 0.95


@dataclass
class RecallBenchConfig:
    context: int = 16384
    queries: int = 256
    layers: list[int] | None = None  # None: every 4th global layer
    document: Path | None = None
    baseline_ingest: bool = False  # also time the same prefill with no index (for the ingest ratio)
    chunk_size: int | None = None  # IngestOptions' default for the device
    params: IndexParams = field(default_factory=IndexParams)
    prefill: str = "auto"  # ingest's --prefill for the bench context


def time_ingest(loaded, name: str, text: str, config: RecallBenchConfig, params: IndexParams, on_progress=None) -> float:
    """Seconds to prefill and store the bench context with `params` into a scratch store, deleted after."""
    import shutil

    from ra_cli.document import Document

    tokens, layout = context_tokens(loaded, text, config.context)
    options = IngestOptions(chunk_size=config.chunk_size, index=params, prefill=config.prefill)
    document = Document(name=f"{name} (bench timing)", sha256="timing", kind="text", text="")
    out = Path(tempfile.mkdtemp(prefix="ra-bench-timing-")) / "timing.idx"
    try:
        result = write_context(loaded, tokens, [0] * len(tokens), store_header(loaded, document, options, layout), out,
                               options, on_progress)
        return result.seconds
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def capture_decode_queries(loaded, store: ContextStore, held_out: list[int], layers: list[int], hi: int, lo: int):
    """Run the held-out tokens with full attention; return per layer the queries [H, q, D] float32
    and the attention mass that static tokens (and static + exact top-100) hold."""
    cache = full_attention_cache(loaded, store)
    captured = {layer: [] for layer in layers}
    mass = {layer: {"static": [], "static_top100": []} for layer in layers}

    def observer(layer, query, keys, q_offset, kv_offset, scaling):
        if layer not in captured:
            return
        q = query[0].float()
        captured[layer].append(q.cpu().numpy())
        scores = grouped_scores(q, keys[0].float()) * scaling  # [H, q, n] over positions kv_offset..
        positions = torch.arange(kv_offset, kv_offset + keys.shape[2])
        query_positions = torch.arange(q_offset, q_offset + q.shape[1])
        scores.masked_fill_(positions[None, None, :] > query_positions[None, :, None], float("-inf"))
        held = static_and_top_mass(scores, lo - kv_offset, hi - kv_offset, (0, K))
        mass[layer]["static"].append(held[0].mean(1).numpy())
        mass[layer]["static_top100"].append(held[K].mean(1).numpy())

    for layer in cache.layers:
        layer.observer = observer
    for start in range(0, len(held_out), 64):
        prefill(loaded.model, cache, held_out[start:start + 64], want_logits=False)
    queries = {layer: np.concatenate(parts, axis=1) for layer, parts in captured.items()}
    masses = {layer: {name: np.mean(values, axis=0).tolist() for name, values in m.items()} for layer, m in mass.items()}
    return queries, masses


class HeadsAlone:
    """The graph index searched one query head at a time (its KV head's graph, the same kernel,
    groups of one), instead of a KV head's query heads in lockstep, where every head is charged the
    union of the keys the group read: one search per query head, as the first recall figures in
    docs/benchmarks.md (2026-11-26) were measured."""

    def __init__(self, index, kv_heads: int):
        self.index, self.kv_heads = index, kv_heads

    def search(self, queries: np.ndarray, k: int, ef: int | None = None, extra: np.ndarray | None = None) -> SearchResult:
        """extra [H, X]: each query head's own extra entry points (as the index's search takes them)."""
        groups = queries.shape[0] // self.kv_heads
        results = [self.index.search(np.ascontiguousarray(queries[j::groups]), k, ef,
                                     None if extra is None else np.ascontiguousarray(extra[j::groups]))
                   for j in range(groups)]
        fields = []
        for name in ("ids", "scores", "evaluations"):
            parts = [getattr(result, name) for result in results]
            whole = np.empty((queries.shape[0],) + parts[0].shape[1:], parts[0].dtype)
            for j, part in enumerate(parts):  # head g * groups + j is row g of search j
                whole[j::groups] = part
            fields.append(whole)
        return SearchResult(*fields)


def evaluations_at(target: float, curve: list[dict]) -> float | None:
    """Evaluations needed to reach `target` recall, interpolated along an ef sweep (None: never)."""
    previous = None
    for point in curve:
        if point["recall"] >= target:
            if previous is None or point["recall"] == previous["recall"]:
                return point["evaluations"]
            fraction = (target - previous["recall"]) / (point["recall"] - previous["recall"])
            return previous["evaluations"] + fraction * (point["evaluations"] - previous["evaluations"])
        previous = point
    return None


def _pooled(results: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """results: per layer (found ids [H,q,k], truth [H,q,k], evaluations [H,q]) -> pooled stats."""
    per_head = []
    evaluations = []
    hits = 0.0
    total = 0
    for found, truth, evals in results:
        for h in range(found.shape[0]):
            r = recall(found[h], truth[h])
            per_head.append(r)
            hits += r * found.shape[1]
            total += found.shape[1]
        evaluations.append(evals.mean())
    return hits / total, min(per_head), float(np.mean(evaluations))


def run_recall_bench(loaded, config: RecallBenchConfig, on_progress=None, on_index=None, status=print) -> dict:
    name, text = bench_text(config.document)
    started = time.perf_counter()
    bench = cached_context(loaded, name, text, config.context, config.queries, config.params, config.chunk_size,
                           on_progress, on_index, config.prefill)
    store, held_out, ingest_result = bench.store, bench.continuation, bench.result
    section = store.manifest["index"]
    lo, hi = section["lo"], section["hi"]
    n_indexed = hi - lo
    if n_indexed < 2 * K:
        raise RaError(f"--context {config.context} leaves only {n_indexed} indexed keys; use at least {K * 2 + 640}")
    shape = model_shape(loaded.model.config)
    heads = shape["heads"]
    global_layers = [int(layer) for layer in section["layers"]]
    layers = config.layers or global_layers[::4]
    unknown = [layer for layer in layers if layer not in global_layers]
    if unknown:
        raise RaError(f"--layers {unknown}: not global attention layers of this model (0..{shape['layers'] - 1})")
    status(f"capturing {len(held_out)} held-out decode queries on layers {layers}")
    queries, masses = capture_decode_queries(loaded, store, held_out, layers, hi, lo)
    kinds = ("graph", "graph_heads_alone", "hnsw", "hnsw_centered", "flat")
    per_kind = {kind: {"operating": [], "sweep": {ef: [] for ef in EF_SWEEP}, "build_seconds": 0.0, "index_bytes": 0}
                for kind in kinds}
    work = Path(tempfile.mkdtemp(prefix="ra-bench-"))
    try:
        for layer in layers:
            status(f"layer {layer}: searching")
            keys = float32_keys(np.asarray(store.keys(layer)[:, lo:hi]), store.kv_dtype)
            q = queries[layer]
            truth = FlatLayerIndex(keys).search(q, K).ids
            indexes = {"graph": open_layer_index(store, layer), "flat": FlatLayerIndex(keys)}
            indexes["graph_heads_alone"] = HeadsAlone(open_layer_index(store, layer), keys.shape[0])
            entry = section["layers"][str(layer)]
            per_kind["graph"]["build_seconds"] += entry.get("build_seconds", 0.0)
            per_kind["graph"]["index_bytes"] += sum(store.file(f).stat().st_size for f in entry["files"].values())
            for kind, centered in (("hnsw", False), ("hnsw_centered", True)):
                params = IndexParams(kind="hnsw", hnsw_centered=centered)
                graphs = []
                for g in range(keys.shape[0]):
                    path = work / f"{kind}_{layer}_{g}.bin"
                    per_kind[kind]["build_seconds"] += build_hnsw_file(keys[g], path, params)
                    per_kind[kind]["index_bytes"] += path.stat().st_size
                    graphs.append(parse_hnsw_file(path, keys.shape[2]))
                indexes[kind] = HnswLayerIndex(graphs, keys, heads)
            for kind, index in indexes.items():
                if kind == "flat":
                    result = index.search(q, K)
                    per_kind[kind]["operating"].append((result.ids, truth, result.evaluations))
                    continue
                for ef in EF_SWEEP:
                    result = index.search(q, K, ef)
                    per_kind[kind]["sweep"][ef].append((result.ids, truth, result.evaluations))
                if kind in ("graph", "graph_heads_alone"):
                    result = index.search(q, K)  # the per-layer ef calibrated at ingest: what chat uses
                    per_kind[kind]["operating"].append((result.ids, truth, result.evaluations))
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    report = {
        "context_tokens": store.n_tokens, "indexed_keys": n_indexed, "held_out_queries": len(held_out),
        "layers": layers, "document": name, "k": K, "target_recall": TARGET,
        "ingest": store.manifest.get("ingest"), "indexes": {},
    }
    for kind in kinds:
        data = per_kind[kind]
        curve = []
        if kind != "flat":
            for ef in EF_SWEEP:
                r, worst, evals = _pooled(data["sweep"][ef])
                curve.append({"ef": ef, "recall": round(r, 4), "worst_head_recall": round(worst, 4),
                              "evaluations": round(evals, 1)})
        if data["operating"]:
            r, worst, evals = _pooled(data["operating"])
            operating = {"ef": "calibrated per layer" if kind.startswith("graph") else None}
        else:
            reaching = next((p for p in curve if p["recall"] >= TARGET), curve[-1])
            r, worst, evals = reaching["recall"], reaching["worst_head_recall"], reaching["evaluations"]
            operating = {"ef": reaching["ef"]}
        report["indexes"][kind] = {
            "recall_at_100": round(r, 4), "worst_head_recall_at_100": round(worst, 4),
            "evaluations_per_query": round(evals, 1), "scanned_fraction": round(evals / n_indexed, 4),
            "build_seconds": round(data["build_seconds"], 3), "index_bytes": data["index_bytes"],
            "evaluations_at_target": (None if kind == "flat" else evaluations_at(TARGET, curve)),
            **operating, "sweep": curve,
        }
    graph_cost = report["indexes"]["graph"]["evaluations_at_target"]
    if report["indexes"]["graph"]["recall_at_100"] >= TARGET:
        graph_cost = min(filter(None, [graph_cost, report["indexes"]["graph"]["evaluations_per_query"]]))
    for kind in ("hnsw", "hnsw_centered"):
        other = report["indexes"][kind]["evaluations_at_target"]
        report[f"{kind}_to_graph_scan_ratio"] = (round(other / graph_cost, 2) if other and graph_cost else None)
    fp16_kv = 2 * 2 * shape["kv_heads"] * shape["head_dim"] * n_indexed * len(layers)
    report["graph_index_bytes_per_fp16_kv_byte"] = round(report["indexes"]["graph"]["index_bytes"] / fp16_kv, 3)
    report["attention_mass"] = {str(layer): {"static_mean": round(float(np.mean(m["static"])), 4),
                                             "static_min_head": round(float(np.min(m["static"])), 4),
                                             "static_top100_mean": round(float(np.mean(m["static_top100"])), 4),
                                             "static_top100_min_head": round(float(np.min(m["static_top100"])), 4)}
                                for layer, m in masses.items()}
    if config.baseline_ingest:
        if ingest_result is not None:
            with_index = ingest_result.seconds
        else:  # the indexed context came from the cache: its time was measured in another run
            status("timing the graph ingest again (the indexed context came from the cache)")
            with_index = time_ingest(loaded, name, text, config, config.params, on_progress)
        status("timing the same prefill without an index")
        plain = time_ingest(loaded, name, text, config, IndexParams(kind="flat"), on_progress)
        report["ingest_baseline_seconds"] = round(plain, 1)
        report["ingest_with_graph_seconds"] = round(with_index, 1)
        report["ingest_speed_ratio"] = round(plain / with_index, 3)  # tokens/s with graph / without
    report["reach"] = measure_reach(loaded, store, layers, lo, hi, capture_decode_queries, status)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def print_recall_table(report: dict) -> None:
    from rich.table import Table

    from ra_cli.ui import stderr

    table = Table(title=f"Recall@100 on {report['context_tokens']:,} tokens ({report['indexed_keys']:,} indexed keys, "
                        f"{report['held_out_queries']} held-out queries, layers {report['layers']})")
    for column in ("index", "recall@100", "worst head", "evaluations/query", "scanned", "evals for 0.95", "build s", "bytes"):
        table.add_column(column, justify="right")
    for kind, row in report["indexes"].items():
        at = row["evaluations_at_target"]
        table.add_row(kind, f"{row['recall_at_100']:.3f}", f"{row['worst_head_recall_at_100']:.3f}",
                      f"{row['evaluations_per_query']:,.0f}", f"{row['scanned_fraction']:.1%}",
                      "-" if at is None else f"{at:,.0f}", f"{row['build_seconds']:.1f}", f"{row['index_bytes']:,}")
    stderr.print(table)
    stderr.print(f"hnsw/graph evaluations at 0.95: {report['hnsw_to_graph_scan_ratio']}; "
                 f"centred hnsw/graph: {report['hnsw_centered_to_graph_scan_ratio']}")
    reach = report["reach"]
    stderr.print(f"reachable from the entry points: min {reach['reachable_fraction_min']:.1%} of indexed keys over layers and "
                 f"heads; keys no prefill query selected: {reach['unselected_fraction']:.1%}; found in the top-10 of copy "
                 f"queries: rare keys {reach['rare_key_recall']} (with token seeds "
                 f"{reach['rare_key_recall_with_token_seeds']}), selected keys {reach['selected_key_recall']} "
                 f"(with token seeds {reach['selected_key_recall_with_token_seeds']}; {reach['rare_keys_checked']} rare "
                 "checked)", markup=False)
    for layer, mass in report["attention_mass"].items():
        stderr.print(f"layer {layer}: static mass {mass['static_mean']:.3f} (min head {mass['static_min_head']:.3f}), "
                     f"static+top100 {mass['static_top100_mean']:.3f} (min head {mass['static_top100_min_head']:.3f})")
