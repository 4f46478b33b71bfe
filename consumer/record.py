"""The unit of work that travels the flow: one Kafka record and the tracking calls it implies.

As in arroyo, the record's coordinates (topic, partition, offset and the assignment generation it was read
under) ride along with the data to settlement, so only the settle stage decides what may be committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from consumer.contract import TrackingCall
from consumer.errors import PermanentError

TopicPartition = tuple[str, int]


class KafkaMessage(Protocol):
    """What the flow needs of ``confluent_kafka.Message`` (which cannot be built in Python)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None] | None: ...
    def timestamp(self) -> tuple[int, int]: ...


@dataclass(slots=True, eq=False)
class CallFailure:
    """A call of a record that got a permanent answer."""

    index: int
    method: str
    status: int | None
    reason: str
    #: ``translate`` when the call broke the contract and was never sent, else ``deliver``.
    stage: str = "deliver"


@dataclass(slots=True, eq=False)
class Record:
    """One consumed record on its way to settlement.

    ``payloads`` are the calls to send, encoded once on the intake thread (as ``visitorEvents`` envelopes in
    batch mode, as bare bodies in single mode). ``payloads[j]`` is ``calls[send_index[j]]``; ``send_index``
    is ``None`` in the common case where every call is sent, in order. Calls are left out when translation
    rejected them (they are in ``failed_calls`` from the start) or, on a re-drive, when they were delivered
    before.
    """

    tp: TopicPartition
    offset: int
    generation: int
    key: bytes | None
    message: KafkaMessage
    shop: str | None = None
    calls: list[TrackingCall] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    #: Set when decode or translate failed: the record goes straight to the dead-letter topic.
    failure: PermanentError | None = None
    #: Calls that got a permanent answer; every other call was delivered.
    failed_calls: list[CallFailure] = field(default_factory=list)
    send_index: list[int] | None = None
    #: Where the record first came from, when it is re-driven from a dead-letter topic: (topic, partition,
    #: offset). Dead-letter headers name this origin, not the dead-letter coordinates.
    origin: tuple[str, int, int] | None = None
    #: How many times the record was re-driven before (a loop guard).
    redrive_count: int = 0
    attempts: int = 0
    first_failure: float | None = None
    last_failure: float | None = None
    consumed_at: float = 0.0

    @property
    def size(self) -> int:
        return sum(map(len, self.payloads))  # once per record in batch mode: no generator frame per call

    def sendable(self) -> list[tuple[int, TrackingCall]]:
        """``(index in calls, call)`` of each call to send, in order."""
        if self.send_index is None:
            return list(enumerate(self.calls))
        return [(i, self.calls[i]) for i in self.send_index]

    def note_failure(self, now: float) -> None:
        self.attempts += 1
        if self.first_failure is None:
            self.first_failure = now
        self.last_failure = now
