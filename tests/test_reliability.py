"""Reliability (docs/reliability.md): hostile and damaged stores, killed ingests, sizes that change
types (>= 65,535 keys: int32 graphs; >= 64 MiB KV files)."""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from ra_cli.errors import RaError
from ra_cli.index import IndexParams
from ra_cli.store import ContextStore

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, loaded):
    """A real ~700-token context with a graph index (bf16 KV: every file under 1 MiB, so the
    sampled digests cover each one whole)."""
    from ra_cli.document import load_document
    from ra_cli.ingest import IngestOptions, ingest

    root = tmp_path_factory.mktemp("fuzz")
    text = (REPO / "samples" / "ra-handbook.md").read_text()[:3000]
    (root / "doc.md").write_text(text)
    ingest(loaded, load_document(root / "doc.md"), root / "ctx.idx",
           IngestOptions(chunk_size=256, kv_dtype="bfloat16", index=IndexParams(kind="graph", sinks=16, window=64)))
    return root / "ctx.idx"


def _snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _restore(path, snapshot):
    for relative, data in snapshot.items():
        (path / relative).write_bytes(data)


def _load_everything(loaded, path):
    from ra_cli.retrieval.modes import open_cache

    store = ContextStore.open(path, loaded.fingerprint)
    open_cache(loaded, store, "retrieval")  # every layer's index file read and checked
    return store


def _without_checksum(manifest_bytes: bytes):
    manifest = json.loads(manifest_bytes)
    manifest.pop("checksum", None)
    return manifest


@FUZZ
@given(data=st.data())
def test_fuzzed_stores_fail_cleanly_or_load_identically(small_store, loaded, data):
    """Byte flips, truncations, extensions anywhere, or any manifest field replaced or dropped:
    a one-line RaError, or — only when nothing that matters changed — the same store."""
    original = _snapshot(small_store)
    relative = data.draw(st.sampled_from(sorted(original)))
    blob = bytearray(original[relative])
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "field"] if relative == "manifest.json"
                                     else ["flip", "truncate", "extend"]))
    if kind == "flip":
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "extend":
        blob += bytes(data.draw(st.binary(min_size=1, max_size=64)))
    else:
        manifest = json.loads(blob)
        paths = list(_leaf_paths(manifest))
        path = data.draw(st.sampled_from(paths))
        target = manifest
        for key in path[:-1]:
            target = target[key]
        if data.draw(st.booleans()):
            target[path[-1]] = data.draw(st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63),
                                                   st.floats(allow_nan=True), st.text(max_size=20),
                                                   st.lists(st.integers(-5, 5), max_size=3)))
        elif isinstance(target, dict):
            del target[path[-1]]
        blob = bytearray(json.dumps(manifest).encode())
    (small_store / relative).write_bytes(bytes(blob))
    try:
        _load_everything(loaded, small_store)
        loaded_fine = True
    except RaError:
        loaded_fine = False
    finally:
        current = _snapshot(small_store)
        _restore(small_store, original)
        gc.collect()
    if loaded_fine:
        for name, content in original.items():
            if name == "manifest.json":
                assert _without_checksum(current[name]) == _without_checksum(content)
            else:
                assert current[name] == content, f"{relative} {kind}: a changed {name} loaded silently"


def _leaf_paths(value, prefix=()):
    if isinstance(value, dict):
        for key, item in value.items():
            yield prefix + (key,)
            yield from _leaf_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value[:4]):
            yield prefix + (i,)
            yield from _leaf_paths(item, prefix + (i,))


_OPENED = {}


def opened(path) -> ContextStore:
    """One open store per path: each open maps every KV file (a file descriptor each)."""
    if path not in _OPENED:
        _OPENED[path] = ContextStore.open(path)
    return _OPENED[path]


