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
from pathlib import Path

from coordinator import nginx
from procs import Proc, free_port, python


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

    def start(self) -> None:
        c = self.cluster
        self.proc = Proc(
            [python(), "-m", "coordinator", "server", "--address", f"127.0.0.1:{self.port}", "--data-dir", str(self.data),
             "--relay-url", self.relay_url, "--access-url", c.access_url or "http://lb.invalid", "--pg-url", self.pg_url,
             "--heartbeat", c.heartbeat, "--log-level", "info"],
            env={"COORDINATOR_API_TOKEN": c.api_token},
            log=self.data / f"server-{int(time.time() * 1000)}.log",
        )
        self.proc.wait_http(self.url + "/readyz")  # ready: listening and registered

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


class HACluster:
    def __init__(self, pg_url: str, *, heartbeat: str = "500ms"):
        self.base = Path(tempfile.mkdtemp(prefix="coordtest-ha-"))
        self.pg_url = pg_url
        self.heartbeat = heartbeat
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

    def start_nginx(self) -> None:
        assert nginx.nginx_binary(), "nginx is not installed (scripts/bootstrap.sh installs it with COORDINATOR_WITH_NGINX=1)"
        prefix = self.base / "nginx"
        conf = nginx.write_config(prefix, [("127.0.0.1", r.port) for r in self.replicas], ("127.0.0.1", self.access_port))
        nginx.check(prefix, conf)
        self.nginx = Proc(nginx.command(prefix, conf), log=prefix / "nginx.out")
        self.nginx.wait_http(self.access_url + "/healthz")

    def close(self) -> None:
        for r in self.replicas:
            if r.proc is not None:
                r.proc.signal(signal.SIGKILL)
                r.proc.stop()
        if self.nginx is not None:
            self.nginx.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def logs(self) -> str:
        out = []
        for r in self.replicas:
            for f in sorted(r.data.glob("server-*.log")):
                out.append(f"--- replica {r.index} {f.name}\n{f.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)
