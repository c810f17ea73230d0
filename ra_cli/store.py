"""On-disk context store: the prefilled KV of a document, memory-mappable, no pickle anywhere.

Layout of a store directory (spec: docs/store-format.md):

    manifest.json          written last; its presence means "complete"
    tokens.npy             int32 [N]      token ids of the stored prefix
    token_pages.npy        int32 [N]      1-based page per token, 0 for template tokens
    token_lines.npy        int32 [N]      1-based line per token, 0 for template tokens (optional)
    kv/k_LLL.npy, v_LLL.npy               [kv_heads, N, head_dim] per layer (bfloat16 as uint16)
    index/...              attention-aware search indexes (engine/index), listed in the manifest

A store is written into `<OUT>.partial/` with a progress file, so a killed ingest resumes where it
stopped and never leaves anything at `<OUT>` that loads as complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ra_cli.errors import RaError
from ra_cli.files import array_file, file_sha256, sample_sha256, write_json_atomic
from ra_cli.manifest import MANIFEST, validate_manifest

FORMAT_NAME = "ra-context"
FORMAT_VERSION = 2  # 2: one graph per KV head (1: per query head)
PROGRESS = "progress.json"

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def numpy_storage_dtype(dtype_name: str):
    try:
        return _NUMPY_DTYPES[dtype_name]
    except KeyError:
        raise RaError(f"unsupported KV dtype {dtype_name}; use float32, float16 or bfloat16")


def kv_to_numpy(tensor, kv_dtype: str) -> np.ndarray:
    """A KV tensor as the numpy array a store keeps in `kv_dtype` (bfloat16 as its raw uint16 bits)."""
    import torch

    from ra_cli.intrinsics import bf16_bits

    if kv_dtype == "bfloat16":
        return bf16_bits(tensor.detach().to("cpu", torch.bfloat16))
    return tensor.detach().to("cpu").numpy().astype(numpy_storage_dtype(kv_dtype), copy=False)


def kv_to_tensor(array: np.ndarray, kv_dtype: str, device, dtype):
    """Stored (possibly memory-mapped, read-only) KV -> a tensor of its own on `device`."""
    return torch_view(np.array(array, copy=True), kv_dtype).to(device=device, dtype=dtype)


def torch_view(array: np.ndarray, kv_dtype: str):
    """A store's KV array as a torch tensor sharing its memory (bfloat16 from its bits)."""
    import torch

    if kv_dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def widened(array: np.ndarray) -> np.ndarray:
    """A host KV array as float32 (for torch): bf16 bits widened, float32 as it is."""
    return float32_keys(array, "bfloat16") if array.dtype == np.uint16 else array


