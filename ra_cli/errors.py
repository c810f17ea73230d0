"""The exceptions the CLI shows to users as a single line (no traceback), and the one-line
explanation of any other failure a user can meet."""

import errno
import re


class RaError(Exception):
    """A problem the user can fix; the message says what happened and what to do. Exit code 1."""

    exit_code = 1


class Interrupted(RaError):
    """Ctrl-C stopped the work; the message says what was kept. Exit code 130 (128 + SIGINT)."""

    exit_code = 130


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def explain(exc: BaseException) -> tuple[str, int]:
    """(one-line message saying what happened and what to do, exit code) for any failure."""
    if isinstance(exc, RaError):
        return str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", Interrupted.exit_code
    if isinstance(exc, MemoryError):
        return "out of memory; close other programs, or use a smaller context or model", 1
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return f"no space left on the disk{where}; free some space and run the same command again", 1
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"permission denied{where}; check the file's permissions or choose another path", 1
        if exc.errno is None and re.fullmatch(r"\d+ requested and \d+ written", str(exc)):  # numpy's short write
            return "a file could not be written whole (the disk is probably full); free some space and run the same command again", 1
        if exc.errno == errno.EROFS:
            return f"read-only file system{where}; choose a writable location (e.g. RA_CACHE_DIR)", 1
        return f"{exc.strerror or exc}{where}", 1
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return "the accelerator ran out of memory; use a smaller context or --chunk-size, or --load-in-4bit", 1
    first = first_line(exc, 200) if str(exc).strip() else ""
    return (f"unexpected {type(exc).__name__}{': ' + first if first else ''} — this is a bug in ra; "
            "rerun with RA_DEBUG=1 for the traceback and report it"), 1
