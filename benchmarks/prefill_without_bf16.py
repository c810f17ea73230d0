"""Prefill on a CPU without bf16 instructions, stood in for on this one: torch reaches bf16
hardware only through oneDNN, so with oneDNN switched off its bf16 GEMMs take the software path a
CPU without AVX512-BF16 / AMX takes. Times TOKENS tokens of prefill (512-token chunks, full
attention) with the default weights, alternating ROUNDS times:

  this-cpu           oneDNN on: what this CPU does
  no-bf16            oneDNN off, ra's choice there: products in float32 (engine/linear.py)
  no-bf16-bf16-gemm  oneDNN off, bf16 products anyway (ra before that choice)

usage: python benchmarks/prefill_without_bf16.py [--model NAME] [TOKENS] [ROUNDS]"""

import json
import sys
import time

import torch

import ra_cli.engine.linear as linear
from ra_cli.bench.corpus import bench_text, context_tokens
from ra_cli.engine.cache import ContextCache
from ra_cli.engine.generate import prefill
from ra_cli.model import load_model

args = sys.argv[1:]
model_name = None
if args[:1] == ["--model"]:
    model_name, args = args[1], args[2:]
total = int(args[0]) if args else 2048
rounds = int(args[1]) if len(args) > 1 else 2
CHUNK = 512

loaded = load_model(model_name)
tokens, _ = context_tokens(loaded, bench_text(None)[1], total)
tokens = tokens[:total]
ra_choice = linear.cpu_multiplies_bf16


def run(setting: str) -> dict:
    torch.backends.mkldnn.enabled = setting == "this-cpu"
    linear.cpu_multiplies_bf16 = (lambda: True) if setting == "no-bf16-bf16-gemm" else ra_choice
    cache = ContextCache.full(loaded.model.config)
    began = time.perf_counter()
    for start in range(0, total, CHUNK):
        prefill(loaded.model, cache, tokens[start:start + CHUNK], want_logits=False)
    seconds = time.perf_counter() - began
    return {"setting": setting, "tokens": total, "seconds": round(seconds, 2), "tokens_per_s": round(total / seconds, 1)}


print(json.dumps({"model": loaded.spec.name, "dtype": loaded.fingerprint.dtype,
                  "cpu_has_bf16_instructions": linear._cpu_has_bf16_instructions(), "threads": torch.get_num_threads()}))
for setting in ("this-cpu", "no-bf16"):  # warm-up: first calls; the float32 weight copies are made once
    run(setting)
copies = [m._float32[1] for m in loaded.model.ra_lean.modules()
          if isinstance(m, linear.PackedLinear) and getattr(m, "_float32", None) is not None]
print(json.dumps({"float32_weight_copies_bytes": sum(c.numel() * c.element_size() for c in copies)}))
for _ in range(rounds):
    for setting in ("this-cpu", "no-bf16", "no-bf16-bf16-gemm"):
        print(json.dumps(run(setting)), flush=True)
