#!/usr/bin/env python3
"""Shared helpers for the relay benchmarks: server processes, /proc readings, DERP client plumbing.

Run as a script it is the benchmarks' relay server process::

    python scripts/benchlib.py relay [--keepalive 3600] [--mesh-key HEX]

which serves ``create_app(DerpRelay(...))`` under uvicorn with uvloop and ``DerpHttpProtocol``
(as ``coordinator server`` does) on 127.0.0.1 and a free port, prints ``READY <port>`` on stdout
once the socket listens, and adds ``GET /bench/stats`` (the relay's counters as JSON) and ``GET /bench/mem`` (malloc and
CPython heap figures). With ``--mesh-key`` the relay accepts mesh peers with that key and runs a
``coordinator.mesh.Mesh``: ``POST /bench/mesh`` with ``{"peers": [url, ...]}`` sets its peers (as the
control plane would), ``GET /bench/mesh`` returns the links' status. The process
dies with its parent (``PR_SET_PDEATHSIG``), so an interrupted benchmark leaves nothing behind.
"""

from __future__ import annotations

import argparse
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
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# -- process plumbing ----------------------------------------------------------------------------


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

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"

    def __enter__(self) -> ServerProcess:
        env = dict(os.environ)
        env.update(self.env or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
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
                    self.port = int(line.split()[1])
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
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(obj).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def stats(self, timeout: float = 5.0, path: str = "/bench/stats") -> dict:
        """The server's counters from ``GET /bench/stats`` ({} if it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return {}


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


# -- DERP client plumbing ------------------------------------------------------------------------


async def connect_raw(url: str, timeout: float = 30.0):
    """A handshaken raw-upgrade DerpClient whose socket has nothing left unread by the client.

    Returns ``(client, leftover)``: bytes the client's StreamReader read past the handshake, to be
    fed to whatever protocol takes over ``client.transport`` (with ``transport.set_protocol``).
    """
    from coordinator.client import DerpClient

    client = await DerpClient.connect(url, timeout=timeout)
    return client, await take_over(client)


async def take_over(client) -> bytes:
    """Detach a raw DerpClient's socket from its StreamReader: the bytes read but not consumed.

    Whatever protocol then takes over ``client.transport`` must be fed these bytes first.
    """
    if client._backlog or client._reader.buffered:
        # Parsed-but-unconsumed frames cannot be handed over in order; the relay sends nothing
        # after ServerInfo unless someone sends to us, so this means a misbehaving server.
        await client.close()
        raise RuntimeError("DERP client holds frames past the handshake; cannot hand the socket over")
    buf = client._stream.reader._buffer
    leftover = bytes(buf)
    buf.clear()
    return leftover


def memory_breakdown() -> dict:
    """This process's heap as glibc malloc and CPython see it (for attributing RSS)."""
    import gc

    out: dict = {"python_blocks": sys.getallocatedblocks(), "gc_objects": len(gc.get_objects())}
    with contextlib.suppress(Exception):
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]

        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2
        mi = libc.mallinfo2()
        # arena: sbrk heap; hblkhd: mmap'd blocks; uordblks: bytes in use; fordblks: free in the heap.
        out.update(malloc_heap=mi.arena, malloc_mmap=mi.hblkhd, malloc_in_use=mi.uordblks, malloc_free=mi.fordblks)
    return out


def use_relay_build(path: str) -> None:
    """Import ``_relay`` from ``path`` (a directory holding a built ``_relay/``), not the installed one.

    For A/B runs of a modified relay built elsewhere (``python setup.py build_ext --inplace`` in a
    copy of the repository): the editable install's import hook is bypassed and ``coordinator``
    comes from this repository.
    """
    if not os.path.isdir(os.path.join(path, "_relay")):
        raise SystemExit(f"--relay-path: no _relay/ in {path}")
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in (getattr(f, "__module__", "") or "")]
    sys.path[:0] = [os.path.abspath(path), REPO_ROOT]


# -- the relay server process ----------------------------------------------------------------------


def serve_relay(keepalive: float, tracemalloc_frames: int = 0, relay_path: str | None = None,
                mesh_key: str | None = None) -> None:
    if tracemalloc_frames:
        import tracemalloc

        tracemalloc.start(tracemalloc_frames)
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    import _relay.relay
    from coordinator.app import create_app
    from coordinator.derp import DerpRelay
    from coordinator.http import DerpHttpProtocol
    from coordinator.keys import NodeKey

    if relay_path:
        print(f"relay server: _relay from {os.path.dirname(_relay.relay.__file__)}", file=sys.stderr, flush=True)
    relay = DerpRelay(NodeKey.generate(), keepalive=keepalive, mesh_key=mesh_key)
    mesh = None
    if mesh_key:
        from coordinator.mesh import Mesh

        # Links see frames only every `keepalive` s: do not time them out before that.
        mesh = Mesh(relay, read_timeout=max(150.0, 2 * keepalive + 30))

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(relay.stats())

    async def mem(request: Request) -> JSONResponse:
        return JSONResponse(memory_breakdown())

    async def mesh_peers(request: Request) -> JSONResponse:
        """POST {"peers": [url, ...]}: mesh with those relays; GET: the links' status."""
        if mesh is None:
            return JSONResponse({"error": "start the server with --mesh-key"}, status_code=400)
        if request.method == "POST":
            await mesh.set_peers((await request.json())["peers"])
        return JSONResponse(mesh.status())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with contextlib.AsyncExitStack() as stack:
            if mesh is not None:
                await stack.enter_async_context(mesh)
            yield

    snapshots: dict = {}

    async def trace(request: Request) -> JSONResponse:
        """?take=NAME stores a tracemalloc snapshot; ?diff=NAME returns the top growth since NAME."""
        import tracemalloc

        if not tracemalloc.is_tracing():
            return JSONResponse({"error": "start the server with --tracemalloc"}, status_code=400)
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        if "take" in request.query_params:
            snapshots[request.query_params["take"]] = snap
            return JSONResponse({"taken": request.query_params["take"]})
        base = snapshots[request.query_params["diff"]]
        top = snap.compare_to(base, "lineno")[: int(request.query_params.get("top", 15))]
        return JSONResponse([{"where": str(d.traceback), "size_diff": d.size_diff, "count_diff": d.count_diff}
                             for d in top])

    app = create_app(relay, lifespan=lifespan,
                     extra_routes=[Route("/bench/stats", stats), Route("/bench/mem", mem), Route("/bench/trace", trace),
                                   Route("/bench/mesh", mesh_peers, methods=["GET", "POST"])])
    sock = listening_socket()
    config = uvicorn.Config(
        app, http=DerpHttpProtocol, loop="uvloop", lifespan="on", log_level="warning",
        access_log=False, backlog=4096, timeout_graceful_shutdown=1,
    )
    print(f"READY {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("relay", help="serve the Cython relay under uvicorn (uvloop) on a free port")
    p.add_argument("--keepalive", type=float, default=3600.0, help="DERP keepalive interval, s (default 3600)")
    p.add_argument("--relay-path", metavar="DIR", help="import _relay from DIR/_relay (a modified build)")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                   help="trace Python allocations (GET /bench/trace) with this many frames (default off)")
    p.add_argument("--mesh-key", metavar="KEY",
                   help="accept mesh peers with this key and mesh with the relays POSTed to /bench/mesh")
    args = ap.parse_args()
    die_with_parent()
    raise_nofile()
    if args.cmd == "relay":
        if args.relay_path:
            use_relay_build(args.relay_path)
        serve_relay(args.keepalive, args.tracemalloc, args.relay_path, args.mesh_key)


if __name__ == "__main__":
    main()
