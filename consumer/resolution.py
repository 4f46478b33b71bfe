"""The resolution log: which dead-letter records a re-drive has settled, when, and how.

A dead-letter topic keeps every record the relay could not deliver; the re-drive never deletes or moves
anything there. What it has done is written beside it, to ``<dead-letter topic>.resolved`` (one partition,
``cleanup.policy=compact``, created by the first re-drive): one record per settled dead-letter record,

* key: ``<partition>:<offset>`` of the dead-letter record (compaction keeps the latest outcome of each);
* value: JSON ``{"topic", "partition", "offset", "outcome", "at", "redrive", "sent", "failed", "reason",
  "version"}``, ``outcome`` being ``delivered`` (every call it still had was accepted) or ``dead-lettered``
  (it failed again and was copied to the dead-letter topic, the copy naming it in ``rr.dlq.redrive.from.*``).

A re-drive reads the log first and passes over what it names; ``dlq inspect`` reads it to show each record's
state. A record the re-drive filters passed over, or could not re-drive, gets no entry: a later run takes it.
The entry is written after the record settled, so a run killed in between re-drives that record again next
time (at-least-once). Deleting and re-creating a dead-letter topic starts its offsets again: delete its
``.resolved`` topic with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from consumer import __version__
from consumer.record import TopicPartition
from consumer.redrive import Outcome

SUFFIX: Final = ".resolved"
OUTCOMES: Final = frozenset({"delivered", "dead-lettered"})
TIMEOUT_S: Final = 10.0
SCAN_POLL_S: Final = 0.1
WRITE_TIMEOUT_S: Final = 30.0

#: dead-letter (topic, partition) -> offset -> its latest outcome
Resolutions = dict[TopicPartition, dict[int, Outcome]]


def log_topic(dead_letter_topic: str) -> str:
    return dead_letter_topic + SUFFIX


def encode(outcome: Outcome) -> tuple[bytes, bytes]:
    topic, partition, offset = outcome.where
    value = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "outcome": outcome.outcome,
        "at": datetime.fromtimestamp(outcome.at, UTC).isoformat(timespec="milliseconds"),
        "redrive": outcome.redrive,
        "sent": outcome.sent,
        "failed": outcome.failed,
        "reason": outcome.reason,
        "version": __version__,
    }
    return f"{partition}:{offset}".encode(), orjson.dumps(value)


def decode(value: bytes | None) -> Outcome | None:
    """An entry of the log, or None when it is not one (anything else in the topic is ignored)."""
    try:
        data = orjson.loads(value or b"")
        where = (data["topic"], data["partition"], data["offset"])
        at = datetime.fromisoformat(data["at"]).timestamp()
        numbers = [where[1], where[2], data["redrive"], data["sent"], data["failed"]]
        if (
            not isinstance(where[0], str)
            or data["outcome"] not in OUTCOMES
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)
            or not isinstance(data["reason"], str)
        ):
            return None
        return Outcome(
            where, data["outcome"], at, data["redrive"], data["sent"], data["failed"], data["reason"]
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


@dataclass
class Read:
    """What the log says, and how many records in it were not entries of it."""

    #: The outcome of each record (only when read with ``outcomes=True``).
    resolutions: Resolutions = field(default_factory=dict)
    #: The offsets with an outcome, per dead-letter partition.
    resolved: dict[TopicPartition, set[int]] = field(default_factory=dict)
    ignored: int = 0


def read(
    client_config: Mapping[str, Any], dead_letter_topics: Iterable[str], *, outcomes: bool = True
) -> Read:
    """The logs of ``dead_letter_topics`` up to their current end (a log not created yet is empty);
    ``outcomes=False``: only which offsets have one (what a re-drive needs, in a fraction of the memory)."""
    found = Read()
    wanted = list(dead_letter_topics)
    consumer = Consumer(
        {
            **client_config,
            "group.id": "rr-dlq-resolutions",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    try:
        metadata = consumer.list_topics(timeout=TIMEOUT_S)
        logs = {log_topic(t): t for t in wanted}
        ends = end_offsets(consumer, [name for name in logs if name in metadata.topics])

        def keep(message: Message) -> None:
            outcome = decode(message.value())
            if outcome is None or logs.get(message.topic() or "") != outcome.where[0]:
                found.ignored += 1
                return
            topic, partition, offset = outcome.where
            found.resolved.setdefault((topic, partition), set()).add(offset)
            if outcomes:
                found.resolutions.setdefault((topic, partition), {})[offset] = outcome

        scan(consumer, ends, keep)
    finally:
        consumer.close()
    return found


class MissingTopic(LookupError):
    """A topic that should be there is not (its name is the message)."""


def end_offsets(consumer: Consumer, topics: Iterable[str]) -> dict[TopicPartition, tuple[int, int]]:
    """(low, high) watermarks of every partition of ``topics``; MissingTopic if a topic is missing."""
    metadata = consumer.list_topics(timeout=TIMEOUT_S)
    ends: dict[TopicPartition, tuple[int, int]] = {}
    for topic in topics:
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            raise MissingTopic(topic)
        for partition in info.partitions:
            low, high = consumer.get_watermark_offsets(
                KafkaTopicPartition(topic, partition), timeout=TIMEOUT_S
            )
            ends[(topic, partition)] = (low, high)
    return ends


def scan(
    consumer: Consumer,
    ends: Mapping[TopicPartition, tuple[int, int]],
    handle: Callable[[Message], None],
    *,
    timeout_s: float = TIMEOUT_S,
) -> None:
    """Hand every record of the partitions in ``ends``, from their start to the high watermark, to ``handle``.

    A partition is done when its position reaches its end, so offsets without a record (compaction, a
    transaction's markers) never leave the scan waiting."""
    remaining = {tp: high for tp, (low, high) in ends.items() if high > low}
    if not remaining:
        return
    consumer.assign([KafkaTopicPartition(t, p, OFFSET_BEGINNING) for t, p in remaining])
    # consume() waits for its whole timeout unless it fills the batch: short calls, and a deadline for
    # the broker's silence.
    silent_since = time.monotonic()
    while remaining:
        messages = consumer.consume(num_messages=500, timeout=SCAN_POLL_S)
        if messages:
            silent_since = time.monotonic()
        for message in messages:
            error = message.error()
            if error is not None:
                raise KafkaException(error)
            tp: TopicPartition = (message.topic(), message.partition())  # type: ignore[assignment]
            if tp in remaining:
                handle(message)
        positions = consumer.position([KafkaTopicPartition(t, p) for t, p in remaining])
        for position in positions:
            tp = (position.topic, position.partition)
            if position.offset >= remaining[tp]:
                del remaining[tp]
        if remaining and time.monotonic() - silent_since > timeout_s:
            raise KafkaException(f"no answer from the broker while reading {sorted(remaining)}")


def ensure_logs(client_config: Mapping[str, Any], dead_letter_topics: Iterable[str]) -> None:
    """Create the logs that do not exist yet (compacted, one partition). KafkaException naming the topic
    and what to do when the broker refuses."""
    admin = AdminClient(dict(client_config))
    try:
        existing = admin.list_topics(timeout=TIMEOUT_S).topics
        missing = [log_topic(t) for t in dead_letter_topics if log_topic(t) not in existing]
        if not missing:
            return
        new = [NewTopic(name, num_partitions=1, config={"cleanup.policy": "compact"}) for name in missing]
        for name, future in admin.create_topics(new, operation_timeout=TIMEOUT_S).items():
            try:
                future.result(timeout=TIMEOUT_S)
            except KafkaException as error:
                if _code(error) == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue  # another re-drive created it meanwhile
                raise KafkaException(
                    f"cannot create {name}, where the re-drive records what it resolved ({error}); "
                    "create it (1 partition, cleanup.policy=compact) or allow this client to"
                ) from None
    finally:
        del admin


def _code(error: KafkaException) -> int | None:
    inner = error.args[0] if error.args else None
    return inner.code() if isinstance(inner, KafkaError) else None


class Writer:
    """Writes outcomes to the logs (``produce`` on the event loop; delivery confirmed by :meth:`close`)."""

    def __init__(self, client_config: Mapping[str, Any]) -> None:
        self._producer = Producer(
            {
                **client_config,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                # An outcome that cannot be written comes back as a failure within this, not after 5 min.
                "message.timeout.ms": int(WRITE_TIMEOUT_S * 1000),
            }
        )
        self.written = 0
        self.failed = 0
        self.first_error: str | None = None

    def write(self, outcome: Outcome) -> None:
        key, value = encode(outcome)
        while True:
            try:
                self._producer.produce(
                    log_topic(outcome.where[0]), key=key, value=value, on_delivery=self._report
                )
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def _report(self, error: KafkaError | None, _message: Message) -> None:
        if error is None:
            self.written += 1
            return
        self.failed += 1
        if self.first_error is None:
            self.first_error = error.str()

    def close(self, timeout_s: float = WRITE_TIMEOUT_S + 5.0) -> int:
        """Wait for every outcome to be confirmed; return how many were not (they will be re-driven again)."""
        try:
            remaining: int = self._producer.flush(timeout_s)
        finally:
            self._producer.close()
        return remaining + self.failed