def float32_keys(keys: np.ndarray, kv_dtype: str) -> np.ndarray:
    """Stored keys [KVH, n, D] as float32 (numba has no half types): a view when already float32."""
    if kv_dtype == "float32":
        return keys
    if kv_dtype == "bfloat16":
        return (np.asarray(keys, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(keys, dtype=np.float32)


@dataclass
class LayerShape:
    kv_heads: int
    head_dim: int
    sliding_window: int | None


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


class StoreWriter:
    """Streams a context into `<out>.partial/`; `publish()` makes it a complete store at `out`."""

    def __init__(self, out: Path, header: dict, tokens: list[int], token_pages: list[int],
                 layers: list[LayerShape], kv_dtype: str, token_lines: list[int] | None = None):
        self.out = Path(out)
        self.dir = partial_path(self.out)
        self.header = json.loads(json.dumps(header))  # as it will read back (tuples become lists)
        self.n_tokens = len(tokens)
        self.layers = layers
        self.kv_dtype = kv_dtype
        self.tokens_done = 0
        self.resumed_from = 0
        self._check_destination()
        storage = numpy_storage_dtype(kv_dtype)
        progress = self._read_progress()
        if progress is not None and progress.get("header") == self.header and self._kv_files_ok(storage):
            self.tokens_done = self.resumed_from = int(progress["tokens_done"])
            mode = "r+"
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            (self.dir / "kv").mkdir(parents=True)
            np.save(self.dir / "tokens.npy", np.asarray(tokens, dtype=np.int32))
            np.save(self.dir / "token_pages.npy", np.asarray(token_pages, dtype=np.int32))
            if token_lines is not None:
                np.save(self.dir / "token_lines.npy", np.asarray(token_lines, dtype=np.int32))
            mode = "w+"
        self.keys, self.values = [], []
        try:
            for index, shape in enumerate(layers):
                full = (shape.kv_heads, self.n_tokens, shape.head_dim) if mode == "w+" else None
                self.keys.append(array_file(self._kv_path("k", index), mode, storage, full))
                self.values.append(array_file(self._kv_path("v", index), mode, storage, full))
        except OSError:
            if mode == "w+":  # nothing done yet: leave the disk as it was, not full of reserved files
                self.keys, self.values = [], []
                shutil.rmtree(self.dir, ignore_errors=True)
            raise
        if mode == "w+":
            self.commit(0)

    def _check_destination(self) -> None:
        if self.out.exists() and not (self.out / MANIFEST).is_file():
            raise RaError(f"{self.out} exists and is not an ra context; choose another --save path or remove it")
        if self.out.exists() and not self.out.is_dir():
            raise RaError(f"{self.out} exists and is a file; choose another --save path")

    def _kv_path(self, kind: str, layer: int) -> Path:
        return self.dir / "kv" / f"{kind}_{layer:03d}.npy"

    def _read_progress(self) -> dict | None:
        try:
            return json.loads((self.dir / PROGRESS).read_text())
        except (OSError, ValueError):
            return None

    def _kv_files_ok(self, storage) -> bool:
        for index, shape in enumerate(self.layers):
            for kind in ("k", "v"):
                try:
                    arr = np.load(self._kv_path(kind, index), mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError):
                    return False
                if arr.shape != (shape.kv_heads, self.n_tokens, shape.head_dim) or arr.dtype != storage:
                    return False
        return True

    def write(self, layer: int, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Store KV [kv_heads, n, head_dim] of tokens start..start+n for one layer."""
        end = start + keys.shape[1]
        self.keys[layer][:, start:end] = keys
        self.values[layer][:, start:end] = values

    def kv_tensors(self, layer: int):
        """The layer's KV files as writable torch views [1, kv_heads, n_tokens, head_dim] (a prefill's cache)."""
        return torch_view(self.keys[layer], self.kv_dtype)[None], torch_view(self.values[layer], self.kv_dtype)[None]

    def commit(self, tokens_done: int) -> None:
        """Record that every layer holds tokens [0, tokens_done): after a crash, resume from there."""
        for array in (*self.keys, *self.values):
            array.flush()
        self.tokens_done = tokens_done
        write_json_atomic(self.dir / PROGRESS, {"header": self.header, "tokens_done": tokens_done,
                                                "updated": time.time()})

    def add_file(self, relative: str) -> Path:
        path = self.dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, extra: dict | None = None) -> Path:
        if self.tokens_done != self.n_tokens:
            raise RuntimeError("publish() before every token was written")
        shutil.rmtree(self.dir / "work", ignore_errors=True)  # build-time scratch, not part of a store
        for array in (*self.keys, *self.values):
            array.flush()
        self.keys.clear()
        self.values.clear()
        files = {}
        for path in sorted(self.dir.rglob("*")):
            if path.is_file() and path.name not in (PROGRESS, MANIFEST):
                relative = path.relative_to(self.dir).as_posix()
                size = path.stat().st_size
                files[relative] = {"bytes": size, "sha256": file_sha256(path), "sample_sha256": sample_sha256(path, size)}
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.header,
            "n_tokens": self.n_tokens,
            "kv_dtype": self.kv_dtype,
            "layers": [{"kv_heads": s.kv_heads, "head_dim": s.head_dim, "sliding_window": s.sliding_window,
                        "keys": f"kv/k_{i:03d}.npy", "values": f"kv/v_{i:03d}.npy"} for i, s in enumerate(self.layers)],
            **(extra or {}),
            "files": files,
        }
        manifest["checksum"] = manifest_checksum(manifest)
        (self.dir / PROGRESS).unlink(missing_ok=True)
        write_json_atomic(self.dir / MANIFEST, manifest)
        old = None
        if self.out.exists():
            old = self.out.with_name(self.out.name + f".old{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.dir, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


class ContextStore:
    """A complete store opened for reading; KV arrays are memory-mapped, never loaded whole."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.n_tokens = int(manifest["n_tokens"])
        self.kv_dtype = manifest["kv_dtype"]
        self.tokens = _load_token_array(path, "tokens.npy", self.n_tokens)
        self.token_pages = _load_token_array(path, "token_pages.npy", self.n_tokens)
        # stores written before line numbers were kept cite pages only
        self.token_lines = (_load_token_array(path, "token_lines.npy", self.n_tokens)
                            if "token_lines.npy" in manifest["files"] else None)
        self.layers = [LayerShape(entry["kv_heads"], entry["head_dim"], entry["sliding_window"]) for entry in manifest["layers"]]
        self._keys = [_load_array(path, entry["keys"], mmap=True) for entry in manifest["layers"]]
        self._values = [_load_array(path, entry["values"], mmap=True) for entry in manifest["layers"]]
        storage = numpy_storage_dtype(self.kv_dtype)
        for index, shape in enumerate(self.layers):
            expected = (shape.kv_heads, self.n_tokens, shape.head_dim)
            for array in (self._keys[index], self._values[index]):
                if array.shape != expected or array.dtype != storage:
                    raise RaError(f"{path}: layer {index} KV has shape {array.shape}, expected {expected}; the store is damaged — ingest again")

    @classmethod
    def open(cls, path: str | Path, fingerprint=None, verify: bool = False) -> "ContextStore":
        """Open a complete store. Everything in it is untrusted input: the manifest is validated
        (types, bounds, contained paths, every file listed) before any value is used, and each
        file is checked by size and a sampled digest — or, with `verify`, its full sha256."""
        path = Path(path)
        if not path.exists():
            if partial_path(path).exists():
                raise RaError(f"{path}: ingest did not finish; run `ra ingest` again with the same arguments to resume")
            raise RaError(f"{path}: no such context; create it with `ra ingest DOCUMENT --save {path}`")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise RaError(f"{path}: not a complete ra context (no manifest.json); ingest again")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise RaError(f"{path}: manifest.json is unreadable ({str(exc)[:80]}); ingest again")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise RaError(f"{path}: not an ra context (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise RaError(
                f"{path}: context format version {manifest.get('format_version')} but this ra reads version "
                f"{FORMAT_VERSION}; ingest the document again"
            )
        if "checksum" in manifest and manifest["checksum"] != manifest_checksum(manifest):
            raise RaError(f"{path}: manifest.json fails its checksum; the context is damaged — ingest again")
        validate_manifest(path, manifest)
        if fingerprint is not None:
            stored = manifest["model"]
            differing = fingerprint.differences(stored)
            if differing:
                raise RaError(
                    f"{path}: made by a different model ({stored.get('source')}, {stored.get('dtype')}; differs in "
                    f"{', '.join(differing)}) than the one loaded ({fingerprint.source}, {fingerprint.dtype}); "
                    "use that model (--model/--dtype) or ingest again"
                )
        _check_files(path, manifest, verify)
        return cls(path, manifest)

    def keys(self, layer: int) -> np.ndarray:
        return self._mapped(self._keys, layer, "keys")

    def values(self, layer: int) -> np.ndarray:
        return self._mapped(self._values, layer, "values")

    def _mapped(self, arrays: list, layer: int, kind: str) -> np.ndarray:
        if arrays[layer] is None:  # released: map it again
            arrays[layer] = _load_array(self.path, self.manifest["layers"][layer][kind], mmap=True)
        return arrays[layer]

    def release(self, layer: int) -> None:
        """Unmap a layer's KV once a chat has copied it out: its pages leave this process's resident
        set (the kernel keeps them as reclaimable file cache) instead of counting a second time
        beside the copy. `keys`/`values` map it again if asked."""
        self._keys[layer] = self._values[layer] = None

    def file(self, relative: str) -> Path:
        return self.path / relative


def _load_array(root: Path, relative: str, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(root / relative, mmap_mode="r" if mmap else None, allow_pickle=False)
    except OSError as exc:
        raise RaError(f"{root}: cannot read {relative} ({exc.strerror or exc})")
    except ValueError as exc:
        # allow_pickle=False: an object array (which needs unpickling) lands here, unloaded.
        raise RaError(f"{root}: {relative} is not a plain numeric array ({str(exc).splitlines()[0][:80]}); ingest again")


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without this field: budgets, ef and file records
    are checked like the files they describe."""
    import hashlib

    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _load_token_array(root: Path, relative: str, n: int) -> np.ndarray:
    array = _load_array(root, relative)
    if array.shape != (n,) or array.dtype != np.int32:
        raise RaError(f"{root}: {relative} holds {array.dtype} {array.shape}, expected int32 ({n},); "
                      "the store is damaged — ingest again")
    return array


def _check_files(path: Path, manifest: dict, verify: bool) -> None:
    for relative, meta in manifest["files"].items():
        file = path / relative
        if not file.is_file():
            raise RaError(f"{path}: missing {relative}; the context is incomplete — ingest again")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise RaError(f"{path}: {relative} is {size} bytes, expected {meta['bytes']}; the context is damaged — ingest again")
        # Hashing every file on every open would read the whole store (GBs at 128K tokens): a
        # digest of sampled blocks catches truncation and most damage in O(1) reads per file;
        # --verify reads everything.
        if verify or "sample_sha256" not in meta:
            if file_sha256(file) != meta["sha256"]:
                raise RaError(f"{path}: {relative} fails its checksum; the context is damaged — ingest again")
        elif sample_sha256(file, size) != meta["sample_sha256"]:
            raise RaError(f"{path}: {relative} fails its checksum; the context is damaged — ingest again")
