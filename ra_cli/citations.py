"""Citations: the pages (sections of HTML and EPUB files; passages of text files; in a collection,
each document's own) an answer's attention went to.

Every decode step of every layer and query head spreads one unit of softmax weight over the keys it
attends to (engine/mass.py collects it by position). Summed over the answer and grouped by the
page or line range of each document token — template tokens and the first few positions (attention
sinks, which soak up weight whatever is asked) left out — that is where the model read while it
answered: grounded in its own attention, not in a separate embedding search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SINKS = 4  # the first positions of the context: weight parks there regardless of content
# Weights below this are not counted: diffuse and positional attention spreads small weights
# over everything near and far, while a head that reads something singles it out (measured on
# needle documents: with no floor the recent window outranks the needle; from 0.2 the needle's
# passage comes first)
FLOOR = 0.2
CITED = 3  # sources shown under an answer
PASSAGE_LINES = 8  # a text-file passage: a paragraph, cut into runs of at most this many lines
EXCERPT_TOKENS = 80  # of a cited page shown by /sources, centred on the most attended token
TITLE_CHARS = 48  # of a section's heading in a citation


@dataclass
class Source:
    unit: str  # "page" (PDFs, Word), "section" (HTML, EPUB, Word without page marks) or "line" (text)
    first: int  # 1-based page or section, or first line of the passage
    last: int  # last line of the passage (= first for pages and sections)
    share: float  # of the answer's attention to document text
    peak: int  # the most attended token position inside it
    start: int  # token positions [start, end) of the page or passage
    end: int
    title: str = ""  # a section's heading
    document: str = ""  # in a collection, the document it is in

    def label(self) -> str:
        where = f"{self.document} " if self.document else ""
        if self.unit == "page":
            return f"{where}p. {self.first}"
        if self.unit == "section":
            title = self.title if len(self.title) <= TITLE_CHARS else self.title[:TITLE_CHARS - 1].rstrip() + "…"
            return f"{where}§{self.first} “{title}”" if title else f"{where}§{self.first}"
        return where + (f"line {self.first}" if self.last == self.first else f"lines {self.first}-{self.last}")

    def as_json(self) -> dict:
        document = {"document": self.document} if self.document else {}
        if self.unit in ("page", "section"):
            return {**document, self.unit: self.first, **({"title": self.title} if self.unit == "section" else {}),
                    "share": round(self.share, 4)}
        return {**document, "line": self.first, "last_line": self.last, "share": round(self.share, 4)}


class Citer:
    """Maps a document's token positions to citable units once, then ranks them per answer.

    unit: "page", "section" or "line" (document.citation_unit); titles: the section headings, in
    order; parts: a collection's documents (collection.Part records), each cited in its own unit
    and numbering. All three come from a manifest, which is user input: what does not hold
    together is cited without it (titles dropped; a collection by its own pages)."""

    def __init__(self, token_pages: np.ndarray, token_lines: np.ndarray | None, unit: str,
                 titles: list[str] | None = None, parts: list[dict] | None = None):
        pages = np.asarray(token_pages, dtype=np.int64)
        lines = None if token_lines is None else np.asarray(token_lines, dtype=np.int64)
        self.units = np.zeros(len(pages), np.int64)
        self.cited: list[tuple] = [("", "page", 0, 0, "")]  # per unit: (document, unit, first, last, title); 0: none
        whole = {"name": "", "unit": unit, "first_page": 1, "pages": int(pages.max(initial=0)), "first_line": 1,
                 "sections": titles}
        for part in _checked(parts, whole["pages"]) or [whole]:
            inside = (pages >= part["first_page"]) & (pages < part["first_page"] + part["pages"])
            if part["unit"] == "line" and lines is not None:
                where = np.flatnonzero(inside)
                ids, firsts, lasts = _passages(lines[where] - part["first_line"] + 1)  # its own line numbers
                self.units[where[ids > 0]] = ids[ids > 0] + len(self.cited) - 1
                self.cited += [(part["name"], "line", int(f), int(l), "") for f, l in zip(firsts[1:], lasts[1:])]
            else:
                kind = "section" if part["unit"] == "section" else "page"
                headings = part.get("sections") if kind == "section" and _strings(part.get("sections")) else []
                self.units[inside] = pages[inside] - part["first_page"] + len(self.cited)
                self.cited += [(part["name"], kind, n, n, headings[n - 1] if n <= len(headings) else "")
                               for n in range(1, part["pages"] + 1)]
        self.units[:SINKS] = 0  # unit 0: never cited

    def sources(self, weights: np.ndarray, count: int = CITED) -> list[Source]:
        """The `count` units holding the most of `weights` [positions] (a prefix of the document)."""
        units = self.units[:weights.shape[0]]
        totals = np.bincount(units, weights=weights, minlength=len(self.cited))
        totals[0] = 0.0
        whole = totals.sum()
        if whole <= 0:
            return []
        ranked = [int(u) for u in np.argsort(-totals, kind="stable")[:count] if totals[u] > 0]
        found = []
        for unit in ranked:
            positions = np.flatnonzero(units == unit)
            peak = int(positions[np.argmax(weights[positions])])
            document, kind, first, last, title = self.cited[unit]
            found.append(Source(kind, first, last, float(totals[unit] / whole), peak, int(positions[0]),
                                int(positions[-1]) + 1, title, document))
        return found


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _checked(parts, pages: int) -> list[dict] | None:
    """A manifest's collection parts when they hold together: named, in a known unit, their pages
    consecutive from 1 and covering the document's pages."""
    if not isinstance(parts, list) or not parts:
        return None
    expected = 1
    for part in parts:
        if not (isinstance(part, dict) and isinstance(part.get("name"), str) and part.get("unit") in ("page", "section", "line")
                and all(type(part.get(key)) is int and part.get(key) >= 1 for key in ("first_page", "pages", "first_line"))
                and part["first_page"] == expected):
            return None
        expected += part["pages"]
    return parts if expected == pages + 1 else None


def _passages(lines: np.ndarray):
    """Text-file passages: runs of consecutive non-blank lines (a blank line — no token starts on
    it — ends one), at most PASSAGE_LINES long. Returns (passage per token, 0 = none; first line
    and last line per passage)."""
    present = np.unique(lines[lines > 0])
    firsts, lasts = [0], [0]
    for line in present.tolist():
        if len(firsts) > 1 and line == lasts[-1] + 1 and line - firsts[-1] < PASSAGE_LINES:
            lasts[-1] = line
        else:
            firsts.append(line)
            lasts.append(line)
    firsts_array = np.asarray(firsts)
    units = np.where(lines > 0, np.searchsorted(firsts_array, lines, side="right") - 1, 0)
    return units, firsts_array, np.asarray(lasts)


def excerpt(tokenizer, tokens: np.ndarray, source: Source) -> str:
    """The cited text: a whole passage, or the part of a page around its most attended token."""
    start, end = source.start, source.end
    if end - start > EXCERPT_TOKENS:
        start = max(source.start, min(source.peak - EXCERPT_TOKENS // 2, source.end - EXCERPT_TOKENS))
        end = start + EXCERPT_TOKENS
    text = tokenizer.decode(tokens[start:end].tolist(), skip_special_tokens=True).strip()
    return ("… " if start > source.start else "") + " ".join(text.split()) + (" …" if end < source.end else "")
