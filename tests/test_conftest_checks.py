"""The suite's own guard rails (tests/conftest.py) catch what they promise to catch."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

LEAKY = '''
import asyncio

import pytest

pytestmark = pytest.mark.anyio


async def test_leaks_a_task():
    asyncio.get_running_loop().create_task(asyncio.sleep(3600), name="forgotten-sleeper")


async def test_cleans_up():
    task = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
    task.cancel()


async def test_fire_and_forget_that_ends_soon():
    asyncio.get_running_loop().create_task(asyncio.sleep(0.05))
'''


def test_a_test_that_leaves_an_asyncio_task_running_fails(pytester):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_leaky=LEAKY)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_task*", "*left 1 asyncio task(s) running: forgotten-sleeper*"])
