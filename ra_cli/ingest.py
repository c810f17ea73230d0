"""Document -> tokens -> chunked prefill -> context store on disk (resumable)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ra_cli.document import Document
from ra_cli.engine.cache import ContextCache, DeviceKVLayer, HostKVLayer, WideningScratch, layer_windows
from ra_cli.engine.device_memory import check_fits, kv_bytes, layers_on_device, prefill_reserve
from ra_cli.engine.generate import prefill
from ra_cli.engine.sparse import SparsePrefill
from ra_cli.errors import RaError
from ra_cli.files import exclusive
from ra_cli.index import IndexParams, build_store_indexes
from ra_cli.index.collect import PrefillCollector
from ra_cli.manifest import MANIFEST
from ra_cli.model import LoadedModel, dtype_name
from ra_cli.paths import contexts_dir
from ra_cli.prompt import Prompter, layout_for
from ra_cli.store import LayerShape, StoreWriter, kv_to_numpy, kv_to_tensor, partial_path


COMMIT_SECONDS = 2.0  # how much prefill a crash may cost: progress is synced to disk this often
# Longer documents are prefilled sparsely on a CPU unless --prefill full: full prefill is quadratic
# (32K tokens take minutes, 128K hours), sparse prefill costs the same per chunk at any length.
SPARSE_FROM = 32768
# Prefill chunk sizes: on a GPU a larger chunk fills the device and streams the layers kept in host
# memory (device_memory.py) a quarter as often; on a CPU 512 is as fast and keeps memory small.
CHUNK_CPU, CHUNK_GPU = 512, 2048


@dataclass
class IngestOptions:
    chunk_size: int | None = None  # None: CHUNK_CPU tokens on a CPU, CHUNK_GPU on an accelerator
    kv_dtype: str = "auto"  # auto = the model's compute dtype, so reloaded KV is bit-identical
    index: IndexParams = field(default_factory=IndexParams)
    prefill: str = "auto"  # full | sparse | auto (sparse past SPARSE_FROM tokens on a CPU)

    def chunk(self, device) -> int:
        return self.chunk_size or (CHUNK_GPU if device.type == "cuda" else CHUNK_CPU)

    def prefill_mode(self, n_tokens: int, device) -> str:
        if self.prefill not in ("auto", "full", "sparse"):
            raise RaError(f"unknown prefill mode '{self.prefill}'; use auto, full or sparse")
        if self.prefill != "auto":
            return self.prefill
        return "sparse" if n_tokens > SPARSE_FROM and device.type == "cpu" else "full"

    def content_params(self, model_dtype: str) -> dict:
        """Parameters that change what is stored (a resumed or cached store must match them)."""
        params = {"kv_dtype": model_dtype if self.kv_dtype == "auto" else self.kv_dtype, "index": self.index.as_dict()}
        if self.prefill != "auto":
            params["prefill"] = self.prefill
        if self.prefill == "sparse":
            params["sparse"] = sparse_policy(self).as_dict()
        return params


@dataclass
class IngestResult:
    path: Path
    n_tokens: int
    reused_tokens: int
    prefilled_tokens: int
    seconds: float  # prefill + index build
    prefill_seconds: float = 0.0
    index_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.prefilled_tokens / self.seconds if self.seconds > 0 else 0.0


def model_shape(config) -> dict:
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return {"layers": text.num_hidden_layers, "heads": text.num_attention_heads, "kv_heads": kv_heads, "head_dim": head_dim}


def layer_shapes(config) -> list[LayerShape]:
    shape = model_shape(config)
    return [LayerShape(shape["kv_heads"], shape["head_dim"], window) for window in layer_windows(config.get_text_config(decoder=True))]


def store_header(loaded: LoadedModel, document: Document, options: IngestOptions, layout: dict) -> dict:
    return {
        "document": {"name": document.name, "sha256": document.sha256, "kind": document.kind,
                     "pages": len(document.pages), "characters": len(document.text), "unit": document.unit,
                     **({"sections": [page.title for page in document.pages]} if document.unit == "section" else {}),
                     **({"parts": document.parts} if document.parts else {})},
        "model": {**loaded.fingerprint.as_dict(), "fingerprint": loaded.fingerprint.digest},
        "model_shape": model_shape(loaded.model.config),
        "prompt": layout,
        "params": options.content_params(dtype_name(loaded.dtype)),
    }


def cached_context_path(loaded: LoadedModel, name: str, sha256: str, options: IngestOptions) -> Path:
    """Where `ra chat DOCUMENT` keeps its context: keyed by the document's name and file sha256,
    the model and the stored parameters."""
    key = json.dumps({"doc": sha256, "model": loaded.fingerprint.digest,
                      "params": options.content_params(dtype_name(loaded.dtype))}, sort_keys=True)
    return contexts_dir() / (cached_context_stem(name) + "-" + hashlib.sha256(key.encode()).hexdigest()[:16] + ".idx")


def cached_context_stem(name: str) -> str:
    return Path(name).stem[:40]


def sparse_policy(options: IngestOptions) -> SparsePrefill:
    # the window covers the index's static window, so every KV head's attended set meets the
    # indexed range in the same number of positions (index/collect.py relies on it)
    return SparsePrefill(window=max(SparsePrefill.window, options.index.window))


def context_limit_notice(loaded: LoadedModel, n_tokens: int) -> str | None:
    """What to tell the user when a context is longer than the model was trained on (None: it fits)."""
    trained = loaded.trained_context
    if not trained or n_tokens <= trained:
        return None
    from ra_cli.model.resolve import NAMED

    longer = [m for m in NAMED.values() if m.trained_context >= n_tokens]
    advice = (f"use a model trained on longer texts (--model {longer[0].name}: {longer[0].trained_context:,} tokens; "
              "`ra models` lists them)" if longer else "split the document or use a model trained on longer texts")
    return (f"the context is {n_tokens:,} tokens but {loaded.fingerprint.source} was trained on {trained:,}: "
            f"ra will use all of it, but the model's answers about text beyond its trained length are unreliable; "
            f"{advice}")


def ingest(loaded: LoadedModel, document: Document, out: str | Path, options: IngestOptions | None = None,
           on_progress: Callable[[int, int, int, int | None], None] | None = None,
           on_index: Callable[[int, int], None] | None = None,
           on_notice: Callable[[str], None] | None = None) -> IngestResult:
    """Prefill `document` in chunks and store its KV (and search index) at `out`.

    `on_progress(done, total, reused, span)` is called after every chunk (span: the most keys a
    token attends to, None when it is every earlier one), `on_index(done, total)` after
    each layer's index is built, `on_notice(message)` before any prefill when the document is
    longer than the model's trained context. A partial store from an earlier run with equal inputs
    is resumed.
    """
    options = options or IngestOptions()
    layout = layout_for(loaded.tokenizer)
    prompter = Prompter(loaded.tokenizer, layout)
    tokens, pages, lines = prompter.document_places(document.text, [p.char_start for p in document.pages])
    notice = context_limit_notice(loaded, len(tokens))
    if notice and on_notice is not None:
        on_notice(notice)
    if options.prefill == "auto" and options.prefill_mode(len(tokens), loaded.device) == "sparse" and on_notice:
        policy = sparse_policy(options)
        on_notice(f"{len(tokens):,} tokens: prefilling sparsely (each chunk attends to {policy.sinks} sinks, the last "
                  f"{policy.window:,} tokens and {policy.blocks} blocks of {policy.block} chosen per KV head; linear "
                  "time instead of quadratic); --prefill full for exact attention over everything")
    header = store_header(loaded, document, options, layout.as_dict())
    return write_context(loaded, tokens, pages, header, out, options, on_progress, on_index, on_notice, lines)


def write_context(loaded: LoadedModel, tokens: list[int], pages: list[int], header: dict, out: str | Path,
                  options: IngestOptions, on_progress=None, on_index=None, on_notice=None,
                  lines: list[int] | None = None) -> IngestResult:
    """Prefill `tokens` in chunks, streaming their KV (and what the index learns from) to disk,
    build the search index and publish the store at `out`. One process at a time writes a given
    `out` (`<out>.lock`); one that waited finds the store complete and reuses it."""
    if options.chunk_size is not None and options.chunk_size < 1:
        raise RaError("--chunk-size must be at least 1")
    out = Path(out)
    with exclusive(out, f"writing {out.name}", on_notice):
        done = _complete_with(out, header, len(tokens))
        if done is not None:
            return done
        return _write_context(loaded, tokens, pages, lines, header, out, options, on_progress, on_index)


def _complete_with(out: Path, header: dict, n: int) -> IngestResult | None:
    """`out` as a finished ingest of exactly these inputs (made meanwhile by another process), if it is one."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    same = manifest.get("n_tokens") == n and all(manifest.get(key) == value for key, value in json.loads(json.dumps(header)).items())
    return IngestResult(out, n, n, 0, 0.0) if same else None


