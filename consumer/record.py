"""The unit of work that travels the flow: one Kafka record and the tracking calls it implies.

As in arroyo, the record's coordinates (topic, partition, offset and the assignment generation it was read
under) ride along with the data to settlement, so only the settle stage decides what may be committed.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Final, Protocol

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
    #: The range the record settles in (``OffsetLedger``); the ledger gives a record of its own one.
    run: Run | None = None
    #: Set by the ledger when the record settled: a second completion changes nothing.
    settled: bool = False

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


class Run:
    """The records of one partition read in one ``consume()`` batch: they settle as a range.

    The ledger keeps runs, not offsets: ``open`` counts the run's records not yet settled (a record that
    needs nothing sent is never counted), and a partition's committable position is the ``first`` offset of
    its oldest run still open, or the ``end`` of the last one once every run before it has closed. Records
    of the run that exist as :class:`Record` objects (a failure, a batch's permanent answer) are in
    ``records`` until they settle: once they are all that is open, the position is the first of them,
    exact, as a record held back (a suspect, a dead letter not yet written) needs it to be. A run is
    ``live`` while its partition is owned under the generation it was read in.
    """

    __slots__ = ("end", "first", "generation", "live", "open", "records", "tp")

    def __init__(self, tp: TopicPartition, generation: int, first: int, end: int, open_: int = 0) -> None:
        self.tp = tp
        self.generation = generation
        self.first = first
        self.end = end
        self.open = open_
        self.live = True
        self.records: list[Record] = []

    def __repr__(self) -> str:
        return f"Run({self.tp[0]}[{self.tp[1]}] {self.first}..{self.end}, open={self.open})"


#: One record on the batch path, as a plain tuple (the cheapest object Python builds), by field position:
#: ``(element, key, run, method, source, weight)``. ``element``: the record's ``visitorEvents`` envelopes,
#: joined by commas, ready to go into a batch; ``key``: its ordering key within its shop (None: none);
#: ``weight``: how many calls (events) it carries. A record taken whole from Kafka has ``run`` and ``method``
#: set and ``source`` is its message: it settles with its run, and a :class:`Record` is made of it only if a
#: call of it fails. A :class:`Record` travelling the batch path (re-driven, or partly refused by
#: translation) has ``run`` and ``method`` None and is its own ``source``: it settles as a record.
Entry = tuple[bytes, Hashable | None, "Run | None", "str | None", "KafkaMessage | Record", int]
ELEMENT: Final = 0
KEY: Final = 1
RUN: Final = 2
METHOD: Final = 3
SOURCE: Final = 4
WEIGHT: Final = 5


@dataclass(slots=True, eq=False)
class Consumed:
    """What the intake hands over for one ``consume()`` batch on the batch path.

    ``lots`` holds, per shop, the entries to send in consumption order; ``failed`` the records that failed
    decoding or translating (each a :class:`Record`, to be dead-lettered); ``runs`` every partition run read.
    """

    runs: list[Run]
    lots: dict[str, list[Entry]]
    failed: list[Record]
