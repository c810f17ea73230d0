"""`ra bench` (index recall, one decode step) and `ra eval` (fidelity against full attention)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ra_cli.cli import options as opt
from ra_cli.cli.steps import load_model, model_for, open_store, read_source
from ra_cli.errors import RaError


# Options that belong to one measurement; given to another, they are refused (not silently ignored).
MODE_OPTIONS = {
    "context": ("modes", "baseline", "plot_file", "steps", "synthetic", "prefill", "exact_margin"),
    "recall": ("layers", "queries", "query_stride", "baseline_ingest", "prefill"),
    "decode-step": ("shape",),
    "needles": ("exact_margin",),
}


def _refuse_other_modes_options(ctx: typer.Context, mode: str) -> None:
    from typer._click.core import ParameterSource  # typer vendors click: its enum, not click's

    own = set(MODE_OPTIONS[mode])
    for name in {n for options in MODE_OPTIONS.values() for n in options} - own:
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            flag = next(p.opts[0] for p in ctx.command.params if p.name == name)
            raise typer.BadParameter(f"{flag} does not apply to {'whole-model decode' if mode == 'context' else '--' + mode}",
                                     param_hint=f"'{flag}'")


def bench_command(
    ctx: typer.Context,
    context: Optional[str] = typer.Option(None, "--context",
                                          help="Context length(s) in tokens: 16k, 8k,16k,32k or 4k..32k (default 16k; "
                                               "--recall, --decode-step and --needles take one; --needles: document size, default 6k)."),
    recall: bool = typer.Option(False, "--recall", help="Index quality: Recall@100 and keys scanned vs hnswlib and exact search."),
    decode_step: bool = typer.Option(False, "--decode-step", help="CPU cost of one decode step of one layer: retrieval vs exact attention."),
    needles: bool = typer.Option(False, "--needles", help="Needle sweep: real documents, needles at 10 depths, full vs flat vs retrieval."),
    modes: str = typer.Option("retrieval,full,flat", "--modes", help="Attention modes for whole-model decode: retrieval, full, flat, offload, "
                                                                      "search-all (retrieval with --search-every-layer), static-on-host (retrieval with the static sets in host memory: on a GPU, one CPU call per layer)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="llama.cpp: the same GGUF and tokens in the same run (pip install 'ra-cli\\[bench]')."),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="Write ms/token vs context, one line per mode, to this PNG."),
    steps: int = typer.Option(32, "--steps", min=1, help="Decode steps timed per run (after 4 warm-up steps)."),
    synthetic: Optional[str] = typer.Option(None, "--synthetic",
                                            help="Random weights of a real shape, made on the device: llama-3-8b, qwen2.5-7b, tiny (timing only)."),
    prefill: opt.PrefillMode = opt.Prefill,
    shape: str = typer.Option("smollm2", "--shape", help="Layer shape for --decode-step: smollm2 or llama3-8b."),
    document: Optional[Path] = typer.Option(None, "--document", exists=True, dir_okay=False,
                                            help="Text to use (default: the shipped corpus; the sample for --recall)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="--recall: comma-separated layers (default: every 4th), or 'all'."),
    queries: int = typer.Option(256, "--queries", min=1, max=4096, help="--recall: held-out decode-time queries."),
    query_stride: int = typer.Option(16, "--query-stride", min=1, help="--recall: graph trained on every n-th prefill query."),
    baseline_ingest: bool = typer.Option(False, "--baseline-ingest", help="--recall: also time the same prefill without any index."),
    exact_margin: float = opt.ExactMargin,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    model: Optional[str] = opt.Model,
    device: str = opt.Device,
    dtype: opt.ComputeDtype = opt.Dtype,
    weights: opt.WeightFormat = opt.Weights,
    load_in_4bit: bool = opt.LoadIn4bit,
    load_in_8bit: bool = opt.LoadIn8bit,
    gpu_mem_gb: Optional[float] = opt.GpuMemGb,
):
    """Measure ra: decode per context size (default), --recall, --decode-step or --needles.

    Default: whole-model decode per context size and attention mode (--baseline llama.cpp beside it).

    --recall: the index against exact top-k. --decode-step: one layer's step against exact attention.

    --needles: needles at 10 depths of real documents, answered with full, flat and retrieval attention."""
    from ra_cli.ui import TokenProgress, status

    if recall + decode_step + needles > 1:
        raise RaError("choose one of --recall, --decode-step and --needles (or none, for whole-model decode)")
    _refuse_other_modes_options(ctx, "recall" if recall else "decode-step" if decode_step else "needles" if needles else "context")
    sizes = opt.token_counts(context or ("6k" if needles else "16k"))
    if (recall or decode_step or needles) and len(sizes) != 1:
        raise RaError("--recall, --decode-step and --needles measure one context size; give --context a single size")
    if needles:
        from ra_cli.bench.needles import NeedleBenchConfig, run_needle_bench

        config = NeedleBenchConfig(tokens=sizes[0], exact_margin=exact_margin)
        if document is not None:
            config.documents = [document]
        report = run_needle_bench(load_model(model, device, dtype, weights.value, opt.quantization(load_in_4bit, load_in_8bit), gpu_mem_gb), config, status=status)
        status(f"{report['placements']} placements: full right {report['full_right']}, flat right {report['flat_right']}, "
               f"retrieval right {report['retrieval_right']}; retrieval right where full is right: "
               f"{report['retrieval_right_where_full_right']}/{report['full_right_placements']}; retrieval differs from "
               f"full: {report['retrieval_differs_from_full']}")
        if as_json:
            print(json.dumps(report))
        return
    if not (recall or decode_step):
        from ra_cli.bench.context import LLAMA_CPP, MODES, ContextBenchConfig, plot, print_table, run_context_bench

        chosen = tuple(mode.strip() for mode in modes.split(",") if mode.strip())
        unknown = [mode for mode in chosen if mode not in MODES]
        if unknown or not chosen:
            raise RaError(f"--modes {modes}: choose from {', '.join(MODES)}")
        if baseline not in (None, LLAMA_CPP):
            raise RaError(f"--baseline {baseline}: the one baseline is {LLAMA_CPP}")
        from ra_cli.model.synthetic import SHAPES

        if synthetic is not None and synthetic not in SHAPES:
            raise RaError(f"unknown --synthetic '{synthetic}'; choose {', '.join(SHAPES)}")
        if synthetic is not None and baseline:
            raise RaError("--synthetic weights have no GGUF for llama.cpp to run; drop --baseline")
        config = ContextBenchConfig(contexts=sizes, modes=chosen, document=document, steps=steps, baseline=baseline,
                                    model=model, device=device, dtype=dtype.value, weights=weights.value,
                                    prefill=prefill.value, synthetic=synthetic, gpu_mem_gb=gpu_mem_gb, exact_margin=exact_margin,
                                    quantize=opt.quantization(load_in_4bit, load_in_8bit))
        report = run_context_bench(config, status=status)
        print_table(report)
        if plot_file is not None:
            plot(report, plot_file)
            status(f"plot written to {plot_file}")
        if as_json:
            print(json.dumps(report))
        return
    tokens = sizes[0]
    if decode_step:
        from ra_cli.bench.decode import SHAPES, DecodeStepConfig, run_decode_step_bench

        if shape not in SHAPES:
            raise RaError(f"unknown --shape '{shape}'; choose {', '.join(SHAPES)}")
        report = run_decode_step_bench(DecodeStepConfig(keys=tokens, shape=shape, queries=min(queries, 256)), status=status)
        if as_json:
            print(json.dumps(report))
        else:
            from ra_cli.ui import stderr

            for key, value in report.items():
                stderr.print(f"  {key:24s} {value}", markup=False)
        return
    from ra_cli.bench.recall import RecallBenchConfig, print_recall_table, run_recall_bench
    from ra_cli.index import IndexParams

    config = RecallBenchConfig(context=tokens, queries=queries, document=document,
                               params=IndexParams(query_stride=query_stride), baseline_ingest=baseline_ingest,
                               prefill=prefill.value)
    if layers and layers != "all":
        try:
            config.layers = [int(part) for part in layers.split(",")]
        except ValueError:
            raise RaError("--layers takes comma-separated layer numbers, e.g. 2,15,28, or 'all'")
    loaded = load_model(model, device, dtype, weights.value, opt.quantization(load_in_4bit, load_in_8bit), gpu_mem_gb)
    if layers == "all":
        from ra_cli.engine.cache import layer_windows

        config.layers = [i for i, w in enumerate(layer_windows(loaded.model.config)) if w is None]
    with TokenProgress("prefill") as bar:
        report = run_recall_bench(loaded, config, on_progress=bar, status=status)
    if as_json:
        print(json.dumps(report))
    else:
        print_recall_table(report)


EVAL_FIELDS = ("token_agreement", "kl_mean", "mass_coverage", "recall_at_k", "scanned_fraction",
               "keys_scanned_per_search", "exact_step_fraction", "ms_per_token_full", "ms_per_token_retrieval")


def eval_command(
    source: Path = typer.Argument(..., help="A context saved by `ra ingest`, or a document."),
    tokens: int = typer.Option(64, "--tokens", min=1, help="Teacher-forced continuation tokens per prompt."),
    attention: str = typer.Option("retrieval", "--attention", help="Mode compared with full attention: retrieval or flat."),
    top_k: Optional[int] = opt.TopK,
    ef: Optional[int] = opt.Ef,
    coverage: float = opt.Coverage,
    dense_below: float = opt.DenseBelow,
    dense_when_cheaper: bool = opt.DenseWhenCheaperEval,
    exact_margin: float = opt.ExactMargin,
    as_json: bool = opt.Json,
    chunk_size: Optional[int] = opt.ChunkSize,
    model: Optional[str] = opt.Model,
    device: str = opt.Device,
    dtype: opt.ComputeDtype = opt.Dtype,
    weights: opt.WeightFormat = opt.Weights,
    load_in_4bit: bool = opt.LoadIn4bit,
    load_in_8bit: bool = opt.LoadIn8bit,
    gpu_mem_gb: Optional[float] = opt.GpuMemGb,
    encoding: str = opt.Encoding,
):
    """Fidelity of retrieval attention against full attention on the same context."""
    from ra_cli.bench.fidelity import EvalConfig, run_eval
    from ra_cli.ingest import IngestOptions
    from ra_cli.choices import AttentionMode
    from ra_cli.retrieval.modes import settings_for
    from ra_cli.ui import stderr, status

    if attention not in ("retrieval", "flat", "graph", "hnsw"):
        raise typer.BadParameter(f"'{attention}': choose retrieval, flat, graph or hnsw", param_hint="'--attention'")
    found = read_source(source, encoding)
    loaded = load_model(model_for(found, model), device, dtype, weights.value,
                        opt.quantization(load_in_4bit, load_in_8bit), gpu_mem_gb)
    store = open_store(loaded, found, IngestOptions(chunk_size=chunk_size))
    settings = settings_for(store, top_k, ef, None, coverage, dense_below, dense_when_cheaper=dense_when_cheaper,
                            exact_margin=exact_margin)
    report = run_eval(loaded, store, EvalConfig(tokens=tokens, attention=AttentionMode(attention), settings=settings), status)
    if as_json:
        print(json.dumps(report))
        return
    stderr.print(f"{report['context_tokens']:,} tokens, {report['indexed_keys']:,} indexed keys per head; "
                 f"{report['attention']} attention, top-k {report['top_k'] or 'per layer'}", markup=False)
    for name in EVAL_FIELDS:
        stderr.print(f"  {name:24s} {report[name]}", markup=False)