def kv_in_store(loaded: LoadedModel, kv_dtype: str) -> bool:
    """Whether the prefill's cache can be the store's memory map itself: on a CPU, when the store
    keeps the KV in the dtype the model makes it in. KV is then held once, not also as float32
    copies (5.6 GiB at 128K tokens for the embedded model), and widened exactly where attention
    reads it — what is stored and indexed is the same either way (tested)."""
    return loaded.device.type == "cpu" and kv_dtype == dtype_name(loaded.dtype)


def prefill_cache(loaded: LoadedModel, n: int, chunk: int) -> ContextCache:
    """The prefill's cache of `n` tokens: on a GPU, each layer's KV on the device while it fits
    beside the weights and a chunk's working memory (under --gpu-mem-gb), the later layers' in
    page-locked host memory, streamed to the device as each chunk attends; on a CPU all of it."""
    config = loaded.model.config
    if loaded.device.type != "cuda":
        return ContextCache.full(config, capacity=n, dtype=loaded.cache_dtype)
    torch.cuda.empty_cache()  # blocks freed while loading (a 4-bit model made in bf16 first) go back whole
    shape = model_shape(config)
    element = loaded.cache_dtype.itemsize
    per_layer = kv_bytes(n, shape["kv_heads"], shape["head_dim"], element)
    reserve = prefill_reserve(config, chunk, element, per_layer)
    check_fits(loaded.device, reserve, f"a prefill chunk of {chunk:,} tokens beside the weights",
               "use a smaller --chunk-size, --load-in-4bit or a larger --gpu-mem-gb", margin=0)  # the reserve has its slack
    windows = layer_windows(config)
    on_device = layers_on_device(loaded.device, per_layer, len(windows), reserve)
    return ContextCache([DeviceKVLayer(i, window, n, loaded.cache_dtype) if i < on_device
                         else HostKVLayer(i, loaded.device, window, n, loaded.cache_dtype)
                         for i, window in enumerate(windows)])


