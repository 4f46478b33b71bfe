"""The dead-letter writer's lifecycle: closed for good, within its deadline, whatever the broker does."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest
import structlog
from confluent_kafka import Message

from consumer import logs
from consumer.deadletter import DeadLetterWriter
from consumer.errors import TranslateError
from consumer.record import Record
from tests.kafka import clients_left_behind
from tools import kafka_local


async def test_closing_without_a_broker_destroys_the_producer_in_time_and_settles_nothing(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A dead-letter topic that cannot be written: close() returns the unconfirmed count within its deadline,
    destroys the producer (nothing is left for a garbage collection to destroy later), and the purged write
    is reported to nobody (the record stays unsettled, so uncommitted). librdkafka's complaints on the way
    went through the relay's JSON log."""
    logs.configure("info", "json")
    before = Counter(clients_left_behind())
    written: list[Record] = []
    failed: list[str] = []
    writer = DeadLetterWriter(
        {"bootstrap.servers": f"127.0.0.1:{kafka_local.free_port()}"},  # nothing listens there
        lambda topic: f"{topic}.dlq",
        asyncio.get_running_loop(),
        write_timeout_s=60,
        on_written=written.append,
        on_failed=lambda _record, reason: failed.append(reason),
    )
    message = Message(
        topic="t", partition=0, offset=3, key=b"k", value=b"v", timestamp=(1, 1_700_000_000_000)
    )
    record = Record(("t", 0), 3, 1, b"k", message)
    record.failure = TranslateError("broken", field="x")
    writer.send(record)
    started = time.monotonic()
    assert writer.close(timeout_s=0.5) == 1
    assert time.monotonic() - started < 5.5, "bounded by the flush deadline and the poller's join"
    await asyncio.sleep(0)  # anything the close handed to the loop runs now
    assert written == [], "a purged write is not written"
    assert failed == [], "nor reported as failed: it would be retried after the writer closed"
    assert Counter(clients_left_behind()) == before, "the producer was destroyed by close()"
    structlog.reset_defaults()
    lines = capfd.readouterr().err.splitlines()
    assert not [line for line in lines if line.startswith("%")], "a raw librdkafka line reached stderr"
    events = [json.loads(line) for line in lines]
    assert {e["client"] for e in events if e["event"] == "kafka.log"} == {"dead-letter-producer"}
