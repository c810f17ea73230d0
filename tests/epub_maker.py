"""Minimal EPUB files for tests, written with zipfile as e-book software lays them out: the
mimetype first and stored, META-INF/container.xml naming the package file, the package's
manifest (listed here in reverse, so only the spine gives the reading order) and spine."""

from __future__ import annotations

import zipfile
from pathlib import Path
from urllib.parse import quote

CONTAINER = """<?xml version="1.0" encoding="UTF-8"?>
<container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">
  <rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/></rootfiles>
</container>"""

CHAPTER = """<?xml version="1.0" encoding="{encoding}"?>
<html xmlns="http://www.w3.org/1999/xhtml"><head><title>The Book</title>
<style>h1 {{ color: red }}</style></head><body>{body}</body></html>"""


def make_epub(path: Path, chapters: list[tuple[str, str]], encrypted: list[str] = (), encoding: str = "utf-8") -> Path:
    """chapters: (file name under OEBPS/Text/, body markup) in reading order; encrypted: those file
    names listed in META-INF/encryption.xml (as DRM does)."""
    items = [f'<item id="c{i}" href="Text/{quote(name)}" media-type="application/xhtml+xml"/>'
             for i, (name, _) in enumerate(chapters)]
    items.append('<item id="css" href="style.css" media-type="text/css"/>')
    spine = "".join(f'<itemref idref="c{i}"/>' for i in range(len(chapters)))
    package = (f'<?xml version="1.0" encoding="UTF-8"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0">'
               f'<metadata/><manifest>{"".join(reversed(items))}</manifest><spine>{spine}</spine></package>')
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as book:
        book.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        book.writestr("META-INF/container.xml", CONTAINER)
        book.writestr("OEBPS/content.opf", package)
        book.writestr("OEBPS/style.css", "p { margin: 0 }")
        for name, body in chapters:
            book.writestr(f"OEBPS/Text/{name}", CHAPTER.format(body=body, encoding=encoding).encode(encoding))
        if encrypted:
            references = "".join(f'<EncryptedData xmlns="http://www.w3.org/2001/04/xmlenc#"><CipherData>'
                                 f'<CipherReference URI="OEBPS/Text/{quote(name)}"/></CipherData></EncryptedData>'
                                 for name in encrypted)
            book.writestr("META-INF/encryption.xml",
                          f'<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container">{references}</encryption>')
    return path
