"""How close is a needle answer to a tie? Log-probabilities of the tokens after a first answer token,
per attention mode and setting, on one placement of `ra bench --needles`.

    python benchmarks/needle_margin.py DOCUMENT_INDEX DEPTH_INDEX FIRST_ANSWER_TOKEN_TEXT

e.g. `1 7 ' "'` (python-execution-model at 75%, after the answer's opening quote). Prints one JSON
line per (mode, setting) with the top 3 next tokens and their log-probabilities.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from ra_cli.bench.needles import DEPTHS, NEEDLES, NeedleBenchConfig, document_of
from ra_cli.document import Document
from ra_cli.engine.generate import prefill
from ra_cli.ingest import IngestOptions, ingest
from ra_cli.model import load_model
from ra_cli.retrieval.layer import RetrievalSettings
from ra_cli.retrieval.modes import open_cache
from ra_cli.store import ContextStore

# every layer searched and no step run again exactly: the index is what is measured
SEARCHED = dict(dense_when_cheaper=False, exact_margin=0)
SETTINGS = [("full", None), ("flat", RetrievalSettings(exact_margin=0)), ("flat", RetrievalSettings(coverage=0.98, exact_margin=0)),
            ("flat", RetrievalSettings(coverage=0.99, exact_margin=0)), ("retrieval", RetrievalSettings(**SEARCHED)),
            ("retrieval", RetrievalSettings(ef=256, **SEARCHED)), ("retrieval", RetrievalSettings(ef=512, **SEARCHED))]


def main(d: int, p: int, first: str) -> None:
    loaded = load_model(None)
    paragraphs = document_of(loaded, NeedleBenchConfig().documents[d], 4096)  # as `ra bench --needles --context 4k`
    needle, cue, _ = NEEDLES[(d + p) % len(NEEDLES)]
    at = max(1, round(DEPTHS[p] * len(paragraphs)))
    path = Path(tempfile.mkdtemp()) / "needle.idx"
    ingest(loaded, Document(name="needle", sha256=f"margin-{d}-{p}", kind="text",
                            text="\n\n".join(paragraphs[:at] + [needle] + paragraphs[at:])), path, IngestOptions())
    store = ContextStore.open(path, loaded.fingerprint)
    tokenizer = loaded.tokenizer
    for mode, settings in SETTINGS:
        cache = open_cache(loaded, store, mode, settings)
        prefill(loaded.model, cache, tokenizer(cue, add_special_tokens=False).input_ids)
        log_probs = torch.log_softmax(prefill(loaded.model, cache, tokenizer(first, add_special_tokens=False).input_ids), -1)
        top = torch.topk(log_probs, 3)
        print(json.dumps({"mode": mode, "settings": settings and {"ef": settings.ef, "coverage": settings.coverage},
                          "next": [[tokenizer.decode([int(i)]), round(float(v), 3)] for v, i in zip(top.values, top.indices)]}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
