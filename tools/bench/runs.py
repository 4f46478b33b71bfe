"""One measured run of one contender: start it, cut its window out of the middle, stop it.

Every run gets a fresh consumer group (so it reads the backlog from the start), a fresh log file and a reset
emulator; nothing carries over from one run to the next but the backlog itself.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tools.bench.child import read_result
from tools.bench.contenders import Child, start_program, start_relay, write_relay_config
from tools.bench.measure import POLL_S, Window, measure_window
from tools.bench.stack import BenchError, Emulator, Topics
from tools.bench.workload import Workload


@dataclass(frozen=True)
class Sizes:
    """How big each part of a run is: ``(warm-up, window)`` pairs count events at the emulator."""

    records: int
    repeats: int
    batch: tuple[int, int]
    single: tuple[int, int]
    latency: tuple[int, int]
    rate_warmup: int
    rate_seconds: float
    #: A backlog drained under the rate limit (batch mode): events at the emulator, as ``batch``.
    backlog_rate: tuple[int, int]
    #: End-to-end latency at a steady rate: seconds of flow before the window, and the window's length.
    e2e_warmup_s: float
    e2e_window_s: float
    #: The longest the warm-up waits for the relay to catch up with the stream before the window starts.
    e2e_catch_up_s: float
    naive: tuple[int, int]
    arroyo: tuple[int, int]
    arroyo_batch: tuple[int, int]
    #: Extra rows that explain rather than answer a target (the intake stage alone, arroyo in batches).
    extras: bool
    profile_seconds: float
    #: The longest any one run may take: every window is sized to close well within it.
    run_deadline_s: float


#: About 15 minutes on a 2-core machine, backlog production and profiles included.
FULL: Final = Sizes(
    records=1_000_000,
    repeats=3,
    batch=(30_000, 300_000),
    single=(5_000, 40_000),
    latency=(1_000, 12_000),
    rate_warmup=150,
    rate_seconds=10.0,
    backlog_rate=(50_000, 500_000),
    e2e_warmup_s=3.0,
    e2e_window_s=20.0,
    e2e_catch_up_s=30.0,
    naive=(100, 1_000),
    arroyo=(1_000, 8_000),
    arroyo_batch=(30_000, 200_000),
    extras=True,
    profile_seconds=8.0,
    run_deadline_s=240.0,
)
#: The smoke version: every figure's code runs, on a tiny backlog, once.
QUICK: Final = Sizes(
    records=3_000,
    repeats=1,
    batch=(300, 1_500),
    single=(100, 600),
    latency=(50, 300),
    rate_warmup=20,
    rate_seconds=1.0,
    backlog_rate=(500, 2_000),
    e2e_warmup_s=1.0,
    e2e_window_s=2.0,
    e2e_catch_up_s=5.0,
    naive=(10, 40),
    arroyo=(100, 400),
    arroyo_batch=(300, 1_500),
    extras=False,
    profile_seconds=0.0,
    run_deadline_s=40.0,
)


@dataclass(frozen=True)
class Measured:
    """A contender's rate over its window (events at the emulator, or records for the ceiling)."""

    per_s: float
    cpu_us: float
    peak_rss: int

    @classmethod
    def of(cls, window: Window) -> Measured:
        return cls(window.per_s, window.cpu_us_per_event, window.peak_rss)


