"""Closing librdkafka clients deterministically.

Every client the project makes is closed (an ``AdminClient``, which has no ``close()``: its last reference
dropped) by the code that made it, while its broker is still there, never left to the garbage collector:
librdkafka's destroy, run by a collection at some later point after the broker had gone, waited for good on
a broker thread and hung the whole test suite (issue 12).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from confluent_kafka import Producer

if TYPE_CHECKING:
    from consumer.config import Settings


def close_producer(producer: Producer, timeout_s: float) -> int:
    """Deliver what is queued within ``timeout_s``, purge the rest, destroy the producer; return how many
    records were purged unconfirmed (their delivery reports say so: ``_PURGE_QUEUE``, ``_PURGE_INFLIGHT``).

    ``Producer.close()`` alone flushes without a deadline: a broker that went away would hold it for the
    records' whole ``message.timeout.ms``.
    """
    remaining: int = producer.flush(timeout_s)
    if remaining:
        producer.purge()
        producer.flush(0)  # serves the purged records' delivery reports
    producer.close()
    return remaining


#: librdkafka settings only a consumer takes: passed to a producer or an admin client, each draws a warning.
_CONSUMER_ONLY = (
    "auto.",
    "group.",
    "session.",
    "heartbeat.",
    "max.poll.",
    "fetch.",
    "queued.",
    "partition.assignment.",
    "isolation.",
    "enable.auto.",
    "enable.partition.eof",
    "check.crcs",
)


def kafka_client_config(settings: Settings) -> dict[str, Any]:
    """The settings every client of the relay shares (security, addresses): no consumer-only ones."""
    kafka = settings.kafka
    common = {k: v for k, v in kafka.client.items() if not k.startswith(_CONSUMER_ONLY)}
    return {**common, "bootstrap.servers": kafka.bootstrap_servers}
