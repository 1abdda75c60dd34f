"""The status page in a real headless Chromium against real replicas: login, live updates, SIGKILL, delay.

Screenshots go to ``build/test-artifacts/status/`` (or ``$COORDINATOR_ARTIFACTS/status/``);
``COORDINATOR_DOCS_SCREENSHOT=docs/status.png`` also writes the one the docs show.
"""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from testkit.cluster import HACluster, serve
from testkit.delayproxy import DelayProxy
from testkit.polling import wait_blocking as wait
from testkit.procs import ROOT, http_get

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--window-size=1400,1700"]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/bootstrap.sh installs them as root)",
                allow_module_level=True)
from selenium.webdriver.common.by import By  # noqa: E402


def artifacts() -> Path:
    d = Path(os.environ.get("COORDINATOR_ARTIFACTS") or ROOT / "build" / "test-artifacts") / "status"
    d.mkdir(parents=True, exist_ok=True)
    return d


def screenshot(driver, name: str) -> Path:
    path = artifacts() / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


@pytest.fixture
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def cluster(pg_url, request):
    yield from serve(HACluster(pg_url, heartbeat="500ms"), request)


def log_in(driver, url: str, token: str, expect: str) -> None:
    """Submit the login form and wait for the page it leads to (the element with id ``expect``)."""
    driver.get(url + "/status")
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "login-button").click()
    wait(lambda: driver.find_elements(By.ID, expect), 30, f"#{expect} after logging in", ignore=(Exception,))


def rows(driver) -> dict[str, str]:
    """replica id -> data-alive of the replica table as the page shows it now."""
    return {tr.get_attribute("data-replica"): tr.get_attribute("data-alive")
            for tr in driver.find_elements(By.CSS_SELECTOR, "#replicas tbody tr")}


def latency_levels(driver, to: str) -> dict[str, str]:
    """row replica id -> level of its latency cell towards ``to``."""
    out = {}
    for tr in driver.find_elements(By.CSS_SELECTOR, "#latency tr[data-replica]"):
        for td in tr.find_elements(By.CSS_SELECTOR, f'td[data-to="{to}"]'):
            out[tr.get_attribute("data-replica")] = td.get_attribute("data-level")
    return out


def test_without_or_with_a_wrong_token_a_login_and_no_data(cluster, browser):
    r = cluster.add_replica()
    replica_id = json.loads(http_get(r.url + "/status/data", cluster.api_token)[1])["replica_id"]
    browser.get(r.url + "/status")
    assert browser.find_elements(By.ID, "token") and not browser.find_elements(By.ID, "dashboard")
    assert replica_id not in browser.page_source
    screenshot(browser, "login.png")
    # the page's own script cannot fetch data either
    status = browser.execute_async_script(
        "const done = arguments[0]; fetch('/status/data').then(r => done(r.status));")
    assert status == 401
    wrong = "x" + cluster.api_token[1:]  # all but one character right: still no hint
    log_in(browser, r.url, wrong, expect="login-error")
    error = browser.find_element(By.ID, "login-error").text
    assert error == "That token is not valid."
    assert not browser.find_elements(By.ID, "dashboard") and replica_id not in browser.page_source
    assert browser.get_cookies() == []
    screenshot(browser, "login-wrong-token.png")
    for token in (None, wrong):
        code, body = http_get(r.url + "/status/data", token)
        assert code == 401 and replica_id not in body and cluster.api_token not in body
        assert http_get(r.url + "/status", token)[0] == 401
    assert http_get(r.url + "/status/data", cluster.api_token)[0] == 200  # Bearer works for scripts


def test_live_page_three_replicas_sigkill_and_delay(cluster, browser):
    r0, r1 = cluster.add_replica(), cluster.add_replica()
    slow = cluster.add_replica(start=False)
    with DelayProxy("127.0.0.1", slow.port, delay=0.0) as proxy:
        slow.relay_url = f"http://127.0.0.1:{proxy.port}"
        slow.start()
        ids = [json.loads(http_get(r.url + "/status/data", cluster.api_token)[1])["replica_id"] for r in (r0, r1, slow)]
        log_in(browser, r0.url, cluster.api_token, expect="dashboard")
        cookie = browser.get_cookie("coordinator_status")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != cluster.api_token
        assert "coordinator_status" not in browser.execute_script("return document.cookie")
        browser.execute_script("window.__not_reloaded = true;")

        wait(lambda: rows(browser) == dict.fromkeys(ids, "1"), 30, "all three replicas alive on the page",
             ignore=(Exception,))
        wait(lambda: all(td.get_attribute("data-state") == "up"
                         for td in browser.find_elements(By.CSS_SELECTOR, f'#mesh tr[data-replica="{ids[0]}"] td[data-peer]')),
             30, "this replica's mesh links up", ignore=(Exception,))
        wait(lambda: browser.find_element(By.ID, "relay-clients").text and browser.find_elements(By.CSS_SELECTOR, "#drops tr"),
             10, "the relay counters", ignore=(Exception,))
        screenshot(browser, "healthy.png")

        started = time.monotonic()
        proxy.delay = 0.0075  # 15 ms round trip to the slow replica
        wait(lambda: latency_levels(browser, ids[2]).get(ids[0]) == "over"
             and latency_levels(browser, ids[2]).get(ids[1]) == "over", 60,
             "the slow replica's cells past the 10 ms limit", ignore=(Exception,))
        print(f"delay shown past the limit after {time.monotonic() - started:.1f} s")
        assert latency_levels(browser, ids[1]).get(ids[0]) in ("ok", "near")  # the fast pair stays within
        wait(lambda: browser.find_elements(By.CSS_SELECTOR, '#findings li[data-code="EDERP02"]'), 30,
             "the slow-peer finding listed", ignore=(Exception,))

        started = time.monotonic()
        r1.stop(signal.SIGKILL)
        wait(lambda: rows(browser).get(ids[1]) == "0", 20, "the SIGKILLed replica dead on the page", ignore=(Exception,))
        print(f"SIGKILLed replica shown dead after {time.monotonic() - started:.1f} s (heartbeat 500 ms)")
        assert browser.execute_script("return window.__not_reloaded === true")
        assert rows(browser)[ids[0]] == "1" and rows(browser)[ids[2]] == "1"
        shot = screenshot(browser, "dead-and-slow.png")
        if docs := os.environ.get("COORDINATOR_DOCS_SCREENSHOT"):
            shutil.copyfile(shot, ROOT / docs)
