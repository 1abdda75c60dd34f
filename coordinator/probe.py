"""``coordinator probe``: measure, from where it runs, the latencies an HA deployment depends on.

Every replica must be within the threshold (10 ms by default) of every other and of Postgres.
Given the database URL (or one replica's URL and an API token), the probe discovers the live
replicas and measures, each as the median of a few samples:

* the database round trip (``SELECT 1``) and the pub/sub round trip (NOTIFY to LISTEN) from here;
* per replica: ``GET <relay>/derp/latency-check`` on a kept-alive connection, and a DERP Ping
  through its relay;
* per ordered pair of replicas A, B in one region (the mesh path): a probe client on A's relay
  sends to a probe client on B's relay, which echoes. The round trip crosses A's and B's relays
  twice; what is judged is the relays' share of it, the round trip minus the probe's own DERP
  pings to A and to B (the legs between this host and the two relays);
* and it shows what the replicas measured themselves: their database and pub/sub latency and
  the peer matrix (``replicas.peer_latencies``).

Exit status: 0 when every figure is within the threshold and every replica answers, 1 when not,
2 for usage and configuration errors (bad arguments, a URL that leads nowhere, a refused token, a
server that is not a coordinator), with a one-line message on stderr. ``--json`` prints the
``coordinator.probe/v1`` document described in ``docs/latency.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import ssl as ssl_module
import statistics
import sys
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import permutations
from urllib.parse import urlsplit

from coordinator.client import ssl_context
from coordinator.httpclient import KeepAliveHttp
from coordinator.httpclient import describe as _describe

SCHEMA = "coordinator.probe/v1"
DEFAULT_THRESHOLD = 0.010  # seconds
DEFAULT_SAMPLES = 5
DEFAULT_TIMEOUT = 3.0  # seconds, per connection attempt and per sample
THRESHOLD_ENV = "COORDINATOR_LATENCY_THRESHOLD"
PG_URL_ENV = ("COORDINATOR_PG_CONNECTION_URL", "CODER_PG_CONNECTION_URL")
TOKEN_ENV = ("COORDINATOR_API_TOKEN",)  # the replicas' own setting: set in their pods already

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

_MAGIC = b"coordinator-probe\x00"  # mesh probe packets: _MAGIC + b"Q"|b"R" + 8-byte nonce
_PAIR_CONCURRENCY = 8  # mesh pairs sampled at once (more would measure the probe's own event loop)
_ALIVE = "(updated_at > now() - 3 * heartbeat_ms * interval '1 millisecond' AND stopped_at IS NULL)"
_REPLICAS_SQL = f"""
    SELECT id, hostname, region_id, relay_url, error, database_latency, pubsub_latency, peer_latencies,
           updated_at, stopped_at, heartbeat_ms, {_ALIVE} AS alive
    FROM replicas ORDER BY id"""
# Before migration 0002 (replicas without the latency monitor).
_REPLICAS_SQL_V1 = f"""
    SELECT id, hostname, region_id, relay_url, error, database_latency, NULL::integer AS pubsub_latency,
           NULL::jsonb AS peer_latencies, updated_at, stopped_at, heartbeat_ms, {_ALIVE} AS alive
    FROM replicas ORDER BY id"""

log = logging.getLogger("coordinator.probe")


class ProbeUsageError(Exception):
    """Exit status 2: bad arguments, a URL that leads nowhere, a refused token, a garbage answer."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


# -- what is measured ------------------------------------------------------------------------------


@dataclass
class Figure:
    """Samples of one latency, in seconds, or why there are none."""

    samples: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def to_json(self, threshold: float) -> dict:
        med = self.median
        return {
            "median_ms": None if med is None else _ms(med),
            "samples_ms": [_ms(s) for s in self.samples],
            "error": self.error,
            "over_threshold": med is not None and med > threshold,
        }


@dataclass
class ReplicaInfo:
    """One replica as discovered (database row or API object)."""

    id: str
    hostname: str = ""
    region_id: int | None = None
    relay_url: str = ""
    error: str = ""
    database_latency_us: int | None = None
    pubsub_latency_us: int | None = None
    peer_latencies: dict = field(default_factory=dict)
    alive: bool = True
    short: str = ""
    # measured by the probe
    http: Figure = field(default_factory=Figure)
    derp: Figure = field(default_factory=Figure)
    server_key: bytes | None = None

    @property
    def label(self) -> str:
        where = ", ".join(x for x in (self.hostname, self.relay_url) if x)
        return f"replica {self.short} ({where})" if where else f"replica {self.short}"


