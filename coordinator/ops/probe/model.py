"""What the probe measures and reports: figures, replicas, mesh pairs, and how milliseconds are shown."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

SCHEMA = "coordinator.ops.probe/v1"
DEFAULT_SAMPLES = 5
DEFAULT_TIMEOUT = 3.0  # seconds, per connection attempt and per sample

THRESHOLD_ENV = "COORDINATOR_LATENCY_THRESHOLD"
PG_URL_ENV = ("COORDINATOR_PG_CONNECTION_URL", "CODER_PG_CONNECTION_URL")
TOKEN_ENV = ("COORDINATOR_API_TOKEN",)  # the replicas' own setting: set in their pods already

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class ProbeUsageError(Exception):
    """Exit status 2: bad arguments, a URL that leads nowhere, a refused token, a garbage answer."""


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def fmt_ms(value: float | None, threshold_ms: float | None = None) -> str:
    """``1.23 ms`` (``" !"`` appended when over ``threshold_ms``), ``-`` for no figure."""
    if value is None:
        return "-"
    text = f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"
    return text + (" !" if threshold_ms is not None and value > threshold_ms else "")


def fmt_threshold(value_ms: float) -> str:
    return f"{value_ms:g} ms"


@dataclass
class Figure:
    """Samples of one latency, in seconds, or why there are none."""

    samples: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def to_json(self, threshold: float) -> dict:
        med = self.median
        return {
            "median_ms": None if med is None else ms(med),
            "samples_ms": [ms(s) for s in self.samples],
            "error": self.error,
            "over_threshold": med is not None and med > threshold,
        }


@dataclass
class ReplicaInfo:
    """One replica as discovered (database row or API object)."""

    id: str
    hostname: str = ""
    region_id: int | None = None
    relay_url: str = ""
    error: str = ""
    database_latency_us: int | None = None
    pubsub_latency_us: int | None = None
    peer_latencies: dict = field(default_factory=dict)
    alive: bool = True
    short: str = ""
    # measured by the probe
    http: Figure = field(default_factory=Figure)
    derp: Figure = field(default_factory=Figure)
    server_key: bytes | None = None

    @property
    def label(self) -> str:
        where = ", ".join(x for x in (self.hostname, self.relay_url) if x)
        return f"replica {self.short} ({where})" if where else f"replica {self.short}"


@dataclass
class MeshPair:
    a: ReplicaInfo
    b: ReplicaInfo
    rtt: Figure = field(default_factory=Figure)

    def relays(self) -> float | None:
        """The relays' share of the round trip: minus the probe's own legs to A and to B."""
        rtt = self.rtt.median
        if rtt is None:
            return None
        leg_a, leg_b = self.a.derp.median, self.b.derp.median
        if leg_a is None or leg_b is None:
            return rtt
        return max(0.0, rtt - leg_a - leg_b)


def assign_short_ids(replicas: list[ReplicaInfo]) -> None:
    """Give each replica the shortest id prefix (8, 12, ... characters) that tells them apart."""
    ids = [r.id.replace("-", "") for r in replicas]
    n = 8
    while n < 32 and len({i[:n] for i in ids}) < len(ids):
        n += 4
    for r, i in zip(replicas, ids, strict=True):
        r.short = i[:n]
