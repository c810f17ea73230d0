"""Chat as people use it: citations grounded in attention, sessions, the REPL's commands (piped
and on a pseudo-terminal), `ra info`."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import REPO
from docx_maker import make_docx, paragraph
from epub_maker import make_epub
from pdf_maker import make_text_pdf
from ra_cli.cli import app

runner = CliRunner()
NEEDLE = "The secret code for project Falcon is red-otter-25."
QUESTION = "What is the secret code for project Falcon?"


def run(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def handbook_paragraphs() -> list[str]:
    return (REPO / "samples" / "ra-handbook.md").read_text().split("\n\n")


@pytest.fixture(scope="module")
def needle_context(tmp_path_factory, loaded):
    """The handbook with the needle at 30% depth, as a text file, ingested once."""
    from ra_cli.document import load_document
    from ra_cli.ingest import ingest

    root = tmp_path_factory.mktemp("needle")
    paragraphs = handbook_paragraphs()
    at = int(len(paragraphs) * 0.3)
    document = root / "needle.md"
    document.write_text("\n\n".join(paragraphs[:at] + [NEEDLE] + paragraphs[at:]))
    ingest(loaded, load_document(document), root / "needle.idx")
    line = document.read_text().splitlines().index(NEEDLE) + 1
    return root / "needle.idx", line


@pytest.mark.parametrize("attention", ["retrieval", "full"])
def test_the_needle_line_is_cited_first(needle_context, attention, reuse_loaded_model):
    context, line = needle_context
    result = run("chat", context, "--ask", QUESTION, "-n", 16, "--attention", attention, "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert "red-otter" in answer["answer"].lower()
    first = answer["sources"][0]
    assert first["line"] <= line <= first["last_line"] and first["share"] > 0.3
    assert sum(source["share"] for source in answer["sources"]) <= 1.0 + 1e-6


def test_the_needle_page_of_a_pdf_is_cited_first(tmp_path, reuse_loaded_model):
    lines = [line for paragraph in handbook_paragraphs() for line in paragraph.splitlines() + [""]]
    pages = [lines[i:i + 40] for i in range(0, 200, 40)]
    pages[1].insert(12, NEEDLE)
    pdf = make_text_pdf(tmp_path / "book.pdf", pages)
    assert run("ingest", pdf, "--save", tmp_path / "book.idx").exit_code == 0
    result = run("chat", tmp_path / "book.idx", "--ask", QUESTION, "-n", 12)
    assert result.exit_code == 0, result.output
    assert "red-otter" in result.stdout.lower()
    cited = re.search(r"sources: p\. (\d+) \((\d+)%\)", result.stderr)
    assert cited and int(cited.group(1)) == 2, result.stderr  # the needle's page, 1-based
    as_json = json.loads(run("chat", tmp_path / "book.idx", "--ask", QUESTION, "-n", 12, "--json").stdout)
    assert as_json["sources"][0]["page"] == 2


@pytest.mark.parametrize("kind", ["epub", "docx"])
def test_the_needle_section_of_an_epub_or_page_of_a_word_file_is_cited_first(tmp_path, kind, reuse_loaded_model):
    """An EPUB's parts are sections cited by number and heading; a Word file saved by Word (page
    marks) is cited by the pages Word showed."""
    paragraphs = handbook_paragraphs()[:24]
    parts = [paragraphs[i * 6:(i + 1) * 6] for i in range(4)]
    parts[2].insert(0, NEEDLE)
    if kind == "epub":
        document = make_epub(tmp_path / "book.epub", [(f"part{i}.xhtml", f"<h1>Part {i + 1}</h1>" + "".join(
            f"<p>{p}</p>" for p in part)) for i, part in enumerate(parts)])
        unit, expected = "section", {"section": 3, "title": "Part 3"}
    else:
        document = make_docx(tmp_path / "book.docx", "".join(
            paragraph(p, page_mark=i > 0 and j == 0) for i, part in enumerate(parts) for j, p in enumerate(part)))
        unit, expected = "page", {"page": 3}
    ingested = run("ingest", document, "--save", tmp_path / "book.idx")
    assert ingested.exit_code == 0 and f"(4 {unit}s)" in ingested.stderr, ingested.output
    result = run("chat", tmp_path / "book.idx", "--ask", QUESTION, "-n", 12, "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert "red-otter" in answer["answer"].lower()
    assert {key: answer["sources"][0][key] for key in expected} == expected, answer["sources"]
    info = run("info", tmp_path / "book.idx")
    assert f"book.{kind} ({kind}, 4 {unit}s," in info.stderr + info.stdout


def test_attention_mass_is_the_exact_softmax_weight_of_each_position():
    """The retrieval kernel's collected weights equal softmax over static + retrieved keys, the
    static sinks included from the mass's first collected position on (as full attention's)."""
    from ra_cli.engine.mass import AttentionMass
    from ra_cli.retrieval.kernels import attend_static_and_retrieved

    rng = np.random.default_rng(0)
    heads, kv_heads, dim, lo, window, indexed = 4, 2, 8, 3, 5, 20
    query = rng.standard_normal((heads, 1, dim)).astype(np.float32)
    static_keys = rng.standard_normal((kv_heads, lo + window, dim)).astype(np.float32)
    static_values = rng.standard_normal((kv_heads, lo + window, dim)).astype(np.float32)
    keys = rng.standard_normal((kv_heads, indexed, dim)).astype(np.float32)
    values = rng.standard_normal((kv_heads, indexed, dim)).astype(np.float32)
    ids = np.stack([rng.permutation(indexed)[:6] for _ in range(heads)]).astype(np.int32)[:, None, :]
    scores = np.einsum("hd,hkd->hk", query[:, 0], keys[np.arange(heads) // 2][np.arange(heads)[:, None], ids[:, 0]])
    sinks = 1  # the first position is not collected; the other static sinks are
    mass = AttentionMass(heads, lo + indexed + window, sinks=sinks)
    out = np.empty((heads, 1, dim), np.float32)
    window_start = lo + indexed
    attend_static_and_retrieved(query, static_keys, static_values, np.array([lo + window]), values, ids,
                                scores[:, None, :].astype(np.float32), np.float32(0.5), out, mass.rows,
                                np.float32(0.0), sinks, lo, window_start)
    for h in range(heads):
        g = h // 2
        logits = np.concatenate([static_keys[g] @ query[h, 0], scores[h]]) * 0.5
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        expected = np.zeros(mass.limit)
        expected[lo + ids[h, 0]] = weights[lo + window:]
        expected[window_start:window_start + window] = weights[lo:lo + window]
        expected[sinks:lo] = weights[sinks:lo]
        np.testing.assert_allclose(mass.rows[h], expected, rtol=1e-5, atol=1e-7)


def test_text_passages_and_pages():
    from ra_cli.citations import Citer

    lines = np.array([0, 0, 0, 0, 1, 1, 2, 4, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0])
    citer = Citer(np.ones_like(lines), lines, "line")
    weights = np.zeros(len(lines))
    weights[[7, 8]] = [3.0, 1.0]  # line 4: the passage that starts after the blank line 3
    weights[5] = 1.0
    weights[2] = 50.0  # a sink / template position: never cited
    found = citer.sources(weights)
    assert [(s.first, s.last, round(s.share, 2)) for s in found] == [(4, 11, 0.8), (1, 2, 0.2)]
    pages = Citer(np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 0]), None, "page")
    weights = np.array([9, 9, 9, 9, 0.5, 0.5, 3, 0, 1, 5.0])
    assert [(s.label(), s.as_json()) for s in pages.sources(weights)] == [
        ("p. 2", {"page": 2, "share": 0.6}), ("p. 1", {"page": 1, "share": 0.2}), ("p. 3", {"page": 3, "share": 0.2})]
    sections = Citer(np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 0]), lines[:10], "section",
                     ["One", "", "A heading far longer than a citation line has room to show in full"])
    assert [(s.label(), s.as_json()) for s in sections.sources(weights)] == [
        ("§2", {"section": 2, "title": "", "share": 0.6}), ("§1 “One”", {"section": 1, "title": "One", "share": 0.2}),
        ("§3 “A heading far longer than a citation line has r…”",
         {"section": 3, "title": "A heading far longer than a citation line has room to show in full", "share": 0.2})]
    garbled = Citer(np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 0]), None, "section", {"not": "a list"})  # a hand-edited manifest
    assert [s.label() for s in garbled.sources(weights)] == ["§2", "§1", "§3"]


def test_piped_repl_commands_sessions_and_resume(needle_context, reuse_loaded_model):
    context, _ = needle_context
    script = (f"{QUESTION}\n/sources\n/set temperature 0.5\n/set top_p 7\n/set\n/stats\n"
              '"""Say\nhello"""\n/regen\n/save falcon\n/save ../x\n/bye\n')
    result = run("chat", context, "-n", 12, input=script)
    assert result.exit_code == 0, result.output
    assert "red-otter" in result.stdout.lower()
    assert re.search(r"\[line \d+, \d+%\] The secret code for project Falcon is red-otter-25\.", result.stderr)
    assert "temperature 0.5" in result.stderr and "top_p must be between" in result.stderr
    assert re.search(r"turns\s+1\n", result.stderr)
    assert "saved 2 turn(s) as 'falcon'" in result.stderr and "bad session name '../x'" in result.stderr
    listed = json.loads(run("sessions", "--json").stdout)["sessions"]
    assert [(s["name"], s["turns"], s["document"]) for s in listed] == [("falcon", 2, "needle.md")]
    saved = json.loads(_session_file("falcon").read_text())
    assert saved["turns"][0]["question"] == QUESTION and saved["turns"][1]["question"] == "Say\nhello"
    # resumed: the saved conversation's tokens are back in the cache, after the document
    resumed = run("chat", "--resume", "falcon", input="/stats\n")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed 'falcon': 2 turn(s)" in resumed.stderr and re.search(r"turns\s+2\n", resumed.stderr)
    tokens = re.search(r"conversation tokens +([\d,]+)\n", resumed.stderr).group(1)
    assert int(tokens.replace(",", "")) == len(saved["transcript"]) > 0
    follow_up = run("chat", "--resume", "falcon", "What did I ask first?", "-n", 6)  # the session names the context
    assert follow_up.exit_code == 0 and follow_up.stdout.strip(), follow_up.output
    assert "resumed 'falcon': 2 turn(s)" in follow_up.stderr
    missing = run("chat", "--resume", "nobody")
    assert missing.exit_code == 1 and "no saved session 'nobody'" in missing.output


def test_a_session_whose_context_was_cleared_reads_its_document_again(tmp_path, reuse_loaded_model):
    """`ra cache clear --contexts` removes the context a saved session of `ra chat notes.txt` talks
    about: resuming reads and ingests the document again, unless it changed or is gone (one line
    each, before any model work)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("The ferry leaves at nine.\nThe bridge opens in June.\n")
    saved = run("chat", notes, "-n", 6, input="When does the ferry leave?\n/save ferry\n/bye\n")
    assert saved.exit_code == 0 and "saved 1 turn(s) as 'ferry'" in saved.stderr, saved.output
    assert json.loads(_session_file("ferry").read_text())["origin"] == str(notes.resolve())
    assert run("cache", "clear", "--contexts").exit_code == 0
    resumed = run("chat", "--resume", "ferry", "And the bridge?", "-n", 6)
    assert resumed.exit_code == 0 and resumed.stdout.strip(), resumed.output
    assert "prefilled" in resumed.stderr and "resumed 'ferry': 1 turn(s)" in resumed.stderr
    assert run("cache", "clear", "--contexts").exit_code == 0
    notes.write_text("The ferry leaves at ten.\n")
    changed = run("chat", "--resume", "ferry", "And the bridge?")
    assert changed.exit_code == 1 and "notes.txt has changed since the conversation was saved" in changed.stderr
    notes.unlink()
    gone = run("chat", "--resume", "ferry", "And the bridge?")
    assert gone.exit_code == 1 and "is gone (cleared from the cache?) and" in gone.stderr
    assert "start a new chat with the document (notes.txt)" in gone.stderr


