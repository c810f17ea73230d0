"""Sparse against full prefill on the same text: what the stored KV lets the model say afterwards.

    python benchmarks/sparse_prefill.py fidelity --context 16384 [--model M] [--document D] [--tokens 128]
    python benchmarks/sparse_prefill.py needles --context 16384 [--model M] [--document D] [--depths 0.1,0.5,0.9]

fidelity: the first N tokens of the text (the shipped corpus by default, repeated as needed)
ingested twice, `--prefill full` (the reference; with `auto` below 32K, so `ra bench --context`'s
cached ingest is reused) and `--prefill sparse`; then the next `--tokens` tokens of the text are
teacher-forced through each store under full attention: top-1 agreement of the next-token
distributions, their mean KL(full || sparse), and the prefill seconds of each.

needles: a needle sentence at each depth of a text cut to about N tokens, ingested both ways; its
cue asked as a raw continuation (10 tokens, greedy) under full attention on each store and under
retrieval attention on the full-prefill store: is the sparse-prefilled store's answer the full
one's, and is retrieval's? One JSON object per measurement on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from ra_cli.bench.corpus import bench_text, cached_context
from ra_cli.bench.needles import NEEDLES, paragraphs_of
from ra_cli.chat import start_chat
from ra_cli.document import Document
from ra_cli.engine.generate import Sampling, prefill
from ra_cli.index import IndexParams
from ra_cli.ingest import IngestOptions, ingest
from ra_cli.model import load_model
from ra_cli.retrieval.modes import open_cache, settings_for
from ra_cli.store import ContextStore


def forced_log_probs(loaded, store, tokens: list[int]) -> torch.Tensor:
    """Next-token log-probabilities after each of `tokens`, fed one at a time after the store."""
    cache = open_cache(loaded, store, "full")
    return torch.stack([torch.log_softmax(prefill(loaded.model, cache, [token]), -1) for token in tokens])


def fidelity(loaded, name: str, text: str, context: int, count: int) -> dict:
    stores, seconds = {}, {}
    for mode, prefill_mode in (("full", "auto" if context <= 32768 else "full"), ("sparse", "sparse")):
        bench = cached_context(loaded, name, text, context, count, IndexParams(), prefill=prefill_mode)
        recorded = bench.store.manifest.get("ingest", {})
        assert recorded.get("prefill") == mode, recorded  # auto must have meant full
        stores[mode], seconds[mode] = bench.store, recorded.get("prefill_seconds")
        following = bench.continuation
    full = forced_log_probs(loaded, stores["full"], following[:count])
    sparse = forced_log_probs(loaded, stores["sparse"], following[:count])
    agreement = (full.argmax(-1) == sparse.argmax(-1)).float().mean().item()
    kl = (full.exp() * (full - sparse)).sum(-1)
    return {"measure": "fidelity", "model": loaded.fingerprint.source, "context": context, "tokens": count,
            "top1_agreement": round(agreement, 4), "kl_mean": round(kl.mean().item(), 5),
            "kl_max": round(kl.max().item(), 4), "prefill_seconds": seconds}


def needles(loaded, name: str, text: str, context: int, depths: list[float]) -> list[dict]:
    paragraphs = paragraphs_of(loaded, text, context)
    work = Path(tempfile.mkdtemp(prefix="ra-sparse-needles-"))
    rows = []
    for i, depth in enumerate(depths):
        needle, cue, answer = NEEDLES[i % len(NEEDLES)]
        at = max(1, round(depth * len(paragraphs)))
        document = Document(name=f"{name} + needle at {depth:.0%}", sha256=f"sparse-needle-{i}", kind="text",
                            text="\n\n".join(paragraphs[:at] + [needle] + paragraphs[at:]))
        answers, seconds = {}, {}
        for mode in ("full", "sparse"):
            started = time.perf_counter()
            ingest(loaded, document, work / f"{i}-{mode}.idx", IngestOptions(prefill=mode))
            seconds[mode] = round(time.perf_counter() - started, 1)
            store = ContextStore.open(work / f"{i}-{mode}.idx", loaded.fingerprint)
            answers[f"{mode} prefill, full attention"] = start_chat(loaded, store, "full").ask(
                cue, 10, Sampling(), raw=True).text
            if mode == "full":
                # the index, not a dense fallback (no layer dense, no step run again exactly)
                searched = settings_for(store, dense_when_cheaper=False, exact_margin=0)
                answers["full prefill, retrieval"] = start_chat(loaded, store, "retrieval", searched).ask(
                    cue, 10, Sampling(), raw=True).text
        reference = answers["full prefill, full attention"]
        row = {"measure": "needle", "model": loaded.fingerprint.source, "depth": depth, "tokens": store.n_tokens,
               "expected": answer, "full_right": answer in reference,
               "sparse_prefill_same_as_full": answers["sparse prefill, full attention"] == reference,
               "retrieval_same_as_full": answers["full prefill, retrieval"] == reference,
               "ingest_seconds": seconds, "answers": answers}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("measure", choices=("fidelity", "needles"))
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--model", default=None)
    parser.add_argument("--document", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    name, text = bench_text(args.document, default="corpus")
    if args.measure == "fidelity":
        print(json.dumps(fidelity(loaded, name, text, args.context, args.tokens)), flush=True)
    else:
        needles(loaded, name, text, args.context, [float(d) for d in args.depths.split(",")])


if __name__ == "__main__":
    main(sys.argv[1:])
