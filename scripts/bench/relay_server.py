"""The relay under test, in its own process: ``python -m bench relay [--keepalive S] [--mesh-key HEX]``.

It serves ``create_app(DerpRelay(...))`` under uvicorn with uvloop and ``DerpHttpProtocol`` (as
``coordinator server`` does) on 127.0.0.1 and a free port, prints ``READY <port>`` on stdout once
the socket listens, and adds ``GET /bench/stats`` (the relay's counters as JSON) and ``GET
/bench/mem`` (malloc and CPython heap figures). With ``--mesh-key`` the relay accepts mesh peers
with that key and runs a ``coordinator.cluster.mesh.Mesh``: ``POST /bench/mesh`` with ``{"peers": [url,
...]}`` sets its peers (as the control plane would), ``GET /bench/mesh`` returns the links' status.
The process dies with its parent (``PR_SET_PDEATHSIG``), so an interrupted benchmark leaves nothing
behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from bench import proc


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
    sys.path[:0] = [os.path.abspath(path), proc.REPO_ROOT]


def serve_relay(keepalive: float, tracemalloc_frames: int = 0, relay_path: str | None = None,
                mesh_key: str | None = None, rate_limit: int = 0, rate_burst: int = 0,
                tls: list[str] | None = None, mesh_tls: list[str] | None = None) -> None:
    if tracemalloc_frames:
        import tracemalloc

        tracemalloc.start(tracemalloc_frames)
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    import _relay.relay
    from coordinator.core.keys import NodeKey
    from coordinator.edge.protocol import DerpHttpProtocol
    from coordinator.edge.routes import create_app
    from coordinator.relay.dataplane import DerpRelay

    if relay_path:
        print(f"relay server: _relay from {os.path.dirname(_relay.relay.__file__)}", file=sys.stderr, flush=True)
    limits = {"rate_limit": rate_limit, "rate_burst": rate_burst} if rate_limit else {}  # older builds lack them
    relay = DerpRelay(NodeKey.generate(), keepalive=keepalive, mesh_key=mesh_key, **limits)
    mesh = None
    if mesh_key:
        from coordinator.cluster.mesh import Mesh

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
    sock = proc.listening_socket()
    common = {"http": DerpHttpProtocol, "loop": "uvloop", "log_level": "warning", "access_log": False,
              "backlog": 4096, "timeout_graceful_shutdown": 1}
    config = uvicorn.Config(app, lifespan="on", **common,
                            **({"ssl_certfile": tls[0], "ssl_keyfile": tls[1]} if tls else {}))
    server = uvicorn.Server(config)
    if not mesh_tls:
        print(f"READY {sock.getsockname()[1]}", flush=True)
        server.run(sockets=[sock])
        return
    # The same app and relay also on HTTPS, for mesh links alone; the plain server owns the lifespan.
    mesh_sock = proc.listening_socket()
    mesh_server = uvicorn.Server(uvicorn.Config(app, lifespan="off", ssl_certfile=mesh_tls[0],
                                                ssl_keyfile=mesh_tls[1], **common))

    async def both() -> None:
        mesh_task = asyncio.ensure_future(mesh_server.serve(sockets=[mesh_sock]))
        await asyncio.sleep(0)  # it captures the signals first, so the plain server's handler gets SIGTERM
        try:
            await server.serve(sockets=[sock])
        finally:
            mesh_server.should_exit = True
            await mesh_task

    print(f"READY {sock.getsockname()[1]} {mesh_sock.getsockname()[1]}", flush=True)
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(both())
