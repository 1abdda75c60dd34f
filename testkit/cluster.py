"""A real HA deployment for tests: replica processes on free ports, one Postgres, nginx in front.

Every process runs in its own session and is killed in :meth:`HACluster.close`, which the
fixtures call even when a test fails.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from coordinator.cli import nginx
from coordinator.core.urls import derp_url
from testkit.procs import Proc, free_port, python


class Replica:
    def __init__(self, cluster: HACluster, index: int):
        self.index = index
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = cluster.base / f"replica{index}"
        self.data.mkdir(exist_ok=True)
        self.proc: Proc | None = None
        self.cluster = cluster
        self.relay_url = self.url  # what peers dial; a test may point it at a delaying proxy
        self.pg_url = cluster.pg_url  # likewise for this replica's database connection

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Start the process; with ``wait``, return once ``/readyz`` answers (listening and registered)."""
        c = self.cluster
        if self.proc is not None:
            self.proc.stop()  # closes the previous run's log
        pg = ["--pg-url", self.pg_url] if self.pg_url else []  # none: the embedded Postgres in the data dir
        self.proc = Proc(
            [python(), "-m", "coordinator", "server", "--address", f"127.0.0.1:{self.port}", "--data-dir", str(self.data),
             "--relay-url", self.relay_url, "--access-url", c.access_url or "http://lb.invalid", *pg,
             "--heartbeat", c.heartbeat, "--log-level", "info", *c.extra_args],
            env={"COORDINATOR_API_TOKEN": c.api_token},
            log=self.data / f"server-{time.time_ns()}.log",
        )
        if wait:
            self.proc.wait_http(self.url + "/readyz", timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def api(self, path: str):
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.cluster.api_token}"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.load(resp)

    def status(self) -> dict:
        return self.api("/api/v2/debug/status")

    @property
    def server_key(self) -> bytes:
        return bytes.fromhex(self.status()["server_key"].removeprefix("nodekey:"))

    def mesh_connected(self) -> set[str]:
        return {url for url, link in self.status()["mesh"].items() if link["connected"]}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.signal(sig)
            self.proc.wait()


def full_mesh(replicas: list[Replica]) -> bool:
    """Every one of ``replicas`` has a connected mesh link to every other."""
    for r in replicas:
        want = {derp_url(o.url) for o in replicas if o is not r}
        if not want <= r.mesh_connected():
            return False
    return True


class HACluster:
    def __init__(self, pg_url: str, *, heartbeat: str = "500ms", extra_args: tuple[str, ...] = ()):
        self.base = Path(tempfile.mkdtemp(prefix="coordtest-ha-"))
        self.base.chmod(0o755)  # as root, an embedded Postgres runs as its own user and must traverse it
        self.pg_url = pg_url
        self.heartbeat = heartbeat
        self.extra_args = extra_args  # more `coordinator server` flags for every replica
        self.api_token = "test-api-token"
        self.replicas: list[Replica] = []
        self.nginx: Proc | None = None
        self.access_port = free_port()
        self.access_url = f"http://127.0.0.1:{self.access_port}"

    def add_replica(self, start: bool = True) -> Replica:
        r = Replica(self, len(self.replicas))
        self.replicas.append(r)
        if start:
            r.start()
        return r

    def add_replicas(self, n: int, timeout: float = 60.0) -> list[Replica]:
        """Start ``n`` replicas at once and wait until every one is ready."""
        new = [self.add_replica(start=False) for _ in range(n)]
        for r in new:
            r.start(wait=False)
        for r in new:
            r.proc.wait_http(r.url + "/readyz", timeout)
        return new

    def start_nginx(self) -> None:
        assert nginx.nginx_binary(), "nginx is not installed (scripts/bootstrap.sh installs it with COORDINATOR_WITH_NGINX=1)"
        prefix = self.base / "nginx"
        conf = nginx.write_config(prefix, [("127.0.0.1", r.port) for r in self.replicas], ("127.0.0.1", self.access_port))
        nginx.check(prefix, conf)
        self.nginx = Proc(nginx.command(prefix, conf), log=prefix / "nginx.out")
        self.nginx.wait_http(self.access_url + "/healthz")

    def close(self, graceful: bool = False) -> None:
        """Stop everything; ``graceful`` SIGTERMs the running replicas first (their stops are recorded)."""
        if graceful:
            for r in self.running():
                r.proc.signal(signal.SIGTERM)
        for r in self.replicas:
            if r.proc is not None:
                r.proc.signal(signal.SIGKILL)
                r.proc.stop()
        if self.nginx is not None:
            self.nginx.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def running(self) -> list[Replica]:
        return [r for r in self.replicas if r.running]

    def logs(self, tail: int = 4000) -> str:
        out = []
        for r in self.replicas:
            for f in sorted(r.data.glob("server-*.log")):
                out.append(f"--- replica {r.index} {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)


def serve(cluster: HACluster, request, setup=None) -> Iterator[HACluster]:
    """The body of a cluster fixture: ``setup(cluster)``, yield it; print the replicas' logs if
    either failed; close it whatever happens."""
    try:
        if setup is not None:
            setup(cluster)
        yield cluster
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            print(cluster.logs())  # shown with the failure: what the replicas said
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
