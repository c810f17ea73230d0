"""Where a decode step's time goes on an accelerator: torch.profiler's operations by device time
and by host time, for each attention mode, on a synthetic shape — what the GPU machine's one
prepared call should bring back besides the bench's totals (scripts/gpu-check.sh runs it with
RA_GPU_PROFILE=1, after the bench has cached the context).

    python benchmarks/gpu_profile.py SHAPE CONTEXT [--load-in-4bit | --dtype D] [--gpu-mem-gb N] [--modes a,b]

On a CPU (`tiny 1k --device cpu`) it profiles the same path, to try the script."""

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from ra_cli.bench.worker import SYNTHETIC_SEARCH, _context, _load
from ra_cli.cli import parse_tokens
from ra_cli.engine.generate import prefill
from ra_cli.retrieval.modes import open_cache, retrieval_cache, settings_for

parser = argparse.ArgumentParser()
parser.add_argument("shape")
parser.add_argument("context", type=parse_tokens)
parser.add_argument("--device", default="cuda")
parser.add_argument("--dtype", default="auto")
parser.add_argument("--load-in-4bit", action="store_true")
parser.add_argument("--gpu-mem-gb", type=float)
parser.add_argument("--modes", default="retrieval,static-on-host,full")
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()

config = {"synthetic": args.shape, "device": args.device, "dtype": args.dtype, "weights": "auto",
          "quantize": "4bit" if args.load_in_4bit else None, "gpu_mem_gb": args.gpu_mem_gb, "model": None,
          "document": "", "warmup": 2, "steps": args.steps, "prefill": "auto"}
loaded = _load(config)
bench = _context(loaded, config, args.context)  # the bench's cached ingest when it ran first
on_device = loaded.device.type == "cuda"
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
device_column = "device_time_total" if on_device else "cpu_time_total"
for mode in args.modes.split(","):
    # as the bench times a synthetic model: every layer searching at a trained model's budget
    settings = settings_for(bench.store, dense_below=0.0, dense_when_cheaper=False, exact_margin=0.0, **SYNTHETIC_SEARCH)
    cache = (retrieval_cache(loaded, bench.store, settings, static_on_host=True) if mode == "static-on-host"
             else open_cache(loaded, bench.store, mode, settings))
    tokens = iter(bench.continuation)
    for _ in range(config["warmup"]):
        prefill(loaded.model, cache, [next(tokens)])
    with profile(activities=activities) as trace:
        for _ in range(args.steps):
            prefill(loaded.model, cache, [next(tokens)])
            if on_device:
                torch.cuda.synchronize()
    averages = trace.key_averages()
    print(json.dumps({"mode": mode, "context_tokens": bench.store.n_tokens, "steps": args.steps}))
    print(f"== {mode}: by device time (totals over {args.steps} steps)")
    print(averages.table(sort_by=device_column, row_limit=15))
    print(f"== {mode}: by host time")
    print(averages.table(sort_by="cpu_time_total", row_limit=15))
    del cache