def _session_file(name: str):
    from ra_cli.sessions import session_path

    return session_path(name)


def test_regen_answers_the_same_question_again(needle_context, reuse_loaded_model):
    context, _ = needle_context
    result = run("chat", context, "-n", 10, input=f"{QUESTION}\n/regen\n/regen\n/stats\n")
    assert result.exit_code == 0, result.output
    answers = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(answers) == 3 and answers[0] == answers[1] == answers[2]  # greedy: the same answer
    assert re.search(r"turns\s+1\n", result.stderr)


def test_info_says_what_a_context_holds(needle_context):
    context, _ = needle_context
    summary = json.loads(run("info", context, "--json").stdout)
    assert summary["document"]["name"] == "needle.md" and summary["tokens"] > 2000
    assert summary["index"]["kind"] == "graph" and summary["index"]["sinks"] == 128
    assert sum(summary["index"]["budget_counts"].values()) + len(summary["index"]["dense_layers"]) == summary["layers"]
    text = run("info", context)
    assert text.exit_code == 0 and "needle.md" in text.stdout and "dense layers" in text.stdout
    characters = len((context.parent / "needle.md").read_text())
    assert f"needle.md (text, {characters:,} characters)" in text.stdout  # a text file's kind said once
    assert summary["verified"]["full_sha256"] is False
    assert json.loads(run("info", context, "--verify", "--json").stdout)["verified"]["full_sha256"] is True
    document = run("info", REPO / "samples" / "ra-handbook.md")
    assert document.exit_code == 1 and "a document, not a saved context" in document.output