def _write_context(loaded: LoadedModel, tokens: list[int], pages: list[int], lines: list[int] | None, header: dict,
                   out: Path, options: IngestOptions, on_progress=None, on_index=None) -> IngestResult:
    kv_dtype = header["params"]["kv_dtype"]
    shapes = layer_shapes(loaded.model.config)
    n = len(tokens)
    chunk = options.chunk(loaded.device)
    # planned before anything is written: a prefill that cannot fit leaves no partial store behind.
    # Its own buffers (float32 on a CPU, as the collector ranks against) unless it adopts the store's below
    cache = prefill_cache(loaded, n, chunk)
    writer = StoreWriter(out, header, tokens, pages, shapes, kv_dtype, lines)
    in_store = kv_in_store(loaded, kv_dtype)
    # bf16 KV read by float32 attention is widened; a float32 model's store is read as it is
    widening = WideningScratch(loaded.cache_dtype, n) if in_store and loaded.cache_dtype != loaded.dtype else None
    for index, layer in enumerate(cache.layers):
        layer.kernels = False  # a resumed ingest stores exactly what an uninterrupted one does
        if in_store:
            layer.adopt(*writer.kv_tensors(index), writer.tokens_done, widening)
    mode = options.prefill_mode(n, loaded.device)
    if mode == "sparse":
        cache.use_sparse_prefill(sparse_policy(options))
    start = writer.tokens_done
    collector = None
    if options.index.kind == "graph":
        shape = header["model_shape"]
        try:
            collector = PrefillCollector(writer.dir / "work", n, [s.sliding_window for s in shapes], shape["heads"],
                                         shape["kv_heads"], shape["head_dim"], options.index, resume=start > 0)
        except OSError:
            if start == 0:  # e.g. a full disk (files.array_file): nothing done yet, leave the disk as it was
                shutil.rmtree(writer.dir, ignore_errors=True)
            raise
        for layer in cache.layers:
            layer.observer = collector.observe
    if start and not in_store:
        for index, layer in enumerate(cache.layers):
            keys = kv_to_tensor(writer.keys[index][:, :start], kv_dtype, loaded.device, loaded.cache_dtype)[None]
            values = kv_to_tensor(writer.values[index][:, :start], kv_dtype, loaded.device, loaded.cache_dtype)[None]
            layer.load(keys, values)
    span = sparse_policy(options).span if mode == "sparse" else None
    if on_progress is not None:
        on_progress(start, n, writer.resumed_from, span)
    began = time.perf_counter()

    def commit(done: int) -> None:
        if collector is not None:
            collector.flush()
        writer.commit(done)

    committed = began
    store_seconds = 0.0  # of the prefill: copying each chunk's KV into the store (on a GPU, from the device)
    try:
        while start < n:
            end = min(n, start + chunk)
            prefill(loaded.model, cache, tokens[start:end], want_logits=False)
            if not in_store:  # else the forward wrote it there
                if loaded.device.type == "cuda":  # the forward's queued work is the forward's time
                    torch.cuda.synchronize(loaded.device)
                began_store = time.perf_counter()
                for index, layer in enumerate(cache.layers):
                    writer.write(index, start, kv_to_numpy(layer.keys[0, :, start:end], kv_dtype),
                                 kv_to_numpy(layer.values[0, :, start:end], kv_dtype))
                store_seconds += time.perf_counter() - began_store
            start = end
            # syncing every file to disk per chunk cost ~2% of ingest: do it every few seconds
            if end == n or time.perf_counter() - committed >= COMMIT_SECONDS:
                commit(end)
                committed = time.perf_counter()
            if on_progress is not None:
                on_progress(end, n, writer.resumed_from, span)
    except KeyboardInterrupt:
        if start > writer.tokens_done:
            commit(start)  # every chunk before `start` is fully written: keep it for the resume
        raise
    prefill_seconds = time.perf_counter() - began
    del cache
    index_began = time.perf_counter()
    section = build_store_indexes(writer, collector, options.index, header["model_shape"]["heads"], on_index)
    index_seconds = time.perf_counter() - index_began
    seconds = time.perf_counter() - began
    extra = {"index": section,
             "ingest": {"chunk_size": chunk, "prefill": mode, "seconds": round(seconds, 3),
                        "prefill_seconds": round(prefill_seconds, 3), "index_seconds": round(index_seconds, 3),
                        # of the prefill: the index's collection next to attention, and the KV's copy to the store
                        "collect_seconds": round(collector.seconds if collector else 0.0, 3),
                        "store_seconds": round(store_seconds, 3),
                        "prefilled_tokens": n - writer.resumed_from,
                        **({"sparse": sparse_policy(options).as_dict()} if mode == "sparse" else {})}}
    path = writer.publish(extra)
    return IngestResult(path, n, writer.resumed_from, n - writer.resumed_from, seconds, prefill_seconds, index_seconds)


def is_context(path: Path) -> bool:
    """A context made by `ra ingest`, finished or not (a file of that name is a document)."""
    return not path.is_file() and ((path / MANIFEST).exists() or partial_path(path).exists())
