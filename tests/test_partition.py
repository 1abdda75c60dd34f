"""A real partition between two replicas that both still reach Postgres (network namespaces + nftables).

Each replica runs in its own namespace with its own address and reaches the test's Postgres over its
Unix socket; the test talks to them from the lab's hub namespace. A drop rule between the two
addresses must show, on both sides and within two heartbeats, in the replica's row (the error
column), as the finding EMESH01 on /api/v2/debug/health, in ``coordinator probe`` and on the status
page; once the rule goes, the link must be back within about 2 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from testkit import netlab

try:
    from testkit.procs import Proc, python
except ImportError:  # before testkit/ held the shared helpers
    from testkit.procs import Proc, python

HEARTBEAT = 1.0
PORT = 3000  # every replica has its own address, so they can share the port
TOKEN = "partition-test-token"


def _get(url: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=3) as resp:
        return json.load(resp)


def _wait(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` holds (polled every 50 ms); fails the test after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def lab() -> Iterator[netlab.NetLab]:
    try:
        netlab.check()
    except netlab.Unavailable as exc:
        pytest.skip(str(exc))
    netlab.sweep()
    with netlab.NetLab(2) as made:
        yield made


class Pair:
    """Two replicas, each in its own namespace of ``lab``, on the database ``dbname`` of ``pg``."""

    def __init__(self, lab: netlab.NetLab, pg, dbname: str):
        self.lab = lab
        self.base = Path(tempfile.mkdtemp(prefix="coordtest-partition-"))
        self.urls = [f"http://{lab.address(i)}:{PORT}" for i in range(2)]
        self.derp = [u + "/derp" for u in self.urls]
        self.pg_url = f"postgresql://postgres@/{dbname}?host={pg.sock}&port={pg.port}"
        self.procs: list[Proc] = []

    def start(self) -> None:
        for i, url in enumerate(self.urls):
            data = self.base / f"r{i}"
            data.mkdir()
            self.procs.append(Proc(
                [*self.lab.exec_args(i), python(), "-m", "coordinator", "server", "--address", f"{self.lab.address(i)}:{PORT}",
                 "--data-dir", str(data), "--relay-url", url, "--access-url", "http://lb.invalid", "--pg-url", self.pg_url,
                 "--heartbeat", f"{HEARTBEAT}s", "--peer-timeout", "500ms"],
                env={"COORDINATOR_API_TOKEN": TOKEN}, log=data / "server.log",
            ))
        _wait("both replicas ready", lambda: all(self.ready(i) for i in range(2)), 60)

    def hub(self, fn: Callable, *args):
        return self.lab.call(netlab.HUB, fn, *args)

    def ready(self, i: int) -> bool:
        for p in self.procs:
            if p.proc.poll() is not None:
                raise AssertionError(f"a replica exited: {p.output[-3000:]}")
        try:
            return self.hub(lambda: urllib.request.urlopen(self.urls[i] + "/readyz", timeout=1).status == 200)
        except OSError:
            return False

    def api(self, i: int, path: str) -> dict:
        return self.hub(_get, self.urls[i] + path)

    def linked(self, i: int) -> bool:
        other = self.derp[1 - i]
        link = self.api(i, "/api/v2/debug/status")["mesh"].get(other)
        return bool(link and link["connected"])

    def finding(self, i: int) -> str | None:
        """The EMESH01 message on replica ``i``'s health report, if it names the pair."""
        for f in self.api(i, "/api/v2/debug/health")["findings"]:
            if f["code"] == "EMESH01" and self.urls[i] in f["message"] and self.derp[1 - i] in f["message"]:
                return f["message"]
        return None

    def logs(self) -> str:
        return "\n".join(f"--- replica {i}\n{p.output[-4000:]}" for i, p in enumerate(self.procs))

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def _row_errors(url: str) -> dict[str, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT relay_url, error FROM replicas WHERE stopped_at IS NULL").fetchall()
    return {relay: error or "" for relay, error in rows}


def test_partition_is_reported_on_both_sides_and_heals_fast(lab, pg_cluster, pg_url):
    pair = Pair(lab, pg_cluster, pg_url.rsplit("/", 1)[1])
    try:
        pair.start()
        _wait("the mesh link both ways", lambda: pair.linked(0) and pair.linked(1), 20)

        lab.partition(0, 1)
        cut = time.monotonic()
        found = _wait("EMESH01 on both sides", lambda: bool(pair.finding(0) and pair.finding(1)), 10)

        def rows_name_the_pair() -> bool:
            errors = _row_errors(pg_url)
            return all(pair.derp[1 - i] in errors.get(pair.urls[i], "") for i in range(2))

        _wait("both rows name the other side", rows_name_the_pair, 10)
        in_rows = time.monotonic() - cut
        print(f"partition: finding after {found:.2f} s, in both rows after {in_rows:.2f} s "
              f"(heartbeat {HEARTBEAT:g} s)")
        assert in_rows <= 2 * HEARTBEAT + 1.0, f"rows named the pair only after {in_rows:.2f} s"
        assert pair.linked(0) is False and pair.linked(1) is False
        # Postgres is still there for both: they stay healthy members of the replica set
        assert all(pair.api(i, "/api/v2/debug/status")["database"] for i in range(2))

        probe = subprocess.run(
            [*lab.exec_args(netlab.HUB), python(), "-m", "coordinator", "probe", "--pg-url", pair.pg_url,
             "--samples", "1", "--timeout", "1s"], capture_output=True, text=True, timeout=60,
        )
        print(probe.stdout)
        lines = [line for line in probe.stdout.splitlines() if pair.urls[0] in line and pair.derp[1] in line]
        assert probe.returncode == 1 and lines, probe.stdout + probe.stderr
        status = pair.api(0, "/status/data")
        ids = {r["relay_url"]: r["id"] for r in status["replicas"]}
        cell = status["mesh"][ids[pair.urls[0]]][ids[pair.urls[1]]]
        assert cell["state"] == "down" and cell["error"], cell
        assert any(f["code"] == "EMESH01" for f in status["findings"])

        lab.heal()
        healed = time.monotonic()
        back = _wait("the mesh link back both ways", lambda: pair.linked(0) and pair.linked(1), 10)
        print(f"partition healed: mesh link back both ways after {back:.2f} s")
        assert back <= 3.0, f"link back only after {back:.2f} s"
        _wait("findings cleared", lambda: not pair.finding(0) and not pair.finding(1), 5)
        _wait("row errors cleared", lambda: not any(_row_errors(pg_url).values()), 3 * HEARTBEAT + 2)
        print(f"rows clean {time.monotonic() - healed:.2f} s after healing")
    except BaseException:
        print(pair.logs())
        raise
    finally:
        lab.heal()
        pair.close()
