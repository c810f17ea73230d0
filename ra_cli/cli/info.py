"""`ra info SOURCE`: what a saved context holds; `ra sessions`: the saved conversations."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ra_cli.cli import options as opt


def info_command(
    source: Path = typer.Argument(..., help="A context saved by `ra ingest` (a .idx directory)."),
    as_json: bool = opt.Json,
    verify: bool = typer.Option(False, "--verify", help="Hash every file in full (opening a context checks sizes and "
                                                        "sampled digests only: O(1) reads per file)."),
):
    """What a saved context holds: document, pages, tokens, model, index, budgets, dense layers, sizes."""
    import time

    from ra_cli.retrieval.modes import describe_context
    from ra_cli.store import ContextStore

    if source.exists() and not source.is_dir():
        from ra_cli.errors import RaError

        raise RaError(f"{source}: a document, not a saved context; `ra ingest {source} --save CONTEXT.idx` makes one "
                      "(ra chat caches its own)")
    began = time.perf_counter()
    summary = describe_context(ContextStore.open(source, verify=verify))
    summary["verified"] = {"full_sha256": verify, "seconds": round(time.perf_counter() - began, 3)}
    if as_json:
        print(json.dumps(summary))
        return
    print_summary(summary)


SHOWN = 8  # a collection's documents named by `ra info`


def print_summary(summary: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    from ra_cli.document import citation_unit, extent
    from ra_cli.ui import byte_size, stdout

    document, index = summary["document"], summary.get("index")
    parts = document.get("parts") if isinstance(document.get("parts"), list) else []
    table = Table(show_header=False, box=None, pad_edge=False, title=Text(str(summary["path"])), title_justify="left")
    table.add_column(style="dim")
    table.add_column()
    size = extent(citation_unit(document), document.get("pages") or 0, len(parts))
    described = [str(document.get("kind"))] + ([size] if size != document.get("kind") else [])  # text: "text" once
    rows = [
        ("document", f"{document.get('name')} ({', '.join(described)}, {document.get('characters', 0):,} characters)"),
        *([("documents", ", ".join(str(p.get("name")) for p in parts[:SHOWN] if isinstance(p, dict))
            + (f" and {len(parts) - SHOWN:,} more" if len(parts) > SHOWN else ""))] if parts else []),
        ("tokens", f"{summary['tokens']:,}"),
        ("model", f"{summary['model']} ({summary['model_dtype']}; {summary['layers']} layers, {summary['heads']} query / "
                  f"{summary['kv_heads']} KV heads, head dim {summary['head_dim']})"),
        ("KV", f"{summary['kv_dtype']}, {byte_size(summary['kv_bytes'])}"),
    ]
    if index:
        rows += [
            ("index", f"{index['kind']}, {byte_size(index['bytes'])}: keys {index['lo']:,}..{index['hi']:,} indexed, "
                      f"{index['sinks']} sinks and {summary['tokens'] - index['hi']:,} recent tokens kept whole"),
            ("budgets", ", ".join(f"{k}×{n}" for k, n in sorted(index["budget_counts"].items(), key=lambda kv: int(kv[0])))
             + " layers (top-k per layer, coverage 0.97)"),
            ("dense layers", ", ".join(map(str, index["dense_layers"])) or "none"),
        ]
    else:
        rows.append(("index", "none (full attention only)"))
    rows += [("on disk", byte_size(summary["bytes"])), ("created", summary.get("created", "?")),
             ("ingest", f"{summary['ingest'].get('prefill', '?')} prefill in {summary['ingest'].get('seconds', 0):.1f} s"),
             ("checked", ("every file's full sha256" if summary["verified"]["full_sha256"] else
                          "sizes and sampled digests (--verify hashes everything)")
              + f", in {summary['verified']['seconds']:.2f} s")]
    for key, value in rows:
        table.add_row(key, Text(value))  # Text: names like "notes[draft].pdf" are not markup
    stdout.print(table)


def sessions_command(as_json: bool = opt.Json):
    """List the conversations saved with /save NAME (continue one with `ra chat --resume NAME`)."""
    from rich.table import Table
    from rich.text import Text

    from ra_cli.sessions import list_sessions, sessions_dir
    from ra_cli.ui import status, stdout

    found = list_sessions()
    if as_json:
        print(json.dumps({"sessions": found}))
        return
    if not found:
        status(f"no saved sessions in {sessions_dir()}; /save NAME in a chat saves one")
        return
    table = Table()
    for column in ("name", "document", "turns", "saved"):
        table.add_column(column)
    for row in found:
        if row["valid"]:
            table.add_row(Text(row["name"]), Text(row["document"]), str(row["turns"]), row["saved"])
        else:
            table.add_row(Text(row["name"]), "(unreadable: delete it)", "-", "-")
    stdout.print(table)
