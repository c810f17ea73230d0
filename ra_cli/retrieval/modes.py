"""The attention cache of a stored context, for each attention mode.

- `full`: every stored key and value on the compute device; exact attention (the reference).
- `retrieval`: global layers keep a static set (sinks + recent window) on the device and search
  the store's index for the rest; layers that ingest measured as too diffuse stay dense.
- `flat`: like retrieval, but the search is an exact top-k scan (what retrieval approximates).
- `offload`: full attention with all KV in host memory, streamed to the accelerator layer by layer
  (what a long context falls back to when its KV does not fit; the same as full on a CPU).
- `graph` / `hnsw`: retrieval, naming the index the context must have been built with.
"""

from __future__ import annotations

import numba
import torch

from ra_cli.choices import AttentionMode
from ra_cli.engine.cache import ContextCache, DeviceKVLayer, HostKVLayer
from ra_cli.engine.device_memory import GIB, check_fits, kv_bytes, layers_on_device
from ra_cli.errors import RaError
from ra_cli.index import open_layer_index
from ra_cli.index.flat import FlatLayerIndex
from ra_cli.retrieval.cost import MeasuredChoice, expected_reads, search_is_cheaper
from ra_cli.retrieval.budget import layer_budget, measured_budgets
from ra_cli.retrieval.host_kv import HostKV, host_kv
from ra_cli.retrieval.layer import RetrievalLayer, RetrievalSettings, RetrievalStats
from ra_cli.retrieval.token_seeds import TokenSeeds
from ra_cli.store import ContextStore, kv_to_tensor

CONVERSATION_ROOM = 4096  # tokens reserved on the device for the conversation after the document



def settings_for(store: ContextStore, top_k: int | None = None, ef: int | None = None, window: int | None = None,
                 coverage: float = 0.97, dense_below: float = 0.8, sinks: int | None = None,
                 dense_when_cheaper: bool = True, exact_margin: float | None = None) -> RetrievalSettings:
    """Retrieval settings for a stored context: the recent window defaults to what ingest kept on
    the device; sinks are fixed by ingest (the indexed range starts after them)."""
    stored = store.manifest.get("index", {}).get("params", {})
    if sinks is not None and stored and stored["sinks"] != sinks:
        raise RaError(f"{store.path} was ingested with --sinks {stored['sinks']}; sinks are fixed at ingest — "
                      "ingest again to change them")
    return RetrievalSettings(top_k=top_k, ef=ef, window=stored.get("window", 512) if window is None else window,
                             coverage=coverage, dense_below=dense_below, dense_when_cheaper=dense_when_cheaper,
                             exact_margin=RetrievalSettings.exact_margin if exact_margin is None else exact_margin)


def open_cache(loaded, store: ContextStore, mode: AttentionMode | str = AttentionMode.retrieval,
               settings: RetrievalSettings | None = None) -> ContextCache:
    """The conversation cache over `store` for an attention mode (see the module docstring)."""
    mode = AttentionMode(mode)
    if mode is AttentionMode.full:
        return full_attention_cache(loaded, store)
    if mode is AttentionMode.offload:
        return offloaded_cache(loaded, store)
    if "index" not in store.manifest:
        raise RaError(f"{store.path}: this context has no index section; ingest it again")
    kind = store.manifest["index"]["kind"]
    if mode not in (AttentionMode.retrieval, AttentionMode.flat) and mode.value != kind:
        raise RaError(f"--attention {mode.value}: this context was indexed with {kind}; "
                      f"use --attention retrieval, flat or full, or ingest again with --index {mode.value}")
    return retrieval_cache(loaded, store, settings or RetrievalSettings(), exact=mode is AttentionMode.flat)


def full_attention_cache(loaded, store: ContextStore) -> ContextCache:
    """Every stored key and value on the compute device: exact attention."""
    check_fits(loaded.device, len(store.layers) * _layer_kv_bytes(store, loaded.dtype),
               f"full attention over {store.n_tokens:,} tokens",
               "use --attention retrieval (the default), or --attention offload to stream every key from host memory")
    cache = ContextCache.full(loaded.model.config, capacity=store.n_tokens + CONVERSATION_ROOM)
    for index, layer in enumerate(cache.layers):
        layer.load(_dense_kv(loaded, store, store.keys(index)), _dense_kv(loaded, store, store.values(index)))
        store.release(index)
    return cache


