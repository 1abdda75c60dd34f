"""The library API: examples/fanout.py embeds a replica in its own Starlette app, served by plain uvicorn."""

import json
import signal
import time
import urllib.request

import pytest

from coordinator.relay.client import DerpClient
from testkit.polling import wait_blocking
from testkit.procs import ROOT, Proc, free_port, python
from testkit.relayfix import routed

pytestmark = pytest.mark.anyio


def get_json(url: str, data: dict | None = None):
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.load(resp)


def ready(url: str) -> bool:
    try:
        return bool(get_json(url + "/readyz")["ready"])
    except OSError:
        return False


@pytest.fixture
def example_service(pg_url, tmp_path):
    """Two copies of the example service (two replicas) under uvicorn with the DERP protocol class."""
    procs, urls = [], []
    try:
        for i in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            procs.append(Proc(
                [python(), "-m", "uvicorn", "fanout:app", "--app-dir", str(ROOT / "examples"), "--port", str(port),
                 "--http", "coordinator.edge:DerpHttpProtocol", "--log-level", "info"],
                env={"COORDINATOR_PG_CONNECTION_URL": pg_url, "COORDINATOR_DATA_DIR": str(tmp_path / f"r{i}"),
                     "COORDINATOR_DERP_SERVER_RELAY_URL": url, "COORDINATOR_REPLICA_HEARTBEAT": "500ms"},
                log=tmp_path / f"service{i}.log",
            ))
            urls.append(url)
        for proc, url in zip(procs, urls, strict=True):
            wait_blocking(lambda url=url: ready(url), 60, f"{url}/readyz")
            assert proc.proc.poll() is None, proc.output
        yield procs, urls
    finally:
        for proc in procs:
            proc.stop()


async def test_example_service_fans_events_out_and_relays_across_replicas(example_service):
    procs, (a, b) = example_service
    t0 = time.monotonic()
    get_json(a + "/events", {"text": "hello, every replica"})
    for url in (a, b):
        wait_blocking(lambda url=url: any(e["text"] == "hello, every replica" for e in get_json(url + "/events")),
                      10, f"the event on {url}")
    print(f"\nevent published on one replica seen by both within {time.monotonic() - t0:.2f} s")

    # The embedded replicas mesh: a packet sent to one reaches a client of the other.
    async with await DerpClient.connect(a + "/derp") as ca, await DerpClient.connect(b + "/derp") as cb:
        await routed(ca, cb, 20)

    for proc in procs:
        proc.signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(30)
        assert "Traceback" not in proc.output and "replica stopped cleanly" in proc.output, proc.output[-3000:]


def test_plain_uvicorn_serves_a_whole_replica_when_given_a_database(pg_url, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Proc(
        [python(), "-m", "uvicorn", "coordinator.app:app", "--port", str(port),
         "--http", "coordinator.edge:DerpHttpProtocol"],
        env={"COORDINATOR_PG_CONNECTION_URL": pg_url, "COORDINATOR_DATA_DIR": str(tmp_path),
             "COORDINATOR_API_TOKEN": "t"},
        log=tmp_path / "uvicorn.log",
    )
    try:
        wait_blocking(lambda: ready(url), 60, f"{url}/readyz")
        request = urllib.request.Request(url + "/api/v2/replicas", headers={"Authorization": "Bearer t"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert [r["self"] for r in json.load(resp)] == [True]
        proc.signal(signal.SIGTERM)
        proc.wait(30)
        assert "Traceback" not in proc.output
    finally:
        proc.stop()
