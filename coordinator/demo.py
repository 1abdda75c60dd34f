"""``coordinator demo``: three local replicas on one embedded Postgres, nginx in front if installed.

The quickest way to see HA work: it starts everything, prints the URLs, and sends packets between
DERP clients placed on different replicas (directly, and through nginx when it is there).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from coordinator import nginx
from coordinator.client import DerpClient, DerpError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(log: Path | None) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines() if log else []
    except OSError:
        return ""
    return f": {lines[-1]}" if lines else ""


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with status {proc.returncode}{_last_line(log)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1):
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f} s")


async def _cross(src_url: str, dst_url: str, label: str) -> None:
    a = await DerpClient.connect(src_url)
    b = await DerpClient.connect(dst_url)
    try:
        start = time.perf_counter()
        deadline = time.monotonic() + 15
        while True:  # the mesh needs a moment to learn where b is
            await a.send(b.public_key, b"hello from the demo")
            try:
                await b.recv_packet(timeout=0.1)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise DerpError(f"{label}: no packet crossed within 15 s") from None
        rtt = await a.ping()
        print(f"  {label}: packet delivered ({(time.perf_counter() - start) * 1000:.0f} ms incl. mesh warm-up); "
              f"DERP ping {rtt * 1000:.2f} ms")
    finally:
        await a.close()
        await b.close()


def run_demo(replicas: int = 3, base_port: int = 0, data_dir: str | None = None, once: bool = False) -> int:
    from coordinator.embedded import EmbeddedPostgresError, start_embedded

    base = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="coordinator-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    if not data_dir:
        base.chmod(0o755)  # our own directory: as root, the embedded Postgres's user must traverse it
    procs: list[subprocess.Popen] = []
    print(f"coordinator demo: data in {base}")
    try:
        pg = start_embedded(base / "shared")
    except EmbeddedPostgresError as exc:
        print(f"coordinator demo: cannot start: {exc}", file=sys.stderr)
        if not data_dir:
            shutil.rmtree(base, ignore_errors=True)
        return 1
    print(f"  PostgreSQL (embedded, shared by all replicas): {pg.url}")
    try:
        ports = [base_port + i if base_port else _free_port() for i in range(replicas)]
        access_port = base_port + replicas if base_port else _free_port()
        access_url = f"http://127.0.0.1:{access_port}"
        for i, port in enumerate(ports):
            url = f"http://127.0.0.1:{port}"
            log = open(base / f"replica{i + 1}.log", "wb")  # noqa: SIM115 - the child owns it
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "coordinator", "server", "--address", f"127.0.0.1:{port}",
                 "--data-dir", str(base / f"replica{i + 1}"), "--relay-url", url, "--access-url", access_url,
                 "--pg-url", pg.url, "--heartbeat", "1s"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))
            log.close()
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for i, (url, proc) in enumerate(zip(urls, procs, strict=True)):
            _wait_http(url + "/readyz", proc, log=base / f"replica{i + 1}.log")
            print(f"  replica up: {url}  (relay URL {url}/derp, log {base}/replica{urls.index(url) + 1}.log)")
        lb = None
        if nginx.nginx_binary() and nginx.EXAMPLE.exists():
            prefix = base / "nginx"
            conf = nginx.write_config(prefix, [("127.0.0.1", p) for p in ports], ("127.0.0.1", access_port))
            procs.append(subprocess.Popen(nginx.command(prefix, conf), start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_http(access_url + "/healthz", procs[-1])
            lb = access_url
            print(f"  nginx (deploy/nginx/coordinator.conf): {access_url}  <- the access URL clients use")
        else:
            print("  nginx not found: skipping the load balancer (install nginx to see it; clients can dial any replica)")
        print("packets crossing replicas:")
        for i in range(len(urls)):
            j = (i + 1) % len(urls)
            asyncio.run(_cross(urls[i] + "/derp", urls[j] + "/derp", f"client on replica {i + 1} -> client on replica {j + 1}"))
        if lb:
            asyncio.run(_cross(lb + "/derp", lb + "/derp", "two clients through nginx"))
        if once:
            return 0
        print("running; try `coordinator probe` or kill a replica. Ctrl-C stops everything.")
        with contextlib.suppress(KeyboardInterrupt):
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    except (RuntimeError, DerpError) as exc:
        print(f"coordinator demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pg.stop()
        if not data_dir:
            shutil.rmtree(base, ignore_errors=True)
