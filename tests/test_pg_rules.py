"""The Postgres fault rules without a server: causes recognised, the connection budget, settings refused."""

from __future__ import annotations

import psycopg


def test_causes_are_recognised_by_sqlstate_and_by_libpq_text():
    from coordinator.cluster.pgerrors import (
        LOCKED,
        READ_ONLY,
        READ_ONLY_MULTI_HOST,
        TLS,
        TOO_MANY_CLIENTS,
        classify,
        explain,
        for_url,
    )

    assert classify(psycopg.errors.TooManyConnections("x")) is TOO_MANY_CLIENTS
    assert classify(psycopg.errors.ReadOnlySqlTransaction("x")) is READ_ONLY
    assert classify(psycopg.errors.LockNotAvailable("x")) is LOCKED
    assert classify(psycopg.errors.QueryCanceled("x")) is LOCKED
    assert classify('connection to server at "db" failed: FATAL:  sorry, too many clients already') is TOO_MANY_CLIENTS
    assert classify("SSL error: certificate verify failed") is TLS
    assert classify("connection refused") is None
    assert classify("FATAL:  the database system is in recovery mode") is None  # a restarting primary
    assert classify("SSL SYSCALL error: EOF detected") is None  # a cut connection
    assert classify("ERROR:  cannot execute LISTEN during recovery") is READ_ONLY
    assert explain("connection refused") == "connection refused"
    assert for_url(READ_ONLY, "postgresql://u@a:5432,b:5432/db") is READ_ONLY_MULTI_HOST
    assert for_url(READ_ONLY, "postgresql://u@a:5432,b:5432/db?target_session_attrs=read-write") is READ_ONLY
    assert for_url(READ_ONLY, "postgresql://u@a:5432/db") is READ_ONLY


def test_connection_budget_is_shared_out_and_bounded():
    from coordinator.cluster.pgbudget import split

    for total in range(4, 40):
        b = split(total)
        assert b.pool + b.publishers + b.listener + b.spare == total
        assert b.pool >= 1 and 1 <= b.publishers <= 4
    assert (split(8).pool, split(8).publishers) == (4, 2)


def test_too_small_a_connection_budget_is_refused_at_start():
    from testkit.procs import refused_at_start

    line = refused_at_start(["server", "--pg-url", "postgresql://x@127.0.0.1:1/x", "--pg-max-conns", "3"],
                            "--pg-max-conns")
    assert "at least 4" in line


def test_an_unparsable_listen_url_is_refused_at_start():
    from testkit.procs import refused_at_start

    line = refused_at_start(["server", "--pg-url", "postgresql://x@127.0.0.1:1/x", "--pg-listen-url",
                             "password=s3cret oops"], "--pg-listen-url")
    assert "s3cret" not in line
