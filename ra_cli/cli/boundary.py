"""The CLI's one error boundary: whatever goes wrong, the user reads one line saying what happened
and what to do, and the exit code says how it ended (0 done, 1 failed, 2 bad usage, 130 Ctrl-C).
RA_DEBUG=1 shows the traceback instead."""

from __future__ import annotations

import os
import sys

import typer
from typer import _click as click  # typer vendors click: its exceptions are these, not click's
from typer.core import TyperGroup

from ra_cli.errors import explain
from ra_cli.ui import report

USAGE = 2
INTERRUPTED = 130


def describe(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code): click's usage errors here, everything else in errors.py."""
    if isinstance(exc, click.exceptions.ClickException):
        return exc.format_message(), exc.exit_code or USAGE
    if isinstance(exc, typer.Abort):
        return "interrupted", INTERRUPTED
    return explain(exc)


class OneLineErrors(TyperGroup):
    """A Typer group whose `main` turns every failure into one line on stderr and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
            if code == INTERRUPTED:  # a bare Ctrl-C, turned into Exit(130) by typer
                report("interrupted")
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help())
            code = USAGE
        except Exception as exc:  # noqa: BLE001 - this is the boundary
            if os.environ.get("RA_DEBUG") == "1":
                raise
            message, code = describe(exc)
            report(message)
        if not standalone_mode:
            return code
        sys.exit(code)
