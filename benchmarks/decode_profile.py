"""Where a decode step's time goes: whole-model ms/token with full attention on a saved context
(16 steps after 4 warm-up), the weight bytes a step streams, and torch's profiler table over 10
more steps (torch ops only: numba kernels show as the time between them).

    python benchmarks/decode_profile.py [--model NAME] CTX.idx
"""

import sys
import time

import torch

from ra_cli.engine.generate import prefill
from ra_cli.model import load_model
from ra_cli.retrieval.layer import RetrievalSettings
from ra_cli.retrieval.modes import open_cache
from ra_cli.store import ContextStore

CONTINUATION = (" The license also says that you may copy and distribute the program, provided that you keep"
                " these notices intact and give every recipient a copy of this license along with the program.")
STEPS = 16

args = sys.argv[1:]
model = None
if args[:1] == ["--model"]:
    model, args = args[1], args[2:]
loaded = load_model(model)
cache = open_cache(loaded, ContextStore.open(args[0]), "full", RetrievalSettings())
tokens = loaded.tokenizer(CONTINUATION, add_special_tokens=False).input_ids
assert len(tokens) >= 4 + STEPS + 10, len(tokens)
for token in tokens[:4]:
    prefill(loaded.model, cache, [token])
began = time.perf_counter()
for token in tokens[4:4 + STEPS]:
    prefill(loaded.model, cache, [token])
print(f"{(time.perf_counter() - began) / STEPS * 1000:.2f} ms/token over {STEPS} steps")
lean = getattr(loaded.model, "ra_lean", None)
if lean is not None:
    print(f"decode weights: {lean.decode_bytes / 1e6:.1f} MB a step")
with torch.profiler.profile() as profile:
    for token in tokens[4 + STEPS:4 + STEPS + 10]:
        prefill(loaded.model, cache, [token])
averages = profile.key_averages()
print(f"{sum(e.count for e in averages) / 10:,.0f} torch op calls a step (nested ones counted), "
      f"{sum(e.self_cpu_time_total for e in averages) / 10 / 1000:.2f} ms of their own time")
print(averages.table(sort_by="self_cpu_time_total", row_limit=20))
