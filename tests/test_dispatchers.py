"""Each dispatcher on its own, with a fake tracking client whose answers the test releases one by one: the
batch dispatcher keeps a visitor's order across sealed batches, re-sends a refused batch singly and seals on
linger; the single dispatcher keeps one call per visitor in flight; the factory picks by mode; the
``visitorEvents`` envelope round-trips."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from consumer.breaker import CircuitBreaker
from consumer.config import DeliveryConfig, RetryConfig, TrackingConfig
from consumer.contract import BATCH_METHOD, SINGLE_METHODS, TrackingCall
from consumer.deliver import BatchDispatcher, SingleDispatcher, make_dispatcher
from consumer.deliver import envelope as envelopes
from consumer.ratelimit import TokenBucket
from consumer.record import Record
from consumer.retry import Backoff
from consumer.tracking import Delivered, Outcome, Permanent

Answer = Callable[[str, Any], Outcome]


class GatedClient:
    """Holds every request until the test answers it, so what is in flight at once is the test's to see."""

    def __init__(self, answer: Answer | None = None, *, gated: bool = True) -> None:
        self.requests: list[tuple[str, bytes]] = []
        self.limiters = {"demo": TokenBucket(float("inf"))}
        self._answer = answer or (lambda method, body: Delivered())
        self._gated = gated
        self._gates: list[asyncio.Event] = []

    async def send_raw(self, shop: str, method: str, payload: bytes, *, timeout: float) -> Outcome:
        self.requests.append((method, payload))
        gate = asyncio.Event()
        self._gates.append(gate)
        if self._gated:
            await gate.wait()
        return self._answer(method, orjson.loads(payload))

    def release(self, index: int) -> None:
        self._gates[index].set()

    def products(self, index: int) -> list[int]:
        """The product ids request ``index`` carried, in order."""
        method, payload = self.requests[index]
        body = orjson.loads(payload)
        if method == BATCH_METHOD:
            return [next(iter(event.values()))["productId"] for event in body]
        return [body["productId"]]


def make_record(offset: int, session: str, mode: str) -> Record:
    """A record of one ``view`` call whose product id is its offset, its key the visitor's session."""
    body = {"sessionExternalId": session, "productId": offset}
    call = TrackingCall("demo", "view", body)
    payload = envelopes.encode(call) if mode == "batch" else orjson.dumps(body)
    message: Any = None
    return Record(
        ("t", 0), offset, 1, session.encode(), message, shop="demo", calls=[call], payloads=[payload]
    )


def dispatcher_args(done: Callable[[Record], None]) -> dict[str, Any]:
    return {
        "tracking": TrackingConfig(),
        "backoff": Backoff(RetryConfig(base_s=0.001, cap_s=0.002)),  # type: ignore[arg-type]
        "breakers": {"demo": CircuitBreaker("demo", threshold=1000, probe_base_s=1, probe_cap_s=1)},
        "done": done,
        "owns": lambda record: True,
    }


async def until(condition: Callable[[], bool], what: str, deadline_s: float = 10) -> None:
    async with asyncio.timeout(deadline_s):
        while not condition():
            await asyncio.sleep(0.001)  # the poll interval of a deadline-bounded wait (noqa: sleep-ok)
    assert condition(), what


async def settle_loop() -> None:
    """Let every task that can run, run: the dispatchers only move work on the loop, with no I/O of their
    own, so after this anything they were going to send with the clients' answers so far has been sent."""
    for _ in range(50):
        await asyncio.sleep(0)


# --- batch ---------------------------------------------------------------------------------------------


