"""The uvicorn internals the project relies on still exist, with a message naming what to fix if not.

coordinator/edge/protocol.py subclasses uvicorn's HttpToolsProtocol, overrides its private ``_should_upgrade``,
calls ``_unset_keepalive_if_required`` and ``_unsupported_upgrade_warning``, re-implements
``data_received`` (a copy of uvicorn's with the DERP hand-over added) and uses ``_TrustedHosts`` for
X-Forwarded-For; coordinator/cli/server.py edits ``Server._captured_signals``. pyproject.toml pins the
uvicorn range this was tested with; this test is what tells when a new uvicorn breaks that.
"""

from __future__ import annotations

import inspect

import pytest
import uvicorn
from uvicorn.protocols.http import httptools_impl

PROTOCOL_METHODS = (  # called or overridden by coordinator.edge.protocol.DerpHttpProtocol
    "_should_upgrade", "_unset_keepalive_if_required", "_unsupported_upgrade_warning", "handle_websocket_upgrade",
    "send_400_response", "on_headers_complete", "data_received",
)
PROTOCOL_ATTRIBUTES = ("parser", "headers", "url", "scope", "connections", "config", "client", "logger",
                       "transport", "app")
# The steps of uvicorn's own data_received that the copy in coordinator/edge/protocol.py repeats, in order.
DATA_RECEIVED_STEPS = ("self._unset_keepalive_if_required()", "self.parser.feed_data(data)",
                       "except httptools.HttpParserError", "self.send_400_response(",
                       "except httptools.HttpParserUpgrade", "self._should_upgrade()",
                       "self.handle_websocket_upgrade()", "self._unsupported_upgrade_warning()")


def fail(what: str, where: str) -> None:
    pytest.fail(f"uvicorn {uvicorn.__version__}: {what}; coordinator/{where} relies on it: adapt that code, "
                "or keep this version out of the uvicorn range in pyproject.toml")


def test_http_protocol_private_methods_and_attributes():
    cls = httptools_impl.HttpToolsProtocol
    for name in PROTOCOL_METHODS:
        if not callable(getattr(cls, name, None)):
            fail(f"HttpToolsProtocol.{name} is gone", "http.py")
    source = inspect.getsource(cls)
    for name in PROTOCOL_ATTRIBUTES:
        if f"self.{name} =" not in source and f"self.{name}:" not in source:
            fail(f"HttpToolsProtocol no longer sets self.{name}", "http.py")


def test_data_received_copy_still_matches_uvicorns_steps():
    source = inspect.getsource(httptools_impl.HttpToolsProtocol.data_received)
    at = 0
    for step in DATA_RECEIVED_STEPS:
        found = source.find(step, at)
        if found < 0:
            fail(f"HttpToolsProtocol.data_received no longer does {step!r} (in this order); its copy, "
                 "DerpHttpProtocol.data_received,", "http.py")
        at = found + len(step)


def test_trusted_hosts_helper():
    from uvicorn.middleware import proxy_headers

    trusted_cls = getattr(proxy_headers, "_TrustedHosts", None)
    if trusted_cls is None:
        fail("uvicorn.middleware.proxy_headers._TrustedHosts is gone", "http.py (client_address)")
    trusted = trusted_cls("127.0.0.1")
    if "127.0.0.1" not in trusted or "10.0.0.1" in trusted:
        fail("_TrustedHosts no longer answers `host in trusted`", "http.py (client_address)")
    get = getattr(trusted, "get_trusted_client_address", None)
    if get is None:
        fail("_TrustedHosts.get_trusted_client_address is gone", "http.py (client_address)")
    if get("203.0.113.7, 127.0.0.1")[0] != "203.0.113.7":
        fail("_TrustedHosts.get_trusted_client_address changed meaning", "http.py (client_address)")


def test_server_captured_signals():
    async def app(scope, receive, send):  # pragma: no cover - never served
        pass

    server = uvicorn.Server(uvicorn.Config(app))
    if not isinstance(getattr(server, "_captured_signals", None), list):
        fail("Server._captured_signals is not a list any more", "server.py (ReplicaServer.handle_exit)")
    if list(inspect.signature(uvicorn.Server.handle_exit).parameters) != ["self", "sig", "frame"]:
        fail("Server.handle_exit(sig, frame) changed its signature", "server.py (ReplicaServer.handle_exit)")
