"""Document extraction: real text out, and a one-line RaError for every kind of bad input."""

from __future__ import annotations

import zipfile

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SHARED_PDFS
from docx_maker import make_docx, paragraph, table
from epub_maker import make_epub
from pdf_maker import make_encrypted_pdf, make_text_pdf
from ra_cli.document import PAGE_SEPARATOR, load_document, load_piped
from ra_cli.errors import RaError


def test_pdf_pages_and_page_map(tmp_path):
    path = make_text_pdf(tmp_path / "three.pdf", [["First page text."], ["Second page (middle)."], ["Third final page."]])
    seen = []
    doc = load_document(path, on_page=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert doc.kind == "pdf" and [p.number for p in doc.pages] == [1, 2, 3]
    assert [doc.text[p.char_start:p.char_end] for p in doc.pages] == [
        "First page text.", "Second page (middle).", "Third final page."]
    assert doc.text == PAGE_SEPARATOR.join(["First page text.", "Second page (middle).", "Third final page."])
    assert len(doc.sha256) == 64


def test_blank_pages_keep_their_numbers(tmp_path):
    path = make_text_pdf(tmp_path / "gap.pdf", [["Alpha."], [], ["Gamma."]])
    doc = load_document(path)
    assert [(p.number, doc.text[p.char_start:p.char_end]) for p in doc.pages] == [(1, "Alpha."), (2, ""), (3, "Gamma.")]


def test_text_and_markdown(tmp_path):
    (tmp_path / "a.md").write_bytes("\ufeff# Title\r\nbody ünïcode\r\n".encode("utf-8"))
    doc = load_document(tmp_path / "a.md")
    assert doc.text == "# Title\nbody ünïcode\n" and doc.kind == "text" and len(doc.pages) == 1
    for markup in ("guide.rst", "manual.adoc", "notes.org", "paper.tex"):  # plain-text markups: text, cited by line
        (tmp_path / markup).write_text("Title\n=====\n\\section{x}\n")
        assert (load_document(tmp_path / markup).kind, load_document(tmp_path / markup).unit) == ("text", "line")


def test_utf16_with_bom(tmp_path):
    (tmp_path / "u16.txt").write_bytes("hello wörld".encode("utf-16"))
    assert load_document(tmp_path / "u16.txt").text == "hello wörld"


def test_explicit_encoding(tmp_path):
    (tmp_path / "latin.txt").write_bytes("café au lait".encode("latin-1"))
    assert load_document(tmp_path / "latin.txt", encoding="latin-1").text == "café au lait"


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "the file is empty"),
    ("blank.txt", b"  \n\n \t\n", "the document is empty"),
    ("binary.txt", bytes(range(256)) * 4, "looks like binary data"),
    ("controls.txt", b"ab\x01\x02\x03\x04\x05\x06\x07\x08" * 50, "looks like binary data"),
    ("bad.txt", b"caf\xe9 au lait", "not valid utf-8 (byte 0xe9 at offset 3)"),
    ("notes.odt", b"PK\x03\x04", "unsupported file type '.odt'"),
    ("letter.docx", b"\xd0\xcf\x11\xe0 an old .doc renamed", "not a valid .docx (it is not a zip archive)"),
    ("book.epub", b"PK\x03\x04 not really", "not a valid EPUB (it is not a zip archive)"),
    ("page.html", b"<html><body><script>x()</script><img src=a.png></body></html>", "no text outside its markup"),
    ("noext", b"\x7fELF\x02\x01\x01\x00" * 8, "unsupported file type '(none)' (binary, not text)"),
    ("data.bin", b"\x89PNG\r\n\x1a\n\x01\x02\x03\x04\x05\x06", "unsupported file type '.bin' (binary, not text)"),
    ("old.log", b"caf\xe9 au lait", "unsupported file type '.log' (not utf-8 text; if it is text, pass --encoding)"),
])
def test_bad_text_inputs(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(RaError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_document(tmp_path / name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["README", "LICENSE", "solver.py", "server.log", "notes.csv"])
def test_other_plain_text_files_are_read_as_text_cited_by_line(tmp_path, name):
    content = "def solve(x):\n\treturn x * 2  # doubles\n"
    (tmp_path / name).write_text(content)
    doc = load_document(tmp_path / name)
    assert (doc.kind, doc.unit, doc.text, len(doc.pages)) == ("text", "line", content, 1)
    (tmp_path / "legacy.cfg").write_bytes("name = café\n".encode("latin-1"))
    assert load_document(tmp_path / "legacy.cfg", encoding="latin-1").text == "name = café\n"


def test_invalid_utf8_message_says_what_to_do(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(RaError, match="--encoding"):
        load_document(tmp_path / "bad.txt")


def test_unknown_encoding(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(RaError, match="unknown encoding 'klingon'"):
        load_document(tmp_path / "a.txt", encoding="klingon")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RaError, match="no such file"):
        load_document(tmp_path / "nope.pdf")
    with pytest.raises(RaError, match="is a directory"):
        load_document(tmp_path)


def test_encrypted_pdf(tmp_path):
    plain = make_text_pdf(tmp_path / "plain.pdf", [["Secret text."]])
    with pytest.raises(RaError, match="password-protected; decrypt it first"):
        load_document(make_encrypted_pdf(tmp_path / "locked.pdf", plain))


def test_image_only_pdf_suggests_ocr(tmp_path):
    path = make_text_pdf(tmp_path / "scan.pdf", [[], []])
    with pytest.raises(RaError, match=r"no extractable text in 2 page\(s\).*OCR"):
        load_document(path)


@pytest.mark.parametrize("content", [b"%PDF-1.4\n garbage garbage", b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog"])
def test_broken_pdf(tmp_path, content):
    (tmp_path / "broken.pdf").write_bytes(content)
    with pytest.raises(RaError, match="cannot read this PDF .*damaged"):
        load_document(tmp_path / "broken.pdf")


@pytest.mark.parametrize("failure", [AssertionError(), NotImplementedError("Unsupported filter /Fl\u9bb0eDecode"), RecursionError()])
def test_pdf_damage_pypdf_meets_with_any_exception_is_one_line(tmp_path, monkeypatch, failure):
    """pypdf meets some damage with an assert or NotImplementedError (found by flipping bytes of
    the ../shared PDFs, piped or as files): those are damage too, not ra's bugs."""
    import pypdf

    def damaged(*args, **kwargs):
        raise failure

    path = make_text_pdf(tmp_path / "book.pdf", [["Page one."]])
    monkeypatch.setattr(pypdf, "PdfReader", damaged)
    with pytest.raises(RaError, match="cannot read this PDF .*damaged") as info:
        load_document(path)
    assert "\n" not in str(info.value)


def test_pdfs_with_bytes_flipped_cut_or_inserted_read_or_fail_in_one_line(tmp_path):
    import random

    rng = random.Random(0)
    good = make_text_pdf(tmp_path / "book.pdf", [["Chapter one is about apples."], ["Chapter two.", "Pears."]]).read_bytes()
    outcomes = set()
    for trial in range(150):
        raw = bytearray(good)
        at = rng.randrange(len(raw))
        if trial % 3 == 0:
            raw[at] = rng.randrange(256)
        elif trial % 3 == 1:
            del raw[at:]
        else:
            raw[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        (tmp_path / "damaged.pdf").write_bytes(raw)
        try:
            load_document(tmp_path / "damaged.pdf")
            outcomes.add("read")
        except RaError as exc:
            assert "\n" not in str(exc)
            outcomes.add("refused")
    assert outcomes == {"read", "refused"}


shared = pytest.mark.skipif(not SHARED_PDFS.is_dir(), reason="../shared corpus not present")


@shared
@pytest.mark.parametrize("name,message", [
    ("libreoffice-writer-password.pdf", "password-protected"),
    ("imagemagick-lzw.pdf", "no extractable text"),
    ("grayscale-image.pdf", "no extractable text"),
    ("unreadablemetadata.pdf", "cannot read this PDF"),
])
def test_real_world_bad_pdfs(name, message):
    with pytest.raises(RaError, match=message):
        load_document(SHARED_PDFS / name)


@shared
def test_real_world_long_pdf_keeps_output_quiet(capfd):
    doc = load_document(SHARED_PDFS / "GeoTopo-komprimiert.pdf")
    assert len(doc.pages) == 117 and len(doc.text) > 130_000
    assert "Topologische Räume" in doc.text
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def sections_of(doc):
    return [(p.number, p.title, doc.text[p.char_start:p.char_end]) for p in doc.pages]


def test_html_text_sections_and_declared_charset(tmp_path):
    page = ('<!DOCTYPE html><html><head><meta charset="iso-8859-1"><title>The  Manual</title>'
            '<style>p { color: red }</style><script>var s = "<p>not text</p>";</script>'
            '<body><svg><title>logo</title><path d="M0"/></svg><nav><a href="/">Home</a> | <a href="/faq">FAQ</a></nav>'
            '<p>Caf\xe9 &amp; more:\n   spaces   collapse.</p>'
            '<h1>Chapter 1</h1><h2 id="a">Install <a href="#a">\xb6</a></h2>'
            '<p>Run<br>make</p><ul><li>one</li><li>two</li></ul><pre>  keep\n    indent</pre>'
            '<h2><a id="empty"></a></h2><table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>'
            '<h3>Use</h3><p>Go.</p><button>Light</button></body></html>').encode("latin-1")
    (tmp_path / "manual.html").write_bytes(page)
    doc = load_document(tmp_path / "manual.html")
    assert doc.kind == "html"
    assert sections_of(doc) == [
        (1, "The Manual", "Café & more: spaces collapse."),
        # "Chapter 1" has no text of its own: it opens the next section; the empty heading starts nothing
        (2, "Chapter 1 · Install ¶", "Chapter 1\n\nInstall ¶\n\nRun\nmake\n\none\ntwo\n\n  keep\n    indent\n\na b\nc d"),
        (3, "Use", "Use\n\nGo."),
    ]
    assert doc.text == PAGE_SEPARATOR.join(text for _, _, text in sections_of(doc))
    # --encoding overrides what the page declares (here wrongly: the bytes are latin-1)
    with pytest.raises(RaError, match=r"not valid ascii \(byte 0xe9 at offset \d+\); pass --encoding"):
        load_document(tmp_path / "manual.html", encoding="ascii")


def test_epub_reading_order_sections_and_titles(tmp_path):
    path = make_epub(tmp_path / "book.epub", [
        ("cover.xhtml", '<div><img src="cover.jpg" alt="Cover"/></div>'),
        ("chapter one.xhtml", "<h1>One</h1><p>It was a dark night.</p><h2>The Storm</h2><p>Rain &mdash; lots.</p>"),
        ("ch2.xhtml", "<p>No heading here; the file starts a section.</p>"),
    ])
    doc = load_document(path)
    assert doc.kind == "epub"
    assert sections_of(doc) == [(1, "One", "One\n\nIt was a dark night."), (2, "The Storm", "The Storm\n\nRain — lots."),
                                (3, "", "No heading here; the file starts a section.")]


def test_epub_in_a_declared_encoding(tmp_path):
    path = make_epub(tmp_path / "old.epub", [("c.xhtml", "<p>Żółw</p>")], encoding="iso-8859-2")
    assert load_document(path).text == "Żółw"


def test_bad_epubs(tmp_path):
    drm = make_epub(tmp_path / "drm.epub", [("a.xhtml", "<p>x</p>")], encrypted=["a.xhtml"])
    with pytest.raises(RaError, match="DRM-protected"):
        load_document(drm)
    images = make_epub(tmp_path / "comic.epub", [("a.xhtml", '<img src="p1.jpg"/>')])
    with pytest.raises(RaError, match=r"no text to read — it holds only images"):
        load_document(images)
    with zipfile.ZipFile(tmp_path / "bare.epub", "w") as book:
        book.writestr("mimetype", "application/epub+zip")
    with pytest.raises(RaError, match=r"cannot read this EPUB \(.*container.xml.*\); it may be damaged"):
        load_document(tmp_path / "bare.epub")


def test_an_epub_that_unpacks_to_gigabytes_is_refused_before_unpacking(tmp_path, monkeypatch):
    import ra_cli.markup as markup

    path = make_epub(tmp_path / "bomb.epub", [("a.xhtml", "<p>" + "ha " * 200_000 + "</p>")])
    monkeypatch.setattr(markup, "MEMBER_LIMIT", 100_000)  # the chapter unpacks to 600 KB from ~2 KB
    read, unpack = [], zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, *a: read.append(name) or unpack(self, name, *a))
    with pytest.raises(RaError, match=r"OEBPS/Text/a.xhtml unpacks to 1 MB, more than an e-book's text needs"):
        load_document(path)
    assert "OEBPS/content.opf" in read and "OEBPS/Text/a.xhtml" not in read


def test_word_sections_at_headings_tables_and_tracked_changes(tmp_path):
    """No page marks (a generated document): sections at the heading styles, found by their names
    (the ids are a German Word's); deleted text and field codes are not text."""
    body = (paragraph("Service Agreement", "Titel") + paragraph("Between A and B.") +
            paragraph("1. Definitions", "berschrift1") + paragraph("Term\tmeans the period.") +
            table([["Fee", "100 EUR"], ["Due", "30 days"]]) +
            paragraph("2. Payment", "berschrift2") +
            paragraph("Pay on time.", inner="<w:del><w:r><w:delText>or never</w:delText></w:r></w:del>"
                                           "<w:r><w:instrText> PAGE </w:instrText></w:r>"))
    doc = load_document(make_docx(tmp_path / "contract.docx", body))
    assert doc.kind == "docx" and doc.unit == "section"
    assert sections_of(doc) == [
        (1, "Service Agreement", "Service Agreement\n\nBetween A and B."),
        (2, "1. Definitions", "1. Definitions\n\nTerm\tmeans the period.\n\nFee\t100 EUR\nDue\t30 days"),
        (3, "2. Payment", "2. Payment\n\nPay on time."),
    ]
    unstyled = load_document(make_docx(tmp_path / "plain.docx", body, styles=False))
    assert [p.title for p in unstyled.pages] == [""] and "or never" not in unstyled.text


def test_word_pages_as_word_laid_them_out(tmp_path):
    """Page marks: Word's rendered page starts and forced breaks; one page marked twice (a forced
    break, then its rendered start) counts once. Forced breaks alone (no word processor laid the
    file out) would number pages wrongly: sections then."""
    body = (paragraph("Page one.") + paragraph("Still page one.") + paragraph("Page two.", page_mark=True) +
            '<w:p><w:r><w:br w:type="page"/></w:r></w:p>' + paragraph("Page three.", page_mark=True) +
            '<w:p><w:pPr><w:pageBreakBefore/></w:pPr><w:r><w:t>Page four.</w:t></w:r></w:p>')
    doc = load_document(make_docx(tmp_path / "paged.docx", body))
    assert doc.unit == "page"
    assert sections_of(doc) == [(1, "", "Page one.\n\nStill page one."), (2, "", "Page two."), (3, "", "Page three."),
                                (4, "", "Page four.")]
    generated = paragraph("Intro.") + '<w:p><w:r><w:br w:type="page"/></w:r></w:p>' + paragraph("Terms", "berschrift1") + \
        paragraph("Pay.")
    doc = load_document(make_docx(tmp_path / "generated.docx", generated))
    assert doc.unit == "section" and sections_of(doc) == [(1, "", "Intro."), (2, "Terms", "Terms\n\nPay.")]


def test_bad_word_files(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.docx", "w") as package:
        package.writestr("content.xml", "<x/>")
    with pytest.raises(RaError, match=r"not a Word document \(no word/document.xml inside\)"):
        load_document(tmp_path / "other.docx")
    with pytest.raises(RaError, match=r"no text to read — it holds no text \(only images or drawings\?\)"):
        load_document(make_docx(tmp_path / "picture.docx", '<w:p><w:r><w:drawing><x>logo</x></w:drawing></w:r></w:p>'))
    with zipfile.ZipFile(tmp_path / "broken.docx", "w") as package:
        package.writestr("word/document.xml", "<w:document><w:body>")
    with pytest.raises(RaError, match=r"cannot read this Word document \(.*\); it may be damaged"):
        load_document(tmp_path / "broken.docx")


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_epub_word_and_html_files_fail_in_one_line(tmp_path, data):
    """Bytes flipped, cut or inserted anywhere in a good file (inside compressed members too):
    the document reads, or a RaError says what is wrong — never another exception (a zlib
    error, a CRC failure, a parser's own), which the CLI would show as a bug."""
    good = {"a.epub": make_epub(tmp_path / "good.epub", [("c1.xhtml", "<h1>One</h1><p>Text &amp; more</p>"),
                                                          ("c2.xhtml", "<p>Two</p>")]).read_bytes(),
            "a.docx": make_docx(tmp_path / "good.docx", paragraph("T", "berschrift1") + paragraph("Body")
                                + table([["a", "b"]])).read_bytes(),
            "a.html": b'<html><head><meta charset="utf-8"><title>x</title></head><body><h1>H</h1><p>p</p></body></html>'}
    name = data.draw(st.sampled_from(sorted(good)))
    blob = bytearray(good[name])
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(blob) - 1))
        change = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if change == "flip":
            blob[at] ^= data.draw(st.integers(1, 255))
        elif change == "cut" and len(blob) > 60:
            del blob[at:at + data.draw(st.integers(1, 50))]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=20))
    (tmp_path / name).write_bytes(bytes(blob))
    try:
        load_document(tmp_path / name)
    except RaError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(tmp_path / name))
    try:  # the same bytes piped in, told apart by what they hold
        load_piped(bytes(blob))
    except RaError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("stdin: ")


def test_a_pipe_given_as_a_path_is_hashed_by_what_it_carried(tmp_path):
    """`ra chat <(curl URL)` names a pipe (/dev/fd/63), which reads once: its sha256 was that of
    nothing, so every such document found the first one's cached context and was answered from
    it. Its bytes are now read once, hashed and told apart as a piped document's."""
    import hashlib
    import os

    def through_a_pipe(content: bytes):
        read_end, write_end = os.pipe()  # what bash's <(...) hands over, as /dev/fd/N
        os.write(write_end, content)
        os.close(write_end)
        try:
            return load_document(f"/dev/fd/{read_end}")
        finally:
            os.close(read_end)

    ferry, bridge = b"The ferry leaves at nine.\n", b"The bridge opens in June.\n"
    first, second = through_a_pipe(ferry), through_a_pipe(bridge)
    assert (first.sha256, second.sha256) == (hashlib.sha256(ferry).hexdigest(), hashlib.sha256(bridge).hexdigest())
    assert (second.kind, second.text) == ("text", bridge.decode())


def test_a_document_is_hashed_by_the_bytes_its_text_came_from(tmp_path, monkeypatch):
    """A log appended to while ra reads it: the context is keyed by the sha256 of the bytes read,
    not of the file a moment later (that key would later find a context missing the new lines)."""
    import hashlib
    from pathlib import Path

    log = tmp_path / "app.log"
    log.write_text("started\n")
    real = Path.read_bytes

    def read_then_append(path):
        raw = real(path)
        if path == log:
            with open(log, "a") as writer:
                writer.write("request served\n")
        return raw

    monkeypatch.setattr(Path, "read_bytes", read_then_append)
    document = load_document(log)
    assert (document.text, document.sha256) == ("started\n", hashlib.sha256(b"started\n").hexdigest())


def test_a_piped_document_is_told_apart_by_its_first_bytes(tmp_path):
    """`... | ra chat -`: no file name says what the bytes are, so their start does; a piped
    document's sha256 is its file's, so the same text piped again finds its context."""
    text = "The river is called the Blau.\nIt floods in May.\n"
    (tmp_path / "river.txt").write_text(text)
    piped = load_piped(text.encode())
    assert (piped.name, piped.kind, piped.unit, piped.text) == ("stdin", "text", "line", text)
    assert piped.sha256 == load_document(tmp_path / "river.txt").sha256
    pdf = make_text_pdf(tmp_path / "river.pdf", [["Page one."], ["The river is called the Blau."]])
    piped = load_piped(pdf.read_bytes())
    assert (piped.kind, piped.unit, piped.text, len(piped.pages)) == ("pdf", "page", load_document(pdf).text, 2)
    page = b"\xef\xbb\xbf <!DOCTYPE html><html><body><h1>Rivers</h1><p>The Blau floods.</p></body></html>"
    piped = load_piped(page)
    assert (piped.kind, piped.unit, [p.title for p in piped.pages]) == ("html", "section", ["Rivers"])
    assert "The Blau floods." in piped.text
    for made in (make_docx(tmp_path / "river.docx", paragraph("Rivers", "berschrift1") + paragraph("The Blau floods.")),
                 make_epub(tmp_path / "river.epub", [("c1.xhtml", "<h1>Rivers</h1><p>The Blau floods.</p>")])):
        piped, named = load_piped(made.read_bytes()), load_document(made)
        assert (piped.kind, piped.unit, piped.text, piped.sha256) == (named.kind, named.unit, named.text, named.sha256)
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as photos:
        photos.writestr("a.jpg", b"\xff\xd8")
    for raw, message in ((b"", "stdin: nothing was piped in"), (archive.read_bytes(), "neither a .docx nor an EPUB"),
                         (b"PK\x03\x04\x14\x00", "stdin: cannot read this zip archive"),
                         (b" \n\t", "stdin: the document is empty"), (b"caf\xe9", "stdin: not valid utf-8")):
        with pytest.raises(RaError, match=message):
            load_piped(raw)
