"""Steps several commands share, each with its status line or progress bar on stderr."""

from __future__ import annotations

from pathlib import Path

from ra_cli.errors import Interrupted, RaError


def load_model(model, device, dtype, weights="auto", quantize=None, gpu_mem_gb=None):
    from ra_cli import model as models  # looked up at call time: tests substitute load_model
    from ra_cli.model.load import cap_device_memory
    from ra_cli.ui import status

    cap_device_memory(device, gpu_mem_gb)
    if weights == "auto" and quantize is None:
        loaded = models.load_model(model, device=device, dtype=dtype)
    else:
        loaded = models.load_model(model, device=device, dtype=dtype, weights=weights, quantize=quantize)
    status(f"model {loaded.fingerprint.source} on {loaded.device} ({loaded.fingerprint.dtype}{_products_note(loaded)}), "
           f"loaded in {loaded.load_seconds:.1f} s")
    return loaded


def _products_note(loaded) -> str:
    import torch

    from ra_cli.engine.linear import cpu_multiplies_bf16

    if loaded.device.type == "cpu" and loaded.dtype == torch.bfloat16 and not cpu_multiplies_bf16():
        return "; prefill products in float32: this CPU has no bf16 instructions"
    return ""


def model_for(source, model: str | None) -> str | None:
    """The model to load for a chat source: the one asked for (--model, or its variable RA_MODEL);
    for a saved context with none asked, the named model that made it — its KV means something to
    that model alone — said on stderr, or an error naming the fetch when it is not here (before
    any loading)."""
    from ra_cli.errors import RaError
    from ra_cli.manifest import recorded_model
    from ra_cli.model.resolve import EMBEDDED_NAME, NAMED, named_model_from_file, named_model_path
    from ra_cli.ui import status

    if model is not None or source.context is None:
        return model
    name = named_model_from_file(recorded_model(source.context))
    if name is None or name == EMBEDDED_NAME:
        return model
    if named_model_path(NAMED[name]) is None:
        raise RaError(f"{source.context} was made with {name}, which is not fetched here; run "
                      f"`{NAMED[name].how_to_get()}` (or pass --model)")
    status(f"using {name}, the model that made {source.context.name}")
    return name


def read_source(path: Path, encoding: str):
    """A saved context, a document or a folder of documents, read (with a page bar for PDFs)
    before any model loads."""
    from ra_cli.sources import resolve_source
    from ra_cli.ui import page_progress, warn

    with page_progress(f"reading {path.name}") as on_page:
        return resolve_source(path, encoding, on_page, warn)


def read_documents(paths: list[Path], encoding: str):
    """What `ra ingest` reads: one document, or several (files, folders) as one collection."""
    from ra_cli.collection import load_collection
    from ra_cli.document import PIPED, load_document
    from ra_cli.ingest import is_context
    from ra_cli.sources import read_piped
    from ra_cli.ui import page_progress, warn

    if any(str(path) == PIPED for path in paths):
        if len(paths) > 1:
            raise RaError("- (a document piped in) is ingested alone; give the other documents in a run of their own")
        return read_piped(encoding)
    for path in paths:
        if is_context(path):
            raise RaError(f"{path} is a context made by `ra ingest`, not a document; chat with it: ra chat {path}")
    with page_progress(f"reading {paths[0].name}") as on_page:
        if len(paths) == 1 and not paths[0].is_dir():
            return load_document(paths[0], encoding, on_page)
        return load_collection(paths, encoding, warn, on_page)


def ingest_with_progress(run, kind: str, interrupted: str):
    """Run `run(on_progress, on_index)` under a prefill bar and an index bar; Ctrl-C ends it with
    `interrupted` (what was kept) and exit code 130."""
    from ra_cli.ui import LayerProgress, TokenProgress

    layers = LayerProgress(f"{kind} index")
    try:
        with TokenProgress("prefill") as bar:
            return run(bar, layers)
    except KeyboardInterrupt:
        raise Interrupted(interrupted)
    finally:
        layers.close()


def open_store(loaded, source, options):
    """The store behind a chat/eval source, ingesting the document into the cache when needed."""
    from ra_cli.sources import open_source
    from ra_cli.ui import status, warn

    store, result = ingest_with_progress(lambda bar, layers: open_source(loaded, source, options, bar, layers, warn),
                                         options.index.kind, "interrupted while ingesting; run the same command "
                                         "again to resume")
    if source.context is not None:
        status(f"context {source.context}: {store.n_tokens:,} tokens of {store.manifest['document']['name']}")
    elif result is None:
        status(f"reused {store.n_tokens:,}/{store.n_tokens:,} tokens of {source.name} from the cache")
    else:
        status(f"reused {result.reused_tokens:,}/{result.n_tokens:,} tokens; prefilled {result.prefilled_tokens:,} "
               f"in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} tok/s)")
    return store