async def test_a_visitors_later_records_wait_for_its_sealed_batch_and_then_go_in_order() -> None:
    client = GatedClient()
    done: list[Record] = []
    delivery = DeliveryConfig(
        mode="batch", batch_max_events=2, batch_linger_ms=60_000, max_concurrent_batches=4
    )
    dispatcher = BatchDispatcher(client, delivery, done_many=done.extend, **dispatcher_args(done.append))  # type: ignore[arg-type]
    dispatcher.start()
    try:
        # a0 and a1 fill the first batch; a2 must wait for it, though senders are free; b3 and c4 need not.
        dispatcher.submit(
            [make_record(0, "a", "batch"), make_record(1, "a", "batch"), make_record(2, "a", "batch")]
        )
        dispatcher.submit([make_record(3, "b", "batch"), make_record(4, "c", "batch")])
        await until(lambda: len(client.requests) == 2, "both full batches sent")
        dispatcher.flush()
        await settle_loop()
        assert [client.products(i) for i in range(len(client.requests))] == [[0, 1], [3, 4]], (
            "visitor a's third record went while its first batch had no answer"
        )

        client.release(1)  # b and c's batch answers first: a still waits
        await until(lambda: len(done) == 2, "b and c reported")
        dispatcher.flush()
        await settle_loop()
        assert len(client.requests) == 2

        client.release(0)
        await until(lambda: len(done) == 4, "a's first batch reported")
        dispatcher.flush()
        await until(lambda: len(client.requests) == 3, "a's third record sent once its batch was answered")
        assert client.products(2) == [2]
        client.release(2)
        await until(lambda: len(done) == 5, "every record reported")
        assert [record.offset for record in done] == [3, 4, 0, 1, 2]
        assert dispatcher.batches_sent == 3
    finally:
        await dispatcher.close()


async def test_a_refused_batch_is_resent_singly_as_bare_bodies_and_only_the_bad_event_fails() -> None:
    def answer(method: str, body: Any) -> Outcome:
        if method == BATCH_METHOD or body["productId"] == 1:
            return Permanent(400, "HTTP 400 Bad Request")
        return Delivered()

    client = GatedClient(answer, gated=False)
    done: list[Record] = []
    reports: list[int] = []

    def done_many(records: list[Record]) -> None:
        reports.append(len(records))
        done.extend(records)

    delivery = DeliveryConfig(mode="batch", batch_linger_ms=60_000)
    dispatcher = BatchDispatcher(client, delivery, done_many=done_many, **dispatcher_args(done.append))  # type: ignore[arg-type]
    dispatcher.start()
    try:
        records = [make_record(0, "a", "batch"), make_record(1, "a", "batch"), make_record(2, "b", "batch")]
        dispatcher.submit(records)
        dispatcher.flush()
        await until(lambda: len(done) == 3, "every record reported")
    finally:
        await dispatcher.close()
    assert [method for method, _ in client.requests] == [BATCH_METHOD, "view", "view", "view"]
    singles = {orjson.loads(payload)["productId"]: payload for _, payload in client.requests[1:]}
    assert singles == {r.offset: orjson.dumps(r.calls[0].body) for r in records}, "each sent as its bare body"
    a_order = [p for p in (client.products(i)[0] for i in range(1, 4)) if p in (0, 1)]
    assert a_order == [0, 1], "a refused batch's visitor is re-sent in order"
    assert {r.offset: [(f.index, f.status) for f in r.failed_calls] for r in done} == {
        0: [],
        1: [(0, 400)],
        2: [],
    }
    assert reports == [3], "the batch's records are reported together"


async def test_an_open_batch_is_sealed_and_sent_when_its_linger_has_passed() -> None:
    client = GatedClient(gated=False)
    done: list[Record] = []
    delivery = DeliveryConfig(mode="batch", batch_max_events=100, batch_linger_ms=20)
    dispatcher = BatchDispatcher(client, delivery, **dispatcher_args(done.append))  # type: ignore[arg-type]
    dispatcher.start()
    try:
        dispatcher.submit(
            [make_record(i, f"s{i}", "batch") for i in range(3)]
        )  # far from full, never flushed
        await until(lambda: len(done) == 3, "the lingering batch sent and reported")
    finally:
        await dispatcher.close()
    assert [client.products(i) for i in range(len(client.requests))] == [[0, 1, 2]]