@FUZZ
@given(data=st.data())
def test_fuzzed_graph_files_behind_the_digests_are_rejected_or_in_range(small_store, loaded, data):
    """The graph reader's own checks (the digests bypassed: files changed after the store was
    opened): a clean error, or ids that all lie inside the layer."""
    from ra_cli.index import open_layer_index

    original = _snapshot(small_store)
    store = opened(small_store)
    graphs = sorted(name for name in original if name.startswith("index/"))
    relative = data.draw(st.sampled_from(graphs))
    array = np.load(small_store / relative, allow_pickle=False)
    flat = array.reshape(-1).copy()
    if flat.size:
        at = data.draw(st.integers(0, flat.size - 1))
        value = data.draw(st.sampled_from([-2, -1, 0, 1, 65534, 65535, 2**31 - 1, int(store.n_tokens)])) \
            if flat.dtype.kind in "iu" else data.draw(st.floats(width=32))
        flat[at] = np.array(value).astype(flat.dtype)  # wrapped into the file's own type
    np.save(small_store / relative, flat.astype(array.dtype, copy=False).reshape(array.shape)
            if data.draw(st.booleans()) else flat[: max(0, flat.size - 1)])
    layer = int(relative.split("_")[-1].split(".")[0])
    try:
        index = open_layer_index(store, layer)
        graph = index.layer
        n = index.n
        adjacency = graph.adjacency.astype(np.int64)
        assert ((adjacency == 65535) | (adjacency == -1) | ((adjacency >= 0) & (adjacency < n))).all()
        assert ((graph.entries >= -1) & (graph.entries < n)).all()
    except RaError:
        pass
    finally:
        _restore(small_store, original)
        gc.collect()  # the memory maps of this example's store: file descriptors


@FUZZ
@given(data=st.data())
def test_fuzzed_hnswlib_files_are_rejected_or_in_range(tmp_path_factory, data):
    """The hnswlib file parser sizes nothing from an unchecked header value and hands numba no id
    outside the graph."""
    from ra_cli.index.hnsw import build_hnsw_file, parse_hnsw_file

    root = tmp_path_factory.getbasetemp() / "hnsw-fuzz"
    root.mkdir(exist_ok=True)
    source = root / "h.bin"
    if not source.exists():
        keys = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
        build_hnsw_file(keys, source, IndexParams(kind="hnsw", hnsw_m=4))
    blob = bytearray(source.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    damaged = root / "damaged.bin"
    damaged.write_bytes(bytes(blob))
    try:
        parsed = parse_hnsw_file(damaged, 8)
    except RaError:
        return
    n = parsed.base_links.shape[0]
    assert ((parsed.base_links >= -1) & (parsed.base_links < n)).all()
    assert ((parsed.upper_links >= -1) & (parsed.upper_links < n)).all()
    assert 0 <= parsed.entry_point < max(n, 1) and (parsed.upper_rows < len(parsed.upper_links)).all()


def _manifest_without_timings(path):
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "seconds" not in k and k not in ("created", "checksum", "prefilled_tokens")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads((path / "manifest.json").read_text()))


def _tokens_done(progress) -> int:
    try:
        return json.loads(progress.read_text())["tokens_done"]
    except (OSError, ValueError, KeyError):
        return 0


def test_kill_9_at_random_points_then_resume_equals_an_uninterrupted_ingest(tmp_path, loaded):
    """An ingest process killed with SIGKILL at random moments, then run to the end, leaves a
    store bit for bit equal to one ingest that was never interrupted (timings aside)."""
    from ra_cli.document import load_document
    from ra_cli.ingest import IngestOptions, ingest

    document = tmp_path / "doc.md"
    document.write_text((REPO / "samples" / "ra-handbook.md").read_text()[:4000])
    options = ["--chunk-size", "16", "--sinks", "16", "--window", "64", "--dtype", "float32", "--weights", "dense"]
    command = [sys.executable, "-m", "ra_cli", "ingest", str(document), "--save", str(tmp_path / "killed.idx"), *options]
    rng = np.random.default_rng(9)
    progress = tmp_path / "killed.idx.partial" / "progress.json"
    kills = 0
    for target in sorted(rng.integers(64, 500, size=4)):  # tokens done (of ~900) when the kill comes (+ up to 0.3 s)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and _tokens_done(progress) < target:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 0.3)))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        assert not (tmp_path / "killed.idx").exists() or (tmp_path / "killed.idx" / "manifest.json").is_file()
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert kills == 4
    reference = tmp_path / "reference.idx"
    ingest(loaded, load_document(document), reference,
           IngestOptions(chunk_size=16, index=IndexParams(kind="graph", sinks=16, window=64)))
    killed = tmp_path / "killed.idx"
    names = sorted(p.relative_to(reference).as_posix() for p in reference.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(killed).as_posix() for p in killed.rglob("*") if p.is_file())
    for name in names:
        if name != "manifest.json":
            assert (killed / name).read_bytes() == (reference / name).read_bytes(), name
    ours, theirs = _manifest_without_timings(killed), _manifest_without_timings(reference)
    for layer, entry in theirs["index"]["layers"].items():
        assert ours["index"]["layers"][layer] == entry, layer
    assert ours == theirs


