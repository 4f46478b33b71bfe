"""Closing librdkafka clients deterministically.

Every client the project makes is closed (an ``AdminClient``, which has no ``close()``: its last reference
dropped) by the code that made it, while its broker is still there, never left to the garbage collector:
librdkafka's destroy, run by a collection at some later point after the broker had gone, waited for good on
a broker thread and hung the whole test suite (issue 12).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from confluent_kafka import Producer

from consumer.logs import KafkaLog

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


#: The librdkafka log of each command-line tool's clients (``dlq``, ``replay``), one per tool and process.
_TOOL_LOGS: dict[str, KafkaLog] = {}


def with_tool_log(config: dict[str, Any], tool: str) -> dict[str, Any]:
    """``config`` with librdkafka's lines going to the relay's JSON log as ``kafka.log`` events of ``tool``,
    never raw ``%3|...`` lines on stderr. The tool calls :func:`flush_tool_logs` once its clients are closed.
    """
    log = _TOOL_LOGS.get(tool)
    if log is None:
        log = _TOOL_LOGS[tool] = KafkaLog(tool)
    return {**config, "logger": log}


def flush_tool_logs() -> None:
    """Log the counts of librdkafka's lines the tools' logs still hold back (see :class:`KafkaLog`)."""
    for log in _TOOL_LOGS.values():
        log.flush()
