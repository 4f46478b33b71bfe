"""Prometheus metrics of the relay.

The hot path only bumps plain ints in dicts (about 0.1 µs); a collector turns them into Prometheus
families when ``/metrics`` is scraped. A labelled prometheus-client counter costs about ten times more per
increment, which at 100,000 records/s would be a tenth of a core for bookkeeping alone. Histograms are
observed once per HTTP request or batch, never per record.

=====================================  =======================================================================
metric                                 meaning
=====================================  =======================================================================
rr_build_info{version}                 always 1; the relay's version
rr_records_consumed_total{topic}       records read from Kafka
rr_records_settled_total{topic,        records settled: ``delivered``, ``dead_lettered`` or ``skipped``
outcome}                               (an unknown event type under ``unknown_event = "skip"``)
rr_calls_total{shop,method,outcome}    tracking calls by final outcome: ``delivered`` or ``permanent``
rr_requests_total{shop,method,status}  HTTP requests by answer (status code, or ``error`` for a timeout or a
                                       connection failure)
rr_retries_total{shop}                 requests repeated after a transient failure
rr_dead_lettered_total{topic,stage,    records written to the dead-letter topic
reason}
rr_in_flight_records                   records consumed and not yet settled
rr_partitions_assigned                 partitions this process owns
rr_breaker_open{shop}                  1 while the shop's circuit breaker is open
rr_consumer_lag{topic,partition}       records behind the partition's end (librdkafka statistics)
rr_committed_offset_age_seconds        seconds since the partition's offset was last committed
{topic,partition}
rr_batch_events                        events per visitorEvents request (histogram)
rr_request_duration_seconds{method}    tracking API request latency (histogram)
=====================================  =======================================================================
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from consumer import __version__

if TYPE_CHECKING:
    from consumer.breaker import CircuitBreaker
    from consumer.handoff import Handoff

log = structlog.get_logger(__name__)

TopicPartition = tuple[str, int]

# The *_created series double the histogram output and carry nothing a dashboard or alert uses.
disable_created_metrics()  # type: ignore[no-untyped-call]


@dataclass
class Gauges:
    """Readers of live state, called at scrape time (set by the service once its parts exist)."""

    in_flight: Callable[[], int] = lambda: 0
    partitions: Callable[[], int] = lambda: 0
    breakers: Callable[[], Mapping[str, bool]] = dict
    lag: Callable[[], Mapping[TopicPartition, int]] = dict
    commit_times: Callable[[], Mapping[TopicPartition, float]] = dict

    def watch(self, handoff: Handoff, breakers: Mapping[str, CircuitBreaker]) -> None:
        """Read the live state where the loop reads it: the hand-off's fields and the shops' breakers."""
        self.in_flight = lambda: sum(handoff.unsettled.values())
        self.partitions = lambda: len(handoff.assigned)
        self.breakers = lambda: {shop: breaker.state == "open" for shop, breaker in breakers.items()}
        self.lag = lambda: handoff.lag
        self.commit_times = lambda: handoff.commit_times


@dataclass
class RelayMetrics:
    """The relay's counters and histograms, in a registry of their own."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    consumed: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    settled: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    calls: defaultdict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    requests: defaultdict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    retries: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    dead_lettered: defaultdict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    gauges: Gauges = field(default_factory=Gauges)

    def __post_init__(self) -> None:
        self.batch_events = Histogram(
            "rr_batch_events",
            "Events per visitorEvents request",
            registry=self.registry,
            buckets=(1, 5, 10, 25, 50, 100, 200, 300, 400, 500, 1000),
        )
        self.request_duration = Histogram(
            "rr_request_duration_seconds",
            "Tracking API request latency",
            ["method"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        # One child histogram per method, looked up once: labels() takes a lock and builds a key each call,
        # and in single mode this runs for every event.
        self._durations: dict[str, Histogram] = {}
        self.registry.register(_Collector(self))

    def observe_request(
        self, shop: str, method: str, status: int | None, seconds: float, events: int
    ) -> None:
        """One HTTP request to the tracking API (called once per request, not per event)."""
        self.requests[(shop, method, "error" if status is None else str(status))] += 1
        duration = self._durations.get(method)
        if duration is None:
            duration = self._durations[method] = self.request_duration.labels(method)
        duration.observe(seconds)
        if method == "visitorEvents":
            self.batch_events.observe(events)


class _Collector(Collector):
    def __init__(self, metrics: RelayMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m, g = self._m, self._m.gauges
        info = GaugeMetricFamily("rr_build_info", "The relay's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield _counter("rr_records_consumed", "Records read from Kafka", ["topic"], m.consumed)
        yield _counter("rr_records_settled", "Records settled", ["topic", "outcome"], m.settled)
        yield _counter("rr_calls", "Tracking calls by final outcome", ["shop", "method", "outcome"], m.calls)
        yield _counter(
            "rr_requests", "Tracking API requests by answer", ["shop", "method", "status"], m.requests
        )
        yield _counter("rr_retries", "Requests repeated after a transient failure", ["shop"], m.retries)
        yield _counter(
            "rr_dead_lettered",
            "Records written to the dead-letter topic",
            ["topic", "stage", "reason"],
            m.dead_lettered,
        )
        yield GaugeMetricFamily(
            "rr_in_flight_records", "Records consumed, not yet settled", value=g.in_flight()
        )
        yield GaugeMetricFamily(
            "rr_partitions_assigned", "Partitions this process owns", value=g.partitions()
        )
        breakers = GaugeMetricFamily(
            "rr_breaker_open", "1 while the shop's circuit breaker is open", labels=["shop"]
        )
        for shop, is_open in sorted(g.breakers().items()):
            breakers.add_metric([shop], 1.0 if is_open else 0.0)
        yield breakers
        lag = GaugeMetricFamily(
            "rr_consumer_lag", "Records behind the partition's end", labels=["topic", "partition"]
        )
        for (topic, partition), value in sorted(g.lag().items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        age = GaugeMetricFamily(
            "rr_committed_offset_age_seconds", "Seconds since the last commit", labels=["topic", "partition"]
        )
        now = time.time()
        for (topic, partition), committed_at in sorted(g.commit_times().items()):
            age.add_metric([topic, str(partition)], max(0.0, now - committed_at))
        yield age


def _counter(
    name: str, documentation: str, labels: list[str], values: Mapping[Any, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(dict(values).items(), key=str):  # dict(): a consistent copy, whatever thread
        family.add_metric(list(key) if isinstance(key, tuple) else [str(key)], value)
    return family


async def report_progress(read: Callable[[], Mapping[str, int]], every_s: float) -> None:
    """Log ``relay.progress`` every ``every_s``: the counts ``read`` gives, and the delivery rate since the
    last line."""
    last_delivered, last_time = 0, time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        counts = read()
        now, delivered = time.monotonic(), counts["delivered"]
        rate = (delivered - last_delivered) / (now - last_time)
        last_delivered, last_time = delivered, now
        log.info("relay.progress", **counts, records_per_s=round(rate, 1))