@dataclass
class MeshPair:
    a: ReplicaInfo
    b: ReplicaInfo
    rtt: Figure = field(default_factory=Figure)

    def relays(self) -> float | None:
        """The relays' share of the round trip: minus the probe's own legs to A and to B."""
        rtt = self.rtt.median
        if rtt is None:
            return None
        legs = [r.derp.median for r in (self.a, self.b)]
        if any(leg is None for leg in legs):
            return rtt
        return max(0.0, rtt - sum(legs))


def _short_ids(replicas: list[ReplicaInfo]) -> None:
    ids = [r.id.replace("-", "") for r in replicas]
    n = 8
    while n < 32 and len({i[:n] for i in ids}) < len(ids):
        n += 4
    for r, i in zip(replicas, ids, strict=True):
        r.short = i[:n]


def _relay_base(relay_url: str) -> str | None:
    """``scheme://host:port`` of a relay URL (any path is ignored, as the mesh does), or None."""
    try:
        parts = urlsplit(relay_url.strip())
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


# -- discovery: the database ---------------------------------------------------------------------


def _to_int(value) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _peer_map(value) -> dict:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, dict)}


async def _connect_db(url: str, timeout: float):
    import psycopg
    from psycopg.conninfo import make_conninfo

    from coordinator.db import DatabaseError, prepare_conninfo, redact

    try:
        conninfo, target, password = prepare_conninfo(url)
    except DatabaseError as exc:
        raise ProbeUsageError(_one_line(exc)) from None
    conninfo = make_conninfo(conninfo, connect_timeout=str(max(2, math.ceil(timeout))),
                             application_name="coordinator-probe")
    try:
        async with asyncio.timeout(timeout + 1.0):
            conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    except TimeoutError:
        raise ProbeUsageError(f"cannot connect to PostgreSQL at {target}: no answer within {timeout:g} s") from None
    except psycopg.Error as exc:
        raise ProbeUsageError(f"cannot connect to PostgreSQL at {target}: {redact(_one_line(exc), password)}") from None
    return conn, target, password


async def _replicas_from_db(conn, target: str, timeout: float) -> list[ReplicaInfo]:
    import psycopg
    from psycopg.rows import dict_row

    try:
        async with asyncio.timeout(timeout):
            try:
                cur = await conn.cursor(row_factory=dict_row).execute(_REPLICAS_SQL)
            except psycopg.errors.UndefinedColumn:
                cur = await conn.cursor(row_factory=dict_row).execute(_REPLICAS_SQL_V1)
            rows = await cur.fetchall()
    except psycopg.errors.UndefinedTable:
        raise ProbeUsageError(
            f"PostgreSQL at {target} has no replicas table: is this the database the replicas use "
            "(their COORDINATOR_PG_CONNECTION_URL)?"
        ) from None
    except TimeoutError:
        raise ProbeUsageError(f"PostgreSQL at {target} did not answer the replica query within {timeout:g} s") from None
    except psycopg.Error as exc:
        raise ProbeUsageError(f"cannot read the replicas table at {target}: {_one_line(exc)}") from None
    return [
        ReplicaInfo(
            id=str(row["id"]), hostname=row["hostname"] or "", region_id=row["region_id"],
            relay_url=row["relay_url"] or "", error=row["error"] or "",
            database_latency_us=_to_int(row["database_latency"]), pubsub_latency_us=_to_int(row["pubsub_latency"]),
            peer_latencies=_peer_map(row["peer_latencies"]), alive=bool(row["alive"]),
        )
        for row in rows
    ]


# -- discovery: a replica's API -----------------------------------------------------------------


