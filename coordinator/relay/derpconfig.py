"""External relays: a ``tailcfg.DERPMap`` from ``--derp-config-url`` or ``--derp-config-path``, checked and
merged with the embedded region (as Coder's ``tailnet.NewDERPMap`` does).

The map is read once at start, where anything wrong with it is a ConfigError naming the flag or
variable the operator used. A config URL is then fetched again every ``--derp-config-refresh``
(:class:`DerpMaps`, run by the replica); a fetch that fails, or brings a map that would be refused at
start, keeps the last good map and is reported as the health finding ``EDERPMAP01`` until a fetch
succeeds again. Documented in ``docs/custom-relays.md``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import httpx

from coordinator.core.errors import ConfigError
from coordinator.core.settings import Settings
from coordinator.relay.derpmap import PublishedMap, embedded_region
from coordinator.relay.httpclient import blocking_http_client, http_client, why

log = logging.getLogger("coordinator.derpmap")

MAX_MAP_BYTES = 4 << 20  # Tailscale's whole public map is ~20 KiB: a bigger answer is a mistake or hostile
FETCH_TIMEOUT = 10.0  # seconds for one fetch of the config URL, answer body included
MAX_REGION_ID = 2**53  # tailcfg: positive, and it must fit in a JavaScript number
FETCH_FAILED = "EDERPMAP01"  # the config URL's last fetch failed: the last good map is served


class DerpMapError(ConfigError):
    """A DERP map that cannot be used; the message names where it came from and what is wrong."""


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_node(node: object, region_id: int, index: int, names: set[str], where: str) -> dict:
    if not isinstance(node, dict):
        raise DerpMapError(f"{where}: node {index} of region {region_id} is not a JSON object")
    name = node.get("Name")
    label = f"node {name!r} of region {region_id}" if isinstance(name, str) and name else f"node {index} of region {region_id}"
    host = node.get("HostName")
    if not isinstance(host, str) or not host.strip():
        raise DerpMapError(f"{where}: {label} has no HostName (every DERP node needs one)")
    if not isinstance(name, str) or not name:
        raise DerpMapError(f"{where}: {label} has no Name")
    if name in names:
        raise DerpMapError(f"{where}: node name {name!r} appears twice (names are unique across the map)")
    names.add(name)
    if "RegionID" in node and _int(node["RegionID"]) not in (0, region_id):
        raise DerpMapError(f"{where}: {label} says RegionID {node['RegionID']!r}")
    for field, low in (("DERPPort", 0), ("STUNPort", -1)):
        port = node.get(field, 0)
        if _int(port) is None or not low <= port <= 65535:
            raise DerpMapError(f"{where}: {label} has {field} {port!r} (a port number is {low}-65535)")
    return node


def parse_derp_map(data: bytes, where: str, *, keep_embedded: bool = False) -> dict:
    """The checked ``tailcfg.DERPMap`` in ``data``; DerpMapError (one line, starting with ``where``) if unusable.

    Regions come back keyed by their ID and in Go's order (keys sorted as strings); a custom region
    never claims to be the embedded one (``EmbeddedRelay`` is dropped, unless ``keep_embedded``: for
    reading a deployment's own ``/derpmap/default``).
    """
    try:
        document = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise DerpMapError(f"{where}: not UTF-8 text, so not a JSON DERP map") from None
    except _DuplicateKey as dup:
        what = " (a duplicate region ID)" if dup.key.strip().isdigit() else ""
        raise DerpMapError(f"{where}: key {dup.key!r} appears twice in one JSON object{what}") from None
    except json.JSONDecodeError as exc:
        raise DerpMapError(f"{where}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(document, dict):
        raise DerpMapError(f'{where}: a DERP map is a JSON object with "Regions", not {type(document).__name__}')
    regions = document.get("Regions")
    if not isinstance(regions, dict) or not regions:
        raise DerpMapError(f'{where}: the DERP map has no regions ("Regions" is missing or empty)')
    checked: dict[str, dict] = {}
    names: set[str] = set()
    for key, region in regions.items():
        region_id = int(key) if key.strip().isdigit() else 0
        if not 0 < region_id <= MAX_REGION_ID:
            raise DerpMapError(f"{where}: region key {key!r} is not a region ID (a positive integer)")
        if str(region_id) in checked:
            raise DerpMapError(f"{where}: region ID {region_id} appears twice")
        if not isinstance(region, dict):
            raise DerpMapError(f"{where}: region {region_id} is not a JSON object")
        if _int(region.get("RegionID")) != region_id:
            raise DerpMapError(f"{where}: region {key!r} has RegionID {region.get('RegionID')!r}; it must equal its key")
        nodes = region.get("Nodes")
        if not isinstance(nodes, list) or not nodes:
            raise DerpMapError(f"{where}: region {region_id} has no nodes")
        for index, node in enumerate(nodes):
            _check_node(node, region_id, index, names, where)
        checked[str(region_id)] = {k: v for k, v in region.items() if keep_embedded or k != "EmbeddedRelay"}
    out: dict = {}
    if "HomeParams" in document:
        out["HomeParams"] = document["HomeParams"]
    out["Regions"] = dict(sorted(checked.items()))
    if document.get("omitDefaultRegions"):
        out["omitDefaultRegions"] = True
    return out


def merge(settings: Settings, custom: dict | None, where: str) -> dict:
    """The map clients get: ``custom``'s regions, plus the embedded region while the embedded relay is on.

    A custom region with the embedded region's ID is refused, as Coder refuses it. Without an access
    URL the embedded region cannot be described: it is left out when there are custom regions.
    """
    regions = dict((custom or {}).get("Regions", {}))
    if settings.derp_server_enable:
        own = str(settings.region_id)
        if own in regions:
            raise DerpMapError(f"{where}: region {own} is the embedded relay's region ({settings.source('region_id')} "
                               f"{own}): give one of them another ID")
        if settings.access_url or not regions:
            regions[own] = embedded_region(settings)  # raises ConfigError with neither
    custom = custom or {}
    out: dict = {"HomeParams": custom["HomeParams"]} if "HomeParams" in custom else {}
    out["Regions"] = dict(sorted(regions.items()))
    if custom.get("omitDefaultRegions"):
        out["omitDefaultRegions"] = True
    return out


@dataclass(frozen=True)
class RelayNode:
    """One DERP node of a custom region: where its ``/derp/probe`` and ``/derp`` are."""

    region_id: int
    region_code: str
    name: str
    host_name: str
    base_url: str  # scheme://host[:port], no path
    insecure: bool  # InsecureForTests: do not verify its certificate

    @property
    def label(self) -> str:
        return f"{self.region_code or self.region_id}/{self.name}"


def node_base_url(node: dict) -> str:
    """The URL a DERP client dials for ``node``, without ``/derp``: https unless Coder's ForceHTTP."""
    host = node["HostName"]
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    port = node.get("DERPPort") or 0
    scheme = "http" if node.get("ForceHTTP") else "https"
    return f"{scheme}://{host}:{port}" if port else f"{scheme}://{host}"


def relay_nodes(document: dict) -> list[RelayNode]:
    """The DERP nodes (not STUN-only) of the regions that are not the embedded relay's, in map order."""
    out = []
    for region in document.get("Regions", {}).values():
        if region.get("EmbeddedRelay"):
            continue
        for node in region.get("Nodes", []):
            if node.get("STUNOnly"):
                continue
            out.append(RelayNode(region_id=region["RegionID"], region_code=str(region.get("RegionCode") or ""),
                                 name=node["Name"], host_name=node["HostName"], base_url=node_base_url(node),
                                 insecure=bool(node.get("InsecureForTests"))))
    return out


# -- reading the map --------------------------------------------------------------------------------


def _status_problem(response: httpx.Response) -> str | None:
    if response.status_code != 200:
        return f"HTTP {response.status_code} {response.reason_phrase}".strip()
    return None


def _collect(body: bytearray, chunk: bytes, where: str) -> None:
    body += chunk
    if len(body) > MAX_MAP_BYTES:
        raise DerpMapError(f"{where}: the answer is larger than {MAX_MAP_BYTES >> 20} MiB")


def fetch_sync(url: str, where: str, timeout: float = FETCH_TIMEOUT) -> bytes:
    """GET ``url`` at start (blocking; no event loop runs yet); DerpMapError saying why it failed."""
    deadline = time.monotonic() + timeout
    body = bytearray()
    try:
        with blocking_http_client(timeout) as client, client.stream("GET", url) as response:
            if (problem := _status_problem(response)) is not None:
                raise DerpMapError(f"{where}: {problem}")
            for chunk in response.iter_bytes():
                _collect(body, chunk, where)
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("slow answer")
    except httpx.TimeoutException:
        raise DerpMapError(f"{where}: no whole answer within {timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise DerpMapError(f"{where}: cannot fetch: {why(exc)}") from None
    return bytes(body)


async def fetch(client: httpx.AsyncClient, url: str, where: str, timeout: float = FETCH_TIMEOUT) -> bytes:
    """GET ``url`` with ``client``, the whole answer within ``timeout``; DerpMapError saying why it failed."""
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async with client.stream("GET", url) as response:
                if (problem := _status_problem(response)) is not None:
                    raise DerpMapError(f"{where}: {problem}")
                async for chunk in response.aiter_bytes():
                    _collect(body, chunk, where)
    except (TimeoutError, httpx.TimeoutException):
        raise DerpMapError(f"{where}: no whole answer within {timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise DerpMapError(f"{where}: cannot fetch: {why(exc)}") from None
    return bytes(body)


def config_source(settings: Settings) -> str:
    """How the operator named the custom map (``--derp-config-url (http://...)``), or "" without one."""
    if settings.derp_config_url:
        return f"{settings.source('derp_config_url')} ({settings.derp_config_url})"
    if settings.derp_config_path:
        return f"{settings.source('derp_config_path')} ({settings.derp_config_path})"
    return ""


def load_custom(settings: Settings) -> dict | None:
    """The custom map at start (the file read, the URL fetched once), checked; None without one."""
    where = config_source(settings)
    if settings.derp_config_path:
        try:
            with open(settings.derp_config_path, "rb") as file:
                data = file.read(MAX_MAP_BYTES + 1)
        except OSError as exc:
            raise DerpMapError(f"{where}: cannot read: {exc.strerror or exc}") from None
        if len(data) > MAX_MAP_BYTES:
            raise DerpMapError(f"{where}: larger than {MAX_MAP_BYTES >> 20} MiB")
        return parse_derp_map(data, where)
    if settings.derp_config_url:
        return parse_derp_map(fetch_sync(settings.derp_config_url, where), where)
    return None


class DerpMaps:
    """The deployment's DERP map as it is now, and the custom map's source: what ``/derpmap/default`` serves.

    Build it with :meth:`load` (at start: refuses bad input). :meth:`run` fetches a config URL again
    every ``--derp-config-refresh`` until cancelled; :attr:`on_change` hears of every new map.
    """

    def __init__(self, settings: Settings, custom: dict | None):
        self.settings = settings
        self.source = config_source(settings)
        self.custom = custom
        self.document: dict | None = None
        self.published = PublishedMap()
        self.fetch_error: str | None = None  # why the last fetch of the config URL failed (None: it worked)
        self.failures = 0  # fetches of the config URL that failed, ever
        self.fetched_at: float | None = time.time() if settings.derp_config_url else None  # last good fetch
        self.on_change: Callable[[dict], None] | None = None
        self._publish(custom)

    @classmethod
    def load(cls, settings: Settings) -> DerpMaps:
        """Read (or fetch) the custom map and merge it; DerpMapError naming the setting if it is unusable."""
        return cls(settings, load_custom(settings))

    def _publish(self, custom: dict | None) -> None:
        try:
            document = merge(self.settings, custom, self.source)
        except DerpMapError:
            raise
        except ConfigError as exc:  # only the embedded region alone, without an access URL: 404 says why
            self.document, self.published = None, PublishedMap(missing=str(exc))
            return
        self.custom, self.document = custom, document
        self.published = PublishedMap.from_document(document)

    @property
    def embedded(self) -> bool:
        return self.settings.derp_server_enable

    def relays(self) -> list[RelayNode]:
        """The custom relays' DERP nodes in the map served now."""
        return relay_nodes(self.document) if self.document else []

    async def refresh(self) -> bool:
        """Fetch the config URL once; on success serve the new map, else keep the last good one. True if it worked.

        A new connection each time: minutes apart, a kept-alive one would mostly be stale.
        """
        try:
            async with http_client(follow_redirects=True) as client:
                data = await fetch(client, self.settings.derp_config_url, self.source)
            custom = parse_derp_map(data, self.source)
            before = self.published.etag
            self._publish(custom)
        except DerpMapError as exc:
            self.failures += 1
            if self.fetch_error is None:
                log.warning("%s; serving the last good DERP map", exc)
            self.fetch_error = str(exc)
            return False
        if self.fetch_error is not None:
            log.info("DERP map fetched again from %s", self.source)
        self.fetch_error, self.fetched_at = None, time.time()
        if self.published.etag != before:
            log.info("DERP map from %s changed: %d regions", self.source, len((self.document or {}).get("Regions", {})))
            if self.on_change is not None and self.document is not None:
                self.on_change(self.document)
        return True

    async def run(self) -> None:
        """Fetch the config URL again every ``--derp-config-refresh`` until cancelled (nothing to do without one)."""
        if not self.settings.derp_config_url:
            return
        while True:
            await anyio.sleep(self.settings.derp_config_refresh)
            await self.refresh()

    def problems(self) -> list[tuple[str, str, str]]:
        """(code, severity, message) for the health report."""
        if self.fetch_error is None:
            return []
        age = f"{time.time() - self.fetched_at:.0f} s ago" if self.fetched_at else "at start"
        return [(FETCH_FAILED, "warning", f"custom DERP map not refreshed: {self.fetch_error} ({self.failures} failed "
                                          f"fetches so far); serving the last good map, fetched {age}")]
