"""A minimal HTTP/1.1 keep-alive client for latency checks: timed requests carry no connection set-up.

Used by the replicas' latency monitor and by ``coordinator probe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit

from coordinator.core.errors import describe  # noqa: F401 - re-exported for older imports
from coordinator.relay.client import ssl_context


class KeepAliveHttp:
    """A minimal HTTP/1.1 keep-alive client: the timed requests carry no connection set-up."""

    def __init__(self, base: str, timeout: float, insecure: bool = False):
        parts = urlsplit(base)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.netloc = parts.netloc.rpartition("@")[2]
        self.ssl = ssl_context(insecure) if parts.scheme == "https" else None
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self.ssl,
                                        server_hostname=self.host if self.ssl else None),
                self.timeout)
        except TimeoutError:
            raise ConnectionError(f"cannot connect: no answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise ConnectionError(f"cannot connect: {describe(exc)}") from None

    async def get(self, path: str) -> float:
        """Seconds from sending ``GET path`` to the end of a 200 response; raises on anything else."""
        if self.writer is None:
            await self._open()
        assert self.reader is not None and self.writer is not None
        request = (f"GET {path} HTTP/1.1\r\nHost: {self.netloc}\r\nUser-Agent: coordinator\r\n"
                   "Accept: */*\r\n\r\n").encode()
        try:
            async with asyncio.timeout(self.timeout):
                start = time.perf_counter()
                self.writer.write(request)
                status, keep = await self._read_response()
                elapsed = time.perf_counter() - start
        except TimeoutError:
            await self.close()
            raise TimeoutError(f"no answer to GET {path} within {self.timeout:g} s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            await self.close()
            if isinstance(exc, asyncio.IncompleteReadError) and not exc.partial:
                raise ConnectionError(f"GET {path}: the server closed the connection without answering") from None
            raise ConnectionError(f"GET {path}: {describe(exc)}") from None
        if not keep:
            await self.close()
        if status != 200:
            raise ConnectionError(f"GET {path} answered HTTP {status}, not 200")
        return elapsed

    async def _read_response(self) -> tuple[int, bool]:
        reader = self.reader
        assert reader is not None
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        fields = status_line.split(" ", 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
            raise ValueError(f"not an HTTP response: {status_line[:40]!r}")
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip().lower()
        keep = "close" not in headers.get("connection", "") and fields[0] != "HTTP/1.0"
        if "chunked" in headers.get("transfer-encoding", ""):
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
        elif fields[1] not in ("204", "304"):
            await reader.read()  # body until EOF
            keep = False
        return int(fields[1]), keep

    @property
    def connected(self) -> bool:
        return self.writer is not None

    def abort(self) -> None:
        """Drop the connection without waiting (from synchronous code)."""
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()

    async def close(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)