async def test_past_its_linger_a_batch_stays_open_until_its_shop_has_a_rate_limit_slot() -> None:
    """Sealed at its linger, the batch would only wait for the slot with its visitors locked behind it."""
    client = GatedClient(gated=False)
    bucket = client.limiters["demo"] = TokenBucket(10.0, burst=1)
    taken = time.monotonic()
    assert bucket.reserve() == 0.0, "the free slot is taken now: the shop's next one is 100 ms away"
    done: list[Record] = []
    delivery = DeliveryConfig(mode="batch", batch_max_events=100, batch_linger_ms=20)
    dispatcher = BatchDispatcher(client, delivery, **dispatcher_args(done.append))  # type: ignore[arg-type]
    dispatcher.start()
    try:
        dispatcher.submit([make_record(0, "a", "batch")])
        await until(lambda: time.monotonic() >= taken + 0.05, "the batch's linger long over")
        assert client.requests == [], "sealed at its linger, though its shop has no slot yet"
        dispatcher.submit([make_record(1, "b", "batch")])
        await until(lambda: len(done) == 2, "the batch sent at the slot and reported")
        sent = time.monotonic()
    finally:
        await dispatcher.close()
    assert [client.products(i) for i in range(len(client.requests))] == [[0, 1]], "one batch, both records"
    assert sent >= taken + 0.1, "not sealed before the shop's slot"


# --- single --------------------------------------------------------------------------------------------


async def test_single_mode_keeps_one_call_per_visitor_in_flight_and_sends_the_next_after_it() -> None:
    client = GatedClient()
    done: list[Record] = []
    delivery = DeliveryConfig(mode="single", max_concurrent_calls=4)
    dispatcher = SingleDispatcher(client, delivery, **dispatcher_args(done.append))  # type: ignore[arg-type]
    dispatcher.start()
    try:
        dispatcher.submit(
            [make_record(0, "a", "single"), make_record(1, "a", "single"), make_record(2, "b", "single")]
        )
        await until(lambda: len(client.requests) == 2, "a's first and b's calls sent")
        await settle_loop()
        assert [client.products(i) for i in range(len(client.requests))] == [[0], [2]], (
            "a's second call went while its first had no answer"
        )

        client.release(0)
        await until(lambda: len(client.requests) == 3, "a's second call sent once its first was answered")
        assert client.products(2) == [1]
        assert [record.offset for record in done] == [0]
        client.release(1)
        client.release(2)
        await until(lambda: len(done) == 3, "every record reported")
    finally:
        await dispatcher.close()
    assert sorted(record.offset for record in done) == [0, 1, 2]
    assert all(method == "view" for method, _ in client.requests)


# --- factory and envelope ------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "kind"), [("batch", BatchDispatcher), ("single", SingleDispatcher)])
def test_the_factory_picks_the_dispatcher_of_the_configured_mode(mode: str, kind: type) -> None:
    args = dispatcher_args(lambda record: None)
    dispatcher = make_dispatcher(GatedClient(), DeliveryConfig(mode=mode), **args)  # type: ignore[arg-type]
    assert type(dispatcher) is kind


@pytest.mark.parametrize("method", SINGLE_METHODS)
def test_an_envelope_is_the_method_wrapping_the_body_and_gives_the_same_body_back(method: str) -> None:
    body = {"sessionExternalId": 's-ü"1', "items": [{"productId": 7, "price": 1.5}], "stockId": None}
    call = TrackingCall("demo", method, body)  # type: ignore[arg-type]
    encoded = envelopes.encode(call)
    assert orjson.loads(encoded) == {method: body}
    assert envelopes.bare(method, encoded) == orjson.dumps(body)
    assert orjson.loads(envelopes.batch([encoded, encoded])) == [{method: body}, {method: body}]