@dataclass
class Bench:
    """Everything a figure needs: the broker, the backlog, the emulator, where files go, the sizes."""

    bootstrap: str
    workload: Workload
    emulator: Emulator
    run_dir: Path
    sizes: Sizes
    #: ``{section: {key: value}}`` applied to every relay configuration (``--set``).
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Where a figure creates a topic of its own (deleted with the backlog's at the end of the run).
    topics: Topics | None = None
    results: dict[str, list[Measured]] = field(default_factory=dict)
    _serial: itertools.count[int] = field(default_factory=itertools.count)

    def name(self, purpose: str) -> str:
        return f"{purpose}-{next(self._serial):03d}"

    def config(
        self,
        purpose: str,
        *,
        mode: str,
        emulator: Emulator | None = None,
        rate_limit: float | None = None,
        workload: Workload | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> tuple[Path, Path]:
        """A fresh configuration (new group) and a fresh log path for one run.

        ``settings`` are the figure's own (``{section: {key: value}}``): they define the figure, so they win
        over ``--set`` where both name a key.
        """
        name = self.name(purpose)
        overrides: dict[str, dict[str, Any]] = {k: dict(v) for k, v in self.overrides.items()}
        for section, values in (settings or {}).items():
            overrides.setdefault(section, {}).update(values)
        config = write_relay_config(
            self.run_dir / f"{name}.toml",
            bootstrap=self.bootstrap,
            workload=workload or self.workload,
            group=f"bench-{name}-{time.time_ns() % 10**9}",
            emulator_url=(emulator or self.emulator).url,
            mode=mode,
            rate_limit=rate_limit,
            overrides=overrides,
        )
        return config, self.run_dir / f"{name}.log"

    def keep(self, key: str, measured: Measured) -> Measured:
        self.results.setdefault(key, []).append(measured)
        return measured

    # --- runs ------------------------------------------------------------------------------------------

    def relay_window(
        self,
        purpose: str,
        mode: str,
        warmup_events: tuple[int, int],
        *,
        emulator: Emulator | None = None,
        rate_limit: float | None = None,
    ) -> Window:
        """Run the relay until its window closes; the emulator's events over the window."""
        emulator = emulator or self.emulator
        config, log = self.config(purpose, mode=mode, emulator=emulator, rate_limit=rate_limit)
        emulator.reset()
        with start_relay(config, self.workload, log) as relay:
            return self.window_of(emulator, relay, warmup_events)

    def program_window(self, purpose: str, module: str, warmup_events: tuple[int, int], *args: str) -> Window:
        """Run one of the child programs until its window (counted by the emulator) closes."""
        config, log = self.config(purpose, mode="single")
        self.emulator.reset()
        with start_program(purpose, module, config, self.workload, log, *args) as child:
            return self.window_of(self.emulator, child, warmup_events)

    def ceiling(self, stage: str, warmup: int, count: int) -> Measured:
        """The consume + decode loop (or the intake stage) over ``count`` records after ``warmup``."""
        return self.self_measured(
            f"ceiling-{stage}", "ceiling", *program_args(warmup=warmup, count=count, stage=stage)
        )

    def self_measured(self, purpose: str, module: str, *args: str) -> Measured:
        """Run a child program that times its own window; its ``BENCH-RESULT``: events, seconds, CPU."""
        config, log = self.config(purpose, mode="single")
        self.emulator.reset()
        command = (*args, "--deadline-s", str(self.sizes.run_deadline_s))
        with start_program(purpose, module, config, self.workload, log, *command) as child:
            child.wait(self.sizes.run_deadline_s + 30)
            result = read_result(log.read_text())
            if result is None:
                raise BenchError(f"{purpose} printed no result:\n{child.log_tail()}")
        events = result.get("events", result.get("records", 0))
        return Measured(events / result["seconds"], result["cpu_s"] / events * 1e6, 0)

    def drain(self, purpose: str, on_sample: Any) -> tuple[float, float]:
        """Run the relay in batch mode over the whole backlog; ``on_sample(progress, rss)`` every poll.

        Returns (seconds from the first accepted event to the last, CPU seconds of the relay).
        """
        config, log = self.config(purpose, mode="batch")
        self.emulator.reset()
        total = self.workload.calls
        with start_relay(config, self.workload, log) as relay:
            deadline = time.monotonic() + self.sizes.run_deadline_s
            first: float | None = None
            while True:
                accepted = self.emulator.accepted()
                now = time.monotonic()
                if accepted and first is None:
                    first = now
                on_sample(accepted / total, relay.probe.rss())
                if accepted >= total:
                    return now - (first or now), relay.probe.cpu_s()
                problem = relay.problem()
                if problem is not None:
                    raise BenchError(problem)
                if now > deadline:
                    raise BenchError(f"the relay drained {accepted:,} of {total:,} calls in time")
                time.sleep(POLL_S * 2)  # the poll interval of a deadline-bounded wait

    def window_of(self, emulator: Emulator, child: Child, warmup_events: tuple[int, int]) -> Window:
        """The emulator's events over ``child``'s window (a window can hold no more than the backlog)."""
        warmup, events = warmup_events
        return measure_window(
            emulator.accepted,
            child.probe,
            warmup=warmup,
            events=events,
            total=self.workload.calls,
            deadline_s=self.sizes.run_deadline_s,
            alive=child.problem,
        )


def program_args(**values: object) -> list[str]:
    """``--name value`` pairs for a child program."""
    return [item for key, value in values.items() for item in (f"--{key.replace('_', '-')}", str(value))]
