"""The dispatcher's promises, with a fake tracking client: order per visitor, never two batches of one
visitor in flight, batch limits, a refused batch re-sent singly, transient answers retried."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
import pytest

from consumer.breaker import CircuitBreaker
from consumer.config import DeliveryConfig, RetryConfig, TrackingConfig
from consumer.contract import TrackingCall
from consumer.deliver import BatchDispatcher, envelope, make_dispatcher
from consumer.ratelimit import TokenBucket
from consumer.record import Entry, Record, Run
from consumer.retry import Backoff
from consumer.tracking import Delivered, Outcome, Permanent, Transient


class FakeClient:
    """Answers after a random delay; remembers what each request carried and what was in flight."""

    def __init__(self, answer: Any = None, seed: int = 1) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.in_flight: set[str] = set()
        self.overlaps: list[str] = []
        self.limiters = {"demo": TokenBucket(float("inf"))}
        self._answer = answer or (lambda method, body: Delivered())
        self._random = random.Random(seed)

    async def send_raw(self, shop: str, method: str, payload: bytes, *, timeout: float) -> Outcome:
        body = orjson.loads(payload)
        sessions = (
            {next(iter(e.values()))["sessionExternalId"] for e in body}
            if method == "visitorEvents"
            else {body["sessionExternalId"]}
        )
        self.overlaps.extend(sessions & self.in_flight)
        self.in_flight |= sessions
        self.requests.append((method, body))
        await asyncio.sleep(self._random.uniform(0, 0.003))
        self.in_flight -= sessions
        outcome: Outcome = self._answer(method, body)
        return outcome


def make_record(offset: int, session: str, product: int, mode: str) -> Record:
    body = {"sessionExternalId": session, "productId": product}
    call = TrackingCall("demo", "view", body)
    payload = b'{"view":' + orjson.dumps(body) + b"}" if mode == "batch" else orjson.dumps(body)
    message: Any = None
    return Record(
        ("t", 0), offset, 1, session.encode(), message, shop="demo", calls=[call], payloads=[payload]
    )


async def run_dispatcher(
    client: FakeClient, records: list[Record], mode: str, **delivery: Any
) -> list[Record]:
    done: list[Record] = []
    finished = asyncio.Event()

    def on_done(record: Record) -> None:
        done.append(record)
        if len(done) == len(records):
            finished.set()

    config = DeliveryConfig(mode=mode, **delivery)  # type: ignore[arg-type]
    breakers = {"demo": CircuitBreaker("demo", threshold=1000, probe_base_s=1, probe_cap_s=1)}
    dispatcher = make_dispatcher(
        client,
        config,
        TrackingConfig(),
        Backoff(RetryConfig(base_s=0.001, cap_s=0.002)),  # type: ignore[arg-type]
        breakers=breakers,
        done=on_done,
        owns=lambda record: True,
    )
    dispatcher.start()
    # Arrive in chunks, as consume() batches do.
    for start in range(0, len(records), 37):
        dispatcher.submit(records[start : start + 37])
        await asyncio.sleep(0)
    await asyncio.wait_for(finished.wait(), timeout=30)
    await dispatcher.close()
    return done


def sent_order(client: FakeClient) -> dict[str, list[int]]:
    per_session: dict[str, list[int]] = {}
    for method, body in client.requests:
        events = [next(iter(e.values())) for e in body] if method == "visitorEvents" else [body]
        for event in events:
            per_session.setdefault(event["sessionExternalId"], []).append(event["productId"])
    return per_session


@pytest.mark.parametrize("mode", ["batch", "single"])
@pytest.mark.parametrize("ordering", ["key", "partition"])
def test_each_visitors_calls_go_in_order_and_never_two_at_once(mode: str, ordering: str) -> None:
    rng = random.Random(3)
    sessions = [f"s{i}" for i in range(15)]
    records = [make_record(i, rng.choice(sessions), i, mode) for i in range(600)]
    client = FakeClient()
    done = asyncio.run(
        run_dispatcher(
            client,
            records,
            mode,
            ordering=ordering,
            batch_max_events=20,
            batch_linger_ms=1,
            max_concurrent_batches=4,
            max_concurrent_calls=8,
        )
    )
    assert sorted(r.offset for r in done) == list(range(600)), "every record reported once"
    expected: dict[str, list[int]] = {}
    for record in records:
        expected.setdefault(record.calls[0].body["sessionExternalId"], []).append(record.offset)
    assert sent_order(client) == expected
    assert client.overlaps == [], "a visitor was in two requests at once"


def test_unordered_mode_still_delivers_everything_once() -> None:
    records = [make_record(i, f"s{i % 3}", i, "batch") for i in range(200)]
    client = FakeClient()
    done = asyncio.run(run_dispatcher(client, records, "batch", ordering="unordered", batch_max_events=10))
    assert sorted(r.offset for r in done) == list(range(200))
    assert sorted(p for ps in sent_order(client).values() for p in ps) == list(range(200))


def test_batches_respect_the_event_count_limit() -> None:
    records = [make_record(i, f"s{i}", i, "batch") for i in range(250)]
    client = FakeClient()
    asyncio.run(run_dispatcher(client, records, "batch", batch_max_events=100, batch_linger_ms=50))
    sizes = [len(body) for method, body in client.requests if method == "visitorEvents"]
    assert sum(sizes) == 250
    assert max(sizes) <= 100


def test_a_refused_batch_is_resent_event_by_event_and_only_the_bad_one_fails() -> None:
    def answer(method: str, body: Any) -> Outcome:
        if method == "visitorEvents":
            return Permanent(400, "HTTP 400 Bad Request")
        return Permanent(400, "HTTP 400 Bad Request") if body["productId"] == 3 else Delivered()

    records = [make_record(i, f"s{i}", i, "batch") for i in range(6)]
    client = FakeClient(answer)
    done = asyncio.run(run_dispatcher(client, records, "batch", batch_linger_ms=20))
    failed = {r.offset: [(f.index, f.status) for f in r.failed_calls] for r in done if r.failed_calls}
    assert failed == {3: [(0, 400)]}
    singles = [body["productId"] for method, body in client.requests if method == "view"]
    assert sorted(singles) == list(range(6))


def test_transient_answers_are_retried_until_delivered() -> None:
    answers = iter([Transient(503, "HTTP 503", None), Transient(None, "timeout", None)])

    def answer(method: str, body: Any) -> Outcome:
        return next(answers, Delivered())

    records = [make_record(0, "s0", 1, "single")]
    client = FakeClient(answer)
    done = asyncio.run(run_dispatcher(client, records, "single"))
    assert len(client.requests) == 3
    assert done[0].failed_calls == []
    assert done[0].attempts == 2


async def run_with_a_revoke(revoke_before_send: bool) -> tuple[FakeClient, list[Record], int]:
    """Two partitions' records in one open batch; partition 1 is released (or not) before it is sent."""
    client = FakeClient()
    revoked: set[tuple[str, int]] = set()
    releases = [0]
    owns_calls = [0]

    def owns(record: Record) -> bool:
        owns_calls[0] += 1
        return record.tp not in revoked

    settled: list[Record] = []
    dispatcher = make_dispatcher(
        client,
        DeliveryConfig(mode="batch", batch_linger_ms=10_000),
        TrackingConfig(),
        Backoff(RetryConfig(base_s=0.001, cap_s=0.002)),  # type: ignore[arg-type]
        breakers={"demo": CircuitBreaker("demo", threshold=1000, probe_base_s=1, probe_cap_s=1)},
        done=settled.append,
        done_many=settled.extend,
        owns=owns,
        releases=lambda: releases[0],
    )
    dispatcher.start()
    records = [make_record(i, f"s{i}", i, "batch") for i in range(10)]
    for record in records[5:]:
        record.tp = ("t", 1)
    dispatcher.submit(records)
    if revoke_before_send:
        revoked.add(("t", 1))
        releases[0] += 1
    dispatcher.flush()
    async with asyncio.timeout(10):
        while not client.requests:
            await asyncio.sleep(0.001)  # the poll interval of a deadline-bounded wait (noqa: sleep-ok)
        while not settled:
            await asyncio.sleep(0.001)  # the poll interval of a deadline-bounded wait (noqa: sleep-ok)
    await dispatcher.close()
    return client, settled, owns_calls[0]


