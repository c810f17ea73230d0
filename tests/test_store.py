"""The on-disk context: atomic, resumable, validated on open, never unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ra_cli.cli import app
from ra_cli.document import load_document
from ra_cli.errors import RaError
from ra_cli.ingest import IngestOptions, ingest
from ra_cli.model import Fingerprint
from ra_cli.store import ContextStore, partial_path

runner = CliRunner()


class Interrupt:
    """on_progress callback that presses Ctrl-C once `after` tokens are done."""

    def __init__(self, after: int):
        self.after = after

    def __call__(self, done, total, reused, span):
        if done >= self.after and done < total:
            raise KeyboardInterrupt


def test_interrupted_ingest_resumes_and_matches_a_fresh_one(tmp_path, lighthouse_txt, loaded):
    doc = load_document(lighthouse_txt)
    options = IngestOptions(chunk_size=16)
    out = tmp_path / "ctx.idx"
    with pytest.raises(KeyboardInterrupt):
        ingest(loaded, doc, out, options, Interrupt(after=32))
    assert not out.exists() and partial_path(out).is_dir()
    with pytest.raises(RaError, match="ingest did not finish; run `ra ingest` again"):
        ContextStore.open(out)
    resumed = ingest(loaded, doc, out, options)
    assert resumed.reused_tokens == 32 and resumed.prefilled_tokens == resumed.n_tokens - 32
    assert not partial_path(out).exists()
    fresh = ingest(loaded, doc, tmp_path / "fresh.idx", options)
    a, b = ContextStore.open(out), ContextStore.open(fresh.path)
    for layer in (0, 17, 29):
        np.testing.assert_array_equal(a.keys(layer), b.keys(layer))
        np.testing.assert_array_equal(a.values(layer), b.values(layer))
    # what the collector gathered before the interruption built the same graph
    for name in ("index/graph_017.npy", "index/entries_017.npy"):
        assert a.manifest["files"][name]["sha256"] == b.manifest["files"][name]["sha256"]


def test_changed_inputs_restart_instead_of_resuming(tmp_path, lighthouse_txt, loaded):
    out = tmp_path / "ctx.idx"
    with pytest.raises(KeyboardInterrupt):
        ingest(loaded, load_document(lighthouse_txt), out, IngestOptions(chunk_size=16), Interrupt(after=16))
    lighthouse_txt.write_text(lighthouse_txt.read_text() + "A new sentence.\n")
    result = ingest(loaded, load_document(lighthouse_txt), out, IngestOptions(chunk_size=16))
    assert result.reused_tokens == 0


@pytest.fixture
def context(tmp_path, lighthouse_txt, loaded):
    return ingest(loaded, load_document(lighthouse_txt), tmp_path / "ctx.idx", IngestOptions(chunk_size=64)).path


def test_reopen_reads_back_exact_arrays(context, loaded):
    store = ContextStore.open(context, loaded.fingerprint, verify=True)
    manifest = json.loads((context / "manifest.json").read_text())
    assert manifest["format"] == "ra-context" and manifest["format_version"] == 2
    assert set(manifest["files"]) >= {"tokens.npy", "token_pages.npy", "kv/k_000.npy", "kv/v_029.npy"}
    assert store.keys(5).dtype == np.float32 and isinstance(store.keys(5), np.memmap)


def test_other_model_is_refused(context, loaded):
    other = Fingerprint(**{**loaded.fingerprint.as_dict(), "weights_id": "gguf-sha256:0000"})
    with pytest.raises(RaError, match="made by a different model .*differs in weights_id"):
        ContextStore.open(context, other)
    bf16 = Fingerprint(**{**loaded.fingerprint.as_dict(), "dtype": "bfloat16"})
    with pytest.raises(RaError, match="differs in dtype"):
        ContextStore.open(context, bf16)


def rewrite_manifest(context, manifest: dict) -> None:
    from ra_cli.store import manifest_checksum

    manifest["checksum"] = manifest_checksum(manifest)
    (context / "manifest.json").write_text(json.dumps(manifest))


def test_an_edited_manifest_fails_its_checksum(context):
    manifest = json.loads((context / "manifest.json").read_text())
    manifest["document"]["name"] = "other.txt"  # valid, but not what was written
    (context / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RaError, match="manifest.json fails its checksum"):
        ContextStore.open(context)


def test_other_format_version_is_refused(context):
    manifest = json.loads((context / "manifest.json").read_text())
    manifest["format_version"] = 99
    (context / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RaError, match="format version 99 but this ra reads version 2"):
        ContextStore.open(context)


def test_corrupted_and_truncated_files_are_refused(context):
    path = context / "kv" / "k_003.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RaError, match="kv/k_003.npy fails its checksum"):
        ContextStore.open(context)
    path.write_bytes(bytes(data[:-8]))
    with pytest.raises(RaError, match="kv/k_003.npy is .* bytes, expected"):
        ContextStore.open(context)


def test_pickled_array_is_never_loaded(context):
    # An object array can only be stored by pickling; np.load must refuse it, and we must say so.
    tokens = context / "tokens.npy"
    np.save(tokens, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    manifest = json.loads((context / "manifest.json").read_text())
    manifest["files"].pop("tokens.npy")
    rewrite_manifest(context, manifest)  # as a hostile writer would: checksum recomputed
    with pytest.raises(RaError, match="names the token file .* that is not a listed file"):
        ContextStore.open(context)  # a file the manifest does not hash is never read
    from ra_cli.files import file_sha256, sample_sha256

    size = tokens.stat().st_size  # a hostile store that lists its pickle with the right hashes
    manifest["files"]["tokens.npy"] = {"bytes": size, "sha256": file_sha256(tokens), "sample_sha256": sample_sha256(tokens, size)}
    rewrite_manifest(context, manifest)  # as a hostile writer would: checksum recomputed
    with pytest.raises(RaError, match="tokens.npy is not a plain numeric array"):
        ContextStore.open(context)


def test_cli_errors_for_bad_contexts(tmp_path, context, reuse_loaded_model):
    (tmp_path / "plain_dir").mkdir()
    result = runner.invoke(app, ["chat", str(tmp_path / "plain_dir"), "--ask", "hi"])
    assert result.exit_code == 1 and "plain_dir: no documents in this folder (ra reads .pdf" in result.stderr
    assert "and it is not a context made by `ra ingest`" in result.stderr
    manifest = json.loads((context / "manifest.json").read_text())
    manifest["model"]["config_sha256"] = "x"
    rewrite_manifest(context, manifest)  # as a hostile writer would: checksum recomputed
    result = runner.invoke(app, ["chat", str(context), "--ask", "hi"])
    assert result.exit_code == 1 and "made by a different model" in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) <= 3


def test_save_refuses_to_overwrite_a_foreign_directory(tmp_path, lighthouse_txt, reuse_loaded_model):
    target = tmp_path / "mydata"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    result = runner.invoke(app, ["ingest", str(lighthouse_txt), "--save", str(target)])
    assert result.exit_code == 1 and "is not an ra context" in result.stderr
    assert (target / "precious.txt").read_text() == "keep me"


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("mode", ["retrieval", "full"])
def test_a_chat_cache_unmaps_the_kv_it_copied(context, loaded, mode):
    """Once a layer's KV is copied into the cache, the store's map of it is gone: its pages would
    count a second time in the process's resident set. Read again, it maps again."""
    from ra_cli.retrieval.modes import open_cache

    store = ContextStore.open(context, loaded.fingerprint)
    kv_dir = str(context / "kv")

    def mapped() -> list[str]:
        return [line for line in Path("/proc/self/maps").read_text().splitlines() if kv_dir in line]

    assert len(mapped()) >= 2 * len(store.layers)  # every layer's keys and values, mapped on open
    cache = open_cache(loaded, store, mode)
    assert cache.length == store.n_tokens and mapped() == []
    np.testing.assert_array_equal(store.keys(7), np.load(context / "kv" / "k_007.npy"))
    assert mapped()
