"""The one exception type the CLI shows to users as a single line (no traceback)."""


class RaError(Exception):
    """A problem the user can fix; the message says what happened and what to do."""
