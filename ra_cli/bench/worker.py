"""One measurement of `ra bench --context`, in a process of its own (so that its peak memory is its
own): `python -m ra_cli.bench.worker '<json>'` prints one JSON object on stdout."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path


# top-k and beam of a synthetic run's searches: the default budget, and a beam within the range the
# calibration picks for trained models' layers (index/graph.py EF_CANDIDATES; docs/benchmarks.md)
SYNTHETIC_SEARCH = {"top_k": 100, "ef": 128}


def peak_rss_bytes() -> int | None:
    """The process's peak resident set (VmHWM), the whole run included."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows: not measured
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux and the BSDs KiB


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _context(loaded, config: dict, context: int):
    from ra_cli.bench.corpus import bench_text, cached_context, cached_tokens, random_tokens
    from ra_cli.index import IndexParams
    from ra_cli.ui import LayerProgress, TokenProgress

    following = config["warmup"] + config["steps"] + 1
    layers = LayerProgress("graph index")
    try:
        with TokenProgress(f"ingest {context:,}") as bar:
            if config["synthetic"]:
                tokens, layout = random_tokens(loaded, context + following)
                return cached_tokens(loaded, f"synthetic-{config['synthetic']}", tokens, layout, context, IndexParams(),
                                     on_progress=bar, on_index=layers, prefill=config["prefill"])
            name, text = bench_text(Path(config["document"]) if config["document"] else None, default="corpus")
            return cached_context(loaded, name, text, context, following, IndexParams(), on_progress=bar,
                                  on_index=layers, prefill=config["prefill"])
    finally:
        layers.close()


def _load(config: dict):
    from ra_cli.model import load_model
    from ra_cli.model.load import cap_device_memory, load_synthetic

    cap_device_memory(config["device"], config["gpu_mem_gb"])
    if config["synthetic"]:
        return load_synthetic(config["synthetic"], config["device"], config["dtype"], config["weights"], config["quantize"])
    return load_model(config["model"], config["device"], config["dtype"], config["weights"], config["quantize"])


def decode_run(config: dict, context: int, mode: str) -> dict:
    import torch

    from ra_cli.engine.generate import prefill
    from ra_cli.retrieval.modes import open_cache, retrieval_cache, settings_for

    loaded = _load(config)
    device = loaded.device.type == "cuda"
    load_peak = torch.cuda.max_memory_allocated() if device else None
    if device:  # what the weights' making took (a synthetic 4-bit model is made in bf16 first) is reported apart
        torch.cuda.reset_peak_memory_stats()
    bench = _context(loaded, config, context)
    store = bench.store
    record = store.manifest.get("ingest", {})
    ingest_rate = record.get("prefilled_tokens", 0) / record["seconds"] if record.get("seconds") else None
    ingest_cached = bench.result is None
    searched = mode == "search-all"  # retrieval, with no layer made dense for speed
    if config["synthetic"]:
        # Random weights attend diffusely, their keys have no structure for a graph to use (a
        # search calibrated on them reads nearly every key) and their logits are near ties. So a
        # synthetic run is timed as a trained model is run: every global layer searches with a
        # trained model's budget and beam (SYNTHETIC_SEARCH; keys_scanned reports the reads that
        # costs), and no step is redone exactly. Timing only.
        settings = settings_for(store, dense_below=0.0, dense_when_cheaper=False, exact_margin=0.0, **SYNTHETIC_SEARCH)
    else:
        settings = settings_for(store, dense_when_cheaper=not searched, exact_margin=config["exact_margin"])
    if mode == "static-on-host":  # retrieval with the static sets in host memory too (retrieval_cache)
        cache = retrieval_cache(loaded, store, settings, static_on_host=True)
    else:
        cache = open_cache(loaded, store, "retrieval" if searched else mode, settings)
    stats = getattr(cache, "retrieval_stats", None)
    tokens = bench.continuation
    for token in tokens[: config["warmup"]]:
        prefill(loaded.model, cache, [token])
    cache.attention_timer.seconds = cache.exact_seconds = 0.0
    cache.attention_timer.synchronize = device  # the dense layers' attention timed as the device runs it
    cache.exact_steps = 0
    if stats is not None:
        stats.retrieval_seconds = stats.search_seconds = stats.attention_seconds = 0.0
        stats.evaluations = stats.searches = 0
    steps = []
    for token in tokens[config["warmup"]: config["warmup"] + config["steps"]]:
        began = time.perf_counter()
        prefill(loaded.model, cache, [token])
        if device:  # the step is done when the device is: its kernels run behind the Python that queues them
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - began)
    count = len(steps)
    per_step = lambda seconds: 1000 * seconds / count  # noqa: E731
    search = per_step(stats.search_seconds) if stats else 0.0
    dense_attention = per_step(cache.attention_timer.seconds)  # layers attending to every key
    attention = dense_attention + (per_step(stats.attention_seconds) if stats else 0.0)
    other = per_step(stats.retrieval_seconds - stats.search_seconds - stats.attention_seconds) if stats else 0.0
    exact = per_step(cache.exact_seconds)
    mean = per_step(sum(steps))
    return {
        "context_tokens": store.n_tokens, "mode": mode, "decode_ms_per_token": round(1000 * statistics.median(steps), 3),
        "decode_mean_ms": round(mean, 3), "body_ms": round(mean - search - attention - other - exact, 3),
        "search_ms": round(search, 3), "attention_ms": round(attention, 3), "other_ms": round(other, 3),
        # the retrieval part: the searched layers' search, attention and glue (attention_ms less the dense layers')
        "retrieval_ms": round(search + attention - dense_attention + other, 3),
        "dense_attention_ms": round(dense_attention, 3), "exact_ms": round(exact, 3), "exact_steps": cache.exact_steps if stats else None,
        "ingest_tokens_per_s": round(ingest_rate, 1) if ingest_rate else None, "ingest_cached": ingest_cached,
        # where the ingest's time went (the store's manifest): prefill (of which collection and the
        # KV's copy to the store) and index build
        **{f"ingest_{part}_s": record.get(f"{part}_seconds") for part in ("prefill", "collect", "store", "index")},
        "peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": torch.cuda.max_memory_allocated() if device else None,
        "load_peak_device_bytes": load_peak,
        "disk_bytes": directory_bytes(store.path),
        "keys_scanned": round(stats.evaluations / stats.searches, 1) if stats and stats.searches else None,
        "device_wait_ms": round(per_step(stats.wait_seconds), 3) if stats and device else None,
        "dense_layers": stats.dense_layers if stats else None,
        "cheaper_dense_layers": stats.cheaper_dense_layers if stats else None,
        "measured_dense_layers": stats.measured_dense_layers if stats else None, "model": loaded.fingerprint.source,
        **({"search": SYNTHETIC_SEARCH} if config["synthetic"] and stats else {}),
        "dtype": loaded.fingerprint.dtype, "steps": count,
    }


