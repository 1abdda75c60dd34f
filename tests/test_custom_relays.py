"""Custom relays: real replicas whose DERP map names an external relay (the project's relay run alone under
uvicorn, as an external derper would be), a config URL served by a real HTTP server that is stopped and
started again, clients that find the external relay through the replicas' map, bad input refused at start."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from coordinator.relay.client import DerpClient, DerpError
from testkit.polling import wait_blocking
from testkit.procs import ROOT, Proc, free_port, http_get, python

pytestmark = pytest.mark.anyio
TOKEN = "test-api-token"


# -- real parts ---------------------------------------------------------------------------------------


class ExternalRelay:
    """The project's relay alone (no database), as ``uvicorn coordinator.app:app`` runs it: an external derper."""

    def __init__(self, tmp: Path, name: str = "ext"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COORDINATOR_", "CODER_"))}
        env["COORDINATOR_DATA_DIR"] = str(tmp / f"{name}-data")
        self.proc = Proc([python(), "-m", "uvicorn", "coordinator.app:app", "--http", "coordinator.edge:DerpHttpProtocol",
                          "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
                         env=env, log=tmp / f"{name}.log")
        self.proc.wait_http(self.url + "/derp/probe")

    def region(self, region_id: int, code: str) -> dict:
        return {"RegionID": region_id, "RegionCode": code, "RegionName": f"External {code}", "Nodes": [
            {"Name": f"{region_id}a", "RegionID": region_id, "HostName": "127.0.0.1", "DERPPort": self.port,
             "STUNPort": -1, "ForceHTTP": True}]}

    def stop(self) -> None:
        self.proc.stop()


class MapServer:
    """A real HTTP server answering ``GET /map.json`` with :attr:`document`; stopped and started on one port."""

    def __init__(self, document: dict):
        self.document = document
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/map.json"
        self.requests = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.requests += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200 if self.path == "/map.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="map server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(5)
            self._server = None


class Replicas:
    """``coordinator server`` processes on one Postgres, each with its own data directory and log."""

    def __init__(self, tmp: Path, pg_url: str):
        self.tmp, self.pg_url = tmp, pg_url
        self.procs: list[tuple[Proc, str]] = []

    def start(self, *flags: str) -> tuple[Proc, str]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        n = len(self.procs)
        proc = Proc([python(), "-m", "coordinator", "server", "--address", f"127.0.0.1:{port}", "--data-dir",
                     str(self.tmp / f"r{n}"), "--pg-url", self.pg_url, "--access-url", "http://lb.invalid",
                     "--heartbeat", "500ms", *flags],
                    env={"COORDINATOR_API_TOKEN": TOKEN}, log=self.tmp / f"r{n}.log")
        self.procs.append((proc, url))
        proc.wait_http(url + "/readyz", 60)
        return proc, url

    def logs(self) -> str:
        return "\n".join(f"--- {url}\n{proc.output[-3000:]}" for proc, url in self.procs)

    def stop(self) -> None:
        for proc, _ in self.procs:
            proc.stop()


@pytest.fixture
def parts(tmp_path, request):
    made: list = []
    yield made
    failed = getattr(request.node, "report_call", None)
    for part in reversed(made):
        if isinstance(part, Replicas) and (failed is None or failed.failed):
            print(part.logs())
        part.stop()


def api(url: str, path: str) -> dict:
    status, body = http_get(url + path, TOKEN)
    assert status == 200, (path, status, body)
    return json.loads(body)


def wait_for(what: str, check, timeout: float = 20.0, ignore: tuple[type[BaseException], ...] = ()):
    return wait_blocking(check, timeout, what, ignore=ignore)


def probe(*args: str) -> tuple[dict, int]:
    """``coordinator probe --json`` (a generous threshold: only the relays are under test here)."""
    done = subprocess.run([python(), "-m", "coordinator", "probe", "--json", "--threshold", "1s", "--timeout", "2s",
                           *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout), done.returncode


def node_url(node: dict) -> str:
    """What a region client dials for ``node`` (https unless Coder's ForceHTTP; the scheme's port by default)."""
    scheme = "http" if node.get("ForceHTTP") else "https"
    return f"{scheme}://{node['HostName']}" + (f":{node['DERPPort']}" if node.get("DERPPort") else "") + "/derp"


# -- the embedded relay off: Postgres is the only rendezvous --------------------------------------------


async def test_relay_off_replicas_serve_the_custom_map_and_clients_meet_on_its_relay(pg_url, tmp_path, parts):
    external = ExternalRelay(tmp_path)
    parts.append(external)
    map_file = tmp_path / "derpmap.json"
    map_file.write_text(json.dumps({"Regions": {"900": external.region(900, "ext")}}))
    replicas = Replicas(tmp_path, pg_url)
    parts.append(replicas)
    off = ["--derp-server-enable", "false", "--derp-config-path", str(map_file)]
    a, a_url = replicas.start(*off, "--relay-url", "http://127.0.0.1:1")  # ignored: with a notice
    b, b_url = replicas.start(*off)

    notices = [line for line in a.output.splitlines() if "--relay-url is ignored" in line]
    assert len(notices) == 1 and "--derp-server-enable=false" in notices[0], a.output[-2000:]

    # Both registered and heartbeat (alive in the table), with no relay address; nothing meshed.
    rows = wait_for("both replicas alive", lambda: (r := api(a_url, "/api/v2/replicas")) and
                    sum(1 for x in r if x["alive"]) == 2 and r)
    assert all(row["relay_address"] == "" for row in rows), rows
    for url in (a_url, b_url):
        status = api(url, "/api/v2/debug/status")
        assert status["mesh"] == {} and status["database"] and status["pubsub"], status

    # /derp and its probes answer 404 with the reason; a DERP client is turned away the same way.
    for path in ("/derp", "/derp/probe", "/derp/latency-check"):
        code, body = http_get(a_url + path)
        assert code == 404 and "embedded DERP relay is off" in body and body.count("\n") == 1, (path, code, body)
    with pytest.raises((DerpError, OSError)) as refused:
        await DerpClient.connect(a_url + "/derp", timeout=5)
    assert "404" in str(refused.value), refused.value
    with pytest.raises((DerpError, OSError)) as refused:
        await DerpClient.connect(a_url + "/derp", websocket=True, timeout=5)
    assert "404" in str(refused.value), refused.value

    # The map holds the external relay alone, the same on both replicas; clients dial it and meet there.
    code, body = http_get(a_url + "/derpmap/default")
    assert code == 200 and http_get(b_url + "/derpmap/default")[1] == body
    dmap = json.loads(body)
    assert list(dmap["Regions"]) == ["900"] and "EmbeddedRelay" not in dmap["Regions"]["900"], dmap
    url = node_url(dmap["Regions"]["900"]["Nodes"][0])
    async with await DerpClient.connect(url) as one, await DerpClient.connect(url) as two:
        await one.send(two.public_key, b"met on the custom relay")
        assert (await two.recv_packet(5)).data == b"met on the custom relay"

    # Each replica checks the custom relay: the API, the status page's data and the metrics show it.
    derp = wait_for("the custom relay checked", lambda: (d := api(a_url, "/api/v2/debug/derp"))["relays"] and
                    d["relays"][0]["up"] is not None and d)
    (relay,) = derp["relays"]
    assert derp["embedded_relay"] is False and relay["up"] is True and relay["latency_ms"] > 0, derp
    assert relay["url"] == external.url and relay["name"] == "900a"
    print(f"\ncustom relay {relay['url']}: /derp/probe {relay['latency_ms']} ms from the replica")
    assert api(a_url, "/status/data")["derp"]["relays"][0]["name"] == "900a"
    metrics = http_get(a_url + "/metrics", TOKEN)[1]
    assert f'coordinator_custom_relay_up{{node="900a",region_code="ext",region_id="900",url="{external.url}"}} 1.0' \
        in metrics, metrics
    assert "coordinator_derp_map_embedded_relay 0.0" in metrics

    # `coordinator probe` measures the custom relay as derpprobe would, from the replica's API or the database.
    report, status = probe("--url", a_url, "--token", TOKEN)
    assert status == 0 and report["ok"], report["problems"]
    (measured,) = report["relays"]
    assert measured["reachable"] and measured["url"] == external.url and measured["http"]["median_ms"] > 0, measured
    assert report["derp_map"]["embedded_relay"] is False and any("embedded relay is off" in n for n in report["notes"])
    print(f"probe: /derp/probe {measured['http']['median_ms']} ms, DERP ping {measured['derp']['median_ms']} ms")
    report, status = probe("--pg-url", pg_url, "--derp-map", b_url + "/derpmap/default")
    assert status == 0 and report["relays"][0]["reachable"], report["problems"]

    # The relay goes away: its check says so, as a finding and a metric; the replicas stay ready.
    external.stop()
    report, status = probe("--url", a_url, "--token", TOKEN)
    assert status == 1 and [p["subject"] for p in report["problems"]] == ["relay", "relay"], report["problems"]
    health = wait_for("EDERPMAP02", lambda: (h := api(a_url, "/api/v2/debug/health")) and
                      any(f["code"] == "EDERPMAP02" for f in h["findings"]) and h)
    print("finding:", [f["message"] for f in health["findings"] if f["code"] == "EDERPMAP02"][0])
    assert http_get(a_url + "/readyz")[0] == 200
    metrics = http_get(a_url + "/metrics", TOKEN)[1]
    assert f'coordinator_custom_relay_up{{node="900a",region_code="ext",region_id="900",url="{external.url}"}} 0.0' \
        in metrics, metrics


# -- a config URL: merged with the embedded region, fetched again, the last good map kept ----------------


async def test_config_url_is_merged_refetched_and_the_last_good_map_kept(pg_url, tmp_path, parts):
    external = ExternalRelay(tmp_path)
    parts.append(external)
    server = MapServer({"Regions": {"900": external.region(900, "ext")}})
    parts.append(server)
    server.start()
    replicas = Replicas(tmp_path, pg_url)
    parts.append(replicas)
    _, url = replicas.start("--derp-config-url", server.url, "--derp-config-refresh", "200ms",
                            "--relay-url", "http://127.0.0.1:1")  # a lone replica: its relay URL is not dialled

    dmap = json.loads(http_get(url + "/derpmap/default")[1])
    assert list(dmap["Regions"]) == ["900", "999"] and dmap["Regions"]["999"]["EmbeddedRelay"] is True, dmap
    assert http_get(url + "/derp/probe")[0] == 200  # the embedded relay runs

    # A new map at the URL is served after the next fetch.
    server.document = {"Regions": {"900": external.region(900, "ext"), "901": external.region(901, "two")}}
    wait_for("the new map", lambda: "901" in json.loads(http_get(url + "/derpmap/default")[1])["Regions"])
    last_good = http_get(url + "/derpmap/default")[1]

    # The config server stops: the last good map stays, and a coded finding says why.
    server.stop()
    health = wait_for("EDERPMAP01", timeout=60, check=lambda: (h := api(url, "/api/v2/debug/health")) and
                      any(f["code"] == "EDERPMAP01" for f in h["findings"]) and h)
    finding = next(f for f in health["findings"] if f["code"] == "EDERPMAP01")
    print("\nfinding:", finding["message"])
    assert finding["severity"] == "warning" and "--derp-config-url" in finding["message"]
    assert "last good map" in finding["message"]
    assert http_get(url + "/derpmap/default")[1] == last_good
    derp = api(url, "/api/v2/debug/derp")
    assert derp["fetch_error"] and derp["fetch_failures"] >= 1
    assert "coordinator_derp_map_stale 1.0" in http_get(url + "/metrics", TOKEN)[1]

    # A map that would be refused at start (a region on the embedded relay's ID) is a failed fetch too.
    server.document = {"Regions": {"999": external.region(999, "clash")}}
    server.start()
    wait_for("the clash reported", lambda: "embedded relay's region" in (api(url, "/api/v2/debug/derp")["fetch_error"]
                                                                           or ""))
    assert http_get(url + "/derpmap/default")[1] == last_good

    # A good map again: served, and the finding is gone.
    server.document = {"Regions": {"902": external.region(902, "three")}}
    wait_for("the finding cleared", lambda: not any(f["code"] == "EDERPMAP01"
                                                    for f in api(url, "/api/v2/debug/health")["findings"]))
    assert list(json.loads(http_get(url + "/derpmap/default")[1])["Regions"]) == ["902", "999"]
    assert "coordinator_derp_map_stale 0.0" in http_get(url + "/metrics", TOKEN)[1]


# -- bad input: one line naming the flag or variable, exit status 2 ------------------------------------


def refused(args: list[str], env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("COORDINATOR_", "CODER_"))}
    proc = subprocess.run([python(), "-m", "coordinator", *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**clean, **(env or {})})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and not proc.stdout, (proc.returncode, proc.stderr)
    return lines[0]


GOOD_NODE = {"Name": "900a", "RegionID": 900, "HostName": "derp.example.com"}
BAD_MAPS = {
    "not JSON": ("{Regions: 900}", "not JSON"),
    "no regions": ('{"Regions": {}}', "has no regions"),
    "no Regions at all": ('{"regions": []}', "has no regions"),
    "duplicate region IDs": ('{"Regions": {"900": {"RegionID": 900, "Nodes": [{"Name": "a", "HostName": "a"}]}, '
                             '"900": {"RegionID": 900, "Nodes": [{"Name": "b", "HostName": "b"}]}}}', "duplicate region ID"),
    "a node without a host name": (json.dumps({"Regions": {"900": {"RegionID": 900, "Nodes": [{"Name": "900a"}]}}}),
                                   "has no HostName"),
    "a region on the embedded relay's ID": (json.dumps({"Regions": {"999": {"RegionID": 999, "Nodes": [
        {**GOOD_NODE, "RegionID": 999}]}}}), "embedded relay's region"),
    "a node in the wrong region": (json.dumps({"Regions": {"901": {"RegionID": 901, "Nodes": [GOOD_NODE]}}}),
                                   "says RegionID 900"),
}


@pytest.mark.parametrize("case", list(BAD_MAPS))
def test_bad_map_file_is_refused_at_start_naming_the_setting(case, tmp_path):
    text, why = BAD_MAPS[case]
    path = tmp_path / "map.json"
    path.write_text(text)
    line = refused(["server", "--pg-url", "postgresql://nobody@127.0.0.1:1/none", "--derp-config-path", str(path)])
    assert f"--derp-config-path ({path})" in line and why in line, line
    by_env = refused(["derpmap", "--access-url", "https://lb.corp"], {"CODER_DERP_CONFIG_PATH": str(path)})
    assert f"CODER_DERP_CONFIG_PATH ({path})" in by_env and why in by_env, by_env


def test_bad_config_url_and_other_settings_are_refused_at_start(tmp_path):
    server = MapServer({"Regions": {}})
    server.start()
    try:
        line = refused(["server", "--derp-config-url", server.url])
        assert "--derp-config-url" in line and "has no regions" in line, line
        line = refused(["server", "--derp-config-url", server.url.replace("map.json", "missing.json")],
                       {"CODER_DERP_CONFIG_URL": server.url})
        assert "--derp-config-url" in line and "HTTP 404" in line, line
        server.document = {"Regions": {}, "padding": "x" * (5 << 20)}  # a config URL may not flood us
        line = refused(["server", "--derp-config-url", server.url])
        assert "--derp-config-url" in line and "larger than 4 MiB" in line, line
    finally:
        server.stop()
    line = refused(["server"], {"COORDINATOR_DERP_CONFIG_URL": server.url})  # nothing answers now
    assert "COORDINATOR_DERP_CONFIG_URL" in line and "cannot fetch" in line, line
    line = refused(["server", "--derp-config-path", str(tmp_path / "absent.json")])
    assert "--derp-config-path" in line and "cannot read" in line, line
    line = refused(["server", "--derp-config-path", str(tmp_path)])
    assert "--derp-config-path" in line and "cannot read" in line, line
    line = refused(["server"], {"CODER_DERP_SERVER_ENABLE": "false"})
    assert "CODER_DERP_SERVER_ENABLE=false needs --derp-config-url or --derp-config-path" in line, line
    line = refused(["server", "--derp-config-url", "ftp://x"])
    assert "--derp-config-url" in line, line
    line = refused(["server", "--derp-config-url", "http://x", "--derp-config-path", "/x"])
    assert "--derp-config-url or --derp-config-path, not both" in line, line
    line = refused(["server", "--derp-server-enable", "maybe"])
    assert "--derp-server-enable" in line, line


# -- the status page shows the custom relays, live ------------------------------------------------------


def test_status_page_shows_the_custom_relays_up_then_down(pg_url, tmp_path, parts):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    chromium, driver_bin = "/usr/bin/chromium", "/usr/bin/chromedriver"
    if not (os.access(chromium, os.X_OK) and os.access(driver_bin, os.X_OK)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/bootstrap.sh installs them)")
    from selenium.webdriver.common.by import By

    external = ExternalRelay(tmp_path)
    parts.append(external)
    map_file = tmp_path / "derpmap.json"
    map_file.write_text(json.dumps({"Regions": {"900": external.region(900, "ext")}}))
    replicas = Replicas(tmp_path, pg_url)
    parts.append(replicas)
    _, url = replicas.start("--derp-server-enable", "false", "--derp-config-path", str(map_file))

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_bin))
    try:
        driver.get(url + "/status")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "login-button").click()

        def state() -> str | None:
            cells = driver.find_elements(By.CSS_SELECTOR, '#derp-relays tr[data-relay="900a"] td:nth-child(4)')
            return cells[0].text if cells else None

        # The page redraws every second: a cell read during a redraw is stale, which is "not yet".
        from selenium.common.exceptions import StaleElementReferenceException

        stale = (StaleElementReferenceException,)
        wait_for("the custom relay shown up", lambda: state() == "up", 30, stale)
        summary = driver.find_element(By.ID, "derp-summary").text
        assert "embedded relay off" in summary and "--derp-config-path" in summary, summary
        external.stop()
        wait_for("the custom relay shown down", lambda: state() == "down", 30, stale)
        wait_for("EDERPMAP02 on the page",
                 lambda: any("EDERPMAP02" in li.text for li in driver.find_elements(By.CSS_SELECTOR, "#findings li")),
                 10, stale)
    finally:
        driver.quit()