def _fetch_replicas_api(url: str, token: str | None, timeout: float, insecure: bool) -> list[ReplicaInfo]:
    """``GET <url>/api/v2/replicas`` (blocking: run in a thread)."""
    api = url.rstrip("/") + "/api/v2/replicas"
    headers = {"Accept": "application/json", "User-Agent": "coordinator-probe"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    ctx = ssl_context(insecure) if api.startswith("https:") else None
    try:
        with urllib.request.urlopen(urllib.request.Request(api, headers=headers), timeout=timeout, context=ctx) as resp:
            ctype = resp.headers.get("Content-Type", "")
            body = resp.read(8 << 20)
    except urllib.error.HTTPError as exc:
        message = ""
        with contextlib.suppress(Exception):
            data = json.loads(exc.read(65536))
            if isinstance(data, dict):
                message = str(data.get("message") or data.get("detail") or "")
        detail = f": {_one_line(message)}" if message else ""
        if exc.code in (401, 403):
            if not token:
                raise ProbeUsageError(
                    f"{url} wants an API token (HTTP {exc.code}{detail}): pass --token or set {TOKEN_ENV[0]}"
                ) from None
            raise ProbeUsageError(f"{url} refused the API token (HTTP {exc.code}{detail})") from None
        if exc.code == 404:
            raise ProbeUsageError(
                f"{api} does not exist (HTTP 404): is {url} a coordinator replica (or its load balancer)?"
            ) from None
        raise ProbeUsageError(f"{api} answered HTTP {exc.code} {exc.reason}{detail}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl_module.SSLError):
            raise ProbeUsageError(f"TLS with {url} failed: {_describe(reason)} (--insecure skips verification)") from None
        raise ProbeUsageError(f"cannot reach {url}: {_describe(reason) if isinstance(reason, BaseException) else reason}") from None
    except TimeoutError:
        raise ProbeUsageError(f"no answer from {url} within {timeout:g} s") from None
    except (OSError, ValueError) as exc:  # http.client's BadStatusLine & co. are ValueError/OSError subclasses
        raise ProbeUsageError(f"{url} did not answer like an HTTP server: {_describe(exc)}") from None

    try:
        data = json.loads(body)
    except ValueError:
        snippet = _one_line(body[:60].decode("utf-8", "replace"))
        raise ProbeUsageError(
            f"{api} did not answer JSON ({ctype or 'no content type'}, starting {snippet!r}): "
            f"is {url} a coordinator replica?"
        ) from None
    if not isinstance(data, list) or not all(isinstance(x, dict) and x.get("id") for x in data):
        raise ProbeUsageError(f"{api} answered JSON that is not a list of replicas: is {url} a coordinator replica?")
    out = []
    for x in data:
        region = _to_int(x.get("region_id"))
        out.append(ReplicaInfo(
            id=str(x["id"]), hostname=str(x.get("hostname") or ""), region_id=region,
            relay_url=str(x.get("relay_address") or x.get("relay_url") or ""), error=str(x.get("error") or ""),
            database_latency_us=_to_int(x.get("database_latency")), pubsub_latency_us=_to_int(x.get("pubsub_latency")),
            peer_latencies=_peer_map(x.get("peer_latencies")), alive=bool(x.get("alive", True)),
        ))
    return out


# -- measurements from here --------------------------------------------------------------------------
#
# Three phases. Set-up, all targets at once: connections are opened and each figure's first
# round trip (which may pay for a handshake or a lazily dialled connection) is discarded. Then
# sampling, one round trip at a time, round-robin over the figures, so no measurement shares the
# event loop with another or with the CPU-heavy handshakes. Last the mesh pairs (each needs a
# probe client on both relays, and routes take a few ms to spread).


class _Check:
    """One figure measured from here: ``setup`` (connect, warm up), then ``once`` per sample."""

    def __init__(self, fig: Figure):
        self.fig = fig
        self.ready = False

    async def setup(self) -> None:
        await self.once()  # the warm-up round trip

    async def once(self) -> float:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class _DatabaseCheck(_Check):
    def __init__(self, fig: Figure, conn):
        super().__init__(fig)
        self.conn = conn

    async def once(self) -> float:
        start = time.perf_counter()
        await self.conn.execute("SELECT 1")
        return time.perf_counter() - start


class _PubSubCheck(_Check):
    def __init__(self, fig: Figure, url: str, timeout: float):
        from coordinator.pubsub import PubSub

        super().__init__(fig)
        self.timeout = timeout
        self.ps = PubSub(url, application_name="coordinator-probe", ping_interval=0, connect_timeout=timeout,
                         publish_connections=1, publish_timeout=timeout)

    async def setup(self) -> None:
        try:
            await self.ps.start()
        except Exception as exc:
            raise ConnectionError(f"cannot open a LISTEN connection: {_describe(exc)}") from None
        await self.once()  # also dials the publish connection

    async def once(self) -> float:
        return (await self.ps.measure_latency(timeout=self.timeout))[1]

    async def close(self) -> None:
        await self.ps.close()


class _HttpCheck(_Check):
    """``GET /derp/latency-check`` on one kept-alive connection."""

    def __init__(self, r: ReplicaInfo, timeout: float, insecure: bool):
        super().__init__(r.http)
        self.base = _relay_base(r.relay_url)
        self.conn = KeepAliveHttp(self.base or "http://invalid", timeout, insecure)

    async def setup(self) -> None:
        if self.base is None:
            raise ConnectionError("no usable relay URL")
        await self.once()  # the first request pays for the TCP (and TLS) handshake

    async def once(self) -> float:
        return await self.conn.get("/derp/latency-check")

    async def close(self) -> None:
        await self.conn.close()


class _DerpCheck(_Check):
    """The probe's DERP client on one replica's relay: DERP pings, then it echoes mesh probes.

    Pings are done before the echo reader starts: ``DerpClient.ping`` racing a ``recv`` for the
    read lock can stall until the next frame arrives.
    """

    def __init__(self, r: ReplicaInfo, timeout: float, insecure: bool, pending: dict[bytes, asyncio.Future]):
        super().__init__(r.derp)
        self.replica = r
        self.timeout, self.insecure = timeout, insecure
        self.pending = pending  # nonce -> future resolved with the arrival time of its echo (shared)
        self.client = None
        self.reader: asyncio.Task | None = None
        self.lost: str | None = None

    async def setup(self) -> None:
        from coordinator.client import DerpClient

        base = _relay_base(self.replica.relay_url)
        if base is None:
            raise ConnectionError("no usable relay URL")
        self.client = await DerpClient.connect(base + "/derp", timeout=self.timeout, insecure=self.insecure)
        self.replica.server_key = self.client.server_key
        await self.once()

    async def once(self) -> float:
        return await self.client.ping(self.timeout)

    def start_echo(self) -> None:
        self.reader = asyncio.create_task(self._read(), name=f"probe-reader {self.replica.short}")

    async def _read(self) -> None:
        from coordinator.client import DerpError, RecvPacket

        client = self.client
        try:
            while True:
                frame = await client.recv()
                if not isinstance(frame, RecvPacket) or not frame.data.startswith(_MAGIC):
                    continue
                kind, nonce = frame.data[len(_MAGIC):len(_MAGIC) + 1], frame.data[len(_MAGIC) + 1:]
                if kind == b"Q":
                    await client.send(frame.src, _MAGIC + b"R" + nonce)
                elif kind == b"R":
                    fut = self.pending.pop(nonce, None)
                    if fut is not None and not fut.done():
                        fut.set_result(time.perf_counter())
        except (DerpError, OSError) as exc:
            self.lost = _describe(exc)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        if self.client is not None:
            await self.client.close()


async def _setup(check: _Check, timeout: float) -> None:
    try:
        async with asyncio.timeout(2 * timeout + 1):  # connect, then one round trip
            await check.setup()
        check.ready = True
    except Exception as exc:
        check.fig.error = _describe(exc) if not isinstance(exc, TimeoutError) else f"no answer within {2 * timeout + 1:g} s"


async def _sample_round_robin(checks: list[_Check], samples: int, timeout: float) -> None:
    for _ in range(samples):
        for check in checks:
            if not check.ready:
                continue
            try:
                async with asyncio.timeout(timeout):
                    check.fig.samples.append(await check.once())
            except Exception as exc:
                check.ready = False
                why = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else _describe(exc)
                check.fig.error = f"{why} (after {len(check.fig.samples)} good samples)" if check.fig.samples else why


async def _measure_mesh(pair: MeshPair, a: _DerpCheck, b: _DerpCheck, samples: int, timeout: float,
                        gate: asyncio.Semaphore) -> None:
    loop = asyncio.get_running_loop()
    pending = a.pending
    dst = b.client.public_key

    async def send_probe(fut: asyncio.Future) -> None:
        nonce = os.urandom(8)
        pending[nonce] = fut
        await a.client.send(dst, _MAGIC + b"Q" + nonce)

    # Routing first: B's key reaches A's relay (and A's reaches B's) over the mesh in a few ms.
    up = loop.create_future()
    deadline = loop.time() + timeout
    try:
        while not up.done():
            if a.lost or b.lost:
                raise ConnectionError(a.lost or b.lost)
            if loop.time() >= deadline:
                pair.rtt.error = (f"no probe crossed the mesh within {timeout:g} s: is {pair.a.short} meshed "
                                  f"with {pair.b.short}? (their errors: {pair.a.error or '-'} / {pair.b.error or '-'})")
                return
            await send_probe(up)
            await asyncio.wait({up}, timeout=min(0.02, max(0.0, deadline - loop.time())))
    except Exception as exc:
        pair.rtt.error = f"mesh probe failed: {_describe(exc)}"
        return

    async with gate:
        for _ in range(samples):
            fut = loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    start = time.perf_counter()
                    await send_probe(fut)
                    pair.rtt.samples.append(await fut - start)
            except Exception as exc:
                why = f"an echo did not come back within {timeout:g} s" if isinstance(exc, TimeoutError) else _describe(exc)
                pair.rtt.error = f"{why} (after {len(pair.rtt.samples)} good samples)" if pair.rtt.samples else why
                return


async def _measure(replicas: list[ReplicaInfo], conn, pg_url: str | None, samples: int, timeout: float,
                   insecure: bool) -> tuple[Figure | None, Figure | None, list[MeshPair]]:
    pending: dict[bytes, asyncio.Future] = {}
    database = pubsub = None
    checks: list[_Check] = []
    if conn is not None:
        database, pubsub = Figure(), Figure()
        checks += [_DatabaseCheck(database, conn), _PubSubCheck(pubsub, pg_url, timeout)]
    derps = {r.id: _DerpCheck(r, timeout, insecure, pending) for r in replicas if r.relay_url}
    checks += [_HttpCheck(r, timeout, insecure) for r in replicas if r.relay_url]
    checks += list(derps.values())
    pairs = [MeshPair(a, b) for a, b in permutations(replicas, 2)
             if a.region_id == b.region_id and a.relay_url and b.relay_url]
    try:
        await asyncio.gather(*(_setup(c, timeout) for c in checks))
        await _sample_round_robin(checks, samples, timeout)
        for d in derps.values():
            if d.client is not None:
                d.start_echo()
        gate = asyncio.Semaphore(_PAIR_CONCURRENCY)
        jobs = []
        for pair in pairs:
            a, b = derps[pair.a.id], derps[pair.b.id]
            down = [d.replica.short for d in (a, b) if d.client is None]
            if down:
                pair.rtt.error = "not measured: no DERP connection to " + " and ".join(down)
                continue
            jobs.append(_measure_mesh(pair, a, b, samples, timeout, gate))
        await asyncio.gather(*jobs)
    finally:
        await asyncio.gather(*(c.close() for c in checks), return_exceptions=True)
    return database, pubsub, pairs


# -- the report -------------------------------------------------------------------------------


def _fmt(ms: float | None, threshold_ms: float | None = None) -> str:
    if ms is None:
        return "-"
    text = f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"
    return text + (" !" if threshold_ms is not None and ms > threshold_ms else "")


def _fmt_threshold(ms: float) -> str:
    return f"{ms:g} ms"


def _reported_ms(us: int | None) -> float | None:
    return None if not us or us <= 0 else us / 1000.0


def _build_report(*, source: dict, threshold: float, samples: int, started_at: datetime, duration: float,
                  database: Figure | None, pubsub: Figure | None, replicas: list[ReplicaInfo],
                  not_alive: list[ReplicaInfo], mesh: list[MeshPair]) -> dict:
    th_ms = _ms(threshold)
    problems: list[dict] = []

    def problem(kind: str, subject: str, message: str, *, replica: ReplicaInfo | None = None,
                peer: ReplicaInfo | str | None = None, figure: str | None = None, value_ms: float | None = None) -> None:
        problems.append({
            "kind": kind, "subject": subject,
            "replica": replica.id if replica else None,
            "peer": peer.id if isinstance(peer, ReplicaInfo) else peer,
            "figure": figure, "value_ms": value_ms, "message": message,
        })

    def judge(fig: Figure, subject: str, what: str, *, replica=None, peer=None, figure=None, unreachable=True) -> None:
        med = fig.median
        if med is None:
            problem("unreachable" if unreachable else "failed", subject, f"{what}: {fig.error or 'no samples'}",
                    replica=replica, peer=peer, figure=figure)
            return
        if fig.error:  # answered, then stopped answering
            problem("failed", subject, f"{what}: {fig.error}", replica=replica, peer=peer, figure=figure)
        if med > threshold:
            problem("latency", subject, f"{what} {_fmt(_ms(med))} over the {_fmt_threshold(th_ms)} threshold",
                    replica=replica, peer=peer, figure=figure, value_ms=_ms(med))

    def section(fig: Figure | None, note: str) -> dict:
        if fig is None:
            return {"measured": False, "note": note, "median_ms": None, "samples_ms": [], "error": None,
                    "over_threshold": False}
        return {"measured": True, "note": None, **fig.to_json(threshold)}

    no_db = "not measured (no database URL)"
    if database is not None:
        judge(database, "database", "database round trip from this host", figure="database", unreachable=False)
    if pubsub is not None:
        judge(pubsub, "pubsub", "pub/sub round trip from this host", figure="pubsub", unreachable=False)
    if not replicas:
        problem("unreachable", "replicas", "no live replicas found")

    by_id = {r.id: r for r in replicas}
    replicas_json = []
    for r in replicas:
        if not r.relay_url:
            problem("unreachable", "replica",
                    f"{r.label} has no relay URL: its clients are unreachable from other replicas "
                    "(set COORDINATOR_DERP_SERVER_RELAY_URL)", replica=r, figure="relay_url")
        else:
            judge(r.http, "replica", f"{r.label}: HTTP latency-check", replica=r, figure="http")
            judge(r.derp, "replica", f"{r.label}: DERP ping", replica=r, figure="derp")
        if r.error:
            problem("replica_error", "replica", f"{r.label} reports: {_one_line(r.error)}", replica=r, figure="error")
        reported = {"database_ms": _reported_ms(r.database_latency_us), "pubsub_ms": _reported_ms(r.pubsub_latency_us)}
        for key, what in (("database_ms", "its database latency"), ("pubsub_ms", "its pub/sub round trip")):
            if reported[key] is not None and reported[key] > th_ms:
                problem("latency", "replica", f"{r.label} reports {what} {_fmt(reported[key])} over the "
                        f"{_fmt_threshold(th_ms)} threshold", replica=r, figure="reported_" + key[:-3], value_ms=reported[key])
        replicas_json.append({
            "id": r.id, "short": r.short, "hostname": r.hostname, "region_id": r.region_id, "relay_url": r.relay_url,
            "reachable": bool(r.relay_url) and r.http.median is not None and r.derp.median is not None,
            "server_key": ("nodekey:" + r.server_key.hex()) if r.server_key else None,
            "error": r.error or None, "reported": reported,
            "http": r.http.to_json(threshold), "derp": r.derp.to_json(threshold),
        })

    seen_keys: dict[bytes, ReplicaInfo] = {}
    for r in replicas:
        if r.server_key is None:
            continue
        other = seen_keys.setdefault(r.server_key, r)
        if other is not r:
            problem("misconfigured", "replica",
                    f"{other.label} and {r.label} reach the same relay (server key nodekey:{r.server_key.hex()[:16]}…): "
                    "is one relay URL the load balancer?", replica=r, peer=other, figure="relay_url")

    mesh_json = []
    for p in mesh:
        relays = p.relays()
        what = f"mesh path {p.a.short} -> {p.b.short}"
        if relays is None:
            judge(p.rtt, "mesh", what, replica=p.a, peer=p.b, figure="mesh")
        elif relays > threshold:
            problem("latency", "mesh", f"{what}: relays' share {_fmt(_ms(relays))} over the {_fmt_threshold(th_ms)} threshold "
                    f"(round trip {_fmt(_ms(p.rtt.median))})", replica=p.a, peer=p.b, figure="mesh",
                    value_ms=_ms(relays))
        mesh_json.append({
            "from": p.a.id, "to": p.b.id, "region_id": p.a.region_id, "rtt": p.rtt.to_json(threshold),
            "relays_ms": None if relays is None else _ms(relays),
            "over_threshold": relays is not None and relays > threshold,
        })

    matrix: dict[str, dict[str, dict]] = {}
    for r in replicas:
        row = {}
        for peer_id, entry in sorted(r.peer_latencies.items()):
            peer = by_id.get(peer_id)
            if peer is None or peer is r:
                continue  # a peer that is no longer alive
            cell = {k: entry.get(k) for k in ("relay_url", "http_ms", "derp_ms", "p99_ms", "error")}
            for k in ("http_ms", "derp_ms", "p99_ms"):
                if not isinstance(cell[k], int | float) or isinstance(cell[k], bool):
                    cell[k] = None
            over = [k for k in ("http_ms", "derp_ms") if cell[k] is not None and cell[k] > th_ms]
            cell["over_threshold"] = bool(over)
            row[peer_id] = cell
            if cell["error"]:
                problem("unreachable", "matrix", f"{r.label} cannot reach {peer.short}: {_one_line(cell['error'])}",
                        replica=r, peer=peer, figure="matrix")
            for k in over:
                problem("latency", "matrix", f"{r.label} measures {peer.short}: {k[:-3]} {_fmt(cell[k])} over the "
                        f"{_fmt_threshold(th_ms)} threshold", replica=r, peer=peer, figure="matrix_" + k[:-3], value_ms=cell[k])
        matrix[r.id] = row

    return {
        "schema": SCHEMA,
        "started_at": started_at.isoformat().replace("+00:00", "Z"),
        "duration_ms": round(duration * 1000.0, 1),
        "threshold_ms": th_ms,
        "samples": samples,
        "source": source,
        "database": section(database, no_db),
        "pubsub": section(pubsub, no_db),
        "replicas": replicas_json,
        "mesh": mesh_json,
        "matrix": matrix,
        "not_alive": [{"id": r.id, "hostname": r.hostname, "relay_url": r.relay_url} for r in not_alive],
        "ok": not problems,
        "problems": problems,
    }


async def run_probe(
    *,
    pg_url: str | None = None,
    replica_url: str | None = None,
    token: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    samples: int = DEFAULT_SAMPLES,
    timeout: float = DEFAULT_TIMEOUT,
    insecure: bool = False,
) -> dict:
    """Discover the replicas (from ``pg_url``, else from ``replica_url``'s API) and measure.

    Returns the ``coordinator.probe/v1`` report (``report["ok"]``); raises :class:`ProbeUsageError`
    when the arguments lead nowhere. Thresholds and timeouts are in seconds.
    """
    if bool(pg_url) == bool(replica_url):
        raise ProbeUsageError("give either a database URL (--pg-url) or a replica URL (--url), not both or neither")
    if threshold <= 0:
        raise ProbeUsageError("the threshold must be positive")
    if samples < 1:
        raise ProbeUsageError("samples must be at least 1")
    started_at = datetime.now(UTC)
    t0 = time.perf_counter()
    conn = None
    try:
        if pg_url:
            conn, target, _ = await _connect_db(pg_url, timeout)
            found = await _replicas_from_db(conn, target, timeout)
            source = {"mode": "database", "target": target}
        else:
            if _relay_base(replica_url) is None:
                raise ProbeUsageError(f"--url {replica_url!r} must be an http:// or https:// URL with a host")
            found = await asyncio.to_thread(_fetch_replicas_api, replica_url, token, timeout, insecure)
            parts = urlsplit(replica_url)
            source = {"mode": "replica", "target": parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()}
        alive = [r for r in found if r.alive]
        not_alive = [r for r in found if not r.alive]
        _short_ids(found)

        database, pubsub, mesh = await _measure(alive, conn, pg_url, samples, timeout, insecure)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
    return _build_report(source=source, threshold=threshold, samples=samples, started_at=started_at,
                         duration=time.perf_counter() - t0, database=database, pubsub=pubsub,
                         replicas=alive, not_alive=not_alive, mesh=mesh)


# -- text output ----------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def render_text(report: dict) -> str:
    th = report["threshold_ms"]
    src = report["source"]
    replicas = report["replicas"]
    short = {r["id"]: r["short"] for r in replicas}
    where = f"PostgreSQL at {src['target']}" if src["mode"] == "database" else f"the API of {src['target']}"
    out = [
        f"Latency probe: {len(replicas)} live replica{'s' if len(replicas) != 1 else ''} from {where}",
        f"Threshold {_fmt_threshold(th)} (medians of {report['samples']} samples; '!' marks a figure over it); "
        f"took {report['duration_ms'] / 1000:.2f} s",
        "",
        "From this host",
    ]
    for key, what in (("database", "database round trip"), ("pubsub", "pub/sub round trip")):
        sec = report[key]
        if not sec["measured"]:
            value = sec["note"]
        elif sec["median_ms"] is None:
            value = f"FAILED: {sec['error']}"
        else:
            value = _fmt(sec["median_ms"], th)
        out.append(f"  {what:<22}{value}")

    out += ["", "Replicas (http: GET /derp/latency-check; derp: DERP ping through the relay; "
            "db, pubsub: as the replica reports them)"]
    rows = []
    for r in replicas:
        status = "ok"
        if not r["relay_url"]:
            status = "NO RELAY URL"
        elif not r["reachable"]:
            status = "UNREACHABLE: " + (r["http"]["error"] or r["derp"]["error"] or "")
        if r["error"]:
            status += f"; reports: {_one_line(r['error'])}"
        rows.append([
            r["short"], r["hostname"], str(r["region_id"]), r["relay_url"] or "-",
            _fmt(r["http"]["median_ms"], th), _fmt(r["derp"]["median_ms"], th),
            _fmt(r["reported"]["database_ms"], th), _fmt(r["reported"]["pubsub_ms"], th), status,
        ])
    out += _table(["replica", "hostname", "region", "relay URL", "http", "derp", "db", "pubsub", "status"], rows)
    if report["not_alive"]:
        out.append(f"  ({len(report['not_alive'])} stopped or dead replica rows not probed)")

    out += ["", "Mesh path (probe client on A -> relay A -> relay B -> probe client on B, echoed back; "
            "relays = round trip minus this host's DERP pings to A and B)"]
    if report["mesh"]:
        rows = []
        for m in report["mesh"]:
            rtt = m["rtt"]
            rows.append([short[m["from"]], short[m["to"]], _fmt(rtt["median_ms"]),
                         _fmt(m["relays_ms"], th) if rtt["median_ms"] is not None
                         else rtt["error"] if rtt["error"].startswith("not measured") else f"FAILED: {rtt['error']}"])
        out += _table(["A", "B", "round trip", "relays"], rows)
    else:
        out.append("  (no pairs: fewer than two reachable replicas in one region)")

    out += ["", "Matrix measured by the replicas (row: measuring replica; derp / http)"]
    if any(report["matrix"].values()):
        ids = [r["id"] for r in replicas]
        rows = []
        for a in ids:
            row = [short[a]]
            for b in ids:
                cell = report["matrix"].get(a, {}).get(b)
                if a == b:
                    row.append("·")
                elif cell is None:
                    row.append("-")
                elif cell["error"]:
                    row.append("ERROR")
                else:
                    row.append(" / ".join(_fmt(cell[k]).removesuffix(" ms") for k in ("derp_ms", "http_ms"))
                               + (" !" if cell["over_threshold"] else ""))
            rows.append(row)
        out += _table(["from \\ to", *(short[i] for i in ids)], rows)
    else:
        out.append("  not reported yet (replicas without the latency monitor, or it has not run)")

    out.append("")
    if report["ok"]:
        out.append(f"OK: every figure is within {_fmt_threshold(th)} and every replica answers.")
    else:
        n = len(report["problems"])
        out.append(f"FAIL: {n} problem{'s' if n != 1 else ''}")
        out += [f"  - {p['message']}" for p in report["problems"]]
    return "\n".join(out) + "\n"


# -- command line ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The probe's options, for embedding in another parser (e.g. a ``probe`` subcommand)."""
    where = parser.add_argument_group("where the replicas are (one of)")
    where.add_argument("--pg-url", metavar="URL",
                       help="PostgreSQL URL of the deployment [$COORDINATOR_PG_CONNECTION_URL]")
    where.add_argument("--url", metavar="URL", help="one replica's URL (or the load balancer's), with --token")
    parser.add_argument("--token", metavar="TOKEN", help=f"API token for --url [${TOKEN_ENV[0]}]")
    parser.add_argument("--threshold", metavar="DURATION",
                        help=f"the most any figure may be, Go-style (10ms, 1.5ms; a bare number is seconds) "
                             f"[${THRESHOLD_ENV}, default 10ms]")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                        help=f"samples per figure; the median is judged (default {DEFAULT_SAMPLES})")
    parser.add_argument("--timeout", default="3s", metavar="DURATION",
                        help="per connection attempt and per sample (default 3s)")
    parser.add_argument("--json", action="store_true", help=f"print the {SCHEMA} JSON document instead of tables")
    parser.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    parser.add_argument("--verbose", action="store_true", help="log what the libraries log, tracebacks of internal errors")


def build_parser(prog: str = "coordinator probe") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Measure the latencies an HA deployment depends on, from this host: database and pub/sub "
                    "round trips, each replica's HTTP latency-check and DERP ping, the mesh path between every "
                    "pair of replicas, and the matrix the replicas measure themselves. Exit status 0: all within "
                    "the threshold; 1: a figure over it or a replica unreachable; 2: usage or configuration error.",
    )
    add_arguments(parser)
    return parser


