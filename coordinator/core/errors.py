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


DIAL_ERROR = "Failed to dial peers: "  # Coder's wording in the replicas table's error column


def dial_error(failures: list[str]) -> str | None:
    """``Failed to dial peers: a; b`` for the peers that could not be reached, None if there are none."""
    return DIAL_ERROR + "; ".join(failures) if failures else None


def merge_dial_errors(*errors: str | None) -> str | None:
    """One ``Failed to dial peers: a; b`` string from several such strings (the mesh's, the monitor's)."""
    return dial_error([e.removeprefix(DIAL_ERROR) for e in errors if e])


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says which and why (the flag or variable used)."""
