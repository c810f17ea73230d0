"""`ra cache` lists what ra keeps in its cache directory; `ra cache clear` removes what is asked
for, never what another process is writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ra_cli.cli import app


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of every kind, in a folder of its own (the shared test cache holds real models)."""
    root = tmp_path / "own-cache"
    monkeypatch.setenv("RA_CACHE_DIR", str(root))
    contexts, models = root / "contexts", root / "models"
    book = contexts / "book-0123456789abcdef.idx"
    book.mkdir(parents=True)
    (book / "manifest.json").write_text(json.dumps({"document": {"name": "book.pdf"}, "n_tokens": 12345,
                                                    "model": {"source": "tiny.gguf"}}))
    (book / "kv.bin").write_bytes(b"k" * 1000)
    (contexts / "book-0123456789abcdef.idx.lock").touch()
    broken = contexts / "half-fedcba9876543210.idx"
    broken.mkdir()
    (broken / "kv.bin").write_bytes(b"k" * 10)
    converted = models / "gguf-abc-v1"
    converted.mkdir(parents=True)
    (converted / "ra-fingerprint.json").write_text(json.dumps({"gguf": "/somewhere/tiny.gguf"}))
    (converted / "model.safetensors").write_bytes(b"w" * 500)
    (models / "packed").mkdir()
    save_file({"w": torch.zeros(4)}, str(models / "packed" / "new.safetensors"),
              metadata={"layout_version": "3", "source": "tiny.gguf", "weights": "bfloat16+int4"})
    save_file({"w": torch.zeros(4)}, str(models / "packed" / "old.safetensors"))
    (models / "packed" / "new.safetensors.tmp999999999").write_bytes(b"x" * 7)  # no such process: a leftover
    (models / "packed" / f"other.safetensors.tmp{os.getpid()}").write_bytes(b"x" * 5)  # a live writer's
    (models / "downloads").mkdir()
    (models / "downloads" / "named.gguf").write_bytes(b"g" * 300)
    return root


def listing():
    result = CliRunner().invoke(app, ["cache", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_cache_is_listed_with_what_each_item_holds_and_its_size(cache):
    found = listing()
    rows = {(item["kind"], item["name"], item["model"]): item["bytes"] for item in found["items"]}
    pack_bytes = (cache / "models" / "packed" / "new.safetensors").stat().st_size
    assert rows == {
        ("context", "book.pdf (12,345 tokens)", "tiny.gguf"): 1000 + len((cache / "contexts" / "book-0123456789abcdef.idx" / "manifest.json").read_bytes()),
        ("context", "half-fedcba9876543210.idx (unfinished or unreadable)", ""): 10,
        ("converted model", "float32 weights", "tiny.gguf"): 500 + len((cache / "models" / "gguf-abc-v1" / "ra-fingerprint.json").read_bytes()),
        ("packed weights", "bfloat16+int4", "tiny.gguf"): pack_bytes,
        ("packed weights", "packed (older layout: unused)", ""): (cache / "models" / "packed" / "old.safetensors").stat().st_size,
        ("fetched model", "GGUF", "named.gguf"): 300,
        ("unfinished write", "new.safetensors.tmp999999999", ""): 7,
        ("unfinished write", f"other.safetensors.tmp{os.getpid()}", ""): 5,
    }
    assert found["bytes"] == sum(rows.values()) and found["root"] == str(cache)
    table = CliRunner().invoke(app, ["cache"], env={"COLUMNS": "200"})
    assert "book.pdf (12,345 tokens)" in table.stdout and "8 item(s)" in table.stdout


def test_clear_removes_only_what_is_asked_for(cache):
    result = CliRunner().invoke(app, ["cache", "clear"])
    assert result.exit_code == 2 and "say what to clear" in result.output
    result = CliRunner().invoke(app, ["cache", "clear", "--contexts", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {item["kind"] for item in report["removed"]} == {"context", "unfinished write"}
    assert [item["name"] for item in report["kept_in_use"]] == [f"other.safetensors.tmp{os.getpid()}"]  # being written
    assert not any((cache / "contexts").iterdir())  # lock files too
    assert {item["kind"] for item in listing()["items"]} == {"converted model", "packed weights", "fetched model",
                                                             "unfinished write"}
    CliRunner().invoke(app, ["cache", "clear", "--models"])
    assert [item["kind"] for item in listing()["items"]] == ["fetched model", "unfinished write"]
    result = CliRunner().invoke(app, ["cache", "clear", "--all"])
    assert result.exit_code == 0 and "removed 1 item(s), 300 B freed" in result.output
    assert [item["kind"] for item in listing()["items"]] == ["unfinished write"]
    assert not (cache / "models" / "downloads" / "named.gguf").exists()
    (cache / "models" / "packed" / f"other.safetensors.tmp{os.getpid()}").unlink()
    result = CliRunner().invoke(app, ["cache"])
    assert result.exit_code == 0 and "ra's cache is empty" in result.stderr and result.stdout == ""


def test_clear_older_than_keeps_what_changed_recently(cache):
    book = cache / "contexts" / "book-0123456789abcdef.idx"
    old = time.time() - 10 * 86400
    for path in (book, *book.iterdir()):
        os.utime(path, (old, old))
    result = CliRunner().invoke(app, ["cache", "clear", "--contexts", "--older-than", "7", "--json"])
    assert [item["name"] for item in json.loads(result.stdout)["removed"]] == ["book.pdf (12,345 tokens)"]
    assert not book.exists() and (cache / "contexts" / "half-fedcba9876543210.idx").exists()


def test_clear_keeps_a_context_another_process_is_writing(cache):
    lock = cache / "contexts" / "book-0123456789abcdef.idx.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"l = FileLock({str(lock)!r}); l.acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, ["cache", "clear", "--contexts", "--json"])
        report = json.loads(result.stdout)
        assert [item["name"] for item in report["kept_in_use"]] == ["book.pdf (12,345 tokens)",
                                                                    f"other.safetensors.tmp{os.getpid()}"]
        assert "another ra process is writing it" in result.stderr
        assert (cache / "contexts" / "book-0123456789abcdef.idx" / "kv.bin").exists()
    finally:
        holder.kill()