pexpect = pytest.importorskip("pexpect")


def spawn_chat(context, *extra):
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", COLUMNS="120")
    # the model the test contexts were made with (the session fixture `loaded`)
    return pexpect.spawn(sys.executable, ["-m", "ra_cli", "chat", str(context), "--dtype", "float32", "--weights", "dense", *extra], env=env, encoding="utf-8",
                         timeout=120, dimensions=(40, 120))


def test_questions_to_a_piped_document_come_from_the_terminal(tmp_path, isolated_cache):
    """`cat notes.txt | ra chat -` spends stdin on the document: the questions are read from the
    terminal (as `less` does); with no terminal at all (a job, CI) it says to use --ask, before
    any model loads."""
    import subprocess

    notes = tmp_path / "notes.txt"
    notes.write_text(NEEDLE + "\n")
    command = [sys.executable, "-m", "ra_cli", "chat", "-", "--dtype", "float32", "--weights", "dense", "-n", "12"]
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", COLUMNS="120")
    chat = pexpect.spawn("bash", ["-c", f"cat {notes} | " + " ".join(command)], env=env, encoding="utf-8",
                         timeout=120, dimensions=(40, 120))
    chat.expect(">>>")
    chat.sendline(QUESTION)
    chat.expect("red-otter")
    chat.expect(">>>")
    chat.sendline("/bye")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    alone = subprocess.run(command, input=notes.read_bytes(), capture_output=True, start_new_session=True, env=env)
    assert alone.returncode == 1 and alone.stdout == b""
    assert alone.stderr.decode().strip() == ("error: the document came through stdin, so the questions cannot: "
                                             "give them with --ask (or give the document's path)")


