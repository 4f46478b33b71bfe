"""One function per figure of the report; each measures its figure and its reference in turn, per repeat.

A figure returns :class:`Figure`: the rows of the summary table (one per target, keyed so that the smoke test
can find each) and the detail lines (every repeat's value, what was configured). Rates of the relay are in
*events*: for batch mode records per second (the emulator's calls divided by the backlog's calls per record,
1.008), so that they compare with the ceiling, which counts records; for single mode and the latency figure
the calls the emulator accepted, so that they compare with the bare client and the latency bound.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from consumer.config import DeliveryConfig, TrackingConfig, load_settings
from consumer.contract import BATCH_METHOD
from tools.bench.contenders import start_relay
from tools.bench.measure import POLL_S, Stat, Window, measure_window, ratios
from tools.bench.runs import Bench, Measured, program_args
from tools.bench.stack import BenchError, Emulator, child_env
from tools.bench.workload import SteadyProducer

#: Batch mode against the bare prototype of the flow, run beside it: the relay's guarantees may cost 10 %.
BATCH_TARGET_SHARE: Final = 0.90
#: Batch mode's CPU per event against consume + decode alone.
CPU_TARGET_TIMES: Final = 2.0
SINGLE_TARGET_SHARE: Final = 0.80
LATENCY_MS: Final = 20.0
LATENCY_TARGET_SHARE: Final = 0.80
RATE_LIMIT: Final = 50.0
RATE_TOLERANCE: Final = 0.02
#: "Under 200 MB", in bytes (the report states memory in MiB: 200 MB is 191 MiB).
MEMORY_LIMIT: Final = 200_000_000
#: "Flat": the peak of the second half of the drain is within this share of the first half's peak.
FLAT_TOLERANCE: Final = 0.10


@dataclass(frozen=True)
class Row:
    """One line of the summary table."""

    key: str
    figure: str
    measured: str
    reference: str
    ratio: str
    target: str
    result: str


@dataclass
class Figure:
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


FigureFunction = Callable[[Bench], Figure]


# --- formatting ---------------------------------------------------------------------------------------


#: The report's typography, written as escapes so the source stays ASCII.
DASH: Final = "\u2013"
TIMES: Final = "\u00d7"


def rate(stat: Stat, unit: str = "events/s") -> str:
    """``101,234 events/s (98,000-104,100)``: the median, then the range of the repeats."""
    if len(stat.values) == 1:
        return f"{stat.median:,.0f} {unit}"
    return f"{stat.median:,.0f} {unit} ({stat.low:,.0f}{DASH}{stat.high:,.0f})"


def share(stat: Stat) -> str:
    if len(stat.values) == 1:
        return f"{stat.median:.0%}"
    return f"{stat.median:.0%} ({stat.low:.0%}{DASH}{stat.high:.0%})"


def times(stat: Stat) -> str:
    if len(stat.values) == 1:
        return f"{stat.median:.1f}{TIMES}"
    return f"{stat.median:.1f}{TIMES} ({stat.low:.1f}{DASH}{stat.high:.1f})"


def micros(stat: Stat) -> str:
    if len(stat.values) == 1:
        return f"{stat.median:.1f} µs"
    return f"{stat.median:.1f} µs ({stat.low:.1f}{DASH}{stat.high:.1f})"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _values(measured: Sequence[Measured], attribute: str = "per_s") -> list[float]:
    return [getattr(m, attribute) for m in measured]


def _repeats(values: Sequence[float], what: str, unit: str = "/s") -> str:
    return f"{what}: " + ", ".join(f"{v:,.0f}{unit}" for v in values)


# --- 1. batch mode against the bare prototype, with the consume + decode ceiling beside it -------------


#: What the bare prototype is, for the details: the reference is only as fair as what it leaves out.
PROTOTYPE: Final = (
    "bare prototype (`tools/bench/prototype.py`): consume, decode, translate, one `visitorEvents` POST per "
    "shop and `consume()` batch, 16 in flight; no per-visitor order, retries, dead letters or rate limit"
)


def batch_throughput(bench: Bench) -> Figure:
    """Batch mode, one process, rate limit off, against the bare prototype of the flow run beside it.

    The consume + decode loop (the pipeline's ceiling) runs in the same repeats and is stated beside: the
    prototype answers "what do the relay's guarantees cost", the ceiling "how far is Python from the floor".
    """
    per_record = bench.workload.calls_per_record
    warmup, events = bench.sizes.batch
    relay: list[Measured] = []
    ceiling: list[Measured] = []
    intake: list[Measured] = []
    prototype: list[Measured] = []
    for _ in range(bench.sizes.repeats):
        ceiling.append(bench.keep("ceiling", bench.ceiling("decode", warmup, events)))
        if bench.sizes.extras:
            intake.append(bench.keep("intake", bench.ceiling("intake", warmup, events)))
        records = 2 * (warmup + events) + 1000  # a bound only: the run is stopped once its window closes
        window = bench.program_window("prototype", "prototype", bench.sizes.batch, f"--records={records}")
        prototype.append(
            bench.keep("prototype", Measured(window.per_s / per_record, window.cpu_us_per_event, 0))
        )
        window = bench.relay_window("batch", "batch", bench.sizes.batch)
        relay.append(
            bench.keep(
                "batch",
                Measured(
                    window.per_s / per_record,
                    window.cpu_s / window.events * per_record * 1e6,
                    window.peak_rss,
                ),
            )
        )
    ours, bare, floor = Stat.of(_values(relay)), Stat.of(_values(prototype)), Stat.of(_values(ceiling))
    ratio = ratios(ours.values, bare.values)
    figure = Figure()
    figure.rows.append(
        Row(
            "batch",
            "events/s end to end, `batch` mode, one process",
            rate(ours),
            f"the bare prototype: {rate(bare)}; the ceiling (consume + decode only): {rate(floor)}",
            f"{share(ratio)} of the prototype; {share(ratios(ours.values, floor.values))} of the ceiling",
            f"≥ {BATCH_TARGET_SHARE:.0%} of the prototype; the ceiling's rate stated",
            verdict(ratio.median >= BATCH_TARGET_SHARE),
        )
    )
    figure.details += [
        _repeats(_values(relay), "relay, batch mode (records/s)"),
        _repeats(_values(prototype), PROTOTYPE + " (records/s)"),
        _repeats(_values(ceiling), "consume + decode (records/s)"),
        f"window: {events:,} calls after {warmup:,} (relay, prototype); {events:,} records after "
        f"{warmup:,} (ceiling)",
        _peak(relay, "the relay's peak resident memory"),
    ]
    figure.rows.append(
        Row(
            "batch-ceiling",
            "(explains) the pipeline's ceiling: consume + decode alone, one process",
            rate(floor, "records/s"),
            f"ours, batch: {rate(ours)}; the bare prototype: {rate(bare)}",
            f"ours at {share(ratios(ours.values, floor.values))} of it; the prototype at "
            f"{share(ratios(bare.values, floor.values))}",
            "—",
            "stated",
        )
    )
    if intake:
        stat = Stat.of(_values(intake))
        figure.rows.append(
            Row(
                "batch-intake",
                "(explains) the relay's intake stage alone: consume, decode, translate, encode",
                rate(stat, "records/s"),
                f"consume + decode only: {rate(floor)}",
                share(ratios(stat.values, floor.values)),
                "—",
                "stated",
            )
        )
        figure.details.append(_repeats(_values(intake), "intake stage alone (records/s)"))
    return figure


# --- 2. single mode against a bare aiohttp client ----------------------------------------------------


def single_throughput(bench: Bench) -> Figure:
    """Single mode, rate limit off, against a bare aiohttp client sending the same requests."""
    warmup, events = bench.sizes.single
    concurrency = _single_concurrency()
    relay: list[Measured] = []
    bare: list[Measured] = []
    for _ in range(bench.sizes.repeats):
        arguments = program_args(warmup=warmup, count=events, concurrency=concurrency)
        bare.append(bench.keep("bare", bench.self_measured("bare", "bare_client", *arguments)))
        relay.append(
            bench.keep("single", Measured.of(bench.relay_window("single", "single", bench.sizes.single)))
        )
    ours, reference = Stat.of(_values(relay)), Stat.of(_values(bare))
    ratio = ratios(ours.values, reference.values)
    figure = Figure()
    figure.rows.append(
        Row(
            "single",
            "events/s end to end, `single` mode, one process, rate limit off",
            rate(ours),
            f"bare aiohttp client, same requests, {concurrency} connections: {rate(reference)}",
            share(ratio),
            f"≥ {SINGLE_TARGET_SHARE:.0%} of the bare client",
            verdict(ratio.median >= SINGLE_TARGET_SHARE),
        )
    )
    figure.details += [
        _repeats(_values(relay), "relay, single mode (calls/s)"),
        _repeats(_values(bare), "bare aiohttp client (calls/s)"),
        f"window: {events:,} calls after {warmup:,}; {concurrency} calls in flight in both",
        _peak(relay, "the relay's peak resident memory"),
    ]
    return figure


def _peak(measured: Sequence[Measured], what: str) -> str:
    return f"{what}: " + ", ".join(f"{m.peak_rss / 2**20:.0f} MiB" for m in measured)


def _single_concurrency() -> int:
    """Calls the relay has in flight in single mode: its worker pool, capped by its connection pool."""
    return min(DeliveryConfig().max_concurrent_calls, TrackingConfig().concurrency)


# --- 3. CPU time per event ---------------------------------------------------------------------------


def cpu_per_event(bench: Bench) -> Figure:
    """Process CPU time (every thread) per event, from the runs of figures 1 and 2."""
    figure = Figure()
    results = bench.results
    if "batch" not in results or "ceiling" not in results:
        return figure
    batch, ceiling = (
        Stat.of(_values(results["batch"], "cpu_us")),
        Stat.of(_values(results["ceiling"], "cpu_us")),
    )
    measured = f"batch: {micros(batch)}"
    if "single" in results:
        measured += f"; single: {micros(Stat.of(_values(results['single'], 'cpu_us')))}"
    reference = f"consume + decode: {micros(ceiling)}"
    if "intake" in results:
        reference += f"; intake stage: {micros(Stat.of(_values(results['intake'], 'cpu_us')))}"
    # CPU time is read in clock ticks (10 ms): a window shorter than a few ticks (the smoke run's) reads 0,
    # which must not pass for a met target.
    read = min(batch.values) > 0 and min(ceiling.values) > 0
    ratio = ratios(batch.values, ceiling.values) if read else batch
    figure.rows.append(
        Row(
            "cpu",
            "CPU time per event (process CPU / events)",
            measured,
            reference,
            times(ratio) + " (batch / consume + decode)" if read else "—",
            f"batch ≤ {CPU_TARGET_TIMES:g}{TIMES} consume + decode, both stated",
            verdict(ratio.median <= CPU_TARGET_TIMES) if read else "not measured: the window was too short",
        )
    )
    if "bare" in results:
        bare = Stat.of(_values(results["bare"], "cpu_us"))
        figure.details.append(f"bare aiohttp client: {micros(bare)} per call")
    return figure


# --- 4. single mode with emulated latency ------------------------------------------------------------


def latency_bound(bench: Bench) -> Figure:
    """Single mode against a 20 ms API: the bound is concurrency / latency."""
    concurrency = _single_concurrency()
    bound = concurrency / (LATENCY_MS / 1000)
    warmup, events = bench.sizes.latency
    relay: list[Measured] = []
    bench.emulator.set_faults(latency_ms=LATENCY_MS)
    try:
        for _ in range(bench.sizes.repeats):
            window = bench.relay_window("latency", "single", bench.sizes.latency)
            relay.append(bench.keep("latency", Measured.of(window)))
    finally:
        bench.emulator.set_faults()
    ours = Stat.of(_values(relay))
    ratio = ours.map(lambda value: value / bound)
    figure = Figure()
    figure.rows.append(
        Row(
            "latency",
            f"`single` mode with {LATENCY_MS:.0f} ms emulated latency",
            rate(ours),
            f"concurrency / latency = {concurrency} / {LATENCY_MS:.0f} ms = {bound:,.0f} events/s",
            share(ratio),
            f"≥ {LATENCY_TARGET_SHARE:.0%} of that bound",
            verdict(ratio.median >= LATENCY_TARGET_SHARE),
        )
    )
    figure.details += [
        _repeats(_values(relay), f"relay, single mode, {LATENCY_MS:.0f} ms latency (calls/s)"),
        f"window: {events:,} calls after {warmup:,}",
    ]
    return figure


# --- 5. the rate limit -------------------------------------------------------------------------------


def rate_limit(bench: Bench) -> Figure:
    """50 requests/s per shop, 2 shops, single mode, against an emulator that answers 429 above 50/s."""
    shops = bench.workload.shops
    rates: dict[str, list[float]] = {shop.partner_id: [] for shop in shops}
    refused: list[int] = []
    refused_in_window: list[int] = []
    log = bench.run_dir / "emulator-ratelimited.log"
    with Emulator(shops, log, rate_limit=RATE_LIMIT) as limited:
        for _ in range(bench.sizes.repeats):
            run = _rate_run(bench, limited)
            for partner, value in run.rates.items():
                rates[partner].append(value)
            refused.append(run.refused)
            refused_in_window.append(run.refused_in_window)
    per_shop = {partner: Stat.of(values) for partner, values in rates.items()}
    worst = max(abs(stat.median / RATE_LIMIT - 1) for stat in per_shop.values())
    ok = worst <= RATE_TOLERANCE and not any(refused)
    figure = Figure()
    figure.rows.append(
        Row(
            "ratelimit",
            f"rate limit {RATE_LIMIT:.0f} requests/s per shop, {len(shops)} shops (`single` mode)",
            "; ".join(f"{partner}: {rate(stat, 'req/s')}" for partner, stat in per_shop.items())
            + f"; 429s: {sum(refused)} in all, {sum(refused_in_window)} in the windows",
            f"the configured limit: {RATE_LIMIT:.0f} requests/s per shop",
            f"worst shop off by {worst:.1%}",
            f"within {RATE_TOLERANCE:.0%}, zero 429s",
            verdict(ok),
        )
    )
    figure.details += [
        "per-shop rate: requests the emulator answered 200, by its own arrival times, over "
        f"{bench.sizes.rate_seconds:g} s after the first {bench.sizes.rate_warmup} calls; "
        "the emulator answers 429 above 50/s (burst 10)",
        *(f"{partner}: " + ", ".join(f"{v:.2f} req/s" for v in values) for partner, values in rates.items()),
        f"429 answers per run: {refused} (in the window: {refused_in_window}; "
        "the rest came before it, at start-up)",
    ]
    return figure


@dataclass(frozen=True)
class _RateRun:
    rates: dict[str, float]
    refused: int
    refused_in_window: int


def _rate_run(bench: Bench, limited: Emulator) -> _RateRun:
    config, log = bench.config("ratelimit", mode="single", emulator=limited, rate_limit=RATE_LIMIT)
    limited.reset()
    with start_relay(config, bench.workload, log) as relay:
        bench.window_of(limited, relay, (bench.sizes.rate_warmup, 1))  # the warm-up: start-up, first bursts
        started = time.time()
        time.sleep(bench.sizes.rate_seconds)  # the window: the relay keeps sending, paced by its limiter
        ended = time.time()
        problem = relay.problem()
        if problem is not None:
            raise BenchError(problem)
        requests = limited.requests()
        refused = int(limited.counters()["rate_limited"])
    seconds = ended - started
    counts = {shop.partner_id: 0 for shop in bench.workload.shops}
    refused_in_window = 0
    for request in requests:
        if not started <= request["at"] < ended:
            continue
        if request["status"] == 429:
            refused_in_window += 1
        elif request["status"] == 200 and request["partnerId"] in counts:
            counts[request["partnerId"]] += 1
    return _RateRun({p: count / seconds for p, count in counts.items()}, refused, refused_in_window)


# --- 5b. a backlog drained under the rate limit --------------------------------------------------------

#: The batch size of the backlog figure: with the rate limit, the allowance is shops x rate x this.
BACKLOG_BATCH_EVENTS: Final = 500
BACKLOG_TARGET_SHARE: Final = 0.97


def backlog_ratelimit(bench: Bench) -> Figure:
    """Batch mode draining the backlog under 50 requests/s per shop, against an emulator enforcing it.

    A rate-limited backlog is where batch mode earns its keep: the limit counts requests, so the events per
    second a shop can get are its rate times the batch size. The figure is how close the relay comes to that
    allowance, measured by the emulator's counters over a window cut out of the drain, and the 429s it drew.
    """
    shops = bench.workload.shops
    allowance = len(shops) * RATE_LIMIT * BACKLOG_BATCH_EVENTS
    runs: list[_BacklogRun] = []
    log = bench.run_dir / "emulator-backlog-ratelimited.log"
    with Emulator(shops, log, rate_limit=RATE_LIMIT) as limited:
        runs += [_backlog_run(bench, limited) for _ in range(bench.sizes.repeats)]
    ours = Stat.of([run.window.per_s for run in runs])
    ratio = ours.map(lambda value: value / allowance)
    in_window = [run.refused_in_window for run in runs]
    ok = ratio.median >= BACKLOG_TARGET_SHARE and not any(in_window)
    warmup, events = bench.sizes.backlog_rate
    figure = Figure()
    figure.rows.append(
        Row(
            "backlog_ratelimit",
            f"a backlog under the rate limit: {len(shops)} shops, {RATE_LIMIT:.0f} requests/s each, "
            f"{BACKLOG_BATCH_EVENTS} events per batch (`batch` mode)",
            f"{rate(ours)}; 429s: {sum(in_window)} in the windows, {sum(run.refused for run in runs)} in all",
            f"the allowance: shops {TIMES} rate {TIMES} batch size = {len(shops)} {TIMES} {RATE_LIMIT:.0f} "
            f"{TIMES} {BACKLOG_BATCH_EVENTS} = {allowance:,.0f} events/s",
            share(ratio),
            f"≥ {BACKLOG_TARGET_SHARE:.0%} of the allowance, zero 429s",
            verdict(ok),
        )
    )
    figure.details += [
        _repeats([run.window.per_s for run in runs], "relay, batch mode, rate-limited (calls/s)"),
        f"window: {events:,} calls after {warmup:,}, by the emulator's counters; the emulator answers 429 "
        f"above {RATE_LIMIT:.0f} requests/s per shop (burst 10); the relay's limiter is set to the same rate",
        "requests answered 200 in the window (per second, all shops): "
        + ", ".join(f"{run.requests / run.window.seconds:.1f}/s" for run in runs),
        "events per accepted batch in the window: "
        + ", ".join(f"{run.window.events / run.requests:.0f}" if run.requests else "-" for run in runs),
        f"429 answers per run: {[run.refused for run in runs]} (in the window: {in_window})",
        "the relay's peak resident memory (its in-flight budget, `delivery.max_in_flight_records`, full "
        "while the limit holds it back): " + ", ".join(f"{run.peak_rss / 2**20:.0f} MiB" for run in runs),
    ]
    return figure


@dataclass(frozen=True)
class _BacklogRun:
    window: Window
    #: ``visitorEvents`` requests answered 200 in the window.
    requests: int
    refused: int
    refused_in_window: int
    #: The relay's peak resident memory (bytes): its in-flight budget stays full under the limit.
    peak_rss: int


def _backlog_run(bench: Bench, limited: Emulator) -> _BacklogRun:
    config, log = bench.config(
        "backlog-ratelimit",
        mode="batch",
        emulator=limited,
        rate_limit=RATE_LIMIT,
        settings={"delivery": {"batch_max_events": BACKLOG_BATCH_EVENTS}},
    )
    limited.reset()
    readings: list[dict[str, Any]] = []
    peak_rss = 0

    warmup, events = bench.sizes.backlog_rate
    total = bench.workload.calls
    with start_relay(config, bench.workload, log) as relay:

        def accepted() -> int:
            # The whole counters, kept: the window's 429s and requests come from the readings that bound it.
            nonlocal peak_rss
            counters = limited.counters()
            readings.append(counters)
            peak_rss = max(peak_rss, relay.probe.rss())
            return int(counters["events_accepted"])

        window = measure_window(
            accepted,
            relay.probe,
            warmup=warmup,
            events=events,
            total=total,
            deadline_s=bench.sizes.run_deadline_s,
            alive=relay.problem,
        )
    start = next(r for r in readings if r["events_accepted"] >= min(warmup, total))
    if start["events_accepted"] >= total:  # the whole backlog before the first look: the run is the window
        start = {"rate_limited": 0, "requests": {}}
    end = readings[-1]
    return _BacklogRun(
        window,
        _batches_accepted(end) - _batches_accepted(start),
        int(end["rate_limited"]),
        int(end["rate_limited"]) - int(start["rate_limited"]),
        peak_rss,
    )


def _batches_accepted(counters: Mapping[str, Any]) -> int:
    return int(counters["requests"].get(BATCH_METHOD, {}).get("200", 0))


# --- 5c. end-to-end latency at a steady rate -----------------------------------------------------------

E2E_RATE: Final = 2_000.0
#: What the batch bound allows beyond linger + 2 x API latency: the broker round trips, the event loop.
E2E_SLACK_MS: Final = 10.0
#: How long after the window the calls of its last records get to arrive before they count as missing.
E2E_DRAIN_S: Final = 10.0
#: The relay has caught up with the stream when it has accepted every call of the records this old.
E2E_CAUGHT_UP_MS: Final = 500
#: Events the emulator keeps for reading (it is read every quarter second: a few thousand at a time).
E2E_KEPT: Final = 100_000


def latency_e2e(bench: Bench) -> Figure:
    """Latency from a record's timestamp to the emulator's acceptance of its call, at a steady 2,000/s.

    A producer thread stamps every record as it makes it (its ``occurredAt``, which becomes the call's
    ``timestamp``, and its Kafka timestamp); the emulator, with 20 ms of latency, keeps each accepted call
    with its acceptance time. Each run (each mode in turn) has a fresh topic, produced to once the relay holds
    its partitions; the window is the records stamped during ``e2e_window_s`` from the moment the relay has
    caught up with the stream (``e2e_warmup_s`` after the first record at the earliest): its start-up
    is not in it.
    """
    if bench.topics is None:
        raise BenchError("the end-to-end latency figure needs topics of its own (Bench.topics)")
    runs: dict[str, list[_E2ERun]] = {"batch": [], "single": []}
    shops = bench.workload.shops
    with Emulator(shops, bench.run_dir / "emulator-e2e.log", max_events=E2E_KEPT) as emulator:
        emulator.set_faults(latency_ms=LATENCY_MS)
        for _ in range(bench.sizes.repeats):
            for mode, done in runs.items():
                done.append(_e2e_run(bench, emulator, mode))
    linger = runs["batch"][0].linger_ms
    bound = linger + 2 * LATENCY_MS + E2E_SLACK_MS
    batch_p99 = Stat.of([run.p99 for run in runs["batch"]])
    missing = {mode: sum(run.missing for run in done) for mode, done in runs.items()}
    figure = Figure()
    title = (
        f"end-to-end latency at a steady {E2E_RATE:,.0f} events/s (the record's timestamp → the emulator's "
        f"acceptance), {LATENCY_MS:.0f} ms emulated latency"
    )
    figure.rows.append(
        Row(
            "latency_e2e",
            title + ", `batch` mode",
            _percentiles(runs["batch"]) + _missing(missing["batch"]),
            f"linger + API latency = {linger:g} + {LATENCY_MS:.0f} = {linger + LATENCY_MS:g} ms",
            f"p99 at {times(batch_p99.map(lambda value: value / bound))} the bound",
            f"p50, p99 stated; p99 ≤ linger + 2 {TIMES} API latency + {E2E_SLACK_MS:.0f} ms = {bound:g} ms",
            verdict(batch_p99.median <= bound and not missing["batch"]),
        )
    )
    figure.rows.append(
        Row(
            "latency_e2e-single",
            title + ", `single` mode",
            _percentiles(runs["single"]) + _missing(missing["single"]),
            f"API latency = {LATENCY_MS:.0f} ms",
            f"p50 at {times(Stat.of([run.p50 for run in runs['single']]).map(lambda v: v / LATENCY_MS))} it",
            "p50, p99 stated (no bound is set: nothing waits for a batch to fill, so the API latency is the "
            "floor and the rest is the relay's)",
            "stated",
        )
    )
    for mode, done in runs.items():
        figure.details.append(
            f"{mode}: p50/p99 per run: "
            + ", ".join(f"{run.p50:.1f}/{run.p99:.1f} ms (max {run.worst:.0f})" for run in done)
            + "; calls in the window per run: "
            + ", ".join(f"{run.calls:,} ({run.missing} missing)" for run in done)
            + "; produced: "
            + ", ".join(f"{run.produced_per_s:,.0f} records/s" for run in done)
            + "; caught up with the stream after: "
            + ", ".join(_caught_up(run, bench.sizes.e2e_catch_up_s) for run in done)
        )
    figure.details.append(
        f"window: the records stamped in {bench.sizes.e2e_window_s:g} s, at least "
        f"{bench.sizes.e2e_warmup_s:g} s after the first, once the relay has caught up (every call of the "
        f"records stamped over {E2E_CAUGHT_UP_MS} ms ago accepted); a call not accepted {E2E_DRAIN_S:.0f} s "
        "after the window counts as missing; the producer lingers 1 ms and starts once the relay is assigned "
        "its partitions (a fresh topic per run); latency is the emulator's acceptance "
        "time (epoch, after the emulated latency) minus the call's `timestamp` (ms)"
    )
    return figure


def _caught_up(run: _E2ERun, bound_s: float) -> str:
    if run.caught_up_s is None:
        return f"**not within {bound_s:g} s** (the window holds the rest of the start-up)"
    return f"{run.caught_up_s:.1f} s"


def _percentiles(done: Sequence[_E2ERun]) -> str:
    p50, p99 = Stat.of([run.p50 for run in done]), Stat.of([run.p99 for run in done])
    return f"p50 {_ms(p50)}, p99 {_ms(p99)}"


def _ms(stat: Stat) -> str:
    if len(stat.values) == 1:
        return f"{stat.median:.1f} ms"
    return f"{stat.median:.1f} ms ({stat.low:.1f}{DASH}{stat.high:.1f})"


def _missing(count: int) -> str:
    return f"; **{count:,} calls not accepted**" if count else ""


@dataclass(frozen=True)
class _E2ERun:
    p50: float
    p99: float
    worst: float
    calls: int
    missing: int
    produced_per_s: float
    linger_ms: float
    #: Seconds from the first record to the relay having caught up (None: not within the warm-up's bound).
    caught_up_s: float | None


def _e2e_run(bench: Bench, emulator: Emulator, mode: str) -> _E2ERun:
    """One relay on a fresh topic: produced to from its assignment on, measured once it has caught up."""
    assert bench.topics is not None
    stream = dataclasses.replace(
        bench.workload, topic=bench.topics.create("stream", bench.workload.partitions)
    )
    config, log = bench.config(f"e2e-{mode}", mode=mode, emulator=emulator, workload=stream)
    # As the relay reads it (the file and the environment it gets), so --set is honoured.
    linger = load_settings(config, child_env()).delivery.batch_linger_ms
    emulator.reset()
    deadline = time.monotonic() + bench.sizes.run_deadline_s
    with start_relay(config, stream, log) as relay:
        # Producing only once the relay holds its partitions keeps its start-up out of the stream's backlog.
        _wait_for(lambda: _logged(log, "intake.assigned"), relay.problem, deadline, "the relay's assignment")
        with SteadyProducer(
            bench.bootstrap, stream.topic, stream.registry_url, stream.shops, E2E_RATE
        ) as producer:

            def problem() -> str | None:
                return relay.problem() or (producer.failures[0] if producer.failures else None)

            caught_up_s = _catch_up(bench, emulator, producer, problem, deadline)
            first_ms = _now_ms()
            end_ms = first_ms + int(bench.sizes.e2e_window_s * 1000)
            acceptances = _Acceptances(emulator, emulator.accepted(), (first_ms, end_ms))
            # A record stamped just before end_ms is counted by the producer an instant later: its count is
            # read only once the window is a little in the past.
            settled_ms, give_up_ms = end_ms + 100, end_ms + int(E2E_DRAIN_S * 1000)

            def complete() -> bool:
                acceptances.poll()
                now = _now_ms()
                if now >= settled_ms and acceptances.count >= producer.calls_between(first_ms, end_ms):
                    return True
                return now > give_up_ms

            _wait_for(complete, problem, deadline, "the window's calls", POLL_S * 5)
            expected = producer.calls_between(first_ms, end_ms)
            produced = sum(1 for at, _calls in list(producer.produced) if first_ms <= at < end_ms)
    latencies = sorted(acceptances.latencies_ms)
    if not latencies:
        raise BenchError(f"no call of the window was accepted ({mode} mode)")
    return _E2ERun(
        p50=_rank(latencies, 0.50),
        p99=_rank(latencies, 0.99),
        worst=latencies[-1],
        calls=len(latencies),
        missing=max(expected - len(latencies), 0),
        produced_per_s=produced / bench.sizes.e2e_window_s,
        linger_ms=linger,
        caught_up_s=caught_up_s,
    )


def _catch_up(
    bench: Bench,
    emulator: Emulator,
    producer: SteadyProducer,
    problem: Callable[[], str | None],
    deadline: float,
) -> float | None:
    """Wait out the warm-up: ``e2e_warmup_s`` of flow, and the relay caught up with the stream.

    Caught up: every call of the records stamped more than ``E2E_CAUGHT_UP_MS`` ago has been accepted.
    Returns the seconds that took, or ``None`` when it did not within ``e2e_catch_up_s`` (the window then
    starts anyway, and holds what is left of the start-up).
    """
    started = time.monotonic()
    flowing = started + bench.sizes.e2e_warmup_s
    give_up = started + bench.sizes.e2e_catch_up_s
    caught_up: list[float] = []

    def ready() -> bool:
        now = time.monotonic()
        if now < flowing:  # before, "every record older than the bound" may be none at all
            return False
        if emulator.accepted() >= producer.calls_between(0, _now_ms() - E2E_CAUGHT_UP_MS):
            caught_up.append(now - started)
            return True
        return now >= give_up

    _wait_for(ready, problem, deadline, "the relay to catch up with the stream")
    return caught_up[0] if caught_up else None


def _wait_for(
    done: Callable[[], bool],
    problem: Callable[[], str | None],
    deadline: float,
    what: str,
    poll_s: float = POLL_S,
) -> None:
    while not done():
        found = problem()
        if found is not None:
            raise BenchError(found)
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(poll_s)  # the poll interval of a deadline-bounded wait


def _logged(log: Path, event: str) -> bool:
    """Has the relay's JSON log an ``event`` line yet?"""
    return log.exists() and f'"event": "{event}"' in log.read_text(errors="replace")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _rank(ordered: Sequence[float], quantile: float) -> float:
    """The nearest-rank quantile of sorted values."""
    return ordered[max(math.ceil(quantile * len(ordered)) - 1, 0)]


class _Acceptances:
    """The emulator's kept calls, read as they come: a latency for each call stamped in the window."""

    def __init__(self, emulator: Emulator, since: int, window: tuple[int, int]) -> None:
        self._emulator = emulator
        self.since = since
        self.window = window
        self.latencies_ms: list[float] = []

    @property
    def count(self) -> int:
        return len(self.latencies_ms)

    def poll(self) -> None:
        found, self.since = self._emulator.events(self.since)
        first_ms, end_ms = self.window
        for event in found:
            stamp = datetime.datetime.fromisoformat(event["body"]["timestamp"]).timestamp()
            stamp_ms = round(stamp * 1000)
            if first_ms <= stamp_ms < end_ms:
                self.latencies_ms.append(event["received_at"] * 1000 - stamp_ms)


# --- 6. memory while draining the backlog ------------------------------------------------------------


def memory(bench: Bench) -> Figure:
    """Resident memory of the relay (batch mode) while it drains the whole backlog."""
    peaks: list[float] = []
    flat: list[bool] = []
    profiles: list[str] = []
    drains: list[float] = []
    for _ in range(bench.sizes.repeats):
        samples: list[tuple[float, int]] = []
        seconds, _cpu = bench.drain(
            "memory", lambda progress, rss, into=samples: into.append((progress, rss))
        )
        drains.append(bench.workload.records / seconds if seconds else 0.0)
        first = [rss for progress, rss in samples if progress < 0.5] or [0]
        second = [rss for progress, rss in samples if progress >= 0.5] or [0]
        peaks.append(max(first + second) / 2**20)
        flat.append(max(second) <= max(first) * (1 + FLAT_TOLERANCE))
        profiles.append(_rss_profile(samples))
    peak = Stat.of(peaks)
    ok = peak.high * 2**20 < MEMORY_LIMIT and all(flat)
    figure = Figure()
    figure.rows.append(
        Row(
            "memory",
            f"resident memory while draining a {bench.workload.records:,}-event backlog (`batch` mode)",
            f"peak {peak.median:.0f} MiB ({peak.low:.0f}{DASH}{peak.high:.0f}); "
            + ("flat" if all(flat) else "**growing**"),
            "—",
            "—",
            f"flat, under {MEMORY_LIMIT / 1e6:.0f} MB ({MEMORY_LIMIT / 2**20:.0f} MiB)",
            verdict(ok),
        )
    )
    figure.details += [
        "resident memory at 10/25/50/75/100 % of the drain, per run: " + "; ".join(profiles),
        _repeats(drains, "whole-drain rate, start-up included (records/s)"),
        f"flat: the second half's peak within {FLAT_TOLERANCE:.0%} of the first half's",
    ]
    return figure


def _rss_profile(samples: Sequence[tuple[float, int]]) -> str:
    points = []
    for mark in (0.10, 0.25, 0.50, 0.75, 1.0):
        found = next((rss for progress, rss in samples if progress >= mark), samples[-1][1] if samples else 0)
        points.append(f"{found / 2**20:.0f}")
    return "/".join(points) + " MiB"


# --- 7. the naive consumer ---------------------------------------------------------------------------


def naive(bench: Bench) -> Figure:
    """Poll, one blocking POST per call, synchronous commit, per record."""
    warmup, events = bench.sizes.naive
    records = 2 * (warmup + events) + 100  # a bound only: the run is stopped once its window closes
    runs = [
        bench.keep(
            "naive",
            Measured.of(
                bench.program_window("naive", "naive", bench.sizes.naive, *program_args(records=records))
            ),
        )
        for _ in range(bench.sizes.repeats)
    ]
    stat = Stat.of(_values(runs))
    figure = Figure()
    figure.rows.append(
        Row(
            "naive",
            "a naive consumer (poll, one blocking POST, commit, per record)",
            rate(stat),
            _ours(bench),
            _ours_ratio(bench, stat),
            "ratio stated",
            "stated",
        )
    )
    figure.details += [_repeats(_values(runs), "naive consumer (calls/s)"), f"window: {events:,} calls"]
    return figure


# --- 8. arroyo ---------------------------------------------------------------------------------------


def arroyo(bench: Bench) -> Figure:
    """sentry-arroyo: RunTaskInThreads + blocking requests + CommitOffsets, per record (and in batches)."""
    warmup, events = bench.sizes.arroyo
    per_record = [
        bench.keep(
            "arroyo",
            Measured.of(
                bench.program_window(
                    "arroyo",
                    "arroyo_pipeline",
                    bench.sizes.arroyo,
                    *program_args(records=2 * (warmup + events) + 100, shape="record"),
                )
            ),
        )
        for _ in range(bench.sizes.repeats)
    ]
    stat = Stat.of(_values(per_record))
    single = bench.results.get("single")
    ahead = Stat.of(_values(single)).median > stat.median if single else False
    figure = Figure()
    figure.rows.append(
        Row(
            "arroyo",
            "an arroyo pipeline (RunTaskInThreads, 64 threads of blocking `requests`, commit after), "
            "per record",
            rate(stat),
            _ours(bench, modes=("single",)),
            _ours_ratio(bench, stat, modes=("single",)),
            "ours ahead, ratio stated",
            verdict(ahead) if single else "stated",
        )
    )
    figure.details.append(_repeats(_values(per_record), "arroyo, per record (calls/s)"))
    if bench.sizes.extras:
        warmup, events = bench.sizes.arroyo_batch
        batched = [
            bench.keep(
                "arroyo-batch",
                Measured.of(
                    bench.program_window(
                        "arroyo-batch",
                        "arroyo_pipeline",
                        bench.sizes.arroyo_batch,
                        *program_args(records=2 * (warmup + events) + 1000, shape="batch"),
                    )
                ),
            )
            for _ in range(bench.sizes.repeats)
        ]
        batch_stat = Stat.of(_values(batched)).map(lambda v: v / bench.workload.calls_per_record)
        batch = bench.results.get("batch")
        figure.rows.append(
            Row(
                "arroyo-batch",
                "(comparison) the same arroyo pipeline with BatchStep(500, 20 ms) and `visitorEvents`",
                rate(batch_stat),
                _ours(bench, modes=("batch",)),
                _ours_ratio(bench, batch_stat, modes=("batch",)),
                "ours ahead",
                verdict(Stat.of(_values(batch)).median > batch_stat.median) if batch else "stated",
            )
        )
        figure.details.append(_repeats(batch_stat.values, "arroyo, batches (records/s)"))
    return figure


def _ours(bench: Bench, modes: Sequence[str] = ("single", "batch")) -> str:
    parts = [
        f"ours, {mode}: {rate(Stat.of(_values(bench.results[mode])))}"
        for mode in modes
        if mode in bench.results
    ]
    return "; ".join(parts) or "(ours not measured in this run)"


def _ours_ratio(bench: Bench, theirs: Stat, modes: Sequence[str] = ("single", "batch")) -> str:
    parts = [
        f"ours ({mode}) {Stat.of(_values(bench.results[mode])).median / theirs.median:,.1f}{TIMES} as fast"
        for mode in modes
        if mode in bench.results and theirs.median
    ]
    return "; ".join(parts) or "—"


#: The figures in the order they run and appear; the keys are what ``--only`` takes.
FIGURES: Final[dict[str, FigureFunction]] = {
    "batch": batch_throughput,
    "single": single_throughput,
    "cpu": cpu_per_event,
    "latency": latency_bound,
    "ratelimit": rate_limit,
    "backlog_ratelimit": backlog_ratelimit,
    "latency_e2e": latency_e2e,
    "memory": memory,
    "naive": naive,
    "arroyo": arroyo,
}
