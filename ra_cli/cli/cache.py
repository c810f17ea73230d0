"""`ra cache`: what ra keeps in its cache directory; `ra cache clear`: remove what you choose."""

from __future__ import annotations

import json
from typing import Optional

import typer

from ra_cli.cli import options as opt

cache_app = typer.Typer(help="What ra keeps in its cache (contexts of documents chatted with, converted models), "
                             "and clearing it.", invoke_without_command=True, no_args_is_help=False)


@cache_app.callback()
def cache_list(ctx: typer.Context, as_json: bool = opt.Json):
    """List the cache: each context, converted model and packed weights, with its size."""
    if ctx.invoked_subcommand is not None:
        return
    from ra_cli.cached import cached_items
    from ra_cli.paths import cache_root

    items = cached_items()
    if as_json:
        print(json.dumps({"root": str(cache_root()), "items": [item.as_dict() for item in items],
                          "bytes": sum(item.bytes for item in items)}))
        return
    if not items:
        from ra_cli.ui import status

        status(f"ra's cache is empty ({cache_root()})")
        return
    _print_table(items, f"ra's cache: {cache_root()}")


@cache_app.command("clear")
def cache_clear(
    contexts: bool = typer.Option(False, "--contexts", help="Contexts `ra chat DOCUMENT` saved (made again on the next chat)."),
    models: bool = typer.Option(False, "--models", help="Converted models and packed weights (made again on next use: a minute at most)."),
    downloads: bool = typer.Option(False, "--downloads", help="Fetched models (`ra models fetch` needs the network again)."),
    everything: bool = typer.Option(False, "--all", help="All of the above."),
    older_than: Optional[float] = typer.Option(None, "--older-than", min=0, help="Only what has not changed for this many days."),
    as_json: bool = opt.Json,
):
    """Remove cached contexts, converted models or fetched models; never a context saved with --save.

    A conversation saved with /save over a removed context cannot be resumed."""
    from ra_cli.cached import CONTEXT, CONVERTED, DOWNLOAD, LEFTOVER, PACKED, cached_items, older_than as older, remove
    from ra_cli.ui import byte_size, status, warn

    asked = {(CONTEXT,): contexts, (CONVERTED, PACKED): models, (DOWNLOAD,): downloads}
    kinds = {kind for group, wanted in asked.items() if wanted or everything for kind in group}
    if not kinds:
        raise typer.BadParameter("say what to clear: --contexts, --models, --downloads or --all")
    chosen = [item for item in cached_items() if item.kind in kinds or item.kind == LEFTOVER]
    if older_than is not None:
        chosen = older(chosen, older_than)
    removed, busy = remove(chosen)
    for item in busy:
        warn(f"kept {item.path}: another ra process is writing it")
    freed = sum(item.bytes for item in removed)
    if as_json:
        print(json.dumps({"removed": [item.as_dict() for item in removed], "kept_in_use": [item.as_dict() for item in busy],
                          "bytes_freed": freed}))
        return
    status(f"removed {len(removed)} item(s), {byte_size(freed)} freed" if removed else "nothing to remove")


def _print_table(items, title: str) -> None:
    import datetime

    from rich.table import Table
    from rich.text import Text

    from ra_cli.ui import byte_size, stdout

    table = Table(title=Text(title), title_justify="left")
    for column in ("kind", "what", "model", "size", "changed"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for item in items:
        changed = datetime.datetime.fromtimestamp(item.modified).strftime("%Y-%m-%d %H:%M")
        table.add_row(item.kind, Text(item.name), Text(item.model), byte_size(item.bytes), changed)
    stdout.print(table)
    stdout.print(f"{len(items)} item(s), {byte_size(sum(item.bytes for item in items))}; "
                 "`ra cache clear --contexts/--models/--downloads/--all [--older-than DAYS]` removes them", markup=False)
