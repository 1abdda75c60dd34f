"""The one HTTP client path for everything but the DERP upgrade: httpx, with anyio timeouts.

Used by the admission webhook, the replicas' latency monitor and ``coordinator probe``. Proxies
from the environment are ignored (a latency figure through a proxy measures the proxy), and
httpx's own timeouts are off: callers bound each exchange with an anyio scope (see
``coordinator.relay.client`` for why never ``asyncio.wait_for``).
"""

from __future__ import annotations

import functools
import os
import ssl as ssl_module
import time

import anyio
import httpx

from coordinator.core.errors import describe
from coordinator.core.urls import relay_base

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


def http_client(*, insecure: bool = False, connections: int | None = None, base_url: str = "") -> httpx.AsyncClient:
    """An httpx client as every caller here wants it: our TLS context, no proxies, no httpx timeouts.

    ``connections`` caps the pool (one for a latency check: every request then shares the
    connection the first one opened); idle connections are kept until the client closes.
    """
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=None)
    return httpx.AsyncClient(base_url=base_url, verify=ssl_context(insecure), timeout=None, limits=limits,
                             trust_env=False, headers={"User-Agent": USER_AGENT})


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


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
    """Timed ``GET`` requests to one server over one kept-alive connection.

    :meth:`round_trip` times a request that found the connection open; one that had to open it
    (the first, or after the server closed an idle connection) pays for the TCP and TLS set-up and
    is repeated, so a figure is always one request's round trip.
    """

    def __init__(self, base: str, timeout: float, insecure: bool = False):
        self.base = relay_base(base)
        self.timeout = timeout
        self.client = http_client(insecure=insecure, connections=1, base_url=self.base or "")
        self._stream: object = None  # the connection the last answer came on

    async def round_trip(self, path: str) -> float:
        """Seconds of one ``GET path`` answered 200 on an open connection; raises on anything else."""
        elapsed, reused = await self._get(path)
        if not reused:
            elapsed, _ = await self._get(path)
        return elapsed

    async def _get(self, path: str) -> tuple[float, bool]:
        if self.base is None:
            raise ConnectionError("no usable relay URL")
        request = self.client.build_request("GET", path)
        try:
            with anyio.fail_after(self.timeout):
                start = time.perf_counter()
                response = await self.client.send(request)
                elapsed = time.perf_counter() - start
        except TimeoutError:
            self._stream = None
            raise TimeoutError(f"no answer to GET {path} within {self.timeout:g} s") from None
        except httpx.ConnectError as exc:
            self._stream = None
            raise ConnectionError(f"cannot connect: {why(exc)}") from None
        except httpx.HTTPError as exc:
            self._stream = None
            raise ConnectionError(f"GET {path}: {why(exc)}") from None
        # httpcore hands out the connection's own stream object: the same one means the same connection.
        stream = response.extensions.get("network_stream")
        reused, self._stream = stream is not None and stream is self._stream, stream
        if response.status_code != 200:
            raise ConnectionError(f"GET {path} answered HTTP {response.status_code}, not 200")
        return elapsed, reused

    async def close(self) -> None:
        await self.client.aclose()
