"""User-facing errors: one line on stderr, exit code 2, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix. The message is printed as one line."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source = source
        self.key = key
        parts = []
        if source:
            parts.append(str(source))
        if key:
            parts.append(str(key))
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


def one_line(e: BaseException, limit: int = 500) -> str:
    """An exception's message on one line, shortened: for error messages that quote another error."""
    return " ".join(str(e).split())[:limit]