def _dense_kv(loaded, store: ContextStore, array, device=None):
    """KV of a full-attention layer: in the model's own dtype (bf16: half the bytes to stream)."""
    return kv_to_tensor(array, store.kv_dtype, loaded.device if device is None else device, loaded.dtype)[None]


def offloaded_cache(loaded, store: ContextStore) -> ContextCache:
    """Every stored key and value in host memory, streamed to the device per layer: exact attention."""
    windows = [shape.sliding_window for shape in store.layers]
    cache = ContextCache([HostKVLayer(i, loaded.device, window, store.n_tokens + CONVERSATION_ROOM)
                          for i, window in enumerate(windows)])
    for index, layer in enumerate(cache.layers):
        layer.load(_dense_kv(loaded, store, store.keys(index), "cpu"), _dense_kv(loaded, store, store.values(index), "cpu"))
        store.release(index)
    return cache


def _layer_kv_bytes(store: ContextStore, dtype) -> int:
    shape = store.manifest["model_shape"]
    return kv_bytes(store.n_tokens + CONVERSATION_ROOM, shape["kv_heads"], shape["head_dim"], dtype.itemsize)


def _static_kv(loaded, store: ContextStore, array, on_host: bool):
    """A static set's keys or values: on the compute device, or in host memory in float32 (what
    the CPU kernels read)."""
    if on_host:
        return kv_to_tensor(array, store.kv_dtype, "cpu", torch.float32)[None]
    return kv_to_tensor(array, store.kv_dtype, loaded.device, loaded.cache_dtype)[None]


def dense_layers(store: ContextStore, dense_below: float = 0.8) -> list[int]:
    """Indexed layers whose static set plus the largest measured budget held less than
    `dense_below` of the softmax mass at ingest: too diffuse to retrieve, they attend densely."""
    entries = store.manifest["index"]["layers"]
    return sorted(int(layer) for layer, entry in entries.items()
                  if max(entry.get("coverage", {"": 1.0}).values()) < dense_below)


def cheaper_dense_layers(store: ContextStore, settings: RetrievalSettings, threads: int | None = None) -> list[int]:
    """Retrievable layers that a CPU attends to faster by reading every key than by searching
    (retrieval/cost.py): where the search reads a large share of the keys."""
    section = store.manifest["index"]
    shape = store.manifest["model_shape"]
    lo, hi, n = section["lo"], section["hi"], store.n_tokens
    threads = threads or numba.get_num_threads()
    diffuse = set(dense_layers(store, settings.dense_below))
    cheaper = []
    for layer, entry in section["layers"].items():
        reads = expected_reads(entry, settings.ef)
        if int(layer) in diffuse or reads is None:
            continue
        # an answer holds at most the keys the search read
        attended = min(settings.top_k or layer_budget(entry, settings.coverage), reads) + lo + n - hi
        if not search_is_cheaper(reads, n, attended, shape["kv_heads"], shape["heads"], threads):
            cheaper.append(int(layer))
    return sorted(cheaper)


