"""The per-shop token bucket: rate, burst, FIFO order, holds.

Time is a fake clock throughout: nothing here really waits.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from consumer.config import ShopConfig
from consumer.ratelimit import ShopRateLimiters, TokenBucket, default_burst
from consumer_dev.emulator import AdmissionBucket

pytestmark = pytest.mark.unit

EPS = 1e-9


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class VirtualTime:
    """A fake clock and a fake ``sleep`` for many concurrent waiters.

    Sleepers queue by wake-up time; :meth:`run` wakes them one at a time, earliest first, setting the clock
    to each one's wake-up time, and lets the woken task run to its next sleep before waking another. So each
    task sees exactly the virtual time at which it would have woken.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + delay, self._seq, future))
        self._seq += 1
        await future

    async def run(self, tasks: Sequence[asyncio.Task[None]], until: float = math.inf) -> None:
        """Wake sleepers in time order until every task is done or the next wake-up is after ``until``."""
        await _let_tasks_run()
        while not all(task.done() for task in tasks):
            assert self._sleepers, "tasks are blocked on something other than the virtual sleep"
            if self._sleepers[0][0] > until:
                self.now = until
                return
            when, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, when)
            future.set_result(None)
            await _let_tasks_run()


async def _let_tasks_run() -> None:
    """Yield to the loop until the woken task has reached its next await (a handful of turns is plenty)."""
    for _ in range(5):
        await asyncio.sleep(0)


def send_times(bucket: TokenBucket, clock: FakeClock, arrivals: Sequence[float]) -> list[float]:
    """When each caller arriving at ``arrivals`` (ascending) may send, per ``reserve``."""
    times = []
    for arrival in arrivals:
        clock.now = arrival
        times.append(arrival + bucket.reserve())
    return times


def most_in_any_window(times: Sequence[float], window: float) -> int:
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while ordered[start] < t - window + EPS:
            start += 1
        best = max(best, end - start + 1)
    return best


# --- rate and burst ----------------------------------------------------------------------------------


def test_a_full_bucket_lets_a_burst_go_at_once_then_spaces_calls_by_one_over_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=3, clock=clock)

    waits = [bucket.reserve() for _ in range(6)]

    assert waits == pytest.approx([0, 0, 0, 0.1, 0.2, 0.3])


def test_the_next_slot_is_when_a_reservation_would_go_and_looking_takes_none() -> None:
    clock = FakeClock(1.0)
    bucket = TokenBucket(rate=10, burst=2, clock=clock)
    assert bucket.next_slot() == pytest.approx(1.0), "a full bucket: now"
    for _ in range(2):
        bucket.reserve()
    slot = bucket.next_slot()
    assert slot == pytest.approx(1.1), "the burst used: one interval on"
    assert bucket.next_slot() == slot, "looking took no slot"
    assert clock() + bucket.reserve() == pytest.approx(slot), "the next reservation goes at that slot"
    bucket.hold_until(5.0)
    held = bucket.next_slot()
    assert held >= 5.0, "nothing before a hold's deadline"
    assert clock() + bucket.reserve() == pytest.approx(held), "and the queue moved back with it"


def test_default_burst_is_a_tenth_of_a_second_of_calls_but_at_least_one() -> None:
    assert TokenBucket(50).burst == 5
    assert TokenBucket(3).burst == 1
    assert default_burst(0.5) == 1


def test_the_bucket_refills_at_the_rate_while_idle_up_to_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=3, clock=clock)
    for _ in range(3):
        bucket.reserve()

    clock.now = 0.2  # two tokens back
    assert [bucket.reserve() for _ in range(3)] == pytest.approx([0, 0, 0.1])

    clock.now = 100.0  # a long pause refills to the burst, not beyond
    assert [bucket.reserve() for _ in range(4)] == pytest.approx([0, 0, 0, 0.1])


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=1, max_value=500),
    burst=st.integers(min_value=1, max_value=20),
    gaps=st.lists(st.floats(min_value=0, max_value=0.2), min_size=1, max_size=300),
)
def test_no_window_ever_holds_more_than_burst_plus_rate_times_its_length(
    rate: float, burst: int, gaps: list[float]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=rate, burst=burst, clock=clock)
    arrivals = [sum(gaps[: i + 1]) for i in range(len(gaps))]

    times = send_times(bucket, clock, arrivals)

    assert all(sent >= arrived for sent, arrived in zip(times, arrivals, strict=True))
    for window in (1 / rate, 0.5, 1.0, 3.0):
        assert most_in_any_window(times, window) <= burst + math.floor(rate * window + EPS)


def test_a_saturated_bucket_holds_its_rate_over_a_long_window() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=50, clock=clock)

    times = send_times(bucket, clock, [0.0] * 1000)

    # The burst of 5 goes at once, the other 995 at 50/s: the last one at 995/50 = 19.9 s.
    assert times[-1] == pytest.approx(19.9)
    assert sum(1 for t in times if t < 10.0) == 5 + 500


def test_slots_are_handed_out_in_call_order() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=20, burst=2, clock=clock)

    times = send_times(bucket, clock, [0.0, 0.0, 0.01, 0.01, 0.02, 0.5, 0.5])

    assert times == sorted(times)


# --- acquire: concurrent callers ---------------------------------------------------------------------


