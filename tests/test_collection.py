"""Several documents as one context: a folder or a list of files read in natural order, each
document's own pages, sections and lines cited by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from docx_maker import make_docx, paragraph
from pdf_maker import make_text_pdf
from ra_cli.cli import app
from ra_cli.collection import load_collection
from ra_cli.errors import RaError

runner = CliRunner()
NEEDLE = "The secret code for project Falcon is red-otter-25."
QUESTION = "What is the secret code for project Falcon?"


def folder(tmp_path):
    root = tmp_path / "deal"
    (root / "annex").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "notes.txt").write_text("hidden folder: not a document")
    (root / ".draft.txt").write_text("hidden file: not a document")
    (root / "photo.png").write_bytes(b"\x89PNG not a document type ra reads")
    make_text_pdf(root / "contract.pdf", [["The contract, page one."], ["Page two of the contract."]])
    make_docx(root / "annex" / "annex10.docx", paragraph("Prices", "berschrift1") + paragraph("Ten euros."))
    (root / "annex" / "annex2.txt").write_text("Annex two, line one.\nLine two.\n")
    return root


def test_a_folder_is_its_documents_in_natural_order_each_with_its_pages(tmp_path):
    doc = load_collection([folder(tmp_path)])
    assert doc.kind == "collection" and doc.name == "deal/" and doc.unit == "page"
    assert [(p["name"], p["kind"], p["unit"], p["first_page"], p["pages"]) for p in doc.parts] == [
        ("annex/annex2.txt", "text", "line", 1, 1), ("annex/annex10.docx", "docx", "section", 2, 1),
        ("contract.pdf", "pdf", "page", 3, 2)]
    assert doc.parts[1]["sections"] == ["Prices"]
    pages = [doc.text[p.char_start:p.char_end] for p in doc.pages]
    assert pages == ["File: annex/annex2.txt\n\nAnnex two, line one.\nLine two.\n",
                     "File: annex/annex10.docx\n\nPrices\n\nTen euros.", "File: contract.pdf\n\nThe contract, page one.",
                     "Page two of the contract."]
    lines = doc.text.split("\n")  # each part's first line is where its own text starts
    assert [lines[p["first_line"] - 1] for p in doc.parts] == ["Annex two, line one.", "Prices", "The contract, page one."]


def test_folders_given_together_keep_their_names_apart(tmp_path):
    for name in ("2024", "2025"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.txt").write_text(f"The {name} report.")
    doc = load_collection([tmp_path / "2025", tmp_path / "2024"])
    assert doc.name == "2025 + 1 more" and [p["name"] for p in doc.parts] == ["2025/report.txt", "2024/report.txt"]


def test_what_a_collection_is_made_of_changes_its_identity(tmp_path):
    root = folder(tmp_path)
    first = load_collection([root]).sha256
    assert load_collection([root]).sha256 == first
    (root / "annex" / "annex2.txt").write_text("Annex two, amended.\n")
    amended = load_collection([root]).sha256
    (root / "annex" / "annex2.txt").rename(root / "annex" / "annex3.txt")
    assert len({first, amended, load_collection([root]).sha256}) == 3


def test_a_folder_of_code_takes_its_sources_but_not_installed_or_generated_ones(tmp_path):
    root = tmp_path / "project"
    for folder_of_tools in ("node_modules/left-pad", "__pycache__", "venv"):
        (root / folder_of_tools).mkdir(parents=True)
        (root / folder_of_tools / "index.js").write_text("module.exports = 1\n")
    (root / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / "src").mkdir()
    (root / "src" / "main.py").write_text("print('hello')\n")
    (root / "src" / "util.rs").write_text("fn main() {}\n")
    (root / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    (root / "data.json").write_text("{}\n")  # data, not code: not taken from a folder
    (root / "README.md").write_text("# Demo\n")
    doc = load_collection([root])
    assert [p["name"] for p in doc.parts] == ["pyproject.toml", "README.md", "src/main.py", "src/util.rs"]
    assert "File: src/main.py\n\nprint('hello')" in doc.text


def test_unreadable_files_in_a_folder_are_skipped_aloud_but_named_ones_must_read(tmp_path):
    root = folder(tmp_path)
    (root / "scan.pdf").write_bytes(b"%PDF-1.4\n garbage")
    skipped = []
    doc = load_collection([root], on_skip=skipped.append)
    assert [p["name"] for p in doc.parts] == ["annex/annex2.txt", "annex/annex10.docx", "contract.pdf"]
    assert len(skipped) == 1 and skipped[0].startswith("skipped scan.pdf: cannot read this PDF")
    with pytest.raises(RaError, match="scan.pdf: cannot read this PDF"):
        load_collection([root / "contract.pdf", root / "scan.pdf"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RaError, match=r"empty: no documents in this folder \(ra reads .pdf, .docx"):
        load_collection([tmp_path / "empty"])


def test_collection_citations_name_the_document_and_its_own_unit():
    from ra_cli.citations import Citer

    parts = [{"name": "a.txt", "unit": "line", "first_page": 1, "pages": 1, "first_line": 3},
             {"name": "b.html", "unit": "section", "first_page": 2, "pages": 2, "first_line": 9, "sections": ["Intro", "Use"]},
             {"name": "c.pdf", "unit": "page", "first_page": 4, "pages": 2, "first_line": 20}]
    pages = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 4, 5, 0])
    lines = np.array([0, 0, 0, 0, 1, 3, 4, 6, 9, 11, 20, 25, 0])  # the collection's lines; a.txt's own start at 3
    weights = np.array([9, 9, 9, 9, 5, 2, 1, 0, 0, 4, 0, 3, 0.0])  # the header token (line 1) is not a.txt's text
    citer = Citer(pages, lines, "page", None, parts)
    assert [(s.label(), s.as_json()) for s in citer.sources(weights, count=4)] == [
        ("b.html §2 “Use”", {"document": "b.html", "section": 2, "title": "Use", "share": 0.4}),
        ("a.txt lines 1-2", {"document": "a.txt", "line": 1, "last_line": 2, "share": 0.3}),
        ("c.pdf p. 2", {"document": "c.pdf", "page": 2, "share": 0.3})]
    overlapping = [dict(parts[0], pages=2)] + parts[1:]  # a hand-edited manifest: pages that do not add up
    assert [s.label() for s in Citer(pages, lines, "page", None, overlapping).sources(weights)] == ["p. 1", "p. 3", "p. 5"]


@pytest.fixture
def needle_folder(tmp_path):
    from conftest import REPO

    paragraphs = (REPO / "samples" / "ra-handbook.md").read_text().split("\n\n")
    at = int(len(paragraphs) * 0.3)  # the needle's depth, as in the single-file needle tests
    root = tmp_path / "handbook"
    root.mkdir()
    (root / "part1.md").write_text("\n\n".join(paragraphs[:at - 3]))
    (root / "part2.md").write_text("\n\n".join(paragraphs[at - 3:at] + [NEEDLE] + paragraphs[at:30]))
    make_text_pdf(root / "part3.pdf", [[line for p in paragraphs[30:] for line in p.splitlines()]])
    return root, (root / "part2.md").read_text().splitlines().index(NEEDLE) + 1


def test_chat_with_a_folder_cites_the_needle_in_its_file(needle_folder, reuse_loaded_model):
    """The needle's own file and line (in that file's numbering) come first. The embedded 135M
    model reads the needle (half the answer's attention) but does not copy the code in this
    layout, so the answer's words are not what this test holds."""
    root, line = needle_folder
    result = runner.invoke(app, ["chat", str(root), "--ask", QUESTION, "-n", "16", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    first = answer["sources"][0]
    assert first["document"] == "part2.md" and first["line"] <= line <= first["last_line"], answer["sources"]
    assert first["share"] > 0.3 and {s["document"] for s in answer["sources"]} <= {"part1.md", "part2.md", "part3.pdf"}


def test_ingest_of_several_files_is_one_collection(needle_folder, tmp_path, reuse_loaded_model):
    root, _ = needle_folder
    result = runner.invoke(app, ["ingest", str(root / "part3.pdf"), str(root / "part1.md"), "--save",
                                 str(tmp_path / "two.idx"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["document"], summary["documents"], summary["pages"]) == ("part3.pdf + 1 more", 2, 2)
    info = runner.invoke(app, ["info", str(tmp_path / "two.idx"), "--json"])
    record = json.loads(info.stdout)["document"]
    assert [p["name"] for p in record["parts"]] == ["part3.pdf", "part1.md"]  # in the order given
    shown = " ".join(runner.invoke(app, ["info", str(tmp_path / "two.idx")]).stdout.split())  # as one line, unwrapped
    assert "(collection, 2 documents, 2 pages," in shown and "documents part3.pdf, part1.md tokens" in shown
    again = runner.invoke(app, ["ingest", str(tmp_path / "two.idx")])
    assert again.exit_code == 1 and "is a context made by `ra ingest`, not a document; chat with it" in again.stderr
