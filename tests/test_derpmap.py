"""The DERP map: tailcfg.DERPMap JSON at /derpmap/default and from `coordinator derpmap`, one node that works."""

import asyncio
import json
import subprocess
import urllib.error
import urllib.request

import pytest

from coordinator.core.keys import NodeKey
from coordinator.core.settings import load_settings
from coordinator.edge.routes import create_app
from coordinator.relay.client import DerpClient
from coordinator.relay.dataplane import DerpRelay
from coordinator.relay.derpmap import PublishedMap, derp_map, render
from procs import Proc, free_port, python, refused_at_start
from relayfix import serve_app

pytestmark = pytest.mark.anyio


def settings(**overrides):
    return load_settings(overrides, environ={})


def test_shape_is_tailcfg_with_its_omitempty_rules():
    """Go's field order (Coder's fork: EmbeddedRelay first); zero-valued omitempty fields absent; Regions keyed
    by the ID as a string."""
    https = render(derp_map(settings(access_url="https://derp.big.corp", region_id="901", region_code="fra",
                                     region_name="Frankfurt")))
    assert https == (b'{"Regions":{"901":{"EmbeddedRelay":true,"RegionID":901,"RegionCode":"fra","RegionName":"Frankfurt","Nodes":['
                     b'{"Name":"901a","RegionID":901,"HostName":"derp.big.corp","STUNPort":-1,"DERPPort":443}]}}}')
    # Plain HTTP: Coder's ForceHTTP, an explicit port (0 would mean 443), CanPort80 only on port 80.
    plain = derp_map(settings(access_url="http://10.0.0.5:3000"))
    node = plain["Regions"]["999"]["Nodes"][0]
    assert list(node) == ["Name", "RegionID", "HostName", "STUNPort", "DERPPort", "ForceHTTP"]
    assert node["DERPPort"] == 3000 and node["ForceHTTP"] is True
    assert derp_map(settings(access_url="http://lb.corp"))["Regions"]["999"]["Nodes"][0]["CanPort80"] is True
    region = plain["Regions"]["999"]
    assert list(region) == ["EmbeddedRelay", "RegionID", "RegionCode", "RegionName", "Nodes"]
    assert (region["RegionCode"], region["RegionName"]) == ("coordinator", "Coordinator Embedded Relay")
    ipv6 = derp_map(settings(access_url="https://[2001:db8::1]:8443"))["Regions"]["999"]["Nodes"][0]
    assert (ipv6["HostName"], ipv6["DERPPort"]) == ("2001:db8::1", 8443)


async def test_no_access_url_is_a_404_with_the_reason():
    app = create_app(DerpRelay(NodeKey.generate()), derp_map=PublishedMap.from_settings(settings()))
    async with serve_app(app) as port:
        with pytest.raises(urllib.error.HTTPError) as err:  # in a thread: the app is served by this loop
            await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/derpmap/default", timeout=5)
        assert err.value.code == 404 and b"COORDINATOR_ACCESS_URL" in err.value.read()


def node_url(node: dict) -> str:
    """The URL a region client dials for ``node`` (https unless Coder's ForceHTTP)."""
    host = f"[{node['HostName']}]" if ":" in node["HostName"] else node["HostName"]
    return f"{'http' if node.get('ForceHTTP') else 'https'}://{host}:{node.get('DERPPort') or 443}/derp"


async def test_fetched_map_leads_a_client_to_a_working_relay(pg_url, tmp_path):
    port = free_port()
    access = f"http://127.0.0.1:{port}"
    region = ["--region-id", "950", "--region-code", "tst", "--region-name", "Test Region"]
    replica = Proc([python(), "-m", "coordinator", "server", "--address", f"127.0.0.1:{port}", "--data-dir",
                    str(tmp_path / "data"), "--access-url", access, "--pg-url", pg_url, *region],
                   log=tmp_path / "server.log")
    try:
        replica.wait_http(access + "/readyz")
        with urllib.request.urlopen(access + "/derpmap/default", timeout=5) as resp:
            body, headers = resp.read(), resp.headers
        assert headers["Content-Type"] == "application/json" and "public" in headers["Cache-Control"]
        request = urllib.request.Request(access + "/derpmap/default", headers={"If-None-Match": headers["ETag"]})
        with pytest.raises(urllib.error.HTTPError) as not_modified:
            urllib.request.urlopen(request, timeout=5)
        assert not_modified.value.code == 304
        # `coordinator derpmap` prints the same document from the same settings.
        printed = subprocess.run([python(), "-m", "coordinator", "derpmap", "--access-url", access, *region],
                                 capture_output=True, timeout=60, check=True).stdout
        assert printed.strip() == body
        dmap = json.loads(body)
        assert list(dmap["Regions"]) == ["950"] and dmap["Regions"]["950"]["RegionName"] == "Test Region"
        (node,) = dmap["Regions"]["950"]["Nodes"]
        url = node_url(node)
        print(f"\nDERP map {body.decode()}\n-> {url}")
        async with await DerpClient.connect(url) as a, await DerpClient.connect(url) as b:
            await a.send(b.public_key, b"found through the DERP map")
            assert (await b.recv_packet(5)).data == b"found through the DERP map"
    finally:
        replica.stop()


@pytest.mark.parametrize(("flags", "named"), [
    (["--region-id", "eu"], "--region-id"),
    (["--region-id", "0"], "--region-id"),
    (["--region-id", "-3"], "--region-id"),
    (["--region-code", " "], "--region-code"),
    ([], "COORDINATOR_ACCESS_URL"),
    (["--access-url", "https://lb.corp/coordinator"], "has a path"),
])
def test_bad_region_settings_are_refused_in_one_line(flags, named):
    access = [] if not flags or flags[0] == "--access-url" else ["--access-url", "https://lb.corp"]
    refused_at_start(["derpmap", *access, *flags], named)
