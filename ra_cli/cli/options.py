"""Options shared by several commands, validated by Typer before any slow work starts."""

from __future__ import annotations

import codecs
import re

import typer

from ra_cli.choices import EXACT_MARGIN, ComputeDtype, IndexKind, KvDtype, PrefillMode, WeightFormat


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"'{value}': use auto, cpu, cuda or cuda:N")
    return value


def _encoding(value: str) -> str:
    try:
        codecs.lookup(value)
    except LookupError:
        raise typer.BadParameter(f"unknown encoding '{value}'; use a Python codec name such as utf-8 or latin-1")
    return value


def positive(value: float) -> float:
    if value <= 0:
        raise typer.BadParameter(f"{value} must be greater than 0")
    return value


def parse_tokens(text: str) -> int:
    """'16k' -> 16384, '128K' -> 131072, '5000' -> 5000; at least 1."""
    value = text.strip().lower()
    try:
        count = int(float(value[:-1]) * 1024) if value.endswith("k") else int(value)
    except ValueError:
        raise typer.BadParameter(f"cannot read '{text}' as a token count; use e.g. 4096, 16k or 128k")
    if count < 1:
        raise typer.BadParameter(f"'{text}': a token count must be at least 1")
    return count


def token_counts(text: str) -> list[int]:
    """'8k,16k,32k' -> sizes; '4k..32k' -> every doubling from 4K to 32K."""
    if ".." in text:
        first, last = (parse_tokens(part) for part in text.split("..", 1))
        if first > last:
            raise typer.BadParameter(f"'{text}': the first size must not exceed the last")
        sizes = []
        while first <= last:
            sizes.append(first)
            first *= 2
        return sizes
    return [parse_tokens(part) for part in text.split(",") if part.strip()]


Model = typer.Option(None, "--model", "-m", envvar="RA_MODEL",
                     help="Model: 'smollm2' (embedded, default), a named model (see `ra models`), a .gguf file, "
                          "a model directory, or a cached HF id.")
Device = typer.Option("auto", "--device", callback=_device, help="auto, cpu, cuda, cuda:N")
Dtype = typer.Option(ComputeDtype.auto, "--dtype", help="Compute dtype (auto: on a CPU bf16 for Llama, Qwen2 and Mistral models, float32 for "
                                                              "others; bf16/fp16 on GPU).")
Encoding = typer.Option("utf-8", "--encoding", callback=_encoding, help="Encoding of .txt/.md/.html files (default: strict UTF-8; an HTML file's declared charset).")
ChunkSize = typer.Option(None, "--chunk-size", min=1, help="Tokens per prefill chunk (default 512 on a CPU, 2048 on a GPU).")
KvDtypeOption = typer.Option(KvDtype.auto, "--kv-dtype", help="Stored KV dtype (auto = the compute dtype).")
Coverage = typer.Option(0.97, "--coverage", min=0.0, max=1.0,
                        help="Per-layer retrieval budget: the smallest top-k whose keys held this much attention at ingest.")
DenseBelow = typer.Option(0.8, "--dense-below", min=0.0, max=1.0,
                          help="Layers whose static + largest budget held less softmax mass than this at ingest attend densely (0 = never).")
DenseWhenCheaper = typer.Option(True, "--dense-when-cheaper/--search-every-layer",
                                help="On a CPU, layers whose search would read so many keys that dense attention is faster "
                                     "attend densely (default); --search-every-layer searches them anyway.")
# ra eval measures retrieval itself: every retrievable layer searched unless asked otherwise
DenseWhenCheaperEval = typer.Option(False, "--dense-when-cheaper/--search-every-layer",
                                    help="Evaluate chat's CPU default, where layers that are faster dense attend densely "
                                         "(default here: every retrievable layer searched, to measure retrieval).")
ExactMargin = typer.Option(EXACT_MARGIN, "--exact-margin", min=0.0,
                          help="Run a step again with exact attention when its two likeliest next tokens are closer "
                               "than this many nats (with every layer searched; in proportion to the layers that "
                               "search), where retrieval's small error could swap them; questions are read exactly "
                               "too. 0 = retrieval alone.")
Index = typer.Option(IndexKind.graph, "--index",
                     help="Search index: graph (attention-aware, ours), hnsw (hnswlib on centred keys, a baseline), flat (exact).")
TopK = typer.Option(None, "--top-k", min=1, help="Keys retrieved per query head per layer (default: per-layer budget chosen at ingest).")
Ef = typer.Option(None, "--ef", min=1, help="Search beam width (default: calibrated per layer at ingest).")
Json = typer.Option(False, "--json", help="Print JSON on stdout.")
Prefill = typer.Option(PrefillMode.auto, "--prefill",
                       help="full: every chunk attends to all earlier tokens (quadratic); sparse: sinks, recent window "
                            "and selected blocks (linear); auto: sparse past 32K tokens on a CPU.")
Weights = typer.Option(WeightFormat.auto, "--weights",
                       help="Weight format: auto (int4 groups of the GGUF where exact, else int8, on CPU; dense on GPU), dense, int8, int4.")
LoadIn4bit = typer.Option(False, "--load-in-4bit", help="4-bit weights with bitsandbytes (NF4; CUDA GPUs).")
LoadIn8bit = typer.Option(False, "--load-in-8bit", help="8-bit weights with bitsandbytes (CUDA GPUs).")
GpuMemGb = typer.Option(None, "--gpu-mem-gb", min=1.0, help="Cap this process's GPU memory (a big card standing in for a smaller one).")


def quantization(load_in_4bit: bool, load_in_8bit: bool) -> str | None:
    if load_in_4bit and load_in_8bit:
        raise typer.BadParameter("choose one of --load-in-4bit and --load-in-8bit", param_hint="'--load-in-4bit'")
    return "4bit" if load_in_4bit else "8bit" if load_in_8bit else None
