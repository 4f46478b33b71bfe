"""The backlog every figure reads: realistic shop traffic, produced once per run.

The events come from ``consumer_dev.sample.TrafficGenerator`` (the mix of Retail Rocket's public e-commerce
data set: mostly views, some basket adds, multi-item orders), with a fixed seed and a fixed start time, so
two runs produce the same records; ``produce_sample`` would stamp them with the wall clock instead. Values are
Avro in the Confluent wire format, their schemas registered with the registry double; keys are the visitor's
session id, as a shop platform publishes them.

While producing, each event is also translated, to count the tracking calls the backlog implies: the
emulator counts calls (a batch element or a single call is one event to it), and the figures turn calls back
into records with that ratio.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from confluent_kafka import KafkaError, Message, Producer
from pydantic import SecretStr

from consumer import events
from consumer.clients import close_producer
from consumer.config import ShopConfig
from consumer.decode import DomainEvent, registry_client
from consumer.translate import Translator
from consumer_dev.sample import TrafficGenerator, build_encoder
from tools.bench.stack import BenchError, Shop

PARTITIONS: Final = 6
VISITORS: Final = 100_000
SEED: Final = 20_151_201
#: Events start at this instant (epoch ms) and advance by the generator's random gaps.
START_MS: Final = 1_700_000_000_000
PRODUCE_DEADLINE_S: Final = 60.0


@dataclass(frozen=True)
class Workload:
    """A produced backlog and what it implies."""

    topic: str
    partitions: int
    records: int
    #: Tracking calls the records imply: an order makes one per distinct product.
    calls: int
    registry_url: str
    shops: tuple[Shop, ...]
    visitors: int
    mix: Counter[str]
    value_bytes: int
    produce_s: float

    @property
    def calls_per_record(self) -> float:
        return self.calls / self.records

    def describe(self) -> str:
        total = sum(self.mix.values())
        shares = ", ".join(f"{name} {count / total:.1%}" for name, count in self.mix.most_common())
        return (
            f"{self.records:,} records on a topic of {self.partitions} partitions, "
            f"{self.visitors:,} distinct visitors, {len(self.shops)} shops, Avro in the Confluent wire "
            f"format (mean value {self.value_bytes / self.records:.0f} bytes); {shares}; "
            f"{self.calls:,} tracking calls ({self.calls_per_record:.4f} per record)"
        )


def produce_backlog(
    bootstrap: str,
    topic: str,
    registry_url: str,
    count: int,
    shops: Sequence[Shop],
    *,
    visitors: int = VISITORS,
    seed: int = SEED,
    on_progress: Callable[[int], None] | None = None,
) -> Workload:
    """Produce ``count`` events to ``topic`` and wait until every one is acknowledged."""
    registry = registry_client(registry_url)
    encoder = build_encoder("confluent-avro", registry=registry)
    generator = TrafficGenerator(
        seed=seed, shops=[shop.key for shop in shops], visitors=visitors, now_ms=START_MS
    )
    translator = Translator(
        {s.key: ShopConfig(partner_id=s.partner_id, api_key=SecretStr("-")) for s in shops}
    )
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 20,
            "compression.type": "lz4",
        }
    )
    failures: list[str] = []

    def report(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error.str())

    started = time.monotonic()
    mix: Counter[str] = Counter()
    calls = value_bytes = produced = 0
    try:
        while produced < count:
            size = min(10_000, count - produced)
            for type_name, fields in generator.events(size):
                value = encoder.encode(type_name, fields)
                calls += len(translator.translate(DomainEvent(type_name, fields)))
                mix[type_name] += 1
                value_bytes += len(value)
                _produce(producer, topic, fields["sessionId"].encode(), value, report)
            produced += size
            producer.poll(0)
            if failures:
                raise BenchError(f"producing to {topic} failed: {failures[0]}")
            if on_progress is not None:
                on_progress(produced)
        remaining = producer.flush(PRODUCE_DEADLINE_S)
    finally:
        close_producer(producer, 0)  # flushed above unless it failed: whatever is left is purged
    registry.close()
    if remaining or failures:
        raise BenchError(f"producing to {topic}: {remaining} unacknowledged, failures: {failures[:3]}")
    return Workload(
        topic=topic,
        partitions=PARTITIONS,
        records=count,
        calls=calls,
        registry_url=registry_url,
        shops=tuple(shops),
        visitors=visitors,
        mix=mix,
        value_bytes=value_bytes,
        produce_s=time.monotonic() - started,
    )


def _produce(
    producer: Producer, topic: str, key: bytes, value: bytes, report: Callable[[Any, Message], None]
) -> None:
    deadline = time.monotonic() + PRODUCE_DEADLINE_S
    while True:
        try:
            producer.produce(topic, key=key, value=value, on_delivery=report)
            return
        except BufferError:
            if time.monotonic() > deadline:
                raise BenchError(f"the producer's queue for {topic} did not drain") from None
            producer.poll(0.1)  # the local queue is full: let it drain


# --- a live stream at a steady rate (the end-to-end latency figure) ----------------------------------

#: How often the steady producer wakes to produce what is due: at 2,000 events/s, about 4 at a time.
PACE_TICK_S: Final = 0.002


class SteadyProducer:
    """Produces the workload's kind of traffic to ``topic`` at ``rate`` records/s, on a thread of its own.

    Each record is stamped at produce time: its ``occurredAt`` (which the relay turns into the tracking
    call's ``timestamp``) and its Kafka timestamp are the same wall-clock millisecond, read as the record is
    made. The producer lingers 1 ms, so what a record's latency holds beyond the relay is about one
    broker round trip. ``produced`` keeps (timestamp ms, tracking calls) of every record, so a reader can
    tell how many calls a span of timestamps must bring.
    """

    def __init__(
        self, bootstrap: str, topic: str, registry_url: str, shops: Sequence[Shop], rate: float
    ) -> None:
        self.topic = topic
        self.rate = rate
        self.produced: list[tuple[int, int]] = []
        self.failures: list[str] = []
        self._registry = registry_client(registry_url)
        self._encoder = build_encoder("confluent-avro", registry=self._registry)
        self._generator = TrafficGenerator(
            seed=SEED + 1,
            shops=[shop.key for shop in shops],
            visitors=VISITORS,
            now_ms=lambda: time.time_ns() // 1_000_000,
        )
        self._translator = Translator(
            {s.key: ShopConfig(partner_id=s.partner_id, api_key=SecretStr("-")) for s in shops}
        )
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "all"})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-steady-producer", daemon=True)

    def __enter__(self) -> SteadyProducer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(PRODUCE_DEADLINE_S)
        close_producer(self._producer, 0)
        self._registry.close()

    def calls_between(self, first_ms: int, end_ms: int) -> int:
        """Tracking calls of the records stamped in ``[first_ms, end_ms)``."""
        return sum(calls for at, calls in list(self.produced) if first_ms <= at < end_ms)

    def _report(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            self.failures.append(error.str())

    def _run(self) -> None:
        started = time.monotonic()
        sent = 0
        while not self._stop.is_set():
            # What is due by now, not a fixed count per tick: a late wake-up catches up instead of drifting.
            due = int((time.monotonic() - started) * self.rate) - sent
            for type_name, fields in self._generator.events(max(due, 0)):
                stamp = fields[events.OCCURRED_AT]
                value = self._encoder.encode(type_name, fields)
                calls = len(self._translator.translate(DomainEvent(type_name, fields)))
                self._producer.produce(
                    self.topic,
                    key=fields[events.SESSION_ID].encode(),
                    value=value,
                    timestamp=stamp,
                    on_delivery=self._report,
                )
                self.produced.append((stamp, calls))
            sent += max(due, 0)
            self._producer.poll(0)
            self._stop.wait(PACE_TICK_S)
