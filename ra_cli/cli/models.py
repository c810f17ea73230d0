"""`ra models`: what ra can run offline; `ra models fetch NAME`: the one explicit download."""

from __future__ import annotations

import json

import typer

from ra_cli.cli import options as opt

models_app = typer.Typer(help="Models ra can use offline (ra models), and fetching named ones (ra models fetch NAME).",
                         invoke_without_command=True, no_args_is_help=False)


@models_app.callback()
def models_list(ctx: typer.Context, as_json: bool = opt.Json):
    """List the models ra can use offline, with their trained context length."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from ra_cli.model.catalog import HOW_TO_ADD, available_models
    from ra_cli.ui import stderr

    rows = available_models()
    if as_json:
        print(json.dumps({"models": rows, "how_to_add": HOW_TO_ADD}))
        return
    table = Table(title="models ra can use offline")
    for column in ("name", "kind", "trained context", "status"):
        table.add_column(column)
    for row in rows:
        context = f"{row['trained_context']:,} tokens" if row["trained_context"] else "-"
        table.add_row(row["name"], row["kind"], context, "ready" if row["ready"] else f"get it: {row['how']}")
    stderr.print(table)
    stderr.print(HOW_TO_ADD, markup=False)


@models_app.command("fetch")
def models_fetch(name: str = typer.Argument(..., help="A named model, e.g. qwen2.5-coder-0.5b.")):
    """Download and verify a named model (pinned sha256; a mismatch is refused)."""
    from ra_cli.model.fetch import fetch
    from ra_cli.ui import status

    print(fetch(name, status))
