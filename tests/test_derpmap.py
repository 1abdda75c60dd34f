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
from coordinator.relay.derpconfig import DerpMapError, DerpMaps, merge, parse_derp_map, relay_nodes
from coordinator.relay.derpmap import PublishedMap, derp_map, render
from testkit.procs import Proc, free_port, python, refused_at_start
from testkit.relayfix import serve_app

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


# -- custom relays: the map merged with an external one (docs/custom-relays.md) -----------------------


def ext_region(region_id: int, **node) -> dict:
    return {"RegionID": region_id, "RegionCode": f"r{region_id}", "RegionName": "External",
            "Nodes": [{"Name": f"{region_id}a", "RegionID": region_id, "HostName": "derp.example.com", **node}]}


def test_custom_map_merged_in_gos_order_with_its_extras_and_no_borrowed_embedded_flag():
    custom = parse_derp_map(json.dumps({
        "HomeParams": {"RegionScore": {"1000": 0.5}}, "omitDefaultRegions": True,
        "Regions": {"1000": {**ext_region(1000), "EmbeddedRelay": True}, "2": ext_region(2)},
    }).encode(), "test")
    merged = merge(settings(access_url="https://lb.corp"), custom, "test")
    assert list(merged) == ["HomeParams", "Regions", "omitDefaultRegions"]
    assert list(merged["Regions"]) == ["1000", "2", "999"]  # Go sorts map keys as strings
    assert "EmbeddedRelay" not in merged["Regions"]["1000"] and merged["Regions"]["999"]["EmbeddedRelay"] is True
    assert [n.name for n in relay_nodes(merged)] == ["1000a", "2a"]
    # The embedded relay off: the custom regions alone, as given.
    off = merge(settings(access_url="https://lb.corp", derp_server_enable="false", derp_config_path="/x"), custom, "t")
    assert list(off["Regions"]) == ["1000", "2"]


def test_relay_nodes_skip_stun_only_nodes_and_dial_what_the_node_says():
    custom = parse_derp_map(json.dumps({"Regions": {
        "900": ext_region(900, ForceHTTP=True, DERPPort=8080),
        "901": ext_region(901, STUNOnly=True),
        "902": {**ext_region(902), "Nodes": [{"Name": "902a", "HostName": "2001:db8::1", "InsecureForTests": True}]},
    }}).encode(), "t")
    nodes = relay_nodes(custom)
    assert [(n.name, n.base_url, n.insecure) for n in nodes] == [
        ("900a", "http://derp.example.com:8080", False), ("902a", "https://[2001:db8::1]", True)]


@pytest.mark.parametrize(("document", "why"), [
    ('{"Regions": {"900": {"RegionID": 900, "Nodes": [{"Name": "a", "HostName": "h"}]}, '
     '"0900": {"RegionID": 900, "Nodes": [{"Name": "b", "HostName": "h"}]}}}', "region ID 900 appears twice"),
    ('{"Regions": {"eu": {"RegionID": 1}}}', "is not a region ID"),
    ('{"Regions": {"900": {"RegionID": 901, "Nodes": []}}}', "it must equal its key"),
    ('{"Regions": {"900": {"RegionID": 900, "Nodes": []}}}', "has no nodes"),
    ('{"Regions": {"900": {"RegionID": 900, "Nodes": [{"Name": "a", "HostName": " "}]}}}', "has no HostName"),
    ('{"Regions": {"900": {"RegionID": 900, "Nodes": [{"HostName": "h"}]}}}', "has no Name"),
    ('{"Regions": {"900": {"RegionID": 900, "Nodes": [{"Name": "a", "HostName": "h", "DERPPort": 70000}]}}}',
     "DERPPort 70000"),
    ('{"Regions": {"900": {"RegionID": 900, "Nodes": [{"Name": "a", "HostName": "h"}]}, '
     '"901": {"RegionID": 901, "Nodes": [{"Name": "a", "HostName": "h"}]}}}', "node name 'a' appears twice"),
    ('[1, 2]', "not list"),
    (b'\xff\xfe', "not UTF-8"),
])
def test_unusable_maps_are_refused_in_one_line(document, why):
    data = document if isinstance(document, bytes) else document.encode()
    with pytest.raises(DerpMapError) as err:
        parse_derp_map(data, "--derp-config-path (m.json)")
    message = str(err.value)
    assert message.startswith("--derp-config-path (m.json): ") and why in message and "\n" not in message, message


def test_without_access_url_the_custom_regions_are_served_alone(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"Regions": {"900": ext_region(900)}}))
    maps = DerpMaps.load(settings(derp_config_path=str(path)))
    assert list(json.loads(maps.published.body)["Regions"]) == ["900"]
    assert "COORDINATOR_ACCESS_URL" in DerpMaps.load(settings()).published.missing