async def test_concurrent_callers_are_served_first_come_first_served_at_the_rate() -> None:
    time = VirtualTime()
    bucket = TokenBucket(rate=10, burst=2, clock=time.clock)
    served: list[tuple[int, float]] = []

    async def caller(index: int) -> None:
        await bucket.acquire(time.sleep)
        served.append((index, time.now))

    tasks = [asyncio.create_task(caller(i)) for i in range(8)]
    await time.run(tasks)

    assert [index for index, _ in served] == list(range(8))
    assert [at for _, at in served] == pytest.approx([0, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


async def test_acquire_does_not_sleep_when_a_token_is_free() -> None:
    bucket = AdmissionBucket(rate=10, burst=1, clock=FakeClock())
    sleeps: list[float] = []

    async def record(delay: float) -> None:
        sleeps.append(delay)

    await bucket.acquire(record)

    assert sleeps == []


# --- try_acquire: the server's side (the emulator's bucket) -------------------------------------------------


def test_try_acquire_takes_a_free_token_and_otherwise_says_how_long_without_booking() -> None:
    clock = FakeClock()
    bucket = AdmissionBucket(rate=4, burst=1, clock=clock)

    assert bucket.try_acquire() == 0
    assert bucket.try_acquire() == pytest.approx(0.25)
    assert bucket.try_acquire() == pytest.approx(0.25)  # refusals book nothing
    clock.now = 0.25
    assert bucket.try_acquire() == 0


# --- holds -------------------------------------------------------------------------------------------


def test_a_hold_grants_nothing_before_its_deadline_and_then_restarts_without_a_burst() -> None:
    clock = FakeClock()
    bucket = AdmissionBucket(rate=10, burst=5, clock=clock)

    bucket.hold_until(3.0)
    times = send_times(bucket, clock, [0.0, 1.0, 2.0, 2.5])

    assert times == pytest.approx([3.0, 3.1, 3.2, 3.3])
    assert bucket.held_until == 3.0
    assert bucket.try_acquire() == pytest.approx(0.9)  # still at 2.5: the next slot is at 3.4


def test_a_hold_with_an_earlier_deadline_changes_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=1, clock=clock)
    bucket.hold_until(5.0)

    bucket.hold_until(2.0)
    bucket.hold_until(5.0)  # the same Retry-After seen twice

    assert bucket.reserve() == pytest.approx(5.0)
    assert bucket.reserve() == pytest.approx(5.1)


async def test_callers_already_waiting_when_a_hold_arrives_wait_it_out_in_order_and_spaced() -> None:
    time = VirtualTime()
    bucket = TokenBucket(rate=10, burst=1, clock=time.clock)
    served: list[tuple[int, float]] = []

    async def caller(index: int) -> None:
        await bucket.acquire(time.sleep)
        served.append((index, time.now))

    tasks = [asyncio.create_task(caller(i)) for i in range(5)]
    await time.run(tasks, until=0.15)  # callers 0 and 1 went at 0.0 and 0.1; 2, 3, 4 wait for 0.2-0.4
    bucket.hold_until(2.15)  # a Retry-After of 2 s arrives at 0.15
    late = asyncio.create_task(caller(5))
    await time.run([*tasks, late])

    assert [index for index, _ in served] == [0, 1, 2, 3, 4, 5]
    assert [at for _, at in served] == pytest.approx([0.0, 0.1, 2.2, 2.3, 2.4, 2.5])


def test_an_unlimited_bucket_never_waits_but_can_be_held() -> None:
    clock = FakeClock()
    bucket = AdmissionBucket(rate=math.inf, clock=clock)

    assert [bucket.reserve() for _ in range(1000)] == [0.0] * 1000
    bucket.hold_until(1.5)
    assert bucket.reserve() == pytest.approx(1.5)
    assert bucket.try_acquire() == pytest.approx(1.5)


@pytest.mark.parametrize(("rate", "burst"), [(0, None), (-1, None), (math.nan, None), (10, 0.5)])
def test_impossible_rates_and_bursts_are_refused(rate: float, burst: float | None) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(rate, burst)


# --- per shop ----------------------------------------------------------------------------------------


def test_each_shop_gets_its_own_bucket_at_its_configured_rate() -> None:
    clock = FakeClock()
    shops = {
        "a": ShopConfig(partner_id="pa", api_key=SecretStr("ka")),
        "b": ShopConfig(partner_id="pb", api_key=SecretStr("kb"), rate_limit=2),
        "c": ShopConfig(partner_id="pc", api_key=SecretStr("kc"), rate_limit=None),
    }

    limiters = ShopRateLimiters(shops, clock=clock)

    assert set(limiters) == {"a", "b", "c"}
    assert len(limiters) == 3
    assert limiters["a"].rate == 50  # ShopConfig's default, Retail Rocket's published limit
    assert limiters["b"].rate == 2
    assert limiters["c"].rate == math.inf
    for _ in range(5):
        limiters["a"].reserve()
    assert limiters["a"].reserve() > 0  # shop a's burst is spent...
    assert limiters["b"].reserve() == 0  # ...which does not touch shop b
    with pytest.raises(KeyError):
        limiters["unknown"]
    assert "ka" not in repr(limiters)


async def test_callers_woken_late_and_at_once_by_a_busy_loop_still_leave_at_the_rate() -> None:
    time = VirtualTime()
    bucket = TokenBucket(rate=10, burst=2, clock=time.clock)
    served: list[float] = []

    async def caller() -> None:
        await bucket.acquire(time.sleep)
        served.append(time.now)

    tasks = [asyncio.create_task(caller()) for _ in range(12)]
    await time.run(tasks, until=0.05)  # two went at once (the burst); ten sleep until 0.1 ... 1.0
    time.now = 3.0  # the loop was stuck for three seconds: every booked slot is in the past now
    await time.run(tasks)

    assert len(served) == 12
    assert most_in_any_window(served, 0.1 - EPS) <= 2, "never more than the burst within 1/rate"
    late = [t for t in served if t >= 3.0]
    assert late == pytest.approx([3.0 + 0.1 * i for i in range(len(late))][: len(late)], abs=0.101)
