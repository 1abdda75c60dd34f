"""The pub/sub's counters: plain fields, exported to Prometheus and to ``PubSub.metrics`` from the same place.

A prometheus_client ``Counter.inc`` costs a few microseconds, a sizeable share of delivering one
notification, and reading one back means parsing the registry's samples. So the counters are ints on
this object; ``collect`` exports them and ``snapshot`` reads them. Histograms stay prometheus_client's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from coordinator.cluster.pubsub.limits import COLOSSAL_BYTES

PREFIX = "coordinator_pubsub_"
_LATENCY_BUCKETS = tuple(0.0005 * 2**i for i in range(16))  # 0.5 ms .. ~16 s, as Coder
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class Metrics:
    """Counters, gauges and histograms of one PubSub; registered on ``registry`` (one PubSub per registry)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        subscribers: Callable[[], int],
        channels: Callable[[], int],
        batch_queue: Callable[[], int],
    ):
        self._subscribers, self._channels, self._batch_queue = subscribers, channels, batch_queue
        self.rx_normal = self.rx_colossal = self.rx_bytes = self.dropped = 0
        self.publish_ok = self.publish_fail = self.published_bytes = 0
        self.subscribe_ok = self.subscribe_fail = 0
        self.reconnects = self.disconnections = self.ping_failures = 0
        self.latency_measures = self.latency_errs = 0
        self.batch_ok = self.batch_fail = self.batch_messages = self.batch_lost = 0
        self.connected = False
        registry.register(self)

        def hist(name: str, doc: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=registry)

        self.send_latency = hist("send_latency_seconds", "Time for a latency probe's pg_notify to return.")
        self.recv_latency = hist("receive_latency_seconds", "Time from a latency probe's publish to its receipt.")
        self.batch_size = hist("batch_size", "Messages per batch.", _BATCH_BUCKETS)

    def received(self, size: int) -> None:
        if size < COLOSSAL_BYTES:
            self.rx_normal += 1
        else:
            self.rx_colossal += 1
        self.rx_bytes += size

    def collect(self) -> Iterator[Metric]:
        def counter(name: str, doc: str, value: int | None = None, **by: dict[str, int]) -> Metric:
            if value is not None:
                return CounterMetricFamily(PREFIX + name, doc, value=value)
            ((label, values),) = by.items()
            family = CounterMetricFamily(PREFIX + name, doc, labels=(label,))
            for key, v in values.items():
                family.add_metric((key,), v)
            return family

        def gauge(name: str, doc: str, value: float) -> Metric:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        def outcome(ok: int, failed: int) -> dict[str, int]:
            return {"true": ok, "false": failed}

        yield counter("publishes", "PubSub.publish calls by outcome.", success=outcome(self.publish_ok, self.publish_fail))
        yield counter("subscribes", "subscribe calls by outcome.", success=outcome(self.subscribe_ok, self.subscribe_fail))
        yield counter("published_bytes", "Payload bytes published successfully.", self.published_bytes)
        yield counter("messages", f"Notifications received, by size (colossal: >= {COLOSSAL_BYTES} bytes).",
                      size={"normal": self.rx_normal, "colossal": self.rx_colossal})
        yield counter("received_bytes", "Payload bytes received.", self.rx_bytes)
        yield counter("dropped_messages", "Messages dropped because a subscriber's queue was full.", self.dropped)
        yield counter("reconnects", "Listener connections re-established after a loss.", self.reconnects)
        yield counter("disconnections", "Listener connections lost.", self.disconnections)
        yield counter("ping_failures", "Active listener checks that failed (listener torn down).", self.ping_failures)
        yield counter("latency_measures", "Latency measurements attempted.", self.latency_measures)
        yield counter("latency_measure_errs", "Latency measurements that failed.", self.latency_errs)
        yield counter("batch_flushes", "Batches sent by BatchPublisher (one commit each), by outcome.",
                      success=outcome(self.batch_ok, self.batch_fail))
        yield counter("batch_messages", "Messages sent through BatchPublisher.", self.batch_messages)
        yield counter("batch_lost_messages", "Queued messages BatchPublisher gave up on (logged).", self.batch_lost)
        yield gauge("connected", "1 if the listener is connected.", int(self.connected))
        yield gauge("current_subscribers", "Subscriptions.", self._subscribers())
        yield gauge("current_events", "Channels LISTENed for subscribers.", self._channels())
        yield gauge("batch_queue_depth", "Messages waiting in batch queues.", self._batch_queue())

    def snapshot(self) -> dict[str, Any]:
        """The counters under the names ``PubSub.metrics`` has always used."""
        return {
            "publishes": self.publish_ok,
            "publish_errors": self.publish_fail,
            "subscribes": self.subscribe_ok,
            "subscribe_errors": self.subscribe_fail,
            "messages_received": self.rx_normal + self.rx_colossal,
            "colossal_messages_received": self.rx_colossal,
            "bytes_published": self.published_bytes,
            "bytes_received": self.rx_bytes,
            "reconnects": self.reconnects,
            "disconnections": self.disconnections,
            "dropped_messages": self.dropped,
            "ping_failures": self.ping_failures,
            "latency_measures": self.latency_measures,
            "latency_measure_errors": self.latency_errs,
            "batches": self.batch_ok,
            "batch_errors": self.batch_fail,
            "batched_messages": self.batch_messages,
            "batch_lost_messages": self.batch_lost,
        }
