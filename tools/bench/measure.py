"""Measuring: a window of steady-state throughput and CPU, and the median and spread of repeats.

A throughput figure is never "records over the whole run": start-up, the group join, the first schema fetch
and the last stragglers would all be in it. Instead a window is cut out of the middle of a run: the clock and
the process's CPU time are read when the emulator has accepted ``warmup`` events, and again ``calls`` events
later. The emulator's counter is read over loopback HTTP in about a millisecond, and the time of a reading
is taken as the middle of that request.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import psutil

from tools.bench.stack import BenchError

#: How often a window's end is looked for. The rate is computed from the counts actually read and the
#: times they were read at, so polling more often would not make it more exact, only cost more CPU.
POLL_S: Final = 0.05


@dataclass(frozen=True)
class Stat:
    """Repeats of one quantity: the median is the figure, the spread says how far to trust it."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("a statistic needs at least one value")
        return cls(tuple(values))

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.05 means the repeats lie within 5 % of each other."""
        return (self.high - self.low) / self.median if self.median else 0.0

    def map(self, transform: Callable[[float], float]) -> Stat:
        return Stat(tuple(transform(value) for value in self.values))


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Stat:
    """Per-repeat ratios: a figure divided by the reference measured next to it."""
    return Stat.of([n / d if d else 0.0 for n, d in zip(numerators, denominators, strict=True)])


class Probe:
    """CPU time and resident memory of one process (all its threads: librdkafka's count too)."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._cpu = 0.0
        self._rss = 0

    def cpu_s(self) -> float:
        """CPU seconds so far (the last value read, once the process is gone)."""
        try:
            times = self._process.cpu_times()
        except psutil.Error:
            return self._cpu
        self._cpu = float(times.user + times.system)
        return self._cpu

    def rss(self) -> int:
        """Resident bytes now (the last value read, once the process is gone)."""
        with contextlib.suppress(psutil.Error):
            self._rss = int(self._process.memory_info().rss)
        return self._rss


@dataclass(frozen=True)
class Window:
    """What happened between two readings: events accepted, wall time, the process's CPU time."""

    events: int
    seconds: float
    cpu_s: float
    peak_rss: int

    @property
    def per_s(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_us_per_event(self) -> float:
        return self.cpu_s / self.events * 1e6


def measure_window(
    accepted: Callable[[], int],
    probe: Probe,
    *,
    warmup: int,
    events: int,
    total: int,
    deadline_s: float,
    alive: Callable[[], str | None],
) -> Window:
    """Wait for ``warmup`` accepted events, then measure the next ``events``.

    ``total`` is all the backlog can give: a window that would need more closes when it is reached, and a
    contender so fast that the whole backlog went through between two readings (the smoke version's tiny
    backlog) is measured from its start instead. ``alive`` returns ``None`` while the process under test
    runs, and what went wrong when it died. Raises BenchError when the window does not close within
    ``deadline_s``.
    """
    started = time.monotonic()
    deadline = started + deadline_s
    start = _reading_at_least(accepted, min(warmup, total), deadline, alive, probe)
    if start[1] >= total:
        start = (started, 0, 0.0)  # all of it before the first look: the run as a whole is the window
    peak = probe.rss()
    target = min(start[1] + events, total)
    while True:
        now, count = _read(accepted)
        if count >= target:
            cpu = probe.cpu_s()
            return Window(count - start[1], now - start[0], cpu - start[2], max(peak, probe.rss()))
        peak = max(peak, probe.rss())
        _check(alive, deadline, f"{target:,} accepted events (got {count:,})")
        time.sleep(POLL_S)  # the poll interval of a deadline-bounded wait


def _reading_at_least(
    accepted: Callable[[], int],
    count: int,
    deadline: float,
    alive: Callable[[], str | None],
    probe: Probe,
) -> tuple[float, int, float]:
    while True:
        now, seen = _read(accepted)
        if seen >= count:
            return now, seen, probe.cpu_s()
        _check(alive, deadline, f"{count:,} accepted events to warm up (got {seen:,})")
        time.sleep(POLL_S)


def _read(accepted: Callable[[], int]) -> tuple[float, int]:
    before = time.monotonic()
    count = accepted()
    return (before + time.monotonic()) / 2, count


def _check(alive: Callable[[], str | None], deadline: float, what: str) -> None:
    problem = alive()
    if problem is not None:
        raise BenchError(problem)
    if time.monotonic() > deadline:
        raise BenchError(f"timed out waiting for {what}")
