"""Intake, in-process: every per-record step is total, and the fault board folds what repeats.

A decoder or translator that raises something nobody anticipated must cost that one record (it goes to the
dead-letter topic with the reason), never the intake thread — whose death would stop the whole relay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from consumer.config import Settings, ShopConfig
from consumer.decode import DomainEvent
from consumer.deliver.envelope import encode as envelope
from consumer.errors import DecodeError, RegistryUnavailable, TranslateError
from consumer.faults import REMIND_EVERY_S, FaultBoard
from consumer.handoff import Handoff
from consumer.intake import Intake, _brokers_answering
from consumer.translate import Translator

pytestmark = pytest.mark.unit

VIEW = DomainEvent(
    "ProductViewed",
    {"eventId": "e1", "occurredAt": 1_700_000_000_000, "sessionId": "v1", "shopId": "demo", "productId": 7,
     "groupId": None, "stockId": None},
)  # fmt: skip


class Message:
    """The parts of ``confluent_kafka.Message`` that intake reads (it cannot be built in Python)."""

    def __init__(self, offset: int, value: bytes, partition: int = 0) -> None:
        self._offset, self._value, self._partition = offset, value, partition

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "events"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"v1"

    def value(self) -> bytes:
        return self._value

    def headers(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)


class Decoder:
    """Decodes b"ok" to a view, b"registry down" as the registry being unreachable; anything else raises the
    kind of error a library bug would."""

    def decode(self, value: bytes | None, headers: object = None) -> DomainEvent:
        if value == b"ok":
            return VIEW
        if value == b"registry down":
            raise RegistryUnavailable("connection refused")
        return {}[value]  # type: ignore[index, no-any-return]  # a KeyError no stage anticipated


class Consumer:
    """The two calls intake makes of the consumer when the registry is down: pause and rewind."""

    def __init__(self) -> None:
        self.paused: list[tuple[int, int]] = []
        self.seeks: list[tuple[int, int]] = []

    def pause(self, partitions: list[Any]) -> None:
        self.paused += [(p.partition, p.offset) for p in partitions]

    def seek(self, partition: Any) -> None:
        self.seeks.append((partition.partition, partition.offset))


class BrokenTranslator(Translator):
    def translate_partial(self, event: DomainEvent) -> Any:
        raise ZeroDivisionError("division by zero")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def intake(loop: asyncio.AbstractEventLoop, translator: Translator | None = None) -> Intake:
    settings = Settings(topics=[{"name": "events", "format": "json"}], shops={"demo": {"partner_id": "p"}})
    shops = {"demo": ShopConfig(partner_id="p", api_key=SecretStr("k"))}
    return Intake(
        settings,
        {"events": Decoder()},  # type: ignore[dict-item]
        translator or Translator(shops),
        Handoff(loop),
        listener=None,  # type: ignore[arg-type]  # _prepare never calls it
    )


def test_a_decoder_raising_an_unanticipated_error_fails_that_record_only(
    loop: asyncio.AbstractEventLoop,
) -> None:
    records = intake(loop)._prepare(None, [Message(0, b"ok"), Message(1, b"boom"), Message(2, b"ok")])  # type: ignore[arg-type, list-item]
    assert [r.offset for r in records] == [0, 1, 2], "every record goes on to settlement"
    assert [r.failure is None for r in records] == [True, False, True]
    failure = records[1].failure
    assert isinstance(failure, DecodeError)
    assert failure.reason == "unexpected KeyError while decoding the record: b'boom'"
    assert [len(r.payloads) for r in records] == [1, 0, 1]


def test_a_translator_raising_an_unanticipated_error_is_a_translate_stage_dead_letter(
    loop: asyncio.AbstractEventLoop,
) -> None:
    shops = {"demo": ShopConfig(partner_id="p", api_key=SecretStr("k"))}
    records = intake(loop, BrokenTranslator(shops))._prepare(None, [Message(0, b"ok")])  # type: ignore[arg-type, list-item]
    failure = records[0].failure
    assert isinstance(failure, TranslateError)
    assert failure.stage == "translate"
    assert failure.reason == "unexpected ZeroDivisionError while translating the record: division by zero"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_lasting_fault_is_one_line_then_a_reminder_and_one_line_when_it_clears() -> None:
    clock = Clock()
    board = FaultBoard(clock)
    with capture_logs() as logs:
        for _ in range(50):  # raised on every failed write or poll
            board.raise_fault("dlq:x", "topic x cannot be written", event="fault.up", topic="t")
            clock.now += 0.1
        clock.now += REMIND_EVERY_S
        board.raise_fault("dlq:x", "topic x cannot be written", event="fault.up", topic="t")
        assert board.current() == ["topic x cannot be written"]
        board.clear("dlq:x", event="fault.down")
        board.clear("dlq:x", event="fault.down")  # clearing what is not raised says nothing
    assert [(line["event"], line.get("lasting_s")) for line in logs] == [
        ("fault.up", 0),
        ("fault.up", round(50 * 0.1 + REMIND_EVERY_S)),
        ("fault.down", None),
    ]
    assert logs[0]["log_level"] == "error"
    assert logs[0]["topic"] == "t"
    assert board.current() == []


def test_a_fault_with_a_time_to_live_clears_itself_once_it_stops_recurring() -> None:
    clock = Clock()
    board = FaultBoard(clock)
    with capture_logs():
        board.raise_fault("consume:X", "consuming failed: unknown topic", event="e", ttl_s=30)
        clock.now += 29
        assert board.current() == ["consuming failed: unknown topic"]
        board.raise_fault("consume:X", "consuming failed: unknown topic", event="e", ttl_s=30)
        clock.now += 29
        assert board.current() == ["consuming failed: unknown topic"], "raised again: still current"
        clock.now += 2
        assert board.current() == []


def broker(nodeid: int, state: str, rxidle_s: float) -> dict[str, Any]:
    return {"nodeid": nodeid, "state": state, "rxidle": int(rxidle_s * 1_000_000)}


@pytest.mark.parametrize(
    ("brokers", "verdict"),
    [
        ({"b/1": broker(1, "UP", 0.5), "GroupCoordinator": broker(-1, "UP", 2)}, None),
        # Every partition paused: the broker itself is idle, the coordinator still answers heartbeats.
        ({"b/1": broker(1, "UP", 40), "GroupCoordinator": broker(-1, "UP", 2)}, None),
        ({"b/1": broker(1, "UP", -0.000001)}, None),  # a fresh connection that received nothing yet
        ({"b/1": broker(1, "CONNECT", 1), "b/2": broker(2, "DOWN", 1)}, "no connection to any broker (state"),
        # Frozen: the sockets are up and nothing comes back.
        (
            {"b/1": broker(1, "UP", 12), "GroupCoordinator": broker(-1, "UP", 11)},
            "no broker has answered for 11s",
        ),
    ],
)
def test_a_broker_counts_as_answering_only_when_a_connection_is_up_and_heard_from(
    brokers: dict[str, Any], verdict: str | None
) -> None:
    found = _brokers_answering(brokers, silent_s=6)
    assert (found is None) if verdict is None else (found is not None and verdict in found), found


def test_a_fault_says_how_long_it_has_lasted_until_it_clears() -> None:
    clock = Clock()
    board = FaultBoard(clock)
    with capture_logs():
        assert board.lasting("kafka") is None
        board.raise_fault("kafka", "no broker", event="e")
        clock.now += 42
        board.raise_fault("kafka", "no broker, still", event="e")  # raised again: the age runs on
        assert board.lasting("kafka") == 42
        board.clear("kafka", event="back")
    assert board.lasting("kafka") is None


# --- the batch path: a consume() batch straight into per-shop entries --------------------------------


def test_the_batch_path_makes_entries_one_run_per_partition_run_and_a_record_only_of_a_failure(
    loop: asyncio.AbstractEventLoop,
) -> None:
    messages = [Message(0, b"ok"), Message(1, b"ok"), Message(0, b"ok", 1), Message(2, b"boom")]
    consumed = intake(loop)._prepare_lots(None, messages)  # type: ignore[arg-type]
    runs = [(run.tp, run.first, run.end, run.open) for run in consumed.runs]
    assert runs == [(("events", 0), 0, 2, 2), (("events", 1), 0, 1, 1), (("events", 0), 2, 3, 1)]
    (entries,) = consumed.lots.values()
    (call,) = Translator({"demo": ShopConfig(partner_id="p", api_key=SecretStr("k"))}).translate(VIEW)
    assert [entry[0] for entry in entries] == [envelope(call)] * 3, "the envelope, built once, in intake"
    first, other, last = consumed.runs
    assert [(entry[2], entry[4]) for entry in entries] == [
        (first, messages[0]),
        (first, messages[1]),
        (other, messages[2]),
    ], "each entry settles with its run, its message kept for a dead letter"
    assert [entry[5] for entry in entries] == [1, 1, 1]
    (failed,) = consumed.failed
    assert (failed.tp, failed.offset, failed.run) == (("events", 0), 2, last)
    assert isinstance(failed.failure, DecodeError)
    assert last.records == [failed], "a Record of the run: the position can stop exactly at it"
    assert first.records == []
    assert other.records == []


def test_a_registry_outage_on_the_batch_path_stops_its_partition_at_the_record_and_no_other(
    loop: asyncio.AbstractEventLoop,
) -> None:
    relay_intake = intake(loop)
    consumer = Consumer()
    messages = [
        Message(0, b"ok"),
        Message(1, b"registry down"),
        Message(2, b"ok"),  # behind the record that waits: read again after the rewind, not now
        Message(0, b"ok", 1),
        Message(3, b"ok"),  # a later run of the waiting partition in the same batch: skipped whole
    ]
    with capture_logs():
        consumed = relay_intake._prepare_lots(consumer, messages)  # type: ignore[arg-type]
    assert [(run.tp[1], run.first, run.end, run.open) for run in consumed.runs] == [
        (0, 0, 1, 1),
        (1, 0, 1, 1),
    ]
    (entries,) = consumed.lots.values()
    assert [entry[4] for entry in entries] == [messages[0], messages[3]]
    assert consumed.failed == [], "a registry outage is systemic: nothing is dead-lettered"
    assert consumer.seeks == [(0, 1)], "rewound to the waiting record"
    assert consumer.paused == [(0, 1)]
    assert relay_intake.faults.lasting("registry") is not None
    with capture_logs():
        again = relay_intake._prepare_lots(consumer, [Message(1, b"ok"), Message(2, b"ok")])  # type: ignore[arg-type]
    assert [(run.first, run.end, run.open) for run in again.runs] == [(1, 3, 2)]
    assert relay_intake.faults.lasting("registry") is None, "the registry answered for the partition again"
