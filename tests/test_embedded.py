"""Embedded PostgreSQL: start, connect, share between local processes, stop without leftovers."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import psycopg
import pytest

from coordinator.cluster.embedded import embedded_url, start_embedded
from testkit.polling import wait_blocking

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from coordinator.cluster.embedded import start_embedded
    e = start_embedded(Path(sys.argv[1]))
    print(json.dumps({"url": e.url, "pid": e.pid, "started": e.started}), flush=True)
    if sys.stdin.readline().strip() == "stop":
        e.stop()
    # otherwise exit normally: the handle is released at interpreter exit
    """
)


class Child:
    """Another local process holding a handle on the same embedded server."""

    def __init__(self, data_dir: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        line = self.proc.stdout.readline()
        assert line, f"child failed (exit {self.proc.wait(30)})"
        self.info = json.loads(line)

    def finish(self, command: str = "") -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.wait(30) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def data_dir():
    """A data directory whose server and helper processes are gone after the test, pass or fail.

    Not pytest's tmp_path: concurrent pytest sessions on one machine rotate (delete) each other's.
    """
    base = Path(tempfile.mkdtemp(prefix="coordtest-emb-"))
    base.chmod(0o755)  # as root, pgserver's user must traverse it (coordinator never widens it for it)
    children: list[Child] = []
    try:
        yield base, children
    finally:
        for child in children:
            child.kill()
        pidfile = base / "postgres" / "postmaster.pid"
        if pidfile.exists():
            try:
                psutil.Process(int(pidfile.read_text().split()[0])).kill()
            except (psutil.Error, ValueError, IndexError):
                pass
        shutil.rmtree(base, ignore_errors=True)


def assert_gone(pid: int, data: Path, timeout: float = 15.0) -> None:
    wait_blocking(lambda: not psutil.pid_exists(pid), timeout, "the postmaster to exit", 0.05)
    leftovers = [
        p.pid for p in psutil.process_iter(["cmdline"]) if str(data / "postgres") in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == [], f"postgres processes left: {leftovers}"
    assert embedded_url(data) is None


def query(url: str, sql: str):
    with psycopg.connect(url, connect_timeout=10) as conn:
        return conn.execute(sql).fetchone()[0]


def test_start_connect_reuse_stop(data_dir):
    data, children = data_dir
    t0 = time.monotonic()
    pg = start_embedded(data)
    print(f"\ncold start: {time.monotonic() - t0:.2f} s, url {pg.url}")
    try:
        assert pg.started
        assert query(pg.url, "SELECT current_database()") == "coordinator"
        assert embedded_url(data) == pg.url

        child = Child(data)
        children.append(child)
        assert child.info == {"url": pg.url, "pid": pg.pid, "started": False}
        child.finish("stop")  # a joiner leaving must not stop the server under us
        assert query(pg.url, "SELECT 1") == 1
    finally:
        pg.stop()
    assert_gone(pg.pid, data)
    pg.stop()  # idempotent


def test_starter_leaving_keeps_server_for_others(data_dir):
    data, children = data_dir
    child = Child(data)
    children.append(child)
    assert child.info["started"]
    pg = start_embedded(data)
    try:
        assert not pg.started and pg.pid == child.info["pid"]
        child.finish()  # normal exit releases its handle at interpreter exit
        assert query(pg.url, "SELECT 1") == 1
    finally:
        pg.stop()
    assert_gone(pg.pid, data)


def test_crashed_holder_does_not_pin_the_server(data_dir):
    data, children = data_dir
    pg = start_embedded(data)
    try:
        child = Child(data)
        children.append(child)
        child.kill()  # SIGKILL: its pid stays in .handle_pids.json
        assert child.info["pid"] == pg.pid
    finally:
        pg.stop()
    assert_gone(pg.pid, data)


def test_restart_after_stop_in_same_process(data_dir):
    data, _ = data_dir
    first = start_embedded(data)
    first.stop()
    assert_gone(first.pid, data)
    second = start_embedded(data)
    try:
        assert second.started and second.pid != first.pid
        assert query(second.url, "SELECT 1") == 1
    finally:
        second.stop()
    assert_gone(second.pid, data)