def test_terminal_multiline_ctrl_c_and_history(needle_context, isolated_cache):
    """On a pseudo-terminal: a \"\"\" message, Ctrl-C stopping a long reply (the chat goes on),
    a second Ctrl-C leaving with 130, and the history file recalled with the up arrow next time."""
    context, _ = needle_context
    chat = spawn_chat(context, "-n", "400", "--temperature", "1.5", "--seed", "1")
    chat.expect(">>>")
    chat.sendline('"""Tell me')
    chat.expect(r"\.\.\.")
    chat.sendline('a long story."""')
    chat.expect("thinking")  # the question is in; Ctrl-C lands in its prefill or in the reply
    time.sleep(2)
    chat.sendintr()
    chat.expect(r"\(stopped\)")
    chat.expect(">>>")
    chat.sendintr()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 130  # left through ra's own exit, not killed by the signal
    history = (isolated_cache / "history").read_text()
    assert '+"""Tell me' in history and '+a long story."""' in history
    again = spawn_chat(context, "-n", "8")
    again.expect(">>>")
    again.send("\x1b[A")  # up arrow: the last message comes back
    again.expect("long story")
    again.sendcontrol("c")
    again.expect(r"Ctrl-C again")
    again.sendline("/bye")
    again.expect(pexpect.EOF)
    again.close()
    assert again.exitstatus == 0


