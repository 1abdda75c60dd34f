"""Admission control: who may relay, decided once per connection before ServerInfo is sent.

:class:`WebhookAdmission` asks derper's admission webhook (``--verify-client-url``): it POSTs
``{"NodePublic": "nodekey:<hex>", "Source": "<ip>"}`` (``tailcfg.DERPAdmitClientRequest``) and
admits the client only on ``{"Allow": true}``. Anything else that is not ``{"Allow": false}``
(unreachable, slower than the timeout, an HTTP status other than 200, a body that is not JSON or
has no boolean ``Allow``) is a failure of the webhook, and the fail-open setting decides. Answers
are reused for a short time and concurrent questions about one client share one request, so a
reconnect storm is not a webhook storm. A change of the webhook's outcome is logged once; single
clients are logged at debug level only.

:func:`guarded` wraps an embedder's own ``async def admit(key, source) -> bool`` the same way:
an exception refuses the client and is logged once per change. The relay (``_relay``) only
sees a callable returning a bool or an awaitable of one; it skips mesh peers itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

import anyio
import httpx

from coordinator.relay.httpclient import http_client, read_capped, warm_up, why

log = logging.getLogger("coordinator.admission")

AdmitHook = Callable[[bytes, str], Awaitable[bool]]

MAX_ANSWER = 4096          # bytes of a webhook answer we read (derper reads 4 KiB)
MAX_CACHED = 16384         # decisions kept; hostile clients with fresh keys must not grow it forever


class WebhookFailure(Exception):
    """The webhook gave no usable answer; ``kind`` names the outcome for the once-per-change log."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def request_body(key: bytes, source: str) -> bytes:
    """A ``tailcfg.DERPAdmitClientRequest`` as Go marshals it (``Source`` is "" when unknown)."""
    return json.dumps({"NodePublic": "nodekey:" + key.hex(), "Source": source}, separators=(",", ":")).encode()


def parse_answer(status: int, body: bytes) -> bool:
    """``Allow`` of a ``DERPAdmitClientResponse``; raises WebhookFailure for anything else."""
    if status != 200:
        raise WebhookFailure("status", f"answered HTTP {status}")
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise WebhookFailure("not-json", "answered something that is not JSON") from None
    # Go's encoding/json matches field names case-insensitively; only a JSON boolean decodes into Allow.
    allow = [v for k, v in answer.items() if k.lower() == "allow"] if isinstance(answer, dict) else []
    if len(allow) != 1 or not isinstance(allow[0], bool):
        raise WebhookFailure("no-allow", 'answered JSON without a boolean "Allow"')
    return allow[0]


async def post_json(url: str, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` to ``url``; (status, first MAX_ANSWER bytes of the body).

    One client per question: answers are cached and questions shared, so these are rare, and a
    client without connections left open needs no owner to close it.
    """
    async with http_client() as client, client.stream(
            "POST", url, content=body, headers={"Content-Type": "application/json"}) as response:
        return response.status_code, await read_capped(response, MAX_ANSWER)


class _OnceLog:
    """Logs an outcome only when it differs from the previous one."""

    def __init__(self, what: str):
        self.what = what
        self.kind: str | None = None

    def ok(self) -> None:
        if self.kind not in (None, "ok"):
            log.info("%s answers again", self.what)
        self.kind = "ok"

    def failed(self, kind: str, detail: str, consequence: str) -> None:
        if kind != self.kind:
            log.warning("%s %s; %s", self.what, detail, consequence)
        self.kind = kind


class WebhookAdmission:
    """derper's ``--verify-client-url``: the relay's ``admit`` callable for an HTTP admission webhook."""

    def __init__(self, url: str, *, timeout: float = 5.0, fail_open: bool = True, cache: float = 5.0):
        self.url = url
        self.timeout = timeout
        self.fail_open = fail_open
        self.cache_seconds = cache
        self._cache: dict[tuple[bytes, str], tuple[float, bool]] = {}
        self._inflight: dict[tuple[bytes, str], asyncio.Future] = {}
        self._log = _OnceLog(f"admission webhook {url}")
        self.counts = {"requests": 0, "allowed": 0, "refused": 0, "failures": 0, "cached": 0}
        warm_up()  # else the first question could time out on the client's set-up

    def __call__(self, key: bytes, source: str) -> bool | Awaitable[bool]:
        """A fresh decision for this (key, source) at once, else an awaitable of one."""
        hit = self._cache.get((key, source))
        if hit is not None and hit[0] > time.monotonic():
            self.counts["cached"] += 1
            return self._count(hit[1])
        return self._decide(key, source)

    def _count(self, allowed: bool) -> bool:
        self.counts["allowed" if allowed else "refused"] += 1
        return allowed

    async def _decide(self, key: bytes, source: str) -> bool:
        which = (key, source)
        shared = self._inflight.get(which)
        if shared is None:
            shared = self._inflight[which] = asyncio.ensure_future(self._ask(key, source))
            shared.add_done_callback(lambda _: self._inflight.pop(which, None))
        # Shielded: a client that goes away cancels only its own wait, not its twins' question.
        return self._count(await asyncio.shield(shared))

    async def _ask(self, key: bytes, source: str) -> bool:
        self.counts["requests"] += 1
        try:
            try:
                with anyio.fail_after(self.timeout):
                    status, body = await post_json(self.url, request_body(key, source))
            except TimeoutError:
                raise WebhookFailure("timeout", f"did not answer within {self.timeout:g} s") from None
            except httpx.RemoteProtocolError as exc:
                raise WebhookFailure("not-http", f"did not answer in HTTP ({why(exc)})") from None
            except httpx.HTTPError as exc:
                raise WebhookFailure("unreachable", f"is unreachable ({why(exc)})") from None
            allowed = parse_answer(status, body)
            self._log.ok()
        except WebhookFailure as failure:
            self.counts["failures"] += 1
            allowed = self.fail_open
            self._log.failed(failure.kind, str(failure), "admitting clients until it answers (fail-open)" if allowed
                             else "refusing clients until it answers (fail-closed)")
        log.debug("admission of nodekey:%s from %s: %s", key.hex(), source or "?", "allowed" if allowed else "refused")
        self._remember((key, source), allowed)
        return allowed

    def _remember(self, which: tuple[bytes, str], allowed: bool) -> None:
        if self.cache_seconds <= 0:
            return
        now = time.monotonic()
        if len(self._cache) >= MAX_CACHED:
            for k in [k for k, (expires, _) in self._cache.items() if expires <= now] or list(self._cache)[:1024]:
                del self._cache[k]
        self._cache[which] = (now + self.cache_seconds, allowed)

    def stats(self) -> dict:
        return dict(self.counts)


def guarded(hook: AdmitHook) -> Callable[[bytes, str], Awaitable[bool]]:
    """An embedder's ``async admit(key, source) -> bool`` as the relay's ``admit``: errors refuse, logged once."""
    failures = _OnceLog(f"admission hook {getattr(hook, '__qualname__', hook)!s}")

    async def admit(key: bytes, source: str) -> bool:
        try:
            allowed = bool(await hook(key, source))
        except Exception as exc:  # the embedder's bug must not take the relay down
            failures.failed(type(exc).__name__, f"raised {exc!r}", "refusing the clients it fails for")
            return False
        failures.ok()
        return allowed

    return admit
