"""`ra` command line: each command parses its options, calls one function of the layer below and
prints. Answers go to stdout, status and progress to stderr; every failure is one line
(cli/boundary.py)."""

from __future__ import annotations

import typer

from ra_cli.cli.bench import bench_command, eval_command
from ra_cli.cli.cache import cache_app
from ra_cli.cli.boundary import OneLineErrors
from ra_cli.cli.chat import chat_command
from ra_cli.cli.info import info_command, sessions_command
from ra_cli.cli.ingest import ingest_command
from ra_cli.cli.models import models_app
from ra_cli.cli.options import parse_tokens

app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Chat with long documents on one machine, with retrieval attention over an on-disk KV cache.")
app.command("ingest")(ingest_command)
app.command("chat")(chat_command)
app.command("bench")(bench_command)
app.command("eval")(eval_command)
app.command("info")(info_command)
app.command("sessions")(sessions_command)
app.add_typer(models_app, name="models")
app.add_typer(cache_app, name="cache")

__all__ = ["app", "parse_tokens"]
