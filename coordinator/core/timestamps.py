"""The one way a time is written for operators: ISO 8601 in UTC with a ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(value: datetime | float | None = None, timespec: str = "auto") -> str:
    """``2026-01-02T03:04:05.678901Z`` for ``value`` (a datetime or epoch seconds; now when omitted).

    Naive datetimes are taken as local; ``timespec`` is :meth:`datetime.isoformat`'s.
    """
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    return (value or datetime.now(UTC)).astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
