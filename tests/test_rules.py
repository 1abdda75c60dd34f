"""The shared rules, each with one home: URL reading (coordinator.core.urls), error text and the
"Failed to dial peers" wording (coordinator.core.errors), and liveness (coordinator.cluster.registry.ALIVE_SQL)."""

from __future__ import annotations

import pytest

from coordinator.cluster import controlplane, latency, mesh
from coordinator.cluster import registry as replicas
from coordinator.core import settings as config
from coordinator.core.errors import DIAL_ERROR, describe, dial_error, merge_dial_errors, one_line
from coordinator.core.urls import derp_url, relay_base, same_origin, without_userinfo
from coordinator.ops.probe import discovery


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://10.0.0.1:80", "http://10.0.0.1:80"),
        ("https://a.example/derp/", "https://a.example"),
        (" http://u:secret@h:3000/x?y#z ", "http://h:3000"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("10.0.0.1:80", None),
        ("ftp://h", None),
        ("http://", None),
        ("http://h:notaport", None),
        ("http://h:70000", None),
        ("", None),
    ],
)
def test_relay_base(url, base):
    assert relay_base(url) == base
    assert derp_url(url) == (None if base is None else base + "/derp")


def test_one_reading_of_urls_everywhere():
    assert mesh.normalize_relay_url("http://u:p@h:1/anything") == "http://h:1/derp"
    with pytest.raises(config.ConfigError, match="COORDINATOR_ACCESS_URL"):
        config.check_http_url("http://h:notaport", "COORDINATOR_ACCESS_URL")
    assert same_origin("http://H:80/a", "http://h/b") and not same_origin("http://h", "https://h")
    assert config.same_url is not None and config.same_url("https://h:443", "https://h/")
    assert without_userinfo("http://u:p@h:1/x") == "http://h:1/x"


def test_error_text():
    assert describe(TimeoutError()) == "timed out"
    assert describe(TimeoutError("no reply within 3s")) == "no reply within 3s"
    assert describe(OSError("a\n  b")) == "a b"
    assert describe(ValueError()) == "ValueError"
    assert len(describe(RuntimeError("x" * 1000))) == 300
    assert one_line("a\n\tb  c") == "a b c"


def test_dial_errors_built_and_merged_by_one_rule():
    assert dial_error([]) is None
    assert dial_error(["a: refused"]) == "Failed to dial peers: a: refused"
    merged = merge_dial_errors(dial_error(["a: x"]), None, dial_error(["b: y", "c: z"]))
    assert merged == DIAL_ERROR + "a: x; b: y; c: z"
    assert merge_dial_errors(None, "") is None
    assert controlplane.merge_dial_errors is merge_dial_errors
    assert mesh.dial_error is latency.dial_error is dial_error


def test_liveness_sql_has_one_home():
    assert replicas.ALIVE_SQL in discovery._REPLICAS_SQL and replicas.ALIVE_SQL in discovery._REPLICAS_SQL_V1
    assert f"{replicas.MISSED_BEATS} * heartbeat_ms" in replicas.ALIVE_SQL
