"""The exceptions the CLI shows to users as a single line (no traceback)."""


class RaError(Exception):
    """A problem the user can fix; the message says what happened and what to do. Exit code 1."""

    exit_code = 1


class Interrupted(RaError):
    """Ctrl-C stopped the work; the message says what was kept. Exit code 130 (128 + SIGINT)."""

    exit_code = 130