def llama_run(config: dict, context: int) -> dict:
    """llama.cpp on the same GGUF and the same token ids: prefill of the context, then decode."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from ra_cli.bench.corpus import bench_text, context_tokens
    from ra_cli.model.convert import converted_gguf
    from ra_cli.model.resolve import resolve_model

    spec = resolve_model(config["model"])
    if spec.kind != "gguf":
        raise SystemExit(f"the llama.cpp baseline needs a GGUF model; {spec.name} is not one")
    converted, _ = converted_gguf(spec.path)

    class Tokenizer:  # what context_tokens needs: ra's own tokenizer, without loading the weights
        def __init__(self):
            self.tokenizer = AutoTokenizer.from_pretrained(converted)

    name, text = bench_text(Path(config["document"]) if config["document"] else None, default="corpus")
    tokens, _ = context_tokens(Tokenizer(), text, context + config["warmup"] + config["steps"] + 1)
    prefix, continuation = tokens[:context], tokens[context:]
    llm = Llama(model_path=str(spec.path), n_ctx=len(tokens) + 16, n_threads=os.cpu_count(), n_batch=512, verbose=False)
    began = time.perf_counter()
    llm.eval(prefix)
    prefill_seconds = time.perf_counter() - began
    steps = []
    for index, token in enumerate(continuation[: config["warmup"] + config["steps"]]):
        began = time.perf_counter()
        llm.eval([token])
        if index >= config["warmup"]:
            steps.append(time.perf_counter() - began)
    return {
        "context_tokens": len(prefix), "mode": "llama.cpp", "decode_ms_per_token": round(1000 * statistics.median(steps), 3),
        "body_ms": None, "search_ms": None, "attention_ms": None, "other_ms": None, "retrieval_ms": None,
        "dense_attention_ms": None, "exact_ms": None, "exact_steps": None,
        "ingest_tokens_per_s": round(len(prefix) / prefill_seconds, 1), "ingest_cached": False,
        "peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": None, "disk_bytes": spec.path.stat().st_size,
        "keys_scanned": None, "dense_layers": None, "model": spec.path.name, "dtype": "gguf", "steps": len(steps),
    }


def main() -> None:
    from ra_cli.engine.device_memory import DoesNotFit
    from ra_cli.errors import explain
    from ra_cli.ui import report

    job = json.loads(sys.argv[1])
    try:
        if job["task"] == "llama":
            result = llama_run(job["config"], job["context"])
        else:
            result = decode_run(job["config"], job["context"], job["mode"])
    except Exception as exc:  # one line for the parent to point at, as the CLI would print it
        does_not_fit = isinstance(exc, DoesNotFit) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())
        if os.environ.get("RA_DEBUG") == "1" and not does_not_fit:
            raise
        message, code = explain(exc)
        report(message)
        if not does_not_fit:
            raise SystemExit(code)
        # a measurement in itself: this mode cannot run at this size here
        result = {"context_tokens": job["context"], "mode": job["mode"], "fits": False, "error": message,
                  "decode_ms_per_token": None, "peak_rss_bytes": peak_rss_bytes()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
