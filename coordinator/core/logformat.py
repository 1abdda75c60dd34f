"""Log line formats: the human one (the default) and JSON, one object per line, for log pipelines.

A JSON line holds ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``, the
structured fields the code passed with ``extra=`` (``peer``, ``code``, ...), the fields of the
process's context (``replica`` once it joined the replica set) and, for an exception, ``exception``
(its traceback as one string). Fields that are not JSON types are written as their text.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

from coordinator.core.timestamps import iso_utc

HUMAN = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
FORMATS = ("human", "json")
STDERR_PATHS = ("/dev/stderr", "-")  # Coder's CODER_LOGGING_JSON value that means "JSON on stderr"

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_context: dict[str, Any] = {}
_stderr_kind = ["human"]  # what configure() chose for stderr
_installed: list[logging.Handler] = []  # the root handlers configure() added (a test runner's are left alone)


def set_context(**fields: Any) -> None:
    """Fields every JSON line carries from now on (e.g. ``replica=<id>`` once the replica joined)."""
    _context.update({k: v for k, v in fields.items() if v is not None})


def clear_context() -> None:
    _context.clear()


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": iso_utc(record.created, "milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_context)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def operator_line(text: str, logger: str = "coordinator", level: int = logging.WARNING) -> str:
    """A line written straight to stderr (where logging cannot be used, e.g. in a signal handler):
    ``coordinator: text``, or a JSON object when stderr logs are JSON."""
    if _stderr_kind[0] != "json":
        return f"coordinator: {text}"
    return JsonFormatter().format(logging.LogRecord(logger, level, "", 0, text, None, None))


def formatter(kind: str) -> logging.Formatter:
    return JsonFormatter() if kind == "json" else logging.Formatter(HUMAN)


def configure(level: str, kind: str = "human", json_file: str = "", stream: TextIO | None = None) -> None:
    """The root logger: ``kind`` lines on stderr, and JSON lines appended to ``json_file`` too if given.

    ``json_file`` follows Coder's ``--log-json`` / ``CODER_LOGGING_JSON``: a path JSON logs go to;
    ``/dev/stderr`` means stderr itself becomes JSON (rather than two copies of each line there).
    Raises OSError if the file cannot be opened.
    """
    stream = stream or sys.stderr
    if json_file in STDERR_PATHS:
        kind, json_file = "json", ""
    _stderr_kind[0] = kind
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(stream)
    console.setFormatter(formatter(kind))
    handlers.append(console)
    if json_file:
        to_file = logging.FileHandler(json_file, encoding="utf-8")
        to_file.setFormatter(JsonFormatter())
        handlers.append(to_file)
    root = logging.getLogger()
    for old in _installed:
        root.removeHandler(old)
        old.close()
    _installed[:] = handlers
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.captureWarnings(True)  # a library's warning is a log line in the same format, not raw stderr text