def _env(names: tuple[str, ...]) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _setup_logging(verbose: bool) -> None:
    # basicConfig does nothing if the caller (the coordinator CLI, pytest) configured logging.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.CRITICAL, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def run_from_args(args: argparse.Namespace, prog: str = "coordinator probe") -> int:
    """Run with parsed options (from :func:`add_arguments`); returns the exit status."""
    from coordinator.config import ConfigError, parse_duration

    _setup_logging(args.verbose)

    def fail(message: str) -> int:
        print(f"{prog}: {_one_line(message)}", file=sys.stderr)
        if args.json:
            print(json.dumps({"schema": SCHEMA, "ok": False, "exit_status": EXIT_USAGE, "error": _one_line(message)}))
        return EXIT_USAGE

    try:
        if args.threshold is not None:
            threshold = parse_duration(args.threshold, "--threshold")
        elif os.environ.get(THRESHOLD_ENV):
            threshold = parse_duration(os.environ[THRESHOLD_ENV], THRESHOLD_ENV)
        else:
            threshold = DEFAULT_THRESHOLD
        timeout = parse_duration(args.timeout, "--timeout")
    except ConfigError as exc:
        return fail(str(exc))
    if not threshold > 0:
        return fail("the threshold must be positive")
    if not timeout > 0:
        return fail("--timeout must be positive")
    if not 1 <= args.samples <= 1000:
        return fail("--samples must be between 1 and 1000")
    if args.pg_url and args.url:
        return fail("give either --pg-url or --url, not both")
    pg_url = args.pg_url or (None if args.url else _env(PG_URL_ENV))
    if not pg_url and not args.url:
        return fail(f"where are the replicas? give --pg-url (or set {PG_URL_ENV[0]}), or --url with --token")
    token = args.token or _env(TOKEN_ENV)

    try:
        report = asyncio.run(run_probe(pg_url=pg_url, replica_url=None if pg_url else args.url, token=token,
                                       threshold=threshold, samples=args.samples, timeout=timeout,
                                       insecure=args.insecure))
    except ProbeUsageError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug in the probe, not the user's doing
        if args.verbose:
            traceback.print_exc()
        print(f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)}"
              + ("" if args.verbose else " (--verbose shows the traceback)"), file=sys.stderr)
        return EXIT_INTERNAL
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(render_text(report))
    sys.stdout.flush()
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


def main(argv: list[str] | None = None, *, prog: str = "coordinator probe") -> int:
    """``coordinator probe [options]``: ``argv`` is the options only (without the program or subcommand)."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run_from_args(args, prog)


if __name__ == "__main__":
    sys.exit(main())
