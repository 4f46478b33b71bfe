"""The dead-letter guard and the circuit breaker: the two brakes on systemic faults."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from consumer.breaker import CircuitBreaker
from consumer.config import DeadLetterConfig
from consumer.guard import DeadLetterGuard


def guard(ratio: float = 0.5, window: int = 100, minimum: int = 10) -> DeadLetterGuard:
    return DeadLetterGuard(
        DeadLetterConfig(max_ratio=ratio, window_records=window, min_dead_lettered=minimum)
    )


def test_a_few_bad_records_in_normal_traffic_never_trip_the_guard() -> None:
    brake = guard()
    for i in range(10_000):
        dead = i % 50 == 0  # 2% bad, far more than a healthy topic has
        assert not (dead and brake.would_trip())
        brake.note(dead)


def test_a_run_of_failures_trips_the_guard_once_the_minimum_is_reached() -> None:
    brake = guard(minimum=10)
    for _ in range(100):
        brake.note(False)
    tripped_after = None
    for count in range(1, 200):
        if brake.would_trip():
            tripped_after = count
            break
        brake.note(True)
    # The window holds 100: the share passes half after 51 failures, and the minimum of 10 is long met.
    assert tripped_after == 51


def test_the_minimum_keeps_a_quiet_topic_from_tripping_on_its_first_bad_records() -> None:
    brake = guard(minimum=10)
    for _ in range(9):
        assert not brake.would_trip()
        brake.note(True)
    assert brake.would_trip(), "the tenth failure in a row, all of the window: trip"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_the_threshold_and_lets_one_probe_through_at_growing_intervals() -> None:
    clock = FakeClock()
    changes: list[str] = []
    breaker = CircuitBreaker(
        "demo",
        threshold=3,
        probe_base_s=1.0,
        probe_cap_s=4.0,
        clock=clock,
        on_change=lambda shop, state: changes.append(f"{shop}:{state}"),
    )

    async def scenario() -> None:
        for _ in range(3):
            assert await breaker.admit() is False  # closed: calls go, none is a probe
            breaker.record(transient=True, probe=False)
        assert breaker.state == "open"
        assert changes == ["demo:open"]
        for interval in (1.0, 2.0, 4.0, 4.0):  # doubling, capped
            clock.now += interval
            assert await breaker.admit() is True, "the one probe"
            breaker.record(transient=True, probe=True)
        clock.now += 4.0
        assert await breaker.admit() is True
        breaker.record(transient=False, probe=True)
        assert breaker.state == "closed"
        assert await breaker.admit() is False

    asyncio.run(scenario())
    assert changes == ["demo:open", "demo:closed"], "each state change reported once"
    assert breaker.probes == 5


def test_while_open_other_callers_wait_for_the_probe_to_close_the_breaker() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("demo", threshold=1, probe_base_s=0.0001, probe_cap_s=0.0001, clock=clock)

    async def scenario() -> list[bool]:
        breaker.record(transient=True, probe=False)
        clock.now += 1
        probe = await breaker.admit()
        waiters = [asyncio.create_task(breaker.admit()) for _ in range(5)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters), "nobody else goes while the probe is out"
        breaker.record(transient=False, probe=probe)
        return [probe, *await asyncio.gather(*waiters)]

    results = asyncio.run(scenario())
    assert results == [True, False, False, False, False, False]


@given(st.lists(st.booleans(), max_size=300), st.integers(min_value=0, max_value=250))
def test_counting_a_batch_of_deliveries_at_once_equals_counting_them_one_by_one(
    history: list[bool], batch: int
) -> None:
    one, many = guard(window=100), guard(window=100)
    for dead in history:
        one.note(dead)
        many.note(dead)
    for _ in range(batch):
        one.note(False)
    many.note_delivered(batch)
    assert (many.ratio, many.would_trip()) == (one.ratio, one.would_trip())
