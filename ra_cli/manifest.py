"""A store's manifest.json is untrusted input (stores are shared): its structure, types and bounds
are checked before any value is used, every path in it must stay inside the store, and every
file any part of it names must be listed — with its hashes — in `files`."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

from ra_cli.errors import RaError

MANIFEST = "manifest.json"
MAX_TOKENS = 1 << 26  # 64M tokens: far beyond any context, small enough to bound every allocation
MAX_LAYERS = 512
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
KV_DTYPES = ("float32", "float16", "bfloat16")
INDEX_KINDS = ("graph", "hnsw", "flat")
PROMPT_TEXT = ("style", "opening", "first_open", "close", "turn_open")
HEX64 = re.compile(r"[0-9a-f]{64}")
GRAPH_FILES = ("graph", "router", "entries", "selected")


class _Invalid(Exception):
    pass


def _need(condition: bool, what: str) -> None:
    if not condition:
        raise _Invalid(what)


def _int(value, low: int, high: int, what: str) -> int:
    _need(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
          f"{what} must be an integer in [{low}, {high}]")
    return value


def contained(root: Path, relative) -> bool:
    """A relative POSIX path that stays inside `root`, symbolic links resolved."""
    if not isinstance(relative, str) or not relative or "\\" in relative or "\x00" in relative:
        return False
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts:
        return False
    try:
        return (root / relative).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def validate_manifest(root: Path, manifest: dict) -> None:
    try:
        _validate(root, manifest)
    except _Invalid as problem:
        raise RaError(f"{root}: manifest.json {problem}; the context is damaged or not made by this ra — ingest again")


def _validate(root: Path, manifest: dict) -> None:
    files = manifest.get("files")
    _need(isinstance(files, dict) and files, "lists no files")
    for relative, meta in files.items():
        _need(contained(root, relative), f"names a path outside the store ({relative!r})")
        _need(isinstance(meta, dict), f"has no record for {relative}")
        _int(meta.get("bytes"), 0, 1 << 50, f"files[{relative}].bytes")
        _need(isinstance(meta.get("sha256"), str) and HEX64.fullmatch(meta["sha256"]) is not None,
              f"has no sha256 for {relative}")
        _need(meta.get("sample_sha256") is None or (isinstance(meta["sample_sha256"], str)
                                                     and HEX64.fullmatch(meta["sample_sha256"]) is not None),
              f"has a malformed sample_sha256 for {relative}")

    def listed(relative, what: str) -> None:
        _need(isinstance(relative, str) and relative in files, f"names {what} ({relative!r}) that is not a listed file")

    n = _int(manifest.get("n_tokens"), 1, MAX_TOKENS, "n_tokens")
    _need(manifest.get("kv_dtype") in KV_DTYPES, f"has an unknown kv_dtype {manifest.get('kv_dtype')!r}")
    for required in ("tokens.npy", "token_pages.npy"):
        listed(required, "the token file")
    _need(isinstance(manifest.get("model"), dict), "has no model fingerprint")
    prompt = manifest.get("prompt")
    _need(isinstance(prompt, dict) and all(isinstance(prompt.get(key), str) for key in PROMPT_TEXT)
          and isinstance(prompt.get("stop_strings", []), list)
          and all(isinstance(stop, str) for stop in prompt.get("stop_strings", []))
          and (prompt.get("bos_token_id") is None or isinstance(prompt.get("bos_token_id"), int)),
          "has a malformed prompt layout")
    _need(isinstance(manifest.get("document"), dict), "has no document record")
    layers = manifest.get("layers")
    _need(isinstance(layers, list) and 1 <= len(layers) <= MAX_LAYERS, "has no layers")
    for i, layer in enumerate(layers):
        _need(isinstance(layer, dict), f"layer {i} is not a record")
        _int(layer.get("kv_heads"), 1, MAX_HEADS, f"layer {i} kv_heads")
        _int(layer.get("head_dim"), 1, MAX_HEAD_DIM, f"layer {i} head_dim")
        window = layer.get("sliding_window")
        _need(window is None or (isinstance(window, int) and window >= 1), f"layer {i} has a bad sliding_window")
        listed(layer.get("keys"), f"layer {i} keys")
        listed(layer.get("values"), f"layer {i} values")
    shape = manifest.get("model_shape")
    _need(isinstance(shape, dict) and shape.get("layers") == len(layers), "model_shape does not match its layers")
    heads = _int(shape.get("heads"), 1, MAX_HEADS, "model_shape.heads")
    kv_heads = _int(shape.get("kv_heads"), 1, MAX_HEADS, "model_shape.kv_heads")
    _need(heads % kv_heads == 0, "model_shape has query heads that are not a multiple of KV heads")
    index = manifest.get("index")
    if index is None:
        return
    _need(isinstance(index, dict) and index.get("kind") in INDEX_KINDS, "has an unknown index kind")
    lo = _int(index.get("lo"), 0, n, "index.lo")
    _int(index.get("hi"), lo, n, "index.hi")
    _need(isinstance(index.get("params"), dict), "has no index parameters")  # types: IndexParams.from_dict
    entries = index.get("layers")
    _need(isinstance(entries, dict), "has no index layers")
    for key, entry in entries.items():
        _need(isinstance(key, str) and key.isdigit() and int(key) < len(layers), f"indexes a layer {key!r} it does not have")
        _need(isinstance(entry, dict) and isinstance(entry.get("files", {}), dict), f"index layer {key} is malformed")
        if index["kind"] != "flat":
            _int(entry.get("ef"), 1, 1 << 20, f"index layer {key} ef")
        coverage = entry.get("coverage", {})
        _need(isinstance(coverage, dict) and all(k.isdigit() and isinstance(v, (int, float)) for k, v in coverage.items()),
              f"index layer {key} has a malformed coverage")
        for name, relative in entry.get("files", {}).items():
            listed(relative, f"index layer {key} file {name}")
        needed = {"graph": GRAPH_FILES, "flat": (),
                  "hnsw": tuple(f"hnsw{g}" for g in range(layers[int(key)]["kv_heads"]))}[index["kind"]]
        missing = [name for name in needed if name not in entry.get("files", {})]
        _need(not missing, f"index layer {key} lacks its {', '.join(missing)} file")


def recorded_model(path: Path) -> str | None:
    """The model file a context's manifest says made it, peeked at without opening the context
    (None when it cannot be read: opening the context says what is wrong)."""
    try:
        source = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))["model"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return source if isinstance(source, str) else None
