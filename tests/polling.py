"""Wait for a condition in a test: poll it, and fail with what was awaited instead of hanging."""

from __future__ import annotations

import asyncio
import time


async def wait_for(predicate, timeout: float = 5.0, what: str = "the condition", interval: float = 0.01):
    """Poll ``predicate`` until it returns something true and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_until(predicate, timeout: float = 5.0, what: str = "the condition", interval: float = 0.01) -> float:
    """Like :func:`wait_for`, but return how many seconds it took (for the figures tests print)."""
    start = time.monotonic()
    await wait_for(predicate, timeout, what, interval)
    return time.monotonic() - start


def wait_blocking(predicate, timeout: float, what: str = "the condition", interval: float = 0.1,
                  ignore: tuple[type[BaseException], ...] = ()):
    """:func:`wait_for` for synchronous tests; exceptions in ``ignore`` count as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
