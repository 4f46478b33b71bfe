"""Per-shop rate limiting: keep each shop's calls under Retail Rocket's requests-per-second limit.

The bucket is a token bucket written as a schedule (the "generic cell rate algorithm"): instead of
counting tokens it remembers ``_tat``, the time at which the bucket is full again if no one takes a token.
A caller that finds no free token does not poll or spin: :meth:`TokenBucket.reserve` books the next free
slot at once and says how long to wait for it. Slots are handed out in call order, so concurrent callers are
served first come, first served, and the bucket needs no lock, no queue and no task.

Time comes from an injected ``clock`` (``time.monotonic`` by default) so tests drive the bucket with a fake
clock instead of sleeping.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping

from consumer.config import ShopConfig

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


def default_burst(rate: float) -> float:
    """How many calls may go at once after an idle spell: a tenth of a second's worth, at least one.

    A small burst keeps a shop's first calls after a pause fast without letting a backlog hit the API with
    more than a fraction of a second's allowance at once.
    """
    return max(1.0, rate / 10)


class TokenBucket:
    """``rate`` calls per second on average, at most ``burst`` at once; ``math.inf`` means no limit.

    ``hold_until`` adds a deadline before which no call is allowed at all (a ``Retry-After`` for the whole
    shop); after it the bucket restarts empty, so the calls that waited go one per ``1/rate`` instead of in
    a burst.
    """

    __slots__ = (
        "_clock",
        "_held_until",
        "_interval",
        "_released_tat",
        "_shift",
        "_start_empty",
        "_tat",
        "_tolerance",
        "burst",
        "rate",
    )

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Clock = time.monotonic,
        *,
        start_full: bool = True,
    ) -> None:
        """``start_full=False``: the schedule starts empty at its first slot (see :meth:`_reserve_at`)."""
        if not rate > 0:
            raise ValueError(f"rate must be greater than 0, got {rate}")
        self.rate = rate
        self.burst = default_burst(rate) if burst is None else burst
        if not self.burst >= 1:
            raise ValueError(f"burst must be at least 1, got {self.burst}")
        self._clock = clock
        self._interval = 0.0 if math.isinf(rate) else 1.0 / rate
        # How far ahead of ``now`` the schedule may run before a caller has to wait: burst - 1 slots.
        self._tolerance = 0.0 if math.isinf(rate) else (self.burst - 1.0) * self._interval
        self._tat = -math.inf
        self._start_empty = not start_full
        # The same schedule, kept on the times callers were actually let go (see acquire).
        self._released_tat = -math.inf
        self._held_until = -math.inf
        # Total delay added by holds so far; a waiter compares it with its own copy to see a hold it missed.
        self._shift = 0.0

    def reserve(self) -> float:
        """Take the next slot now and return the seconds to wait before using it (0.0: go at once).

        The slot is taken even when the caller has to wait, so later callers queue behind it; callers are
        served in the order they called. A hold set after this call does not move the returned wait; use
        :meth:`acquire` to wait in a way that honours later holds.
        """
        now = self._clock()
        return self._reserve_at(now) - now

    async def acquire(self, sleep: Sleep = asyncio.sleep) -> None:
        """Wait for a slot; if the shop is held while waiting, wait out the hold too (keeping the order)."""
        send_at = self._reserve_at(self._clock())
        shift = self._shift
        while True:
            if self._shift != shift:
                # A hold arrived while this caller waited: move its slot by the same amount as every other
                # pending slot, so the queue keeps its order and spacing, and never before the deadline.
                send_at = max(send_at + self._shift - shift, self._held_until)
                shift = self._shift
            delay = send_at - self._clock()
            if delay <= 0:
                delay = self._release()
                if delay <= 0:
                    return
            await sleep(delay)

    def _release(self) -> float:
        """Let a caller go only if the calls actually let go keep to the rate and burst; else the wait.

        Booked slots are spaced correctly, but a busy event loop can wake many of their holders late and at
        once; they would then all go together, a burst the API answers with 429. Checking the real release
        times too keeps the calls that leave within the limit, whatever the loop's delays.
        """
        now = self._clock()
        start = max(self._released_tat, now)
        wait = start - self._tolerance - now
        if wait > 0:
            return wait
        self._released_tat = start + self._interval
        return 0.0

    def hold_until(self, deadline: float) -> None:
        """Grant no slot before ``deadline`` (a time on this bucket's clock); the queue moves back with it.

        Holding is idempotent and only ever extends: an earlier deadline than the current one is ignored.
        """
        now = self._clock()
        delay = deadline - max(now, self._held_until)
        if delay <= 0:
            return
        self._held_until = deadline
        self._shift += delay
        # Push the schedule back by the hold, and at least so far that the bucket is empty at the deadline:
        # the first call after it goes at ``deadline``, the next one ``1/rate`` later.
        self._tat = max(self._tat + delay, deadline + self._tolerance)

    def next_slot(self) -> float:
        """When a call that asked now would be let go (on the bucket's clock), without taking the slot."""
        now = self._clock()
        if self._start_empty:
            return max(now, self._held_until)
        return max(now, max(self._tat, now) - self._tolerance, self._held_until)

    @property
    def held_until(self) -> float:
        """The current hold's deadline on the bucket's clock (``-inf`` when the bucket was never held)."""
        return self._held_until

    def _reserve_at(self, now: float) -> float:
        if self._start_empty:
            # The first slot of a client: a full bucket would let ``burst`` calls go at once, and at start-up
            # each of them opens a new connection; connections that complete together deliver those calls and
            # the next scheduled ones in one bunch, which the API counts as a burst over its limit (the
            # benchmark's rate-limit figure drew 429s at start-up from exactly this, none without the burst).
            self._start_empty = False
            self._tat = max(self._tat, now + self._tolerance)
        start = max(self._tat, now)
        self._tat = start + self._interval
        return max(now, start - self._tolerance, self._held_until)

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate}, burst={self.burst})"


class ShopRateLimiters(Mapping[str, TokenBucket]):
    """One :class:`TokenBucket` per shop key, built from ``ShopConfig.rate_limit``.

    A shop whose ``rate_limit`` is ``None`` still gets a bucket, an unlimited one, so that it can be held (a
    ``Retry-After`` applies to every shop).
    """

    def __init__(self, shops: Mapping[str, ShopConfig], clock: Clock = time.monotonic) -> None:
        self._buckets = {
            key: TokenBucket(
                math.inf if shop.rate_limit is None else shop.rate_limit, clock=clock, start_full=False
            )
            for key, shop in shops.items()
        }

    def __getitem__(self, shop: str) -> TokenBucket:
        return self._buckets[shop]

    def __iter__(self) -> Iterator[str]:
        return iter(self._buckets)

    def __len__(self) -> int:
        return len(self._buckets)

    def __repr__(self) -> str:
        return f"ShopRateLimiters({self._buckets!r})"
