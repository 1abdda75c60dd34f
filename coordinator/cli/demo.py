"""``coordinator demo``: three local replicas on one embedded Postgres, nginx in front if installed.

The quickest way to see HA work: it starts everything, prints the URLs, and sends packets between
DERP clients placed on different replicas (directly, and through nginx when it is there).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from coordinator.cli import nginx
from coordinator.cli.demo_peers import peers_find_each_other
from coordinator.cluster.tailnet.view import TailnetError
from coordinator.relay.client import DerpClient, DerpError
from coordinator.relay.httpclient import blocking_http_client


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
    with blocking_http_client(1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: process exited with status {proc.returncode}{_last_line(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).is_success:
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


class Stopped(Exception):
    """A stop signal arrived."""


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP as a request to stop everything the demo started.

    The first signal raises :class:`Stopped` in the main thread, unless a step that must not be torn
    runs (starting a child and recording it, stopping everything): it is then raised when that step
    ends. Once stopping, a further signal only sets :attr:`hurry` (kill instead of waiting). The
    handlers are installed whatever the inherited disposition: a shell's background job starts with
    SIGINT ignored, and the demo must still stop on it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self.hurry = False
        self._holding = 0
        self._stopping = False
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:
            self.hurry = True
            return
        if self.received is None:
            self.received = signum
        if not self._holding:
            self._stopping = True
            raise Stopped(signal.Signals(signum).name)

    @contextlib.contextmanager
    def held(self):
        """Delay a stop signal until the block ends."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if self.received is not None and not self._holding and not self._stopping:
            self._stopping = True
            raise Stopped(signal.Signals(self.received).name)

    def stopping(self) -> None:
        """From now on signals only hurry the clean-up along."""
        self._stopping = True

    def wait(self) -> None:
        """Sleep until a stop signal."""
        while True:
            signal.pause()


def _stop_all(procs: list[subprocess.Popen], signals: StopSignals, timeout: float = 15.0) -> None:
    """SIGTERM every child's process group, wait for all (SIGKILL on a second signal or at ``timeout``)."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        while proc.poll() is None and not signals.hurry and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.1)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_demo(replicas: int = 3, base_port: int = 0, data_dir: str | None = None, once: bool = False) -> int:
    """Start the demo, show packets crossing, and run until SIGINT/SIGTERM/SIGHUP (or return, with ``once``).

    Whatever stops it, every process it started (replicas, nginx, the embedded PostgreSQL) is
    stopped before it returns.
    """
    with StopSignals() as signals:
        try:
            return _run_demo(signals, replicas, base_port, data_dir, once)
        except Stopped as exc:
            print(f"coordinator demo: {exc}; stopped everything it started")
            return 0


def _run_demo(signals: StopSignals, replicas: int, base_port: int, data_dir: str | None, once: bool) -> int:
    from coordinator.cluster.embedded import EmbeddedPostgresError, start_embedded

    base = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="coordinator-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    if not data_dir:
        base.chmod(0o755)  # our own directory: as root, the embedded Postgres's user must traverse it
    procs: list[subprocess.Popen] = []
    pg = None
    print(f"coordinator demo: data in {base}", flush=True)
    try:
        with signals.held():  # a postmaster we hold no handle on would outlive us
            try:
                pg = start_embedded(base / "shared")
            except EmbeddedPostgresError as exc:
                print(f"coordinator demo: cannot start: {exc}", file=sys.stderr)
                return 1
            pg.supervise()
        print(f"  PostgreSQL (embedded, shared by all replicas): {pg.url}")
        ports = [base_port + i if base_port else _free_port() for i in range(replicas)]
        access_port = base_port + replicas if base_port else _free_port()
        access_url = f"http://127.0.0.1:{access_port}"
        tailnet_token = secrets.token_urlsafe(24)  # the peers' bearer token, the same on every replica
        for i, port in enumerate(ports):
            url = f"http://127.0.0.1:{port}"
            with signals.held(), open(base / f"replica{i + 1}.log", "wb") as log:  # the child keeps its copy
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "coordinator", "server", "--address", f"127.0.0.1:{port}",
                     "--data-dir", str(base / f"replica{i + 1}"), "--relay-url", url, "--access-url", access_url,
                     "--pg-url", pg.url, "--heartbeat", "1s"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, "COORDINATOR_TAILNET_TOKEN": tailnet_token},
                ))
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for i, (url, proc) in enumerate(zip(urls, procs, strict=True)):
            _wait_http(url + "/readyz", proc, log=base / f"replica{i + 1}.log")
            print(f"  replica up: {url}  (relay URL {url}/derp, log {base}/replica{urls.index(url) + 1}.log)")
        print(f"  peer coordinator: /api/v2/tailnet/coordinate on every replica; tailnet token {tailnet_token}")
        lb = None
        if nginx.nginx_binary() and nginx.EXAMPLE.exists():
            prefix = base / "nginx"
            conf = nginx.write_config(prefix, [("127.0.0.1", p) for p in ports], ("127.0.0.1", access_port))
            with signals.held():
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
        j = 1 % len(urls)
        print(f"peers finding each other through the coordinator (replica 1 and replica {j + 1}):")
        asyncio.run(peers_find_each_other(urls[0], urls[j], tailnet_token, ("replica 1", f"replica {j + 1}")))
        if once:
            return 0
        print("running; try `coordinator probe` or kill a replica. Ctrl-C (or SIGTERM) stops everything.", flush=True)
        signals.wait()
        return 0  # not reached: wait() ends with Stopped
    except (RuntimeError, DerpError, TailnetError) as exc:
        print(f"coordinator demo: {exc}", file=sys.stderr)
        return 1
    finally:
        signals.stopping()
        _stop_all(procs, signals)
        if pg is not None:
            pg.stop()
        if not data_dir:
            shutil.rmtree(base, ignore_errors=True)