def test_records_of_a_partition_released_before_their_batch_left_are_not_sent() -> None:
    client, settled, _ = asyncio.run(run_with_a_revoke(revoke_before_send=True))
    ((method, body),) = client.requests
    assert method == "visitorEvents"
    assert [event["view"]["productId"] for event in body] == [0, 1, 2, 3, 4]
    assert [record.offset for record in settled] == [0, 1, 2, 3, 4]


def test_a_batch_sent_with_no_release_since_it_opened_checks_no_records_ownership() -> None:
    client, settled, owns_calls = asyncio.run(run_with_a_revoke(revoke_before_send=False))
    assert [event["view"]["productId"] for event in client.requests[0][1]] == list(range(10))
    assert len(settled) == 10
    assert owns_calls == 0


# --- the batch path: entries taken whole from Kafka ---------------------------------------------------


class KafkaMessage:
    """What the dispatcher reads of a message: its offset and key (for a Record made of it)."""

    def __init__(self, offset: int, key: bytes) -> None:
        self._offset, self._key = offset, key

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key


def make_entries(run: Run, sessions: list[str]) -> list[Entry]:
    """One entry per offset of ``run``, as intake builds them: envelope bytes, key, run, method, message."""
    entries: list[Entry] = []
    for offset, session in zip(range(run.first, run.end), sessions, strict=True):
        call = TrackingCall("demo", "view", {"sessionExternalId": session, "productId": offset})
        entries.append((envelope.encode(call), session.encode(), run, "view", KafkaMessage(offset, b"k"), 1))
    run.open = len(entries)
    return entries


