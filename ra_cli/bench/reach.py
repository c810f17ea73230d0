"""Can the graph reach every key, and find the rare ones?

Reachability: per layer and KV head, the fraction of indexed keys a breadth-first walk from every
entry point of a search reaches (router entries, newest keys, key 0).

Rare keys are the keys no sampled prefill query ranked in its top list — a fact stated once and
never looked at again, exactly what users ask about. Their real decode queries come from copies:
spans of the document are replayed after the context, and the induction heads of the model then
query the original span's keys (the token after the one just read). Among each copy query's exact
top-10 indexed keys, the rare ones are checked against what the search finds at default settings
(its per-layer beam, top-100), next to the same figure for keys that prefill did select — by the
graph alone, and with the token seeds chat adds (retrieval/token_seeds.py: the replayed tokens'
earlier places), each position searched as a decode step searches it.
"""

from __future__ import annotations

import numpy as np

from ra_cli.index import open_layer_index
from ra_cli.index.flat import FlatLayerIndex
from ra_cli.retrieval.token_seeds import TokenSeeds
from ra_cli.store import float32_keys

SPANS = (0.15, 0.35, 0.55, 0.75, 0.9)  # depths of the replayed spans, as fractions of the indexed range
SPAN_TOKENS = 40
TOP = 10
K = 100


def copy_tokens(store, lo: int, hi: int) -> list[int]:
    tokens = np.asarray(store.tokens)
    out: list[int] = []
    for depth in SPANS:
        start = lo + int((hi - lo - SPAN_TOKENS) * depth)
        out.extend(int(t) for t in tokens[start:start + SPAN_TOKENS])
    return out


def measure_reach(loaded, store, layers: list[int], lo: int, hi: int, capture, status=print) -> dict:
    """`capture(loaded, store, tokens, layers, hi, lo)`: the recall bench's query capture."""
    n = hi - lo
    status(f"replaying {len(SPANS)} spans of the document to query rare keys on layers {layers}")
    replayed = copy_tokens(store, lo, hi)
    queries, _ = capture(loaded, store, replayed, layers, hi, lo)
    seeds = TokenSeeds(np.asarray(store.tokens), lo, hi)
    extras = [seeds.feed(np.asarray([token]), store.n_tokens + i) for i, token in enumerate(replayed)]  # fresh arrays
    per_layer = {}
    kinds = ("rare", "rare_found", "rare_found_seeded", "selected", "selected_found", "selected_found_seeded")
    totals = dict.fromkeys(kinds, 0)
    for layer in layers:
        index = open_layer_index(store, layer)
        selected = np.unpackbits(np.asarray(index.layer.selected), axis=1)[:, :n].astype(bool)
        keys = np.ascontiguousarray(float32_keys(np.asarray(store.keys(layer)[:, lo:hi]), store.kv_dtype))
        q = queries[layer]
        truth = FlatLayerIndex(keys).search(q, TOP).ids
        found = index.search(q, K).ids
        seeded = np.concatenate([index.search(q[:, i:i + 1], K, extra=extras[i] if extras[i].size else None).ids
                                 for i in range(q.shape[1])], axis=1)
        groups = q.shape[0] // keys.shape[0]
        counts = dict.fromkeys(kinds, 0)
        for h in range(q.shape[0]):
            for i in range(q.shape[1]):
                hits, seeded_hits = set(found[h, i].tolist()), set(seeded[h, i].tolist())
                for key in truth[h, i]:
                    kind = "selected" if selected[h // groups, key] else "rare"
                    counts[kind] += 1
                    counts[kind + "_found"] += key in hits
                    counts[kind + "_found_seeded"] += key in seeded_hits
        reach = index.reachability()
        per_layer[str(layer)] = {"reachable_min_head": round(float(reach.min()), 4),
                                 "unselected_fraction": round(float(1 - selected.mean()), 4), **counts}
        for key in totals:
            totals[key] += counts[key]
    return {
        "reachable_fraction_min": min(v["reachable_min_head"] for v in per_layer.values()),
        "unselected_fraction": round(float(np.mean([v["unselected_fraction"] for v in per_layer.values()])), 4),
        "rare_key_recall": _share(totals, "rare_found", "rare"),
        "rare_key_recall_with_token_seeds": _share(totals, "rare_found_seeded", "rare"),
        "selected_key_recall": _share(totals, "selected_found", "selected"),
        "selected_key_recall_with_token_seeds": _share(totals, "selected_found_seeded", "selected"),
        "rare_keys_checked": totals["rare"], "per_layer": per_layer,
    }


def _share(totals: dict, part: str, whole: str) -> float | None:
    return round(totals[part] / totals[whole], 4) if totals[whole] else None
