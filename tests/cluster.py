"""A real HA deployment for tests: replica processes on free ports, one Postgres, nginx in front.

Every process runs in its own session and is killed in :meth:`HACluster.close`, which the
fixtures call even when a test fails.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
import time
import urllib.request
from pathlib import Path

from procs import ROOT, Proc, free_port, python

NGINX_EXAMPLE = ROOT / "deploy" / "nginx" / "coordinator.conf"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def render_nginx(example: str, upstreams: list[int], listen: int) -> str:
    """The example config with the test's upstream ports and listen port."""
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n" for p in upstreams)
    out, n = re.subn(r"(upstream coordinator_replicas \{\n)(?:    server [^\n]*\n)+", lambda m: m.group(1) + servers, example)
    assert n == 1, "upstream block not found in the example config"
    out, n = re.subn(r"listen 80;", f"listen 127.0.0.1:{listen};", out)
    assert n == 1, "listen line not found in the example config"
    return out


class Replica:
    def __init__(self, cluster: HACluster, index: int):
        self.index = index
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = cluster.base / f"replica{index}"
        self.data.mkdir(exist_ok=True)
        self.proc: Proc | None = None
        self.cluster = cluster

    def start(self) -> None:
        c = self.cluster
        self.proc = Proc(
            [python(), "-m", "coordinator", "server", "--address", f"127.0.0.1:{self.port}", "--data-dir", str(self.data),
             "--relay-url", self.url, "--access-url", c.access_url or "http://lb.invalid", "--pg-url", c.pg_url,
             "--heartbeat", c.heartbeat, "--log-level", "info"],
            log=self.data / f"server-{int(time.time() * 1000)}.log",
        )
        self.proc.wait_http(self.url + "/healthz")

    def status(self) -> dict:
        with urllib.request.urlopen(self.url + "/debug/status", timeout=2) as resp:
            return json.load(resp)

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
        binary = nginx_binary()
        assert binary, "nginx is not installed (scripts/bootstrap.sh installs it with COORDINATOR_WITH_NGINX=1)"
        site = render_nginx(NGINX_EXAMPLE.read_text(), [r.port for r in self.replicas], self.access_port)
        prefix = self.base / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(
            "daemon off;\nworker_processes 1;\npid nginx.pid;\nerror_log logs/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n access_log off;\n client_body_temp_path tmp; proxy_temp_path tmp;\n"
            " fastcgi_temp_path tmp; uwsgi_temp_path tmp; scgi_temp_path tmp;\n" + site + "}\n"
        )
        (prefix / "tmp").mkdir(exist_ok=True)
        self.nginx = Proc([binary, "-p", str(prefix), "-c", str(conf)], log=prefix / "nginx.out")
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
