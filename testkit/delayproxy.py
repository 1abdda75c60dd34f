"""A TCP proxy that adds real latency, for tests that must see slow links without mocked clocks.

::

    with DelayProxy("127.0.0.1", pg_port, delay=0.015) as proxy:   # 15 ms each way
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/db"
        ...
        proxy.delay = 0.0                                            # takes effect for new chunks

Every chunk read from one side is written to the other ``delay`` seconds after it arrived. The
delay is scheduled per chunk, not slept in series, so throughput is not capped: a burst of
chunks arrives a burst, ``delay`` later. Order is kept: a chunk never overtakes an earlier one,
even right after the delay was lowered. EOF (half-close) is forwarded with the same delay.

The proxy runs its own event loop in its own thread, so a test's event loop (or a blocking call
in the test) neither stalls it nor is stalled by it. :meth:`close` stops listening and closes
every proxied connection at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque

import anyio

_HIGH_WATER = 4 << 20  # bytes queued in one direction before the proxy stops reading that side


class _Pipe:
    """One direction of one connection: read chunks, deliver each ``delay`` after its arrival."""

    def __init__(self, proxy: DelayProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.proxy = proxy
        self.reader, self.writer = reader, writer
        self.queue: deque[tuple[float, bytes | None]] = deque()  # (due time, chunk; None = EOF)
        self.queued = 0
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def pump_in(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.room.wait()
                data = await self.reader.read(65536)
                self.queue.append((loop.time() + self.proxy.delay, data or None))
                self.ready.set()
                if not data:
                    return
                self.queued += len(data)
                if self.queued > _HIGH_WATER:
                    self.room.clear()
        except (ConnectionError, OSError):
            self.queue.append((loop.time(), None))
            self.ready.set()

    async def pump_out(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.ready.clear()
                await self.ready.wait()
            due, data = self.queue.popleft()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            self.queued -= len(data)
            if self.queued <= _HIGH_WATER // 2:
                self.room.set()
            await self.writer.drain()


class DelayProxy:
    """TCP proxy on ``127.0.0.1:<port>`` to ``target_host:target_port``, adding ``delay`` s each way."""

    def __init__(self, target_host: str, target_port: int, delay: float = 0.0, *, port: int = 0):
        self.target_host, self.target_port = target_host, target_port
        self.delay = delay  # read for every chunk as it arrives: change it at any time
        self.host = "127.0.0.1"
        self.port = port
        self.connections = 0  # accepted so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> DelayProxy:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"delayproxy->{self.target_port}", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("DelayProxy did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"DelayProxy could not listen: {self._error}") from self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, self.host, self.port))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(client_w)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        upstream_w = None
        try:
            try:
                with anyio.fail_after(10):
                    upstream_r, upstream_w = await asyncio.open_connection(self.target_host, self.target_port)
            except (OSError, TimeoutError):
                return  # the target is down: the client sees its connection closed
            self._writers.add(upstream_w)
            up, down = _Pipe(self, client_r, upstream_w), _Pipe(self, upstream_r, client_w)
            pumps = [asyncio.ensure_future(c) for c in (up.pump_in(), up.pump_out(), down.pump_in(), down.pump_out())]
            try:
                # Both directions done (EOF forwarded each way), or any write failed: close both.
                outs = {pumps[1], pumps[3]}
                while outs:
                    done, _ = await asyncio.wait(outs, return_when=asyncio.FIRST_COMPLETED)
                    outs -= done
                    if any(t.exception() is not None for t in done):
                        break
            finally:
                for t in pumps:
                    t.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except asyncio.CancelledError:
            # close(): end quietly (asyncio's start_server callback would report a cancelled handler task).
            pass
        finally:
            for w in (client_w, upstream_w):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            if task is not None:
                self._tasks.discard(task)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                with anyio.fail_after(2):
                    await self._server.wait_closed()

    def drop_connections(self) -> None:
        """Abort every proxied connection now (the listener stays up)."""
        if self._loop is not None and self._loop.is_running():
            done = threading.Event()

            def abort() -> None:
                for w in list(self._writers):
                    w.transport.abort()
                done.set()

            self._loop.call_soon_threadsafe(abort)
            done.wait(5)

    def close(self) -> None:
        """Stop listening, close every proxied connection, end the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DelayProxy {self.address} -> {self.target_host}:{self.target_port} delay={self.delay * 1000:g}ms>"