async def run_entries(
    client: FakeClient, lots: list[list[Entry]], **delivery: Any
) -> tuple[list[tuple[str, list[Entry]]], list[Record]]:
    """Hand ``lots`` (one consume() batch each) to a batch dispatcher; wait until every entry is reported."""
    delivered: list[tuple[str, list[Entry]]] = []
    done: list[Record] = []
    total = sum(map(len, lots))

    def reported() -> int:
        return sum(len(entries) for _, entries in delivered) + len(done)

    dispatcher = make_dispatcher(
        client,
        DeliveryConfig(mode="batch", **delivery),
        TrackingConfig(),
        Backoff(RetryConfig(base_s=0.001, cap_s=0.002)),  # type: ignore[arg-type]
        breakers={"demo": CircuitBreaker("demo", threshold=1000, probe_base_s=1, probe_cap_s=1)},
        done=done.append,
        done_many=done.extend,
        delivered=lambda shop, entries: delivered.append((shop, entries)),
        owns=lambda record: True,
    )
    assert isinstance(dispatcher, BatchDispatcher)
    dispatcher.start()
    for lot in lots:
        dispatcher.submit_lots({"demo": lot})
        await asyncio.sleep(0)  # let the senders run between consume() batches
    async with asyncio.timeout(30):
        while reported() < total:
            await asyncio.sleep(0.001)  # the poll interval of a deadline-bounded wait (noqa: sleep-ok)
    await dispatcher.close()
    return delivered, done


