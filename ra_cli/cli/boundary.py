"""The CLI's one error boundary: whatever goes wrong, the user reads one line saying what happened
and what to do, and the exit code says how it ended (0 done, 1 failed, 2 bad usage, 130 Ctrl-C).
RA_DEBUG=1 shows the traceback instead."""

from __future__ import annotations

import errno
import os
import sys

from typer import _click as click  # typer vendors click: its exceptions are these, not click's
from typer.core import TyperGroup

from ra_cli.errors import RaError

USAGE = 2
INTERRUPTED = 130


def describe(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for an exception that reached the top."""
    if isinstance(exc, RaError):
        return str(exc), exc.exit_code
    if isinstance(exc, click.exceptions.ClickException):
        return exc.format_message(), exc.exit_code or USAGE
    if isinstance(exc, (KeyboardInterrupt, click.exceptions.Abort)):
        return "interrupted", INTERRUPTED
    if isinstance(exc, MemoryError):
        return "out of memory; close other programs, or use a smaller context or model", 1
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return f"no space left on the disk{where}; free some space and run the same command again", 1
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"permission denied{where}; check the file's permissions or choose another path", 1
        if exc.errno == errno.EROFS:
            return f"read-only file system{where}; choose a writable location (e.g. RA_CACHE_DIR)", 1
        return f"{exc.strerror or exc}{where}", 1
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return "the accelerator ran out of memory; use a smaller context, --gpu-mem-gb or a 4-bit model", 1
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return (f"unexpected {type(exc).__name__}{': ' + first if first else ''} — this is a bug in ra; "
            "rerun with RA_DEBUG=1 for the traceback and report it"), 1


def report(message: str) -> None:
    from rich.text import Text

    from ra_cli.ui import stderr

    # Text, not markup: file names like "notes[draft].pdf" must print as they are.
    stderr.print(Text.assemble(("error:", "bold red"), " ", message.replace("\n", " ")), soft_wrap=True)


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