def retrieval_cache(loaded, store: ContextStore, settings: RetrievalSettings, exact: bool = False,
                    static_on_host: bool = False) -> ContextCache:
    """Retrieval layers for global attention layers (their static set on the device), full device
    KV for sliding-window layers (which never look far), for layers too diffuse to retrieve and, on
    a CPU, for layers whose search would cost more than dense attention (settings.dense_when_cheaper).
    `exact`: search by exact top-k instead of the store's index. `static_on_host`: on a GPU
    machine, the static sets too are kept in host memory, so that a layer's whole attention is one
    CPU call (as on a CPU) and the device only hands over the query and takes back the output —
    against the split path's device attention and merge (benchmarked as `ra bench` mode
    static-on-host)."""
    section = store.manifest["index"]
    lo, hi, n = section["lo"], section["hi"], store.n_tokens
    stats = RetrievalStats(indexed_keys=hi - lo)
    dense = set(dense_layers(store, settings.dense_below))
    if settings.dense_when_cheaper and not exact and loaded.device.type == "cpu":
        stats.cheaper_dense_layers = cheaper_dense_layers(store, settings)
        dense |= set(stats.cheaper_dense_layers)
    stats.dense_layers = sorted(dense)
    seeds = None if exact else TokenSeeds(store.tokens, lo, hi)
    # on a GPU, dense layers keep their KV on the device while it fits (under --gpu-mem-gb), the
    # rest stream it from host memory; a GiB is left for the static sets (sinks + window: a few MB
    # a layer) and a decode step's working memory
    whole = [i for i, shape in enumerate(store.layers) if shape.sliding_window is not None or i in dense]
    on_device = set(whole[: layers_on_device(loaded.device, _layer_kv_bytes(store, loaded.dtype), len(whole), GIB)])
    layers = []
    for i, shape in enumerate(store.layers):
        if i in whole:
            if i in on_device:
                layer, where = DeviceKVLayer(i, shape.sliding_window, capacity=n + CONVERSATION_ROOM), loaded.device
            else:
                layer, where = HostKVLayer(i, loaded.device, shape.sliding_window, n + CONVERSATION_ROOM), "cpu"
            layer.load(_dense_kv(loaded, store, store.keys(i), where), _dense_kv(loaded, store, store.values(i), where))
            store.release(i)  # copied: its pages would count twice
            layers.append(layer)
            continue
        # Every search touches keys at random: a RAM copy (numpy asks for transparent huge pages)
        # measured 1.4x faster than the memory map, whose 4 KiB pages miss the TLB; values too
        # (read a few hundred random rows per head). Both in the store's bf16 when it has it.
        host = HostKV(host_kv(store.keys(i)[:, lo:n], store.kv_dtype), host_kv(store.values(i)[:, lo:n], store.kv_dtype))
        index = FlatLayerIndex(host.keys, hi - lo) if exact else open_layer_index(store, i, host.keys)
        static = [_static_kv(loaded, store, array, static_on_host)
                  for array in (store.keys(i)[:, :lo], store.values(i)[:, :lo], store.keys(i)[:, hi:n], store.values(i)[:, hi:n])]
        layer = RetrievalLayer(i, index, host, hi - lo, lo, *static, settings, stats, seeds)
        store.release(i)
        if settings.dense_when_cheaper and not exact and loaded.device.type == "cpu":
            layer.choice = MeasuredChoice()  # the prediction above can miss: the layer times both ways
        if settings.top_k is None:
            layer.top_k = layer.ingest_top_k = layer_budget(section["layers"][str(i)], settings.coverage)
            layer.budgets = measured_budgets(section["layers"][str(i)])
        layers.append(layer)
    retrieval_layers = [layer for layer in layers if isinstance(layer, RetrievalLayer)]
    stats.budgets = {layer.layer_idx: layer.top_k for layer in retrieval_layers}
    if retrieval_layers:
        retrieval_layers[0].counts_steps = True
    cache = ContextCache(layers)
    cache.retrieval_stats = stats
    # The error retrieval can make grows with the layers that search (each adds its own; a dense
    # layer is exact): the margin is for a model whose every layer searches, applied in proportion.
    # With no layer searching every forward is exact already, and nothing runs again.
    cache.exact_margin = settings.exact_margin * len(retrieval_layers) / len(layers)
    cache.token_seeds = seeds
    return cache


def describe_context(store: ContextStore, settings: RetrievalSettings | None = None) -> dict:
    """What a store holds and how retrieval would use it (`ra info`)."""
    settings = settings or RetrievalSettings()
    manifest = store.manifest
    files = manifest["files"]
    shape = manifest["model_shape"]
    summary = {
        "path": str(store.path), "document": manifest["document"], "tokens": store.n_tokens,
        "model": manifest["model"].get("source"), "model_dtype": manifest["model"].get("dtype"),
        "layers": shape["layers"], "heads": shape["heads"], "kv_heads": shape["kv_heads"], "head_dim": shape["head_dim"],
        "kv_dtype": store.kv_dtype, "kv_bytes": sum(meta["bytes"] for name, meta in files.items() if name.startswith("kv/")),
        "bytes": sum(meta["bytes"] for meta in files.values()), "created": manifest.get("created"),
        "ingest": manifest.get("ingest", {}), "index": None,
    }
    section = manifest.get("index")
    if section:
        budgets = {int(layer): layer_budget(entry, settings.coverage) for layer, entry in section["layers"].items()}
        dense = dense_layers(store, settings.dense_below)
        counts: dict[str, int] = {}
        for layer, budget in budgets.items():
            if layer not in dense:
                counts[str(budget)] = counts.get(str(budget), 0) + 1
        summary["index"] = {
            "kind": section["kind"], "lo": section["lo"], "hi": section["hi"], "sinks": section["lo"],
            "bytes": sum(meta["bytes"] for name, meta in files.items() if name.startswith("index/")),
            "budgets": {str(layer): budget for layer, budget in budgets.items() if layer not in dense},
            "budget_counts": counts, "dense_layers": dense,
        }
    return summary
