"""The custom relays as this replica sees them: each DERP node's ``/derp/probe``, as Tailscale's derpprobe checks it.

Every node of the DERP map's custom regions is asked ``GET /derp/probe`` on a kept-alive connection
(the first request of a connection pays for TCP and TLS and is not timed), every
``CHECK_INTERVAL_BEATS`` heartbeats. The last answer says whether it is up and its round trip; a
node that does not answer is the health finding ``EDERPMAP02``. Read by the status page, the
operator API and the Prometheus metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import httpx

from coordinator.core.errors import describe, one_line
from coordinator.relay.derpconfig import RelayNode
from coordinator.relay.httpclient import http_client, why

log = logging.getLogger("coordinator.derpmap")

PROBE_PATH = "/derp/probe"
CHECK_INTERVAL_BEATS = 5  # one check of every custom relay per 5 heartbeats (10 s by default)
UNREACHABLE = "EDERPMAP02"
MAX_PROBE_ANSWER = 64 << 10  # /derp/probe answers with an empty body; more is not read


@dataclass
class RelayState:
    """The last check of one custom relay node."""

    node: RelayNode
    up: bool | None = None  # None: not checked yet
    latency: float | None = None  # seconds: the last /derp/probe round trip
    error: str | None = None
    checked_at: float | None = None  # time.time() of the last check
    client: httpx.AsyncClient | None = field(default=None, repr=False)
    warm: bool = False  # the client holds a connection that answered

    def as_dict(self) -> dict:
        n = self.node
        return {
            "region_id": n.region_id, "region_code": n.region_code, "name": n.name, "host_name": n.host_name,
            "url": n.base_url, "up": self.up, "error": self.error,
            "latency_ms": None if self.latency is None else round(self.latency * 1e3, 3),
            "checked_at": self.checked_at,
        }


class RelayChecks:
    """Checks every custom relay node; :meth:`run` keeps the set in step with the DERP map until cancelled."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.states: dict[tuple[str, str], RelayState] = {}  # (node name, base URL) -> state, in map order

    def set_nodes(self, nodes: list[RelayNode]) -> list[httpx.AsyncClient]:
        """Follow the map; returns the clients of nodes no longer in it, for the caller to close."""
        wanted = {(n.name, n.base_url): n for n in nodes}
        gone = [s.client for key, s in self.states.items() if key not in wanted and s.client is not None]
        self.states = {key: self.states.get(key) or RelayState(node) for key, node in wanted.items()}
        for key, node in wanted.items():
            self.states[key].node = node  # its region code may have changed
        return gone

    async def _get(self, state: RelayState) -> float:
        assert state.client is not None
        start = time.perf_counter()
        async with state.client.stream("GET", state.node.base_url + PROBE_PATH) as response:
            if response.status_code != 200:
                raise ConnectionError(f"{PROBE_PATH} answered HTTP {response.status_code}")
            size = 0
            async for chunk in response.aiter_bytes():  # read to the end, so the connection is kept
                size += len(chunk)
                if size > MAX_PROBE_ANSWER:
                    raise ConnectionError(f"{PROBE_PATH} answered more than {MAX_PROBE_ANSWER >> 10} KiB")
        return time.perf_counter() - start

    async def check(self, state: RelayState) -> None:
        """One check of one node: warm the connection if needed, then time a request."""
        if state.client is None:
            state.client = http_client(insecure=state.node.insecure, connections=1)
        try:
            with anyio.fail_after(2 * self.timeout):
                if not state.warm:
                    await self._get(state)  # the connection's set-up is not the relay's latency
                    state.warm = True
                rtt = await self._get(state)
        except (TimeoutError, httpx.HTTPError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {2 * self.timeout:g} s"
            else:
                reason = why(exc) if isinstance(exc, httpx.HTTPError) else one_line(describe(exc))
            if state.up is not False:
                log.warning("custom relay %s (%s) unreachable: %s", state.node.label, state.node.base_url, reason)
            state.up, state.latency, state.error, state.warm = False, None, reason, False
        else:
            if state.up is False:
                log.info("custom relay %s (%s) answers again", state.node.label, state.node.base_url)
            state.up, state.latency, state.error = True, rtt, None
        state.checked_at = time.time()

    async def check_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for state in list(self.states.values()):
                tg.start_soon(self.check, state)

    async def run(self, nodes: Callable[[], list[RelayNode]], interval: float) -> None:
        """Check every node of ``nodes()`` every ``interval`` s until cancelled; closes its connections."""
        try:
            while True:
                for client in self.set_nodes(nodes()):
                    await client.aclose()
                await self.check_all()
                await anyio.sleep(interval)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                for state in self.states.values():
                    if state.client is not None:
                        await state.client.aclose()

    def snapshot(self) -> list[dict]:
        return [s.as_dict() for s in self.states.values()]

    def problems(self) -> list[tuple[str, str, str]]:
        """(code, severity, message) for the health report: one per custom relay that did not answer."""
        return [(UNREACHABLE, "warning", f"custom relay unreachable: {s.node.label} ({s.node.base_url}): {s.error}")
                for s in self.states.values() if s.up is False]
