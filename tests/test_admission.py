"""Admission control: a real HTTP webhook (started here) decides who may relay, before ServerInfo.

Each webhook outcome — admits, refuses, down, slow, garbage — follows the fail-open setting, and
the relay logs a change of outcome once, never once per client.
"""

import asyncio
import contextlib
import logging

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from _relay import codec
from coordinator.core.keys import NodeKey
from coordinator.core.settings import load_settings
from coordinator.relay.admission import WebhookAdmission, WebhookFailure, parse_answer
from coordinator.relay.client import DerpClient, DerpRefused, RecvPacket
from testkit.polling import wait_for
from testkit.procs import refused_at_start
from testkit.relayfix import serve_app, serve_relay

pytestmark = pytest.mark.anyio

MESH_KEY = "ab" * 32


class Webhook:
    """derper's admission controller as a real HTTP server: ``mode`` picks how it answers."""

    def __init__(self):
        self.mode = "policy"
        self.allowed: set[str] = set()
        self.requests: list[dict] = []
        self.delay = 0.0
        self.port = 0
        self._serving: contextlib.AsyncExitStack | None = None
        self.app = Starlette(routes=[Route("/admit", self.admit, methods=["POST"])])

    async def admit(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        await asyncio.sleep(1.0 if self.mode == "slow" else self.delay)
        if self.mode == "garbage":
            return PlainTextResponse("<html>upstream error</html>")
        if self.mode == "no-allow":
            return JSONResponse({"allowed": True, "why": "a field name the webhook got wrong"})
        return JSONResponse({"Allow": body["NodePublic"] in self.allowed})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/admit"

    async def start(self) -> None:
        self._serving = contextlib.AsyncExitStack()
        self.port = await self._serving.enter_async_context(serve_app(self.app, port=self.port))

    async def stop(self) -> None:
        if self._serving is not None:
            await self._serving.aclose()
            self._serving = None


@pytest.fixture
async def webhook():
    hook = Webhook()
    await hook.start()
    try:
        yield hook
    finally:
        await hook.stop()


def nodekey(key: NodeKey) -> str:
    return "nodekey:" + key.public.hex()


async def admitted(url: str, key: NodeKey | None = None, **kwargs) -> bool:
    """Connect and report whether the relay let the client in (closing it either way)."""
    try:
        client = await DerpClient.connect(url, key or NodeKey.generate(), timeout=5, **kwargs)
    except DerpRefused as exc:
        assert "admission control" in str(exc), exc
        return False
    await client.close()
    return True


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "coordinator.admission" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
async def test_webhook_outcomes_follow_fail_open_and_log_once_per_change(webhook, caplog, fail_open):
    caplog.set_level(logging.INFO, logger="coordinator.admission")
    admission = WebhookAdmission(webhook.url, timeout=0.3, fail_open=fail_open, cache=0)
    async with serve_relay(admit=admission) as (url, relay):
        good, other, bad = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
        webhook.allowed.update((nodekey(good), nodekey(other)))
        # The webhook decides: admitted keys relay, the other is refused with a clear close.
        async with await DerpClient.connect(url, good) as a, await DerpClient.connect(url, other) as b:
            await a.send(b.public_key, b"through the admitted keys")
            assert (await b.recv_packet(5)).data == b"through the admitted keys"
        assert not await admitted(url, bad)
        assert not await admitted(url, bad, websocket=True)  # WebSocket: close 1008 with the reason
        assert webhook.requests[0] == {"NodePublic": nodekey(good), "Source": "127.0.0.1"}
        assert warnings(caplog) == []
        refused = 2

        outcomes = []
        for mode, expect in (("down", "is unreachable"), ("slow", "did not answer within 0.3 s"),
                             ("garbage", "not JSON"), ("no-allow", 'without a boolean "Allow"')):
            if mode == "down":
                await webhook.stop()
            else:
                webhook.mode = mode
                if webhook._serving is None:
                    await webhook.start()
            # Three clients per outcome, the good key among them: the setting decides, not the key.
            results = [await admitted(url, good), await admitted(url), await admitted(url)]
            outcomes.append((mode, results))
            assert results == [fail_open] * 3, (mode, results)
            refused += 0 if fail_open else 3
            assert len(warnings(caplog)) == len(outcomes), warnings(caplog)
            assert expect in warnings(caplog)[-1]
            assert ("fail-open" if fail_open else "fail-closed") in warnings(caplog)[-1]

        webhook.mode = "policy"
        assert await admitted(url, good) and not await admitted(url, bad)
        refused += 1
        assert any("answers again" in r.getMessage() for r in caplog.records if r.name == "coordinator.admission")
        assert len(warnings(caplog)) == 4
        assert not [r for r in caplog.records if r.name == "coordinator.relay" and r.levelno >= logging.WARNING]
        stats = relay.stats()
        assert stats["admission_refused"] == refused and stats["admission_pending"] == 0
        assert stats["admission_webhook"]["failures"] == 12
        print(f"\n{'fail-open' if fail_open else 'fail-closed'}: {outcomes}; log lines: {warnings(caplog)}")


@pytest.mark.parametrize("websocket", [False, True], ids=["raw", "websocket"])
async def test_frames_sent_before_admission_wait_for_it(webhook, websocket):
    """A client that sends right after ClientInfo: ServerInfo comes first, then its packet is relayed."""
    webhook.delay = 0.3
    admission = WebhookAdmission(webhook.url, timeout=5, cache=0)
    async with serve_relay(admit=admission) as (url, relay):
        keys = NodeKey.generate(), NodeKey.generate()
        webhook.allowed.update(nodekey(k) for k in keys)
        async with await DerpClient.connect(url, keys[0]) as receiver:
            sender = await DerpClient.connect(url, keys[1], wait_server_info=False, websocket=websocket)
            async with sender:
                await sender.send(receiver.public_key, b"sent before admission")
                await wait_for(lambda: relay.stats()["admission_pending"] == 1, what="the sender to wait for admission")
                assert receiver.public_key in relay.server.client_keys() and sender.public_key not in relay.server.client_keys()
                assert (await sender.recv(5)).type == codec.SERVER_INFO
                frame = await receiver.recv_packet(5)
                assert frame == RecvPacket(sender.public_key, b"sent before admission")


async def test_reconnect_storm_is_one_webhook_request(webhook):
    webhook.delay = 0.2
    admission = WebhookAdmission(webhook.url, timeout=5, cache=30)
    async with serve_relay(admit=admission) as (url, relay):
        key = NodeKey.generate()
        webhook.allowed.add(nodekey(key))
        storm = await asyncio.gather(*(admitted(url, key) for _ in range(20)))
        assert all(storm)
        assert await admitted(url, key)  # later: answered from the cache
        stats = admission.stats()
        assert len(webhook.requests) == 1 and stats["requests"] == 1 and stats["allowed"] == 21, stats
        assert stats["cached"] >= 1 and stats["failures"] == 0


async def test_mesh_peers_are_never_sent_to_the_webhook(webhook):
    await webhook.stop()  # down, and fail-closed: only the mesh key gets in
    admission = WebhookAdmission(webhook.url, timeout=0.3, fail_open=False, cache=0)
    async with serve_relay(admit=admission, mesh_key=MESH_KEY) as (url, relay):
        async with await DerpClient.connect(url, mesh_key=MESH_KEY) as peer:
            await peer.watch_conns()
        assert not await admitted(url)
        assert admission.stats()["requests"] == 1 and webhook.requests == []


async def test_embedder_hook(caplog):
    """The same decision as an async Python hook; a hook that raises refuses, logged once."""
    asked = []
    friend, stranger, broken, broken_too = (NodeKey.generate() for _ in range(4))

    async def admit(key: bytes, source: str) -> bool:
        asked.append((key, source))
        await asyncio.sleep(0.01)
        if key in (broken.public, broken_too.public):
            raise RuntimeError("policy store unavailable")
        return key == friend.public

    caplog.set_level(logging.INFO, logger="coordinator.admission")
    async with serve_relay(admit=admit, mesh_key=MESH_KEY) as (url, relay):
        assert await admitted(url, friend)
        assert not await admitted(url, stranger)
        assert not await admitted(url, broken)
        assert not await admitted(url, broken_too)
        assert await admitted(url, mesh_key=MESH_KEY)
        assert len(asked) == 4 and all(source == "127.0.0.1" for _, source in asked)
        assert relay.stats()["admission_refused"] == 3
    failures = warnings(caplog)
    assert len(failures) == 1 and "policy store unavailable" in failures[0], failures


@pytest.mark.parametrize(("status", "body", "outcome"), [
    (200, b'{"Allow": true}', True),
    (200, b'{"Allow": false, "Reason": "unknown node"}', False),
    (200, b'{"allow": true}', True),            # Go matches field names case-insensitively
    (200, b'{"Allow": "yes"}', "no-allow"),     # ... but only a JSON boolean decodes into a bool
    (200, b"[true]", "no-allow"),
    (200, b"<html>", "not-json"),
    (403, b'{"Allow": true}', "status"),
])
def test_webhook_answers(status, body, outcome):
    if isinstance(outcome, bool):
        assert parse_answer(status, body) is outcome
    else:
        with pytest.raises(WebhookFailure) as failure:
            parse_answer(status, body)
        assert failure.value.kind == outcome


def test_admission_settings_from_the_environment():
    s = load_settings(environ={"COORDINATOR_DERP_VERIFY_CLIENT_URL": "https://hooks.corp/admit",
                               "COORDINATOR_DERP_VERIFY_CLIENT_URL_FAIL_OPEN": "false",
                               "COORDINATOR_DERP_VERIFY_CLIENT_URL_TIMEOUT": "750ms"})
    assert (s.verify_client_url, s.verify_client_url_fail_open, s.verify_client_url_timeout) == (
        "https://hooks.corp/admit", False, 0.75)
    assert load_settings(environ={}).verify_client_url_fail_open is True  # derper's default


@pytest.mark.parametrize(("flags", "named"), [
    (["--verify-client-url", "ftp://hooks.corp/admit"], "--verify-client-url"),
    (["--verify-client-url", "hooks.corp/admit"], "--verify-client-url"),
    (["--verify-client-url-fail-open", "maybe"], "--verify-client-url-fail-open"),
    (["--verify-client-url-timeout", "0s"], "--verify-client-url-timeout"),
])
def test_bad_admission_settings_are_refused_at_start(flags, named, tmp_path):
    refused_at_start(["server", "--data-dir", str(tmp_path), *flags], named)
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written
