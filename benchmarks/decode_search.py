"""The graph searches of one real decode step, every layer searched, repeated on one thread: the
time per key read (a KV head's query heads search in lockstep and share each read; the router's
centroid scores count as reads too).

    python benchmarks/decode_search.py [--model NAME] CTX.idx [REPEATS]

Decodes a few tokens of a continuation on the saved context, captures each retrieval layer's
queries and entry points at the next step, then runs those searches REPEATS times (default 25)
and prints the fastest pass. The same searches every pass, so two versions of the kernel can be
compared by alternating runs (this machine is shared: compare within minutes, not across days).
"""

import json
import sys
import time

import numba

from ra_cli.engine.generate import prefill
from ra_cli.model import load_model
from ra_cli.retrieval.kernels import CARRY
from ra_cli.retrieval.layer import RetrievalLayer, RetrievalSettings
from ra_cli.retrieval.modes import open_cache
from ra_cli.store import ContextStore

CONTINUATION = " The license also says that you may copy and distribute the program"

args = sys.argv[1:]
model = None
if args[:1] == ["--model"]:
    model, args = args[1], args[2:]
repeats = int(args[1]) if len(args) > 1 else 25
loaded = load_model(model)
cache = open_cache(loaded, ContextStore.open(args[0]), "retrieval",
                   RetrievalSettings(dense_when_cheaper=False, exact_margin=0))
tokens = loaded.tokenizer(CONTINUATION, add_special_tokens=False).input_ids
for token in tokens[:6]:
    prefill(loaded.model, cache, [token])
captured = []
attend = RetrievalLayer._attend_in_host_memory


def capture(layer, query, offset, scaling):
    captured.append((layer, query.copy(), layer._entry_points(query.shape[0]).copy()))
    return attend(layer, query, offset, scaling)


RetrievalLayer._attend_in_host_memory = capture
prefill(loaded.model, cache, [tokens[6]])
RetrievalLayer._attend_in_host_memory = attend
numba.set_num_threads(1)


def searches():
    began, reads = time.perf_counter(), 0
    for layer, query, entry_points in captured:
        result = layer.index.search(query, min(layer.top_k, layer.n_indexed), layer.settings.ef, entry_points,
                                    ordered=CARRY)
        groups = query.shape[0] // layer.host.keys.shape[0]
        reads += int(result.evaluations[::groups].sum())
    return time.perf_counter() - began, reads


searches()
seconds, reads = min(searches() for _ in range(repeats))
print(json.dumps({"context": args[0], "layers": len(captured), "reads": reads, "ms_one_thread": round(seconds * 1e3, 2),
                  "ns_per_read": round(seconds * 1e9 / reads, 1)}))
