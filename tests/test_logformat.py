"""Structured logs: a real ``coordinator server --log-format json`` writes one JSON object per stderr
line (time, level, logger, message, and the structured fields replica, peer, code); Coder's
``CODER_LOGGING_JSON`` names a file that gets the JSON lines while stderr stays human."""

from __future__ import annotations

import json
import logging
import signal
import time
import uuid
from datetime import datetime

import psycopg

from coordinator.core import logformat

try:
    from testkit.procs import Proc, free_port, python, refused_at_start
except ImportError:  # before testkit/ held the shared helpers
    from testkit.procs import Proc, free_port, python, refused_at_start

KEYS = {"time", "level", "logger", "message"}


def _server(tmp_path, pg_url: str, *flags: str, env: dict | None = None) -> Proc:
    port = free_port()
    proc = Proc(
        [python(), "-m", "coordinator", "server", "--address", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data"),
         "--relay-url", f"http://127.0.0.1:{port}", "--access-url", "http://lb.invalid", "--pg-url", pg_url,
         "--heartbeat", "500ms", *flags],
        env={"COORDINATOR_API_TOKEN": "t", **(env or {})}, log=tmp_path / "stderr.log",
    )
    proc.wait_http(f"http://127.0.0.1:{port}/readyz")
    return proc


def _ghost_peer(pg_url: str) -> str:
    """A live-looking peer row whose relay URL answers nothing: the mesh logs a failed link to it."""
    url = f"http://127.0.0.1:{free_port()}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO replicas (id, hostname, region_id, relay_url, version, heartbeat_ms) "
                     "VALUES (%s, 'ghost', 999, %s, 'test', 600000)", (uuid.uuid4(), url))
        conn.execute("NOTIFY replica_changes")  # harmless if the channel is named otherwise: the resync finds it
    return url


def _wait_for(proc: Proc, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log_path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{proc.output[-3000:]}"
        time.sleep(0.1)


def test_json_logs_one_object_per_line_with_structured_fields(tmp_path, pg_url):
    proc = _server(tmp_path, pg_url, "--log-format", "json")
    try:
        ghost = _ghost_peer(pg_url)
        _wait_for(proc, "EMESH01")
    finally:
        proc.signal(signal.SIGTERM)
        proc.stop()
    lines = [line for line in proc.log_path.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        record = json.loads(line)  # every line, the shutdown's included
        assert KEYS <= record.keys(), record
        assert record["time"].endswith("Z") and datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        records.append(record)
    assert {r["level"] for r in records} <= {"debug", "info", "warning", "error", "critical"}
    joined = [r for r in records if "joined" in r["message"]]
    assert joined and joined[0]["replica"], records
    failed = [r for r in records if r.get("code") == "EMESH01"]
    assert failed and failed[0]["peer"].startswith(ghost) and failed[0]["logger"] == "coordinator.mesh", records
    assert failed[0]["replica"] == joined[0]["replica"]
    print(f"{len(records)} JSON lines; e.g. {json.dumps(failed[0])}")


def test_coder_logging_json_file_keeps_stderr_human(tmp_path, pg_url):
    sink = tmp_path / "coder.json"
    proc = _server(tmp_path, pg_url, env={"CODER_LOGGING_JSON": str(sink)})
    _wait_for(proc, "joined")
    proc.signal(signal.SIGTERM)
    proc.stop()
    human = [line for line in proc.log_path.read_text().splitlines() if " INFO " in line]
    assert human and not human[0].startswith("{"), proc.output
    records = [json.loads(line) for line in sink.read_text().splitlines()]
    assert records and all(KEYS <= r.keys() for r in records)
    assert any("joined" in r["message"] for r in records)


def test_coder_logging_json_dev_stderr_means_json_on_stderr(tmp_path, pg_url):
    proc = _server(tmp_path, pg_url, env={"CODER_LOGGING_JSON": "/dev/stderr"})
    _wait_for(proc, "joined")
    proc.signal(signal.SIGTERM)
    proc.signal(signal.SIGTERM)  # the second one exits at once, with a line written outside logging
    proc.stop()
    lines = [line for line in proc.log_path.read_text().splitlines() if line.strip()]
    assert lines and all(line.startswith("{") and KEYS <= json.loads(line).keys() for line in lines), [x for x in lines if not x.startswith("{")]


def test_bad_log_format_and_unwritable_json_file_are_refused_in_one_line(tmp_path):
    line = refused_at_start(["server", "--log-format", "xml", "--pg-url", "postgresql://x@127.0.0.1:1/x"], "--log-format")
    assert "human, json" in line
    refused_at_start(["server", "--log-json", str(tmp_path / "missing" / "x.json"),
                      "--pg-url", "postgresql://x@127.0.0.1:1/x"], "--log-json")


def test_formatter_carries_extra_fields_and_exceptions():
    record = logging.LogRecord("coordinator.mesh", logging.WARNING, __file__, 1, "link to %s failed", ("p",), None)
    record.peer, record.code = "http://p/derp", "EMESH01"
    out = json.loads(logformat.JsonFormatter().format(record))
    assert out["message"] == "link to p failed" and out["peer"] == "http://p/derp" and out["code"] == "EMESH01"
    assert out["level"] == "warning" and out["logger"] == "coordinator.mesh"
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = logformat.JsonFormatter().format(record)
    assert "\n" not in line and "ValueError" in json.loads(line)["exception"]