def test_graphs_of_65535_keys_and_more_use_int32_ids_and_stay_exact():
    """At 65,535 keys uint16 ids run out (65535 marks "none"): the graph switches to int32 and
    search still finds keys past the boundary exactly when the beam covers everything."""
    from ra_cli.index.flat import FlatLayerIndex
    from ra_cli.index.graph import GraphLayerIndex, build_graph_layer

    rng = np.random.default_rng(0)
    n, dim, heads = 65_600, 8, 1
    keys = rng.standard_normal((1, n, dim)).astype(np.float32)
    keys[0, 65_540:] += 4.0  # the best keys of every query lie past the uint16 range
    queries = (rng.standard_normal((heads, 64, dim)) * 0.1 + 1.0).astype(np.float32)
    params = IndexParams(list_size=16, clusters=4, degree=8, knn=2, query_stride=1)
    lists = FlatLayerIndex(keys).search(queries, params.list_size).ids
    knn = np.full((1, n, params.knn), -1, np.int32)
    knn[0, 1:, 0] = np.arange(n - 1)
    knn[0, 2:, 1] = np.arange(n - 2)
    layer = build_graph_layer(lists, queries.astype(np.float16), knn, np.zeros(64, bool), keys, params=params)
    assert layer.adjacency.dtype == np.int32 and int(layer.adjacency.max()) >= 65_535
    exact = FlatLayerIndex(keys).search(queries[:, :8], 10)
    assert (exact.ids >= 65_535).all()
    found = GraphLayerIndex(layer, keys, params).search(queries[:, :8], 10, ef=n)
    np.testing.assert_array_equal(found.ids, exact.ids)


def test_kv_files_of_64_mib_and_more_round_trip_and_are_checked(tmp_path, loaded):
    """A 64 MiB+ KV file is written in pieces, memory-mapped back exactly, its damage found by
    size (truncation) or by the full checksum of --verify, and opening it reads O(1) of it."""
    from ra_cli.ingest import store_header
    from ra_cli.ingest import IngestOptions
    from ra_cli.document import Document
    from ra_cli.prompt import layout_for
    from ra_cli.store import LayerShape, StoreWriter

    n, kv_heads, dim = 16_448, 8, 128  # 8 x 16,448 x 128 float32 = 64.25 MiB per file
    document = Document("big.txt", "0" * 64, "text", "x")
    header = store_header(loaded, document, IngestOptions(kv_dtype="float32"), layout_for(loaded.tokenizer).as_dict())
    header["model_shape"] = {"layers": 1, "heads": kv_heads, "kv_heads": kv_heads, "head_dim": dim}
    writer = StoreWriter(tmp_path / "big.idx", header, [1] * n, [1] * n, [LayerShape(kv_heads, dim, None)], "float32")
    rng = np.random.default_rng(0)
    blocks = []
    for start in range(0, n, 4096):
        block = rng.standard_normal((2, kv_heads, min(4096, n - start), dim)).astype(np.float32)
        writer.write(0, start, block[0], block[1])
        blocks.append(block)
        writer.commit(start + block.shape[2])
    path = writer.publish()
    assert (path / "kv/k_000.npy").stat().st_size >= 64 << 20
    store = ContextStore.open(path)
    np.testing.assert_array_equal(np.asarray(store.keys(0)), np.concatenate([b[0] for b in blocks], axis=1))
    np.testing.assert_array_equal(np.asarray(store.values(0)[:, -5:]), blocks[-1][1][:, -5:])
    del store
    target = path / "kv/v_000.npy"
    data = bytearray(target.read_bytes())
    data[len(data) // 2 + 12345] ^= 1  # between the sampled blocks
    target.write_bytes(bytes(data))
    with pytest.raises(RaError, match="v_000.npy fails its checksum"):
        ContextStore.open(path, verify=True)
    target.write_bytes(bytes(data[:-4096]))
    with pytest.raises(RaError, match="v_000.npy is .* bytes, expected"):
        ContextStore.open(path)
