"""The dead-letter topic: where a record that can never succeed goes, with the whole story attached.

A dead-lettered record keeps the original key, value, headers and timestamp, and gains headers in one
namespace, ``rr.dlq.*`` (in the spirit of Kafka Connect's ``__connect.errors.*``):

=============================  =====================================================================
header                         value
=============================  =====================================================================
rr.dlq.source.topic            the topic the record was read from
rr.dlq.source.partition        its partition (decimal)
rr.dlq.source.offset           its offset (decimal)
rr.dlq.stage                   ``decode``, ``translate`` or ``deliver``
rr.dlq.error.class             the error's type, e.g. ``DecodeError``, ``TranslateError``, ``Permanent``
rr.dlq.error.message           what was wrong (never a secret)
rr.dlq.http.status             the HTTP status of the failed call (deliver stage only)
rr.dlq.method                  the tracking method of the (first) failed call
rr.dlq.calls.failed            JSON list of the failed calls: ``[{"index", "method", "status", "reason"}]``
rr.dlq.calls.delivered         JSON list of the indices of the calls that were delivered
rr.dlq.attempts                how many times delivery was attempted
rr.dlq.first.failure           ISO 8601 time of the first failure
rr.dlq.last.failure            ISO 8601 time of the last failure
rr.dlq.service.version         the relay's version
rr.dlq.redrive.count           how many times the record was re-driven (only on a re-driven record)
rr.dlq.redrive.from.partition  the dead-letter partition and offset of the record it was re-driven
rr.dlq.redrive.from.offset     from (only on a re-driven record; same dead-letter topic)
=============================  =====================================================================

The producer is idempotent with ``acks=all``, and a record counts as settled only once its delivery report
succeeded. A failed write leaves the record unsettled (so uncommitted) and is retried.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import structlog
from confluent_kafka import KafkaError, KafkaException, Producer

from consumer import __version__
from consumer.clients import close_producer
from consumer.logs import KafkaLog
from consumer.record import Record

log = structlog.get_logger(__name__)

PREFIX: Final = "rr.dlq."
#: Longest message kept in a header.
MAX_MESSAGE: Final = 500


def failure_headers(record: Record, now: float | None = None) -> list[tuple[str, bytes]]:
    """The ``rr.dlq.*`` headers that explain why ``record`` was dead-lettered."""
    topic, partition, offset = record.origin or (*record.tp, record.offset)
    delivered = [i for i in range(len(record.calls)) if i not in {f.index for f in record.failed_calls}]
    if record.failure is not None:
        stage, error_class, message = (
            record.failure.stage,
            type(record.failure).__name__,
            record.failure.reason,
        )
    else:
        first = record.failed_calls[0]
        error_class = "TranslateError" if first.stage == "translate" else "Permanent"
        stage, message = first.stage, first.reason
    first_failure = record.first_failure or now or time.time()
    last_failure = record.last_failure or first_failure
    headers: list[tuple[str, bytes]] = [
        (PREFIX + "source.topic", topic.encode()),
        (PREFIX + "source.partition", str(partition).encode()),
        (PREFIX + "source.offset", str(offset).encode()),
        (PREFIX + "stage", stage.encode()),
        (PREFIX + "error.class", error_class.encode()),
        (PREFIX + "error.message", message[:MAX_MESSAGE].encode()),
        (PREFIX + "attempts", str(max(record.attempts, 1)).encode()),
        (PREFIX + "first.failure", _iso(first_failure)),
        (PREFIX + "last.failure", _iso(last_failure)),
        (PREFIX + "service.version", __version__.encode()),
    ]
    if record.redrive_count:
        # A re-drive reads the dead-letter topic and writes a renewed failure back to it: the copy names the
        # record it came from, so the two are shown together and the original counts as re-driven.
        headers.append((PREFIX + "redrive.count", str(record.redrive_count).encode()))
        headers.append((PREFIX + "redrive.from.partition", str(record.tp[1]).encode()))
        headers.append((PREFIX + "redrive.from.offset", str(record.offset).encode()))
    if record.failed_calls:
        first = record.failed_calls[0]
        if first.status is not None:
            headers.append((PREFIX + "http.status", str(first.status).encode()))
        headers.append((PREFIX + "method", first.method.encode()))
        headers.append(
            (
                PREFIX + "calls.failed",
                orjson.dumps(
                    [
                        {
                            "index": f.index,
                            "method": f.method,
                            "status": f.status,
                            "reason": f.reason,
                            "stage": f.stage,
                        }
                        for f in record.failed_calls
                    ]
                ),
            )
        )
        headers.append((PREFIX + "calls.delivered", orjson.dumps(delivered)))
    return headers


def _iso(epoch_s: float) -> bytes:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").encode()


class DeadLetterWriter:
    """Writes records to their dead-letter topic and reports each write's fate on the event loop."""

    def __init__(
        self,
        producer_config: dict[str, Any],
        topic_for: Callable[[str], str],
        loop: asyncio.AbstractEventLoop,
        *,
        write_timeout_s: float,
        on_written: Callable[[Record], None],
        on_failed: Callable[[Record, str], None],
    ) -> None:
        self._kafka_log = KafkaLog("dead-letter-producer")
        self._producer = Producer(
            {
                **producer_config,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                # A dead-letter topic that cannot be written must come back as a failure, not hang for 5 min.
                "message.timeout.ms": int(write_timeout_s * 1000),
                # librdkafka's own lines go through the relay's JSON log (served by the poller's poll()).
                "logger": self._kafka_log,
            }
        )
        self._topic_for = topic_for
        self._loop = loop
        self._on_written = on_written
        self._on_failed = on_failed
        self._running = True
        self._closed = False
        # Delivery reports arrive only through poll(): this thread keeps polling.
        self._poller = threading.Thread(target=self._poll, name="rr-dlq-poller", daemon=True)
        self._poller.start()
        self.written = 0

    def send(self, record: Record) -> None:
        """Produce the record to its dead-letter topic; its settlement follows the delivery report."""
        message = record.message
        original = message.headers() or []
        headers: list[tuple[str, str | bytes | None]] = [
            # A re-driven record carries the headers of its last failure: they are replaced, not repeated.
            *(
                (k, v)
                for k, v in (original.items() if isinstance(original, dict) else original)
                if not k.startswith(PREFIX)
            ),
            *failure_headers(record),
        ]
        timestamp_type, timestamp = message.timestamp()
        try:
            self._producer.produce(
                self._topic_for(record.tp[0]),
                key=message.key(),
                value=message.value(),
                headers=headers,
                timestamp=timestamp if timestamp_type != 0 and timestamp > 0 else 0,
                on_delivery=lambda error, _msg: self._report(record, error),
            )
        except (BufferError, KafkaException) as exc:
            self._on_failed(record, f"produce refused: {exc}")

    def _report(self, record: Record, error: KafkaError | None) -> None:
        # Runs on the poller thread: hand the outcome to the loop, where the ledger lives.
        if self._closed:
            return  # purged by close(): the record stays unsettled, so uncommitted, and is read again later
        if error is None:
            self._loop.call_soon_threadsafe(self._written, record)
        else:
            self._loop.call_soon_threadsafe(self._on_failed, record, error.str())

    def _written(self, record: Record) -> None:
        self.written += 1
        self._on_written(record)

    def _poll(self) -> None:
        while self._running:
            self._producer.poll(0.1)

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush what is queued, then destroy the producer (never left to the garbage collector); return how
        many writes were still unconfirmed (purged: their records were never settled, so never committed)."""
        remaining: int = self._producer.flush(timeout_s)
        if remaining:
            log.warning("deadletter.unconfirmed_at_close", count=remaining)
        self._running = False
        self._poller.join(timeout=5.0)
        if self._poller.is_alive():
            log.warning("deadletter.poller_stuck")  # closing under a poll() in progress would crash
            return remaining
        self._closed = True
        close_producer(self._producer, 0)
        self._kafka_log.flush()
        return remaining
