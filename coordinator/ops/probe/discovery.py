"""Where the replicas are: the ``replicas`` table (liveness judged by the registry's rule), or a replica's API."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import anyio
import httpx

from coordinator.cluster.registry import ALIVE_SQL
from coordinator.core.errors import describe, one_line
from coordinator.ops.probe.model import TOKEN_ENV, ProbeUsageError, ReplicaInfo
from coordinator.relay.httpclient import http_client, read_capped, tls_failure, why

MAX_API_ANSWER = 8 << 20  # bytes of /api/v2/replicas read: thousands of replicas, never a runaway body

_REPLICAS_SQL = f"""
    SELECT id, hostname, region_id, relay_url, error, database_latency, pubsub_latency, peer_latencies,
           {ALIVE_SQL} AS alive
    FROM replicas ORDER BY id"""
# Before migration 0002 (replicas without the latency monitor).
_REPLICAS_SQL_V1 = f"""
    SELECT id, hostname, region_id, relay_url, error, database_latency, NULL::integer AS pubsub_latency,
           NULL::jsonb AS peer_latencies, {ALIVE_SQL} AS alive
    FROM replicas ORDER BY id"""


def local_database(data_dir: Path) -> str | None:
    """The URL of the embedded PostgreSQL a replica started in ``data_dir`` (``make run``), if it is up."""
    from coordinator.cluster.embedded import embedded_url

    return embedded_url(data_dir)


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


async def connect_db(url: str, timeout: float):
    """(connection, printable target, password): an autocommit connection for discovery and ``SELECT 1``."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    from coordinator.cluster.db import prepare_conninfo, redact
    from coordinator.cluster.dberrors import DatabaseError

    try:
        conninfo, target, password = prepare_conninfo(url)
    except DatabaseError as exc:
        raise ProbeUsageError(one_line(exc)) from None
    conninfo = make_conninfo(conninfo, connect_timeout=str(max(2, math.ceil(timeout))),
                             application_name="coordinator-probe")
    try:
        with anyio.fail_after(timeout + 1.0):
            conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    except TimeoutError:
        raise ProbeUsageError(f"cannot connect to PostgreSQL at {target}: no answer within {timeout:g} s") from None
    except psycopg.Error as exc:
        raise ProbeUsageError(f"cannot connect to PostgreSQL at {target}: {redact(one_line(exc), password)}") from None
    return conn, target, password


async def replicas_from_db(conn, target: str, timeout: float) -> list[ReplicaInfo]:
    import psycopg
    from psycopg.rows import dict_row

    try:
        with anyio.fail_after(timeout):
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
        raise ProbeUsageError(f"cannot read the replicas table at {target}: {one_line(exc)}") from None
    return [
        ReplicaInfo(
            id=str(row["id"]), hostname=row["hostname"] or "", region_id=row["region_id"],
            relay_url=row["relay_url"] or "", error=row["error"] or "",
            database_latency_us=_to_int(row["database_latency"]), pubsub_latency_us=_to_int(row["pubsub_latency"]),
            peer_latencies=_peer_map(row["peer_latencies"]), alive=bool(row["alive"]),
        )
        for row in rows
    ]


async def replicas_from_api(url: str, token: str | None, timeout: float, insecure: bool) -> list[ReplicaInfo]:
    """``GET <url>/api/v2/replicas``."""
    api = url.rstrip("/") + "/api/v2/replicas"
    headers = {"Accept": "application/json", "User-Agent": "coordinator-probe"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with anyio.fail_after(timeout):
            async with http_client(insecure=insecure) as client, client.stream("GET", api, headers=headers) as resp:
                body = await read_capped(resp, MAX_API_ANSWER)
    except TimeoutError:
        raise ProbeUsageError(f"no answer from {url} within {timeout:g} s") from None
    except httpx.ConnectError as exc:
        if (tls := tls_failure(exc)) is not None:
            raise ProbeUsageError(f"TLS with {url} failed: {describe(tls)} (--insecure skips verification)") from None
        raise ProbeUsageError(f"cannot reach {url}: {why(exc)}") from None
    except httpx.HTTPError as exc:
        raise ProbeUsageError(f"{url} did not answer like an HTTP server: {why(exc)}") from None
    if resp.status_code != 200:
        raise _http_error(url, api, resp.status_code, resp.reason_phrase, body, token)
    ctype = resp.headers.get("Content-Type", "")

    try:
        data = json.loads(body)
    except ValueError:
        snippet = one_line(body[:60].decode("utf-8", "replace"))
        raise ProbeUsageError(
            f"{api} did not answer JSON ({ctype or 'no content type'}, starting {snippet!r}): "
            f"is {url} a coordinator replica?"
        ) from None
    if not isinstance(data, list) or not all(isinstance(x, dict) and x.get("id") for x in data):
        raise ProbeUsageError(f"{api} answered JSON that is not a list of replicas: is {url} a coordinator replica?")
    return [
        ReplicaInfo(
            id=str(x["id"]), hostname=str(x.get("hostname") or ""), region_id=_to_int(x.get("region_id")),
            relay_url=str(x.get("relay_address") or x.get("relay_url") or ""), error=str(x.get("error") or ""),
            database_latency_us=_to_int(x.get("database_latency")), pubsub_latency_us=_to_int(x.get("pubsub_latency")),
            peer_latencies=_peer_map(x.get("peer_latencies")), alive=bool(x.get("alive", True)),
        )
        for x in data
    ]


def _http_error(url: str, api: str, code: int, reason: str, body: bytes, token: str | None) -> ProbeUsageError:
    message = ""
    with contextlib.suppress(Exception):
        data = json.loads(body)
        if isinstance(data, dict):
            message = str(data.get("message") or data.get("detail") or "")
    detail = f": {one_line(message)}" if message else ""
    if code in (401, 403):
        if not token:
            return ProbeUsageError(f"{url} wants an API token (HTTP {code}{detail}): pass --token or set {TOKEN_ENV[0]}")
        return ProbeUsageError(f"{url} refused the API token (HTTP {code}{detail})")
    if code == 404:
        return ProbeUsageError(f"{api} does not exist (HTTP 404): is {url} a coordinator replica (or its load balancer)?")
    return ProbeUsageError(f"{api} answered HTTP {code} {reason}{detail}")
