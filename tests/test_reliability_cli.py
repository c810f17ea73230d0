"""Reliability at the command line (docs/reliability.md): odd names, locked and read-only places,
full disks, empty and huge questions, closed stdin, concurrent writers, Ctrl-C in --ask."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from conftest import LIGHTHOUSE
from ra_cli.cli import app
from ra_cli.errors import explain

runner = CliRunner()


def run(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("name", ["notes[draft].txt", "a[/x].txt", "[bold]x[/bold].md", "ünï cødé.txt", "-dash.txt"])
def test_odd_file_names_print_as_they_are(tmp_path, name, reuse_loaded_model):
    path = tmp_path / name  # "a[/x].txt": a file "x].txt" in a directory "a[" — Rich markup if unescaped
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")  # empty: the error names the file
    one_line_error(run("ingest", "--save", tmp_path / "x.idx", "--", path), 1, name, "empty")


def test_a_context_name_with_brackets_chats(tmp_path, lighthouse_txt, reuse_loaded_model):
    context = tmp_path / "book[v2].idx"
    assert run("ingest", lighthouse_txt, "--save", context).exit_code == 0
    result = run("chat", context, "--ask", "Who built it?", "-n", 4)
    assert result.exit_code == 0 and "book[v2].idx" in result.stderr


def test_empty_question_is_one_line_and_the_chat_goes_on(tmp_path, lighthouse_txt, reuse_loaded_model):
    one_line_error(run("chat", lighthouse_txt, "--ask", "   "), 1, "the question is empty")
    result = run("chat", lighthouse_txt, "-n", 3, input="   \n/set temperature -1\nWho built it?\n")
    assert result.exit_code == 0 and result.stdout.strip()


def test_a_question_longer_than_the_document_is_answered(tmp_path, lighthouse_txt, reuse_loaded_model):
    result = run("chat", lighthouse_txt, "--ask", "Why? " * 2000, "-n", 2, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt_tokens"] > 2000


def test_closed_stdin_ends_the_chat_cleanly(tmp_path, lighthouse_txt, reuse_loaded_model):
    result = run("chat", lighthouse_txt, input=None)
    assert result.exit_code == 0 and result.stdout == ""


def test_failures_inside_the_chat_do_not_end_it(tmp_path, lighthouse_txt, reuse_loaded_model, monkeypatch):
    from ra_cli.chat import ChatSession

    real = ChatSession.ask
    calls = []

    def flaky(self, question, *args, **kwargs):
        calls.append(question)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", "/cache/x")
        return real(self, question, *args, **kwargs)

    monkeypatch.setattr(ChatSession, "ask", flaky)
    result = run("chat", lighthouse_txt, "-n", 3, input="first\nsecond\n")
    assert result.exit_code == 0 and "no space left on the disk (/cache/x)" in result.stderr
    assert len(calls) == 2 and result.stdout.strip()


def test_ctrl_c_during_a_scripted_answer_exits_130_and_stops(tmp_path, lighthouse_txt, reuse_loaded_model, monkeypatch):
    from ra_cli.engine import generate

    real = generate.prefill
    steps = []

    def interrupted(model, cache, tokens, want_logits=True, **options):
        steps.append(len(tokens))
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real(model, cache, tokens, want_logits, **options)

    monkeypatch.setattr(generate, "prefill", interrupted)
    result = run("chat", lighthouse_txt, "--ask", "Who built it?", "--ask", "When?", "-n", 20)
    one_line_error(result, 130, "interrupted")
    assert len(steps) == 3  # the second question was never asked


@pytest.mark.parametrize("errno_, words", [(errno.ENOSPC, "no space left on the disk"), (errno.EACCES, "permission denied"),
                                          (errno.EROFS, "read-only file system"), (errno.EMFILE, "Too many open files")])
def test_os_errors_are_explained(errno_, words):
    message, code = explain(OSError(errno_, os.strerror(errno_), "/some/file"))
    assert words in message and "/some/file" in message and code == 1


def test_a_full_disk_is_one_line_and_leaves_the_disk_as_it_was(tmp_path, lighthouse_txt, reuse_loaded_model, monkeypatch):
    """numpy writes a .npy memory map as a sparse file, and a map writing into a page the disk has
    no room for kills the process (SIGBUS, "Bus error"); ra reserves the blocks first."""
    def full(descriptor, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    out = tmp_path / "ctx.idx"
    result = run("ingest", lighthouse_txt, "--save", out)
    one_line_error(result, 1, "no space left on the disk")
    assert "k_000.npy" in result.stderr and "free some space" in result.stderr
    assert not out.exists() and not (tmp_path / "ctx.idx.partial").exists()  # nothing left holding the disk


def test_a_disk_full_at_the_index_build_keeps_the_prefill_for_the_rerun(tmp_path, lighthouse_txt, reuse_loaded_model,
                                                                        monkeypatch):
    from ra_cli import ingest as ingest_module
    from ra_cli.store import ContextStore

    build = ingest_module.build_store_indexes

    def short_write(*args, **kwargs):  # numpy's np.save onto a full disk: an OSError without errno
        raise OSError("416160 requested and 116672 written")

    monkeypatch.setattr(ingest_module, "build_store_indexes", short_write)
    out = tmp_path / "ctx.idx"
    one_line_error(run("ingest", lighthouse_txt, "--save", out), 1, "disk is probably full", "free some space")
    assert not out.exists() and (tmp_path / "ctx.idx.partial").is_dir()
    monkeypatch.setattr(ingest_module, "build_store_indexes", build)
    rerun = run("ingest", lighthouse_txt, "--save", out)
    said = " ".join(rerun.stderr.split())  # as one line, however the console wrapped it
    assert rerun.exit_code == 0 and "the prefill was already done" in said and "index built in" in said
    assert ContextStore.open(out).manifest["ingest"]["prefilled_tokens"] == 0
    again = run("ingest", lighthouse_txt, "--save", out)
    assert again.exit_code == 0 and "nothing to do" in " ".join(again.stderr.split())


def test_memory_and_device_errors_are_explained():
    assert "out of memory" in explain(MemoryError())[0]
    assert "accelerator ran out of memory" in explain(RuntimeError("CUDA out of memory. Tried to allocate"))[0]
    message, code = explain(ValueError("boom"))
    assert "bug in ra" in message and "RA_DEBUG=1" in message and code == 1


def test_read_only_cache_is_one_line(tmp_path, lighthouse_txt, reuse_loaded_model, monkeypatch):
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o500)
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses even root
        cache = "/sys/ra-cache-test"
    monkeypatch.setenv("RA_CACHE_DIR", str(cache))
    result = run("chat", lighthouse_txt, "--ask", "hi")
    one_line_error(result, 1, str(cache))
    assert "permission denied" in result.stderr or "read-only file system" in result.stderr  # sysfs may be mounted ro


def test_a_resumed_work_file_of_the_wrong_shape_is_refused(tmp_path, lighthouse_txt, loaded):
    from ra_cli.document import load_document
    from ra_cli.errors import RaError
    from ra_cli.index import IndexParams
    from ra_cli.ingest import IngestOptions, ingest
    from ra_cli.store import partial_path

    options = IngestOptions(chunk_size=16, index=IndexParams(kind="graph", sinks=8, window=16))
    out = tmp_path / "c.idx"

    def interrupt(done, total, reused, span):
        if 32 <= done < total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(loaded, load_document(lighthouse_txt), out, options, interrupt)
    work = sorted((partial_path(out) / "work").glob("lists_*.npy"))[0]
    import numpy as np

    np.save(work, np.zeros((2, 3), np.int32))
    with pytest.raises(RaError, match="work file does not match it; remove"):
        ingest(loaded, load_document(lighthouse_txt), out, options)


def test_unwritable_save_path_is_one_line(tmp_path, lighthouse_txt, reuse_loaded_model):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(run("ingest", lighthouse_txt, "--save", blocker / "sub" / "x.idx"), 1)


def test_a_second_writer_waits_for_the_first_and_reuses_its_work(tmp_path, isolated_cache):
    """Two processes ingest one document into one place: the second says it waits, then finds
    the store complete and prefills nothing."""
    document = tmp_path / "doc.txt"
    document.write_text(LIGHTHOUSE * 30)
    command = [sys.executable, "-m", "ra_cli", "ingest", str(document), "--save", str(tmp_path / "c.idx"),
               "--dtype", "float32", "--weights", "dense", "--chunk-size", "64", "--json"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "c.idx.lock"
    deadline = time.time() + 60
    while not (tmp_path / "c.idx.partial").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert "another ra process is writing c.idx; waiting" in second.stderr
    assert json.loads(second.stdout)["prefilled_tokens"] == 0 and json.loads(out)["prefilled_tokens"] > 0
    assert lock.exists()  # an OS lock: nothing stale to clean after a kill (flock dies with its holder)


def test_bench_rejects_options_of_another_mode():
    result = run("bench", "--decode-step", "--modes", "full")
    assert result.exit_code == 2 and "--modes" in result.output
