"""The status page's peer coordinator section in a real headless Chromium, with real peers on real replicas:
this replica's peers and tunnels, every coordinator's rows, a SIGKILLed replica's peers shown lost."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid

import pytest

from coordinator.cluster.tailnet.client import TailnetClient
from testkit.cluster import HACluster, serve
from testkit.polling import wait_blocking
from testkit.procs import http_get
from testkit.tailnetfix import tailnet_token

pytestmark = pytest.mark.anyio
status_page = pytest.importorskip("test_status_page", reason="selenium and Debian's chromium are needed")
By = status_page.By


@pytest.fixture
def two(pg_url, request):
    yield from serve(HACluster(pg_url, heartbeat="500ms"), request, setup=lambda c: c.add_replicas(2))


@pytest.fixture
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver or browser
    webdriver = status_page.webdriver
    options = webdriver.ChromeOptions()
    options.binary_location = status_page.CHROMIUM
    for flag in status_page.FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=status_page.CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def coordinators(driver) -> dict[str, tuple[str, str, str]]:
    """coordinator id -> (alive, peers, lost) as the page shows them."""
    out = {}
    for tr in driver.find_elements(By.CSS_SELECTOR, "#tailnet-coordinators tbody tr"):
        out[tr.get_attribute("data-coordinator")] = (tr.get_attribute("data-alive"),
                                                     tr.find_element(By.CSS_SELECTOR, "td.peers").text,
                                                     tr.find_element(By.CSS_SELECTOR, "td.lost").text)
    return out


async def test_status_page_shows_the_peer_coordinator(two, browser, pg_url):
    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    ids = [json.loads(http_get(r.url + "/status/data", two.api_token)[1])["tailnet"]["coordinator_id"] for r in (r0, r1)]
    a = TailnetClient(r0.url, uuid.uuid4(), token, node={"key": "nodekey:aa"})
    b = TailnetClient(r1.url, uuid.uuid4(), token, node={"key": "nodekey:bb"})
    async with a, b:
        await a.add_tunnel(b.peer_id)
        await a.wait_for_node(b.peer_id, 10)
        await b.wait_for_node(a.peer_id, 10)
        await asyncio.to_thread(status_page.log_in, browser, r0.url, two.api_token, "dashboard")

        def shown() -> bool:
            return (browser.find_element(By.ID, "tailnet-peers").text.endswith("1")
                    and coordinators(browser) == {ids[0]: ("1", "1", "0"), ids[1]: ("1", "1", "0")})

        await asyncio.to_thread(wait_blocking, shown, 30, "both coordinators with one peer each", ignore=(Exception,))
        data = json.loads(http_get(r0.url + "/status/data", two.api_token)[1])["tailnet"]
        assert data["healthy"] and data["peers"] == 1 and data["tunnels"] == 1 and data["updates_in"] >= 1
        assert "healthy" in browser.find_element(By.ID, "tailnet-state").text
        await asyncio.to_thread(status_page.screenshot, browser, "tailnet.png")

        r1.stop(signal.SIGKILL)
        await asyncio.to_thread(wait_blocking, lambda: coordinators(browser).get(ids[1]) == ("0", "0", "1"), 20,
                                "the dead coordinator's peer shown lost", ignore=(Exception,))
        await b.close(disconnect=False)
    if os.environ.get("COORDINATOR_DOCS_SCREENSHOT"):
        await asyncio.to_thread(status_page.screenshot, browser, "tailnet-dead.png")