def test_entries_are_delivered_in_order_per_visitor_and_reported_once_by_batch() -> None:
    rng = random.Random(5)
    sessions = [f"s{i}" for i in range(12)]
    runs = [Run(("t", i % 2), 1, 100 * i, 100 * i + 40) for i in range(8)]
    lots = [make_entries(run, [rng.choice(sessions) for _ in range(40)]) for run in runs]
    client = FakeClient()
    delivered, done = asyncio.run(
        run_entries(client, lots, batch_max_events=15, batch_linger_ms=1, max_concurrent_batches=4)
    )
    assert done == [], "no Record is made of an entry whose batch was accepted"
    reported = [entry for _, entries in delivered for entry in entries]
    assert sorted(id(entry) for entry in reported) == sorted(id(entry) for lot in lots for entry in lot)
    expected: dict[str, list[int]] = {}
    for lot in lots:
        for entry in lot:
            body = orjson.loads(entry[0])["view"]
            expected.setdefault(body["sessionExternalId"], []).append(body["productId"])
    assert sent_order(client) == expected
    assert client.overlaps == [], "a visitor was in two requests at once"
    assert max(len(body) for _, body in client.requests) <= 15


def test_a_refused_batch_of_entries_becomes_records_of_them_with_the_batch_attempts() -> None:
    answers = iter([Transient(503, "HTTP 503", None)])

    def answer(method: str, body: Any) -> Outcome:
        if method == "visitorEvents":
            return next(answers, Permanent(400, "HTTP 400 Bad Request"))
        return Permanent(400, "HTTP 400 Bad Request") if body["productId"] == 3 else Delivered()

    run = Run(("t", 0), 1, 0, 6)
    entries = make_entries(run, [f"s{i}" for i in range(6)])
    client = FakeClient(answer)
    delivered, done = asyncio.run(run_entries(client, [entries], batch_linger_ms=20))
    assert delivered == []
    assert sorted(record.offset for record in done) == list(range(6))
    assert {record.attempts for record in done} == {1}, "the batch's transient answer counts for each"
    assert all(record.run is run and record.tp == ("t", 0) and record.shop == "demo" for record in done)
    assert sorted(run.records, key=lambda r: r.offset) == sorted(done, key=lambda r: r.offset), (
        "each settles as a record of its run now"
    )
    failed = {r.offset: [(f.index, f.status) for f in r.failed_calls] for r in done if r.failed_calls}
    assert failed == {3: [(0, 400)]}
    (bad,) = (record for record in done if record.offset == 3)
    assert bad.calls == [TrackingCall("demo", "view", {"sessionExternalId": "s3", "productId": 3})]
    singles = [body["productId"] for method, body in client.requests if method == "view"]
    assert sorted(singles) == list(range(6))


def test_entries_of_a_run_released_before_their_batch_left_are_not_sent() -> None:
    async def scenario() -> tuple[FakeClient, list[tuple[str, list[Entry]]]]:
        client = FakeClient()
        delivered: list[tuple[str, list[Entry]]] = []
        releases = [0]
        dispatcher = make_dispatcher(
            client,
            DeliveryConfig(mode="batch", batch_linger_ms=10_000),
            TrackingConfig(),
            Backoff(RetryConfig(base_s=0.001, cap_s=0.002)),  # type: ignore[arg-type]
            breakers={"demo": CircuitBreaker("demo", threshold=1000, probe_base_s=1, probe_cap_s=1)},
            done=lambda record: None,
            delivered=lambda shop, entries: delivered.append((shop, entries)),
            owns=lambda record: True,
            releases=lambda: releases[0],
        )
        assert isinstance(dispatcher, BatchDispatcher)
        dispatcher.start()
        kept, revoked = Run(("t", 0), 1, 0, 3), Run(("t", 1), 1, 0, 3)
        dispatcher.submit_lots(
            {"demo": make_entries(kept, ["a", "b", "c"]) + make_entries(revoked, ["d", "e", "f"])}
        )
        revoked.live = False  # what the ledger does as it releases the partition
        releases[0] += 1
        dispatcher.flush()
        async with asyncio.timeout(10):
            while not delivered:
                await asyncio.sleep(0.001)  # the poll interval of a deadline-bounded wait (noqa: sleep-ok)
        await dispatcher.close()
        return client, delivered

    client, delivered = asyncio.run(scenario())
    ((_, body),) = client.requests
    assert [event["view"]["sessionExternalId"] for event in body] == ["a", "b", "c"]
    ((_, entries),) = delivered
    assert {entry[2].tp for entry in entries if entry[2] is not None} == {("t", 0)}
