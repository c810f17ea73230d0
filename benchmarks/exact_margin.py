"""Where retrieval's greedy tokens differ from full attention's, how close was the call? The
measurement behind `--exact-margin` (RetrievalSettings.exact_margin).

    python benchmarks/exact_margin.py CONTEXT.idx [--model NAME]

`ra eval`'s protocol (its six prompts, full attention's greedy continuation of 64 tokens,
teacher-forced through full attention and through retrieval with every retrievable layer
searched and no step run again), recording at every position retrieval's own gap between its two
likeliest tokens. Prints the gaps where the two modes chose differently, then for each margin the
share of steps that would run again exactly and the agreement that leaves (a step run again takes
full attention's token). One JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ra_cli.bench.fidelity import DEFAULT_PROMPTS, forced_logits, reference_continuation
from ra_cli.ingest import IngestOptions
from ra_cli.sources import open_source, resolve_source
from ra_cli.model import load_model
from ra_cli.prompt import Prompter, PromptLayout
from ra_cli.retrieval.modes import open_cache, settings_for

MARGINS = (0.1, 0.25, 0.4, 0.5, 0.75, 1.0)

args = sys.argv[1:]
model = None
if "--model" in args:
    at = args.index("--model")
    model, args = args[at + 1], args[:at] + args[at + 2:]
loaded = load_model(model)
store, _ = open_source(loaded, resolve_source(Path(args[0]), "utf-8"), IngestOptions())
searched = settings_for(store, dense_when_cheaper=False, exact_margin=0)
prompter = Prompter(loaded.tokenizer, PromptLayout.from_dict(store.manifest["prompt"]))
stop_ids = prompter.stop_ids(loaded.eos_token_id)
gaps, agree = [], []
for style, text in DEFAULT_PROMPTS:
    prompt = prompter.question_tokens(text, first_turn=True, raw=style == "raw")
    continuation = reference_continuation(loaded, open_cache(loaded, store, "full"), prompt, 64, stop_ids)
    full, _ = forced_logits(loaded, open_cache(loaded, store, "full"), prompt, continuation)
    approx, _ = forced_logits(loaded, open_cache(loaded, store, "retrieval", searched), prompt, continuation)
    top = approx.topk(2, -1).values
    gaps += (top[:, 0] - top[:, 1]).tolist()
    agree += (full.argmax(-1) == approx.argmax(-1)).tolist()
gaps, agree = np.array(gaps), np.array(agree)
print(json.dumps({
    "context": Path(args[0]).name, "context_tokens": store.n_tokens, "model": loaded.fingerprint.source, "positions": len(gaps),
    "token_agreement": round(float(agree.mean()), 4),
    "gaps_where_tokens_differ": sorted(round(float(g), 3) for g in gaps[~agree]),
    "by_margin": [{"margin": m, "steps_run_again": round(float((gaps < m).mean()), 4),
                   "token_agreement": round(float((agree | (gaps < m)).mean()), 4)} for m in MARGINS],
}))
