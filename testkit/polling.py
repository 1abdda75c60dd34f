"""Every wait of the tests and scripts: poll a condition, and fail with what was awaited instead of hanging.

A blocking predicate (HTTP calls to replica processes) in async code: ``lambda: asyncio.to_thread(check)``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

What = str | Callable[[], str]  # a callable is asked at failure time, e.g. for the last value seen


def _timed_out(timeout: float, what: What) -> AssertionError:
    return AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")


async def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, what: What = "the condition",
                   interval: float = 0.01, ignore: tuple[type[BaseException], ...] = ()):
    """Poll ``predicate`` (a function or a coroutine function) until it returns something true and
    return that; exceptions in ``ignore`` count as "not yet"; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what)
        await asyncio.sleep(interval)


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: What = "the condition",
                     interval: float = 0.01, ignore: tuple[type[BaseException], ...] = ()) -> float:
    """Like :func:`wait_for`, but return how many seconds it took (for the figures tests print)."""
    start = time.monotonic()
    await wait_for(predicate, timeout, what, interval, ignore)
    return time.monotonic() - start


def wait_blocking(predicate: Callable[[], Any], timeout: float, what: What = "the condition", interval: float = 0.1,
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
            raise _timed_out(timeout, what)
        time.sleep(interval)


def wait_until_blocking(predicate: Callable[[], Any], timeout: float, what: What = "the condition",
                        interval: float = 0.1, ignore: tuple[type[BaseException], ...] = ()) -> float:
    """:func:`wait_blocking`, returning how many seconds it took (for the figures benchmarks print)."""
    start = time.monotonic()
    wait_blocking(predicate, timeout, what, interval, ignore)
    return time.monotonic() - start
