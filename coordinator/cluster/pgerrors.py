"""Postgres faults an operator can act on: recognise them in an error, name the cause and what to do.

Every part that talks to Postgres (the pool, the heartbeat, the listener, the join loop) logs its
failures with :func:`explain`, and the control plane turns the causes into coded health findings
with :func:`finding_for`. A fault that is none of these stays as it was (its raw message).

libpq reports no SQLSTATE for a refused connection, so those causes are matched on the server's
(English) text as well as on SQLSTATE where there is one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict


@dataclass(frozen=True)
class Cause:
    """One fault: a health finding ``code``, a short ``name`` and what the operator should do."""

    code: str
    name: str
    advice: str

    def line(self, detail: str = "") -> str:
        """``<name> (<detail>): <advice>`` - the one line the log and the finding carry."""
        return f"{self.name} ({detail}): {self.advice}" if detail else f"{self.name}: {self.advice}"


MAX_CONNS_FLAG = "--pg-max-conns (COORDINATOR_PG_MAX_CONNS)"
LISTEN_URL_FLAG = "--pg-listen-url (COORDINATOR_PG_LISTEN_URL)"

TOO_MANY_CLIENTS = Cause(
    "EDB03", "PostgreSQL has no connection slots left",
    f"raise max_connections on the server (or the pooler's limit), or lower {MAX_CONNS_FLAG} on the "
    "replicas",
)
READ_ONLY = Cause(
    "EDB04", "the PostgreSQL URL leads to a read-only standby",
    "point it at the primary (a managed service's writer endpoint)",
)
# With several hosts, libpq can skip standbys by itself.
READ_ONLY_MULTI_HOST = Cause(
    "EDB04", READ_ONLY.name,
    "add target_session_attrs=read-write to the multi-host URL so libpq skips standbys",
)
TLS = Cause(
    "EDB05", "TLS to PostgreSQL failed",
    "check sslrootcert= (the CA that signed the server's certificate) and that the URL's host name is one the "
    "certificate names (sslmode=verify-full checks both)",
)
LOCKED = Cause(
    "EDB06", "a heartbeat statement timed out waiting in PostgreSQL",
    "another session holds a lock on the replicas table or the server is overloaded: look for it in pg_locks / "
    "pg_stat_activity; relaying goes on, heartbeats retry and catch up once it is released",
)
LISTEN_UNSUPPORTED = Cause(
    "EPS03", "LISTEN does not work through this PostgreSQL URL (transaction pooling?)",
    f"the listener's own notifications never arrive although it answers queries; give the replicas a direct URL "
    f"for the listener with {LISTEN_URL_FLAG} or pool by session; relaying, the mesh and heartbeats go on, "
    "peers are found at heartbeat pace",
)

# With a listen URL of its own, the other likely cause: it leads to another database than the publishers'.
LISTEN_ELSEWHERE = Cause(
    "EPS03", "LISTEN does not deliver through the listen URL",
    f"the listener's own notifications never arrive although it answers queries; make {LISTEN_URL_FLAG} lead to "
    "the same database as --pg-url (COORDINATOR_PG_CONNECTION_URL), directly rather than through a transaction "
    "pooler; relaying, the mesh and heartbeats go on, peers are found at heartbeat pace",
)

_TEXT_CAUSES: tuple[tuple[re.Pattern[str], Cause], ...] = (
    (re.compile(r"too many clients already|remaining connection slots are reserved|"
                r"too many connections for (role|database)|no more connections allowed", re.I), TOO_MANY_CLIENTS),
    # Not "the database system is in recovery mode": that is a primary restarting after a crash.
    (re.compile(r"read-only transaction|read-only standby|cannot execute \S+ during recovery|"
                r"while recovery is in progress", re.I), READ_ONLY),
    # Not "SSL SYSCALL error": a connection cut mid-TLS is a network fault, not a certificate one.
    (re.compile(r"certificate verify failed|does not match host name|sslrootcert|certificate|"
                r"server does not support SSL", re.I), TLS),
    (re.compile(r"lock timeout|canceling statement due to (lock|statement) timeout", re.I), LOCKED),
)
_SQLSTATE_CAUSES = {
    "53300": TOO_MANY_CLIENTS,  # too_many_connections
    "25006": READ_ONLY,  # read_only_sql_transaction
    "55P03": LOCKED,  # lock_not_available
    "57014": LOCKED,  # query_canceled (statement_timeout)
}


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def classify(error: BaseException | str | None) -> Cause | None:
    """The operator-facing cause of ``error`` (an exception, its chain, or a message), or None."""
    if error is None:
        return None
    texts: list[str] = []
    if isinstance(error, BaseException):
        for exc in _chain(error):
            state = getattr(exc, "sqlstate", None)
            if state in _SQLSTATE_CAUSES:
                return _SQLSTATE_CAUSES[state]
            texts.append(str(exc))
    else:
        texts.append(error)
    text = " ".join(texts)
    for pattern, cause in _TEXT_CAUSES:
        if pattern.search(text):
            return cause
    return None


class CauseChanges:
    """Says when the known cause of a run of failures changes, so each cause is logged once per outage."""

    def __init__(self) -> None:
        self._last: str | None = None

    def new(self, error: BaseException | str) -> bool:
        """True if ``error`` has a known cause other than the last one seen (then remembered)."""
        cause = classify(error)
        if cause is None or cause.code == self._last:
            return False
        self._last = cause.code
        return True

    def reset(self) -> None:
        """The failures ended."""
        self._last = None


def for_url(cause: Cause, url: str) -> Cause:
    """``cause``, with the advice that fits ``url`` (a multi-host URL without read-write targeting)."""
    if cause.code != READ_ONLY.code:
        return cause
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return cause
    hosts = [h for h in str(params.get("host") or params.get("hostaddr") or "").split(",") if h]
    attrs = str(params.get("target_session_attrs") or "any")
    if len(hosts) > 1 and attrs not in ("read-write", "primary"):
        return READ_ONLY_MULTI_HOST
    return cause


def explain(error: BaseException | str, url: str = "") -> str:
    """One line for the log: the cause and what to do if known, else the error's own message."""
    detail = " ".join(str(error).split())
    cause = classify(error)
    if cause is None:
        return detail
    if url:
        cause = for_url(cause, url)
    return cause.line(detail)