def test_a_long_prefill_logs_plain_progress_lines_when_stderr_is_not_a_terminal(monkeypatch):
    """In a log file no bar is drawn, so a 10-minute ingest would say nothing until it ended:
    a plain line every LOG_SECONDS instead (none on a terminal, where the bar shows it)."""
    import io

    from rich.console import Console

    from ra_cli import ui

    for terminal, expected in ((False, 2), (True, 0)):
        log = io.StringIO()
        monkeypatch.setattr(ui, "stderr", Console(file=log, force_terminal=terminal, width=200))
        clock = iter([0.0, 10.0, 31.0, 45.0, 62.0, 70.0])
        bar = ui.TokenProgress()
        bar._clock = lambda: next(clock)
        with bar:
            for done in (0, 1000, 3100, 4500, 6200, 7000):
                bar(done, 7000, 0)
        lines = [line for line in log.getvalue().splitlines() if line.startswith("prefill:")]
        assert len(lines) == expected, log.getvalue()
        if expected:
            assert lines[0] == "prefill: 3,100/7,000 tokens (44%), 100 tok/s, about 39 s left"
            assert lines[1] == "prefill: 6,200/7,000 tokens (89%), 100 tok/s, about 8 s left"


def test_the_time_left_of_a_prefill_allows_for_tokens_getting_dearer_as_it_goes():
    """A full prefill's token at position p attends to p earlier keys: a constant rate promised the
    end of a long ingest several times too soon. The estimate fits a cost growing with the keys attended (up to a sparse prefill's span, then
    constant), leaving out the first chunk's kernel compiling."""
    from ra_cli.ui import prefill_seconds_left

    def seconds(done, a, b, span=None):  # time to prefill tokens [0, done) at a + b * keys attended each
        return a * done + b * sum(min(position, span or position) for position in range(done))

    for a, b, span in ((1e-3, 1e-6, None), (1e-2, 0.0, None), (0.0, 2e-6, None), (1e-3, 1e-6, 9344)):
        samples = [(0.0, 0)] + [(5.0 + seconds(done, a, b, span), done) for done in range(1024, 16384, 1024)]
        for seen in range(4, len(samples) + 1):
            done = samples[seen - 1][1]
            assert prefill_seconds_left(samples[:seen], 42_000, span) == pytest.approx(
                seconds(42_000, a, b, span) - seconds(done, a, b, span), rel=2e-3)
    assert prefill_seconds_left([(0.0, 0)], 25_000) is None
    assert prefill_seconds_left([(0.0, 0), (10.0, 1000)], 25_000) == pytest.approx(240.0)
    # a sparse prefill's tokens stop getting dearer at its span: a fit that did not know would
    # promise 42K tokens far too late, seen before the span is reached
    sparse = [(0.0, 0)] + [(5.0 + seconds(done, 1e-3, 1e-6, 9344), done) for done in range(1024, 8192, 1024)]
    assert prefill_seconds_left(sparse, 42_000) > 1.5 * prefill_seconds_left(sparse, 42_000, 9344)
