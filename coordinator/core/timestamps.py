"""The one way a time is written for operators: ISO 8601 in UTC with a ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(value: datetime | None = None) -> str:
    """``2026-01-02T03:04:05.678901Z`` for ``value`` (now when omitted); naive times are taken as local."""
    return (value or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")
