"""Helpers for tests that cross the real broker: unique topics, producing and consuming with deadlines.

Every client made here is closed (an AdminClient: its last reference dropped) before the helper returns or
raises, never left to the garbage collector: librdkafka's destroy, run by a collection at a random later
point after the client's broker stopped, waited for good on a broker thread and hung the suite (issue 12).
:func:`clients_left_behind` finds the ones a test forgot; ``tests/conftest.py`` runs it after each test.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.cimpl import _AdminClientImpl

from consumer.clients import close_producer

T = TypeVar("T")
DEFAULT_DEADLINE_S = 30.0


def wait_for(
    condition: Callable[[], T],
    *,
    deadline_s: float = DEFAULT_DEADLINE_S,
    what: str = "condition",
    interval_s: float = 0.05,
) -> T:
    """Poll ``condition`` until it returns something truthy, or fail naming ``what`` after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:.0f}s waiting for {what}")
        time.sleep(interval_s)  # the poll interval of a deadline-bounded wait, not a race guess


def unique_name(prefix: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in prefix)[:80]
    return f"{cleaned}-{uuid.uuid4().hex[:8]}"


class Topics:
    """Creates topics for one test and deletes them afterwards."""

    def __init__(self, admin: AdminClient) -> None:
        self.admin = admin
        self.created: list[str] = []

    def create(self, prefix: str, partitions: int = 1, config: dict[str, str] | None = None) -> str:
        """A fresh topic whose name starts with ``prefix``."""
        return self.create_named(unique_name(prefix), partitions, config)

    def create_named(self, name: str, partitions: int = 1, config: dict[str, str] | None = None) -> str:
        futures = self.admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
            operation_timeout=30,
        )
        futures[name].result(timeout=30)
        self.created.append(name)
        wait_for(lambda: self._leaders_known(name, partitions), what=f"leaders of {name}")
        return name

    def _leaders_known(self, name: str, partitions: int) -> bool:
        metadata = self.admin.list_topics(name, timeout=10).topics.get(name)
        return bool(
            metadata
            and len(metadata.partitions) == partitions
            and all(p.leader >= 0 for p in metadata.partitions.values())
        )

    def delete_all(self) -> None:
        if not self.created:
            return
        for future in self.admin.delete_topics(self.created, operation_timeout=30).values():
            # Already gone is fine: a test may delete its own topic on purpose. exception(), not result(): a
            # raised error's traceback would hold this frame, so the admin client, in a reference cycle.
            error = future.exception(timeout=30)
            if error is not None and not isinstance(error, KafkaException):
                raise error
        self.created.clear()


def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]] | Iterable[tuple[bytes | None, bytes | None, int]],
    *,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> int:
    """Produce ``(key, value[, partition])`` records and wait until every one is acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    failures: list[str] = []
    count = 0

    def report(error: Any, _message: Message) -> None:
        if error is not None:
            failures.append(str(error))

    try:
        for record in records:
            key, value = record[0], record[1]
            kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": report}
            if len(record) > 2:
                kwargs["partition"] = record[2]  # type: ignore[misc]
            while True:
                try:
                    producer.produce(topic, **kwargs)
                    break
                except BufferError:
                    producer.poll(0.1)
            count += 1
        remaining = producer.flush(deadline_s)
    finally:
        close_producer(producer, 0)  # flushed above: whatever is left is purged, and the assertion says so
    assert remaining == 0, f"{remaining} records not acknowledged within {deadline_s}s"
    assert not failures, f"produce failed: {failures[:3]}"
    return count


def produce_with_headers(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
    *,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> int:
    """Produce ``(key, value, headers)`` records in order and wait until every one is acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    failures: list[str] = []

    def report(error: Any, _message: Message) -> None:
        if error is not None:
            failures.append(str(error))

    count = 0
    try:
        for key, value, headers in records:
            producer.produce(topic, key=key, value=value, headers=headers, on_delivery=report)
            producer.poll(0)
            count += 1
        remaining = producer.flush(deadline_s)
    finally:
        producer.close()
    assert remaining == 0, f"{remaining} records not acknowledged within {deadline_s}s"
    assert not failures, f"produce failed: {failures[:3]}"
    return count


#: The librdkafka client types: an object of one of these owns librdkafka threads until it is destroyed.
_CLIENT_TYPES = (Producer, Consumer, _AdminClientImpl)


def clients_left_behind(keep: Iterable[object] = (), *, skip: set[int] | None = None) -> list[str]:
    """Every librdkafka client of this process that is still open, but for ``keep``, as a description.

    A Producer or Consumer that was closed is harmless (its handle is gone); an AdminClient has no close(),
    so one still alive is open. Nothing is collected first: a client that only a reference cycle or a kept
    traceback holds is just the one that would be destroyed by a later collection, so it counts. ``skip``
    holds the ids of clients reported before (reported once), and gains the ones reported now.
    """
    if gc.get_freeze_count():
        gc.unfreeze()  # an in-process relay froze the heap of its time (consumer.interpreter)
    kept = {id(client) for client in keep}
    found: list[str] = []
    for obj in gc.get_objects():
        if not isinstance(obj, _CLIENT_TYPES) or id(obj) in kept or (skip is not None and id(obj) in skip):
            continue
        if _is_open(obj):
            holders = sorted({type(r).__name__ for r in gc.get_referrers(obj) if not isinstance(r, list)})
            found.append(f"an open {type(obj).__name__} (held by: {', '.join(holders) or 'nothing'})")
            if skip is not None:
                skip.add(id(obj))
    return found


def _is_open(client: object) -> bool:
    try:
        if isinstance(client, Producer):
            client.poll(0)
        elif isinstance(client, Consumer):
            client.memberid()
    except RuntimeError:  # "Producer has been closed", "Consumer closed"
        return False
    return True  # an AdminClient: alive means open


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("probe")})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in found}
    finally:
        consumer.close()


@contextmanager
def consumer(bootstrap: str, group: str, topics: list[str], **overrides: Any) -> Iterator[Consumer]:
    config = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.offset.store": False,
        "enable.auto.commit": False,
        "partition.assignment.strategy": "cooperative-sticky",
        **overrides,
    }
    client = Consumer(config)
    try:
        client.subscribe(topics)
        yield client
    finally:
        client.close()


def consume(client: Consumer, count: int, *, deadline_s: float = DEFAULT_DEADLINE_S) -> list[Message]:
    """Consume exactly ``count`` records (fails if fewer arrive before the deadline)."""
    received: list[Message] = []
    deadline = time.monotonic() + deadline_s
    while len(received) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"received {len(received)} of {count} records within {deadline_s}s")
        for message in client.consume(num_messages=count - len(received), timeout=0.5):
            if message.error() is not None:
                raise AssertionError(f"consume error: {message.error()}")
            received.append(message)
    return received
