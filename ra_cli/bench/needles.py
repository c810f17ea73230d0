"""`ra bench --needles`: is retrieval right wherever full attention is right?

A needle sentence ("The secret code for project Heron is amber-falcon-71.") is placed at a
paragraph boundary at each of several depths of real documents (the shipped corpus by default,
each cut to about N tokens); every placement is ingested as `ra ingest` does and asked, as a raw
continuation of the document, the needle's opening words under full attention, exact top-k
(flat) and graph retrieval. A needle stated once and never referred to again is exactly the kind
of key no prefill query selects: this is where a graph that cannot reach such keys fails.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ra_cli.bench.corpus import CORPUS, SAMPLE
from ra_cli.chat import start_chat
from ra_cli.choices import EXACT_MARGIN
from ra_cli.document import Document, load_document
from ra_cli.engine.generate import Sampling
from ra_cli.ingest import IngestOptions, ingest
from ra_cli.retrieval.modes import settings_for

NEEDLES = (
    ("The secret code for project Heron is amber-falcon-71.", "The secret code for project Heron is", "amber-falcon-71"),
    ("Mira's favourite number is 8093, she said.", "Mira's favourite number is", "8093"),
    ("The password to the archive is 4417-blue-moon.", "The password to the archive is", "4417-blue"),
    ("The lighthouse keeper in 1902 was Tobias Venn.", "The lighthouse keeper in 1902 was", "Tobias Venn"),
)
DEPTHS = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
MODES = ("full", "flat", "retrieval")


@dataclass
class NeedleBenchConfig:
    documents: list[Path] = field(default_factory=lambda: [CORPUS[0], CORPUS[1], CORPUS[2], SAMPLE])
    tokens: int = 6144  # each document cut (or repeated) to about this many tokens
    depths: tuple[float, ...] = DEPTHS
    max_new_tokens: int = 10
    exact_margin: float = EXACT_MARGIN  # 0: retrieval's answers with no step run again exactly (the index alone)


def document_of(loaded, path: Path, tokens: int) -> list[str]:
    """The document's paragraphs, repeated or cut to about `tokens` tokens."""
    return paragraphs_of(loaded, load_document(path).text, tokens)


def paragraphs_of(loaded, text: str, tokens: int) -> list[str]:
    """The text's paragraphs, repeated or cut to about `tokens` tokens."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    out, count, i = [], 0, 0
    while count < tokens:
        paragraph = paragraphs[i % len(paragraphs)]
        out.append(paragraph)
        count += len(loaded.tokenizer(paragraph, add_special_tokens=False).input_ids) + 1
        i += 1
    return out


def run_needle_bench(loaded, config: NeedleBenchConfig, status=print) -> dict:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="ra-needles-"))
    started = time.perf_counter()
    for d, path in enumerate(config.documents):
        paragraphs = document_of(loaded, path, config.tokens)
        for p, depth in enumerate(config.depths):
            needle, cue, answer = NEEDLES[(d + p) % len(NEEDLES)]
            at = max(1, round(depth * len(paragraphs)))
            text = "\n\n".join(paragraphs[:at] + [needle] + paragraphs[at:])
            document = Document(name=f"{path.name} + needle at {depth:.0%}", sha256=f"needle-{d}-{p}", kind="text",
                                text=text)
            store_path = work / f"{d}-{p}.idx"
            ingest(loaded, document, store_path, IngestOptions())
            from ra_cli.store import ContextStore

            store = ContextStore.open(store_path, loaded.fingerprint)
            # every layer searched: at these sizes a CPU would attend densely where that is faster,
            # and the sweep measures what the index finds
            searched = settings_for(store, dense_when_cheaper=False, exact_margin=config.exact_margin)
            answers, redone = {}, 0
            for mode in MODES:
                session = start_chat(loaded, store, mode, searched)
                answers[mode] = session.ask(cue, config.max_new_tokens, Sampling(), raw=True).text
                redone += session.cache.exact_steps if mode == "retrieval" else 0
            row = {"document": path.name, "depth": depth, "tokens": store.n_tokens, "needle": needle,
                   **{f"{mode}_right": answer in answers[mode] for mode in MODES},
                   "retrieval_differs_from_full": answers["retrieval"] != answers["full"],
                   "retrieval_exact_steps": redone, "answers": answers}
            rows.append(row)
            status(f"{path.name} {depth:.0%}: full {'right' if row['full_right'] else 'wrong'}, "
                   f"retrieval {'right' if row['retrieval_right'] else 'wrong'}"
                   + (" (differs from full)" if row["retrieval_differs_from_full"] else ""))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    full_right = [row for row in rows if row["full_right"]]
    return {
        "model": loaded.fingerprint.source, "dtype": loaded.fingerprint.dtype, "placements": len(rows),
        "documents": [path.name for path in config.documents], "depths": list(config.depths),
        **{f"{mode}_right": sum(row[f"{mode}_right"] for row in rows) for mode in MODES},
        "retrieval_right_where_full_right": sum(row["retrieval_right"] for row in full_right),
        "full_right_placements": len(full_right),
        "retrieval_differs_from_full": sum(row["retrieval_differs_from_full"] for row in rows),
        "exact_margin": config.exact_margin,
        "retrieval_exact_steps": sum(row["retrieval_exact_steps"] for row in rows),
        "seconds": round(time.perf_counter() - started, 1), "rows": rows,
    }
