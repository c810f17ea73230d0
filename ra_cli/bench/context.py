"""`ra bench --context N`: whole-model decode per context size and attention mode, with llama.cpp
running the same GGUF on the same tokens in the same run.

Every (context, mode) pair runs in a fresh worker process (bench/worker.py), so its peak memory is
its own and one run's caches do not warm the next. The context is the benchmark text (the shipped
corpus by default) cut or repeated to N tokens and ingested as `ra ingest` does (cached: later
runs reuse it); decode is teacher-forced through the tokens that follow it in the text, a
median over `steps` steps after `warmup` (and their mean). A step's time is split into model body,
index search, attention (retrieved and static keys, and dense layers), other (the retrieval
layers' glue) and exact (the steps whose next token was too close to call, run again with exact
attention: their second forward's time, per step, and how many steps).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ra_cli.choices import EXACT_MARGIN
from ra_cli.errors import RaError

# search-all: retrieval, --search-every-layer; static-on-host: retrieval with the static sets in host
# memory too (on a GPU machine: one CPU call per layer instead of the split path; on a CPU the same)
MODES = ("retrieval", "full", "flat", "offload", "search-all", "static-on-host")
LLAMA_CPP = "llama.cpp"
LLAMA_HINT = ("llama.cpp baseline skipped: llama-cpp-python is not installed; `pip install 'ra-cli[bench]'` "
              "builds it from source (a few minutes)")


@dataclass
class ContextBenchConfig:
    contexts: list[int]
    modes: tuple[str, ...] = ("retrieval", "full", "flat")
    document: Path | None = None
    steps: int = 32
    warmup: int = 4
    baseline: str | None = None  # "llama.cpp"
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    weights: str = "auto"
    prefill: str = "auto"
    synthetic: str | None = None  # a model shape with random weights (timing only)
    gpu_mem_gb: float | None = None
    quantize: str | None = None
    exact_margin: float = EXACT_MARGIN  # retrieval modes: steps this uncertain are run again exactly (RetrievalSettings)
    extra: dict = field(default_factory=dict)


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def machine() -> dict:
    import torch

    from ra_cli.engine.linear import cpu_multiplies_bf16

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    info["cpu_bf16_instructions"] = cpu_multiplies_bf16()  # without them prefill multiplies in float32
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_worker(task: str, config: ContextBenchConfig, context: int, mode: str) -> dict:
    """One measurement in a fresh process; its progress bars pass through on stderr."""
    payload = json.dumps({"task": task, "config": asdict(config) | {"document": str(config.document or "")},
                          "context": context, "mode": mode})
    done = subprocess.run([sys.executable, "-m", "ra_cli.bench.worker", payload], stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RaError(f"the {mode} run at {context:,} tokens failed (exit code {done.returncode}); "
                      "its error is printed above")
    return json.loads(lines[-1])


def run_context_bench(config: ContextBenchConfig, status=print) -> dict:
    if config.baseline == LLAMA_CPP and not llama_cpp_available():
        status(LLAMA_HINT)
        config.baseline = None
    runs = []
    for context in config.contexts:
        for mode in config.modes:
            status(f"{context:,} tokens, {mode} attention")
            runs.append(run_worker("decode", config, context, mode))
        if config.baseline == LLAMA_CPP:
            status(f"{context:,} tokens, llama.cpp")
            runs.append(run_worker("llama", config, context, LLAMA_CPP))
    model = f"synthetic:{config.synthetic}" if config.synthetic else config.model or "smollm2"
    return {"machine": machine(), "model": model, "synthetic": config.synthetic is not None,
            "steps": config.steps, "prefill": config.prefill, "runs": runs}


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from ra_cli.ui import stderr

    table = Table(title=f"decode ms/token (median of {report['steps']} steps); model {report['model']}"
                        + (" — synthetic weights: timing only" if report["synthetic"] else ""))
    columns = ("tokens", "mode", "ms/tok", "mean", "body", "search", "attn", "other", "retr", "exact", "ingest/s", "RSS",
               "disk", "keys", "dense")
    for column in columns:
        table.add_column(column, justify="right")

    def number(value, fmt="{:.1f}"):
        return "-" if value is None else fmt.format(value)

    for run in report["runs"]:
        redone = run.get("exact_steps")
        mode = run["mode"] if run.get("fits", True) else f"{run['mode']}: does not fit"
        table.add_row(f"{run['context_tokens']:,}", mode, number(run["decode_ms_per_token"]),
                      number(run.get("decode_mean_ms")), number(run.get("body_ms")), number(run.get("search_ms")),
                      number(run.get("attention_ms")), number(run.get("other_ms")), number(run.get("retrieval_ms")),
                      "-" if redone is None else f"{number(run.get('exact_ms'))} ({redone}/{run['steps']})",
                      number(run.get("ingest_tokens_per_s"), "{:,.0f}"),
                      number(run["peak_rss_bytes"] and run["peak_rss_bytes"] / 2**30, "{:.1f}G"),
                      number(run.get("disk_bytes") and run["disk_bytes"] / 2**30, "{:.2f}G"),
                      number(run.get("keys_scanned"), "{:,.0f}"),
                      dense_count(run))
    # into a log or a pipe (80 columns by default) the 15 columns would be squeezed to "1…"
    console = stderr if stderr.is_terminal else Console(stderr=True, highlight=False, width=170)
    console.print(table)


def dense_count(run: dict) -> str:
    """Dense layers of a run: chosen when the chat opened, + those whose search was timed slower."""
    if run.get("dense_layers") is None:
        return "-"
    measured = run.get("measured_dense_layers")
    return str(len(run["dense_layers"])) + (f"+{len(measured)}" if measured else "")


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RaError("--plot needs matplotlib: pip install 'ra-cli[bench]' (or pip install matplotlib)")
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for mode in dict.fromkeys(run["mode"] for run in report["runs"]):
        points = sorted((run["context_tokens"], run["decode_ms_per_token"]) for run in report["runs"]
                        if run["mode"] == mode and run["decode_ms_per_token"] is not None)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("context (tokens)")
    axis.set_ylabel("decode ms/token")
    axis.set_title(f"{report['model']} on {report['machine'].get('cpu', report['machine']['platform'])}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
