"""Process plumbing and /proc readings for the benchmarks: server child processes, CPU, memory, loops."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(SCRIPTS)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def raise_nofile(want: int | None = None) -> int:
    """Raise RLIMIT_NOFILE's soft limit to ``want`` (default: the hard limit); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else (min(want, hard) if hard != resource.RLIM_INFINITY else want)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (Linux only; no-op elsewhere)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() == 1:  # the parent is already gone
            os._exit(1)


def sigterm_as_interrupt() -> None:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks (process clean-up) run."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds, from /proc/<pid>/stat (10 ms resolution)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (all CPUs)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    total = sum(v[:8])  # guest time is already counted in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests (all CPUs; /proc/stat's steal column)."""
    with open("/proc/stat") as f:
        v = f.readline().split()
    return int(v[8]) / CLK_TCK if len(v) > 8 else 0.0


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class ServerProcess:
    """A benchmark server in a child process that prints ``READY <port>``; a context manager.

    Stopped with SIGTERM (then SIGKILL) on exit, whatever happens in the ``with`` body.
    """

    def __init__(self, argv: list[str], name: str, env: dict | None = None, start_timeout: float = 20.0):
        self.argv, self.name, self.env, self.start_timeout = argv, name, env, start_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.mesh_port = 0  # a second port serving HTTPS for mesh links (``--mesh-tls``), if any
        self.scheme = "https" if "--tls" in argv else "http"  # HTTPS is verified with SSL_CERT_FILE

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/derp"

    @property
    def mesh_url(self) -> str:
        """The URL its mesh peers dial: the HTTPS port of ``--mesh-tls``, else :attr:`url`."""
        return f"https://127.0.0.1:{self.mesh_port}/derp" if self.mesh_port else self.url

    def __enter__(self) -> ServerProcess:
        env = dict(os.environ)
        env.update(self.env or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        # `python -m bench ...` (server_argv) finds this package on PYTHONPATH.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SCRIPTS, env.get("PYTHONPATH")) if p)
        # Own session: a Ctrl-C in the terminal reaches only us, and we stop the server in order.
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + self.start_timeout
            assert self.proc.stdout is not None
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"{self.name} server exited before it was ready (rc={self.proc.wait()})")
                if line.startswith(b"READY "):
                    self.port, self.mesh_port = ([int(f) for f in line.split()[1:3]] + [0])[:2]
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} server did not start within {self.start_timeout:.0f} s")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def post(self, path: str, obj, timeout: float = 5.0) -> dict:
        """POST ``obj`` as JSON to ``path`` on the server; its JSON answer."""
        req = urllib.request.Request(f"{self.scheme}://127.0.0.1:{self.port}{path}", data=json.dumps(obj).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def stats(self, timeout: float = 5.0, path: str = "/bench/stats") -> dict:
        """The server's counters from ``GET /bench/stats`` ({} if it does not answer)."""
        try:
            with urllib.request.urlopen(f"{self.scheme}://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return {}


def server_argv(kind: str, *args: str) -> list[str]:
    """The command line of a benchmark server process: ``python -m bench relay|baseline ARGS``."""
    return [sys.executable, "-m", "bench", kind, *args]


def listening_socket(backlog: int = 4096) -> socket.socket:
    """A TCP socket listening on 127.0.0.1:<free port> (listen() now, so early connects wait)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


def loop_factory(name: str = "uvloop"):
    """``(factory, name)``: uvloop's loop factory when asked for and installed, else asyncio's."""
    import asyncio

    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"


def run(coro, loop: str = "uvloop"):
    """``asyncio.run`` on uvloop (if installed and asked for)."""
    import asyncio

    factory, _ = loop_factory(loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
