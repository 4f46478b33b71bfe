"""One function per figure of the report; each measures its figure and its reference in turn, per repeat.

A figure returns :class:`Figure`: the rows of the summary table (one per target, keyed so that the smoke test
can find each) and the detail lines (every repeat's value, what was configured). Rates of the relay are in
*events*: for batch mode records per second (the emulator's calls divided by the backlog's calls per record,
1.008), so that they compare with the ceiling, which counts records; for single mode and the latency figure
the calls the emulator accepted, so that they compare with the bare client and the latency bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from consumer.config import DeliveryConfig, TrackingConfig
from tools.bench.contenders import start_relay
from tools.bench.measure import Stat, ratios
from tools.bench.runs import Bench, Measured, program_args
from tools.bench.stack import BenchError, Emulator

BATCH_TARGET_EVENTS: Final = 100_000
BATCH_TARGET_SHARE: Final = 0.70
SINGLE_TARGET_SHARE: Final = 0.80
LATENCY_MS: Final = 20.0
LATENCY_TARGET_SHARE: Final = 0.80
RATE_LIMIT: Final = 50.0
RATE_TOLERANCE: Final = 0.02
MEMORY_LIMIT: Final = 250 * 2**20
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


# --- 1. batch mode against the consume + decode ceiling ----------------------------------------------


def batch_throughput(bench: Bench) -> Figure:
    """Batch mode, one process, rate limit off, against consume + decode alone (the pipeline's ceiling)."""
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
            records = 2 * (warmup + events) + 1000
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
    ours, reference = Stat.of(_values(relay)), Stat.of(_values(ceiling))
    ratio = ratios(ours.values, reference.values)
    ok = ours.median >= BATCH_TARGET_EVENTS and ratio.median >= BATCH_TARGET_SHARE
    figure = Figure()
    figure.rows.append(
        Row(
            "batch",
            "events/s end to end, `batch` mode, one process",
            rate(ours),
            f"consume + decode only: {rate(reference)}",
            share(ratio),
            f"≥ {BATCH_TARGET_EVENTS:,} events/s and ≥ {BATCH_TARGET_SHARE:.0%} of the ceiling",
            verdict(ok),
        )
    )
    figure.details += [
        _repeats(_values(relay), "relay, batch mode (records/s)"),
        _repeats(_values(ceiling), "consume + decode (records/s)"),
        f"window: {events:,} calls after {warmup:,} (relay); {events:,} records after {warmup:,} (ceiling)",
        _peak(relay, "the relay's peak resident memory"),
    ]
    if intake:
        stat = Stat.of(_values(intake))
        figure.rows.append(
            Row(
                "batch-intake",
                "(explains) the relay's intake stage alone: consume, decode, translate, encode",
                rate(stat, "records/s"),
                f"consume + decode only: {rate(reference)}",
                share(ratios(stat.values, reference.values)),
                "—",
                "stated",
            )
        )
        figure.details.append(_repeats(_values(intake), "intake stage alone (records/s)"))
    if prototype:
        stat = Stat.of(_values(prototype))
        figure.rows.append(
            Row(
                "batch-prototype",
                "(explains) a bare prototype of the flow (`tools/bench/prototype.py`): consume, decode, "
                "translate, one `visitorEvents` POST per shop and `consume()` batch, 16 in flight; no "
                "per-visitor order, retries, dead letters or rate limit",
                rate(stat),
                f"ours, batch: {rate(ours)}",
                f"ours at {share(ratios(ours.values, stat.values))} of it",
                "—",
                "stated",
            )
        )
        figure.details.append(_repeats(_values(prototype), "bare prototype (records/s)"))
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
    figure.rows.append(
        Row(
            "cpu",
            "CPU time per event (process CPU / events)",
            measured,
            reference,
            times(ratios(batch.values, ceiling.values)) + " (batch / ceiling)",
            "state both",
            "stated",
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
            f"flat, under {MEMORY_LIMIT / 2**20:.0f} MB",
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
    "memory": memory,
    "naive": naive,
    "arroyo": arroyo,
}
