"""What ra keeps in its cache directory, and removing it.

`ra chat DOCUMENT` saves each document's context in the cache (a 128K-token book is ~4 GB), and
every model is converted once and its weights packed for the CPU (hundreds of MB to GB each).
Nothing there is removed by itself; `ra cache` lists it and `ra cache clear` removes what a user
chooses. Contexts a user saved with `ra ingest --save` live where they put them and are never
touched; fetched models are removed only when asked for by name of their category (fetching
again needs the network).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ra_cli.files import lock_file, try_exclusive
from ra_cli.paths import contexts_dir, models_dir

CONTEXT = "context"
CONVERTED = "converted model"
PACKED = "packed weights"
DOWNLOAD = "fetched model"
LEFTOVER = "unfinished write"  # a staging file or folder left by a process that was killed
KINDS = (CONTEXT, CONVERTED, PACKED, DOWNLOAD, LEFTOVER)


@dataclass
class Cached:
    kind: str
    name: str  # what it holds, for a person
    model: str  # the model it belongs to ("" when none)
    path: Path
    bytes: int
    modified: float  # seconds since the epoch

    def as_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def cached_items() -> list[Cached]:
    """Everything in the cache directory that ra made: contexts, then models, newest first within a kind."""
    items = []
    for path in _entries(contexts_dir(), "*.idx"):
        items.append(_item(CONTEXT, *_context_names(path), path))
    for path in _entries(models_dir(), "gguf-*"):
        if path.is_dir() and ".tmp" not in path.name:
            items.append(_item(CONVERTED, "float32 weights", _converted_model(path), path))
    for path in _entries(models_dir() / "packed", "*.safetensors"):
        items.append(_item(PACKED, *_pack_names(path), path))
    for path in _entries(models_dir() / "downloads", "*.gguf"):
        items.append(_item(DOWNLOAD, "GGUF", path.name, path))
    for folder in (contexts_dir(), models_dir(), models_dir() / "packed", models_dir() / "downloads"):
        for path in _entries(folder, "*.tmp*"):
            items.append(_item(LEFTOVER, path.name, "", path))
    return sorted(items, key=lambda item: (KINDS.index(item.kind), -item.modified))


def remove(items: list[Cached]) -> tuple[list[Cached], list[Cached]]:
    """Delete `items`; returns (removed, in use). An item another ra process is writing (its lock
    is held) is left alone."""
    removed, busy = [], []
    for item in items:
        if item.kind == LEFTOVER and _writer_alive(item.path):
            busy.append(item)
            continue
        with try_exclusive(item.path) as held:
            if not held:
                busy.append(item)
                continue
            if item.path.is_dir():
                shutil.rmtree(item.path, ignore_errors=True)
            else:
                item.path.unlink(missing_ok=True)
        lock_file(item.path).unlink(missing_ok=True)  # an empty file; a lock dies with its process
        removed.append(item)
    return removed, busy


def older_than(items: list[Cached], days: float) -> list[Cached]:
    cutoff = time.time() - days * 86400
    return [item for item in items if item.modified < cutoff]


def _entries(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def _writer_alive(path: Path) -> bool:
    """Whether the process that is writing a staging file (NAME.tmpPID: ra's writers put their
    process id there) still runs: then the file is a write in progress, not a leftover."""
    pid = path.name.rpartition(".tmp")[2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, under another user
    return True


def _item(kind: str, name: str, model: str, path: Path) -> Cached:
    files = [path] if path.is_file() else [Path(folder) / name for folder, _, names in os.walk(path) for name in names]
    size, newest = 0, path.stat().st_mtime
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            continue
        size += stat.st_size
        newest = max(newest, stat.st_mtime)
    return Cached(kind, name, model, path, size, newest)


def _context_names(path: Path) -> tuple[str, str]:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        return f"{manifest['document']['name']} ({int(manifest['n_tokens']):,} tokens)", str(manifest["model"]["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path.name} (unfinished or unreadable)", ""


def _converted_model(path: Path) -> str:
    try:
        return Path(json.loads((path / "ra-fingerprint.json").read_text())["gguf"]).name
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path.name} (unfinished or unreadable)"


def _pack_names(path: Path) -> tuple[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as packed:
            metadata = packed.metadata() or {}
    except (SafetensorError, OSError):
        return f"{path.name} (unreadable)", ""
    layout = "" if metadata.get("layout_version") else " (older layout: unused)"
    return metadata.get("weights", "packed") + layout, metadata.get("source", "")
