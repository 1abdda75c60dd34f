"""The HTTP client path for everything but the DERP upgrade: httpx, with anyio timeouts; h11 for the
timed latency checks (:class:`KeepAliveHttp` says why).

Used by the admission webhook, the replicas' latency monitor and ``coordinator probe``. Proxies
from the environment are ignored (a latency figure through a proxy measures the proxy), and
httpx's own timeouts are off: callers bound each exchange with an anyio scope (see
``coordinator.relay.client`` for why never ``asyncio.wait_for``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl as ssl_module
import time

import anyio
import h11
import httpx

from coordinator.core.errors import describe
from coordinator.core.urls import endpoint, relay_base

USER_AGENT = "coordinator"


@functools.cache
def ssl_context(insecure: bool = False) -> ssl_module.SSLContext:
    """A client TLS context offering ALPN http/1.1 only (HTTP/2 cannot carry the DERP upgrade).

    Built once per flavour: loading the trust store costs milliseconds, a context serves any number
    of connections.
    """
    ctx = ssl_module.create_default_context()
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl_module.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def http_client(*, insecure: bool = False, connections: int | None = None, base_url: str = "",
                follow_redirects: bool = False) -> httpx.AsyncClient:
    """An httpx client as every caller here wants it: our TLS context, no proxies, no httpx timeouts.

    ``connections`` caps the pool (one for a latency check: every request then shares the
    connection the first one opened); idle connections are kept until the client closes.
    """
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=None)
    return httpx.AsyncClient(base_url=base_url, verify=ssl_context(insecure), timeout=None, limits=limits,
                             trust_env=False, headers={"User-Agent": USER_AGENT}, follow_redirects=follow_redirects)


def blocking_http_client(timeout: float) -> httpx.Client:
    """The same client, blocking, for the one fetch made before any event loop runs (a DERP map at start).

    With no event loop there is no anyio scope: httpx's own timeout bounds each step instead.
    """
    return httpx.Client(verify=ssl_context(), timeout=timeout, trust_env=False, headers={"User-Agent": USER_AGENT},
                        follow_redirects=True)


async def read_capped(response: httpx.Response, limit: int) -> bytes:
    """The first ``limit`` bytes of a streamed response's body; the rest is never read."""
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return body[:limit]


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def warm_up() -> None:
    """Pay the one-off costs (the trust store, httpx's first client) now, not inside a timed request."""
    ssl_context()
    http_client()  # opens nothing: no connection is made until a request


def tls_failure(exc: BaseException) -> ssl_module.SSLError | None:
    """The TLS error behind an httpx error, if that is what it was."""
    return next((e for e in _causes(exc) if isinstance(e, ssl_module.SSLError)), None)


def why(exc: BaseException) -> str:
    """One line for an httpx error: the system's words for the socket error behind it, if any.

    httpx says "All connection attempts failed"; the operator wants "Connection refused".
    """
    for cause in reversed(_causes(exc)):
        if isinstance(cause, ssl_module.SSLError):
            return describe(cause)
        if isinstance(cause, OSError) and (cause.errno or cause.strerror):
            return os.strerror(cause.errno) if cause.errno and cause.errno > 0 else str(cause.strerror)
    return describe(exc)


class KeepAliveHttp:
    """Timed ``GET`` requests to one server over one kept-alive connection: h11 over asyncio streams.

    Not httpx, on purpose: its request path yields to the event loop between sending a request
    and reading the answer (anyio checkpoints), and on a busy replica each yield lets other work
    into the figure (a loop with one other task running 2 ms slices: 7.8 ms median here against
    12.2 ms through httpx). h11 is the HTTP/1.1 state machine httpx runs on; here the request is
    written and the answer awaited with nothing in between.

    :meth:`round_trip` times one request on an open connection: a connection is opened (TCP, TLS)
    outside the timing, and the first request on it, which may still pay for its set-up on the
    server's side, is repeated.
    """

    def __init__(self, base: str, timeout: float, insecure: bool = False):
        self.base = relay_base(base)
        self.timeout = timeout
        self.insecure = insecure
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._http = h11.Connection(h11.CLIENT)

    async def round_trip(self, path: str) -> float:
        """Seconds of one ``GET path`` answered 200 on an open connection; raises on anything else."""
        fresh = self._reader is None or self._reader.at_eof()  # never opened, or the server closed it
        if fresh:
            await self._open()
        elapsed = await self._get(path)
        if fresh:
            if self._reader is None:  # the server closes after every answer (HTTP/1.0 style)
                await self._open()
            elapsed = await self._get(path)
        return elapsed

    async def _open(self) -> None:
        await self.close()
        if self.base is None:
            raise ConnectionError("no usable relay URL")
        where = endpoint(self.base)
        ctx = ssl_context(self.insecure) if where.tls else None
        try:
            with anyio.fail_after(self.timeout):
                self._reader, self._writer = await asyncio.open_connection(
                    where.host, where.port, ssl=ctx, server_hostname=where.host if ctx else None)
        except TimeoutError:
            raise ConnectionError(f"cannot connect: no answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise ConnectionError(f"cannot connect: {why(exc)}") from None
        self._http = h11.Connection(h11.CLIENT)

    async def _get(self, path: str) -> float:
        reader, writer, http = self._reader, self._writer, self._http
        assert reader is not None and writer is not None
        request = http.send(h11.Request(method="GET", target=path, headers=[
            ("Host", endpoint(self.base or "").netloc), ("User-Agent", USER_AGENT), ("Accept", "*/*")]))
        request += http.send(h11.EndOfMessage())
        try:
            with anyio.fail_after(self.timeout):
                start = time.perf_counter()
                writer.write(request)
                status = await self._answer(reader, http)
                elapsed = time.perf_counter() - start
        except TimeoutError:
            await self.close()
            raise TimeoutError(f"no answer to GET {path} within {self.timeout:g} s") from None
        except (OSError, h11.ProtocolError) as exc:
            await self.close()
            raise ConnectionError(f"GET {path}: {why(exc)}") from None
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()  # kept alive for the next request
        else:
            await self.close()  # the server ends the connection after this answer
        if status != 200:
            raise ConnectionError(f"GET {path} answered HTTP {status}, not 200")
        return elapsed

    @staticmethod
    async def _answer(reader: asyncio.StreamReader, http: h11.Connection) -> int:
        """The status of the response, once all of it is read."""
        status = 0
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await reader.read(65536))  # b"": the server closed the connection
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                return status
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection without answering")

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception), anyio.move_on_after(1):
                await writer.wait_closed()
