"""One line of text for an exception: what logs, probe reports and replica rows show."""

from __future__ import annotations

MAX_CHARS = 300  # a replica's error column and a log line stay readable


def describe(exc: BaseException) -> str:
    """"timed out" for a bare timeout, else the exception's text on one line (its type's name if it has none)."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return one_line(exc)[:MAX_CHARS] or type(exc).__name__


def one_line(text: object) -> str:
    """``text`` with its whitespace runs (newlines included) folded to single spaces."""
    return " ".join(str(text).split())
