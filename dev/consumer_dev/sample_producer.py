"""``rr-consumer produce-sample``: realistic shop traffic into a Kafka topic, for the local stack and tests.

The events come from :class:`consumer_dev.sample.TrafficGenerator` (the mix of Retail Rocket's public
e-commerce data set); each record's key is the visitor's session id, so one visitor's events stay in one
partition, in order, as a shop platform would publish them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer

from consumer.clients import close_producer
from consumer.config import ValueFormat
from consumer.decode import registry_client
from consumer_dev.sample import TrafficGenerator, build_encoder


def produce_sample(
    bootstrap: str,
    topic: str,
    *,
    count: int | None,
    rate: float | None,
    fmt: ValueFormat = "confluent-avro",
    registry_url: str | None = None,
    shops: Sequence[str] = ("demo",),
    seed: int = 1,
    visitors: int = 100_000,
    schemas_dir: Path | None = None,
    on_progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Produce ``count`` events (or until ``should_stop``) at about ``rate`` per second; return how many."""
    registry = registry_client(registry_url) if fmt == "confluent-avro" and registry_url else None
    encoder = build_encoder(fmt, registry=registry, schemas_dir=schemas_dir)
    generator = TrafficGenerator(
        seed=seed, shops=shops, visitors=visitors, now_ms=lambda: int(time.time() * 1000)
    )
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 20,
            "compression.type": "lz4",
        }
    )
    errors: list[str] = []

    def report(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            errors.append(error.str())

    produced = 0
    started = time.monotonic()
    chunk = 100
    try:
        while (count is None or produced < count) and not should_stop():
            size = chunk if count is None else min(chunk, count - produced)
            for type_name, fields in generator.events(size):
                value = encoder.encode(type_name, fields)
                _produce(producer, topic, fields["sessionId"].encode(), value, report)
            produced += size
            producer.poll(0)
            if errors:
                raise RuntimeError(f"producing to {topic} failed: {errors[0]}")
            if on_progress is not None:
                on_progress(produced)
            if rate:
                # Pace to the rate: sleep until this many events are due (a paced producer, not a test wait).
                ahead = produced / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    finally:
        close_producer(producer, 30)
        if registry is not None:
            registry.close()  # a real registry keeps the connection alive: close it, do not leave it to GC
    if errors:
        raise RuntimeError(f"producing to {topic} failed: {errors[0]}")
    return produced


def _produce(
    producer: Producer,
    topic: str,
    key: bytes,
    value: bytes,
    report: Callable[[KafkaError | None, Message], None],
) -> None:
    while True:
        try:
            producer.produce(topic, key=key, value=value, on_delivery=report)
            return
        except BufferError:
            producer.poll(0.1)  # the local queue is full: let it drain
