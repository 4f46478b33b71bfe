"""The relay service: wires the stages together and runs them until SIGTERM/SIGINT.

::

    intake thread                    event loop
    ─────────────                    ──────────
    consume ─► decode ─► translate ─► ledger.track ─► Dispatcher ─► done ─► settle ─► (positions) ─► store
                                                                        └─► dead-letter ─► settle

Settlement decides commits: a record is settled when every call it implied was delivered, or when it was
confirmed written to the dead-letter topic. The intake thread commits settled positions (``consumer.commit``):
periodically, and synchronously on revoke and at shutdown.

Shutdown (SIGTERM): stop fetching, seal open batches, let in-flight records settle within
``delivery.shutdown_grace_s``, commit, leave the group, exit 0. A tripped dead-letter guard exits 3 without
waiting and without committing the records it stopped on.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog

from consumer import __version__, preflight
from consumer.breaker import CircuitBreaker
from consumer.config import RelayConfig, Settings
from consumer.deadletter import DeadLetterWriter
from consumer.decode import Decoder, build_decoder, registry_client
from consumer.deliver import make_dispatcher
from consumer.faults import FaultBoard
from consumer.guard import SHOP_WIDE_STATUSES, DeadLetterGuard
from consumer.health import HealthServer
from consumer.intake import Intake
from consumer.metrics import RelayMetrics
from consumer.record import Record, TopicPartition
from consumer.redrive import RedrivePlan
from consumer.retry import Backoff
from consumer.settle import OffsetLedger
from consumer.tracking import TrackingClient
from consumer.translate import Translator

log = structlog.get_logger(__name__)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2
EXIT_HALTED: Final = 3
#: How often a draining revoke or shutdown looks at the in-flight count.
DRAIN_POLL_S: Final = 0.01
#: How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms); see
#: :func:`_tune_interpreter`.
SWITCH_INTERVAL_S: Final = 0.001
PROGRESS_EVERY_S: Final = 5.0
HEARTBEAT_EVERY_S: Final = 1.0
#: /healthz turns red when the loop has not ticked for this long (a tick is due every second).
HEARTBEAT_STALE_S: Final = 10.0
#: How long closing the Kafka consumer (final commit, leaving the group) may take at shutdown.
CLOSE_TIMEOUT_S: Final = 15.0


def build_decoders(config: RelayConfig) -> dict[str, Decoder]:
    settings = config.settings
    registry = None
    if settings.schema_registry.url:
        extra: dict[str, Any] = {}
        if config.schema_registry_auth is not None:
            extra["basic.auth.user.info"] = config.schema_registry_auth.get_secret_value()
        registry = registry_client(
            settings.schema_registry.url, timeout=settings.schema_registry.timeout_s, extra=extra
        )
    return {
        topic.name: build_decoder(
            topic.format,
            registry=registry if topic.format == "confluent-avro" else None,
            record_name=topic.record_name,
            schemas_dir=settings.schemas_dir,
        )
        for topic in settings.topics
    }


#: librdkafka settings only a consumer takes: passed to a producer or an admin client, each draws a warning.
_CONSUMER_ONLY = (
    "auto.",
    "group.",
    "session.",
    "heartbeat.",
    "max.poll.",
    "fetch.",
    "queued.",
    "partition.assignment.",
    "isolation.",
    "enable.auto.",
    "enable.partition.eof",
    "check.crcs",
)


def kafka_client_config(settings: Settings) -> dict[str, Any]:
    """The settings every client of the relay shares (security, addresses): no consumer-only ones."""
    kafka = settings.kafka
    common = {k: v for k, v in kafka.client.items() if not k.startswith(_CONSUMER_ONLY)}
    return {**common, "bootstrap.servers": kafka.bootstrap_servers}


@dataclass
class Redrive:
    """What turns the relay into a re-drive of dead-letter topics (see consumer.redrive)."""

    plan: RedrivePlan
    #: Decoders of the original topics, by name: a dead-lettered value is decoded as its topic's were.
    decoders: dict[str, Decoder]
    #: Stop once every one of these partitions settled up to its offset (the end when the re-drive began).
    stop_at: dict[TopicPartition, int]
    on_progress: Callable[[int], None] | None = None


class Relay:
    """One process of the relay: a member of the consumer group delivering to the tracking API."""

    def __init__(self, config: RelayConfig, *, redrive: Redrive | None = None) -> None:
        self.config = config
        self.redrive = redrive
        settings = config.settings
        self.ledger = OffsetLedger(on_settled=redrive.plan.settled if redrive is not None else None)
        self.guard = DeadLetterGuard(settings.dead_letter)
        self._dlq_topics: Mapping[str, str] = {t.name: t.dlq for t in settings.topics}
        self._suspects: dict[str, list[Record]] = {}
        # shop -> partitions its records came from: what to pause while the shop's breaker is open
        self._feeds: dict[str, set[TopicPartition]] = {}
        #: Faults of the parts around the relay (broker, registry, dead-letter topic): readiness and the log.
        self.faults = FaultBoard()
        # Partitions with a record the dead-letter topic refused: held (paused) until a write succeeds.
        self._dlq_blocked: set[TopicPartition] = set()
        self._stopping: asyncio.Event | None = None
        self._halt_reason: str | None = None
        self._intake_error: BaseException | None = None
        self._intake_stopped: asyncio.Future[None] | None = None
        self._close_timed_out = False
        self.delivered = 0
        self.dead_lettered = 0
        self.metrics = RelayMetrics()
        self.heartbeat = time.monotonic()
        self.health: HealthServer | None = None

    # --- lifecycle -----------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until stopped; return the process exit status."""
        loop = asyncio.get_running_loop()
        settings = self.config.settings
        self._stopping = asyncio.Event()
        self._intake_stopped = loop.create_future()
        decoders = self.redrive.decoders if self.redrive is not None else build_decoders(self.config)
        translator = Translator(self.config.shops, settings.delivery.default_shop)
        self.client = TrackingClient(settings.tracking, self.config.shops)
        await self.client.start()
        self.dlq = DeadLetterWriter(
            kafka_client_config(self.config.settings),
            self._dlq_topics.__getitem__,
            loop,
            write_timeout_s=settings.dead_letter.write_timeout_s,
            on_written=self._dead_letter_written,
            on_failed=self._dead_letter_failed,
        )
        self.backoff = Backoff(settings.retry)
        retry = settings.retry
        self.breakers = {
            shop: CircuitBreaker(
                shop,
                threshold=retry.breaker_threshold,
                probe_base_s=retry.breaker_probe_base_s,
                probe_cap_s=retry.breaker_probe_cap_s,
                on_change=self._breaker_changed,
            )
            for shop in self.config.shops
        }
        self.dispatcher = make_dispatcher(
            self.client,
            settings.delivery,
            settings.tracking,
            self.backoff,
            breakers=self.breakers,
            done=self._on_done,
            done_many=self._on_done_many,
            owns=self.ledger.owns,
            releases=lambda: self.ledger.releases,
            metrics=self.metrics,
        )
        self.dispatcher.start()
        self.intake = Intake(
            settings,
            decoders,
            translator,
            self.ledger,
            self,
            loop,
            metrics=self.metrics,
            faults=self.faults,
            redrive=self.redrive.plan if self.redrive is not None else None,
            stop_at=self.redrive.stop_at if self.redrive is not None else None,
        )
        self._start_health()
        self._install_signals(loop)
        _tune_interpreter()
        self.intake.start()
        background = [asyncio.create_task(self._report_progress()), asyncio.create_task(self._beat())]
        if self.redrive is not None:
            background.append(asyncio.create_task(self._stop_when_caught_up(self.redrive)))
        log.info(
            "relay.started",
            version=__version__,
            group=settings.kafka.group_id,
            topics=[t.name for t in settings.topics],
            mode=settings.delivery.mode,
            ordering=settings.delivery.ordering,
        )
        try:
            await self._stopping.wait()
            await self._shutdown()
        finally:
            for task in background:
                task.cancel()
            if self.health is not None:
                self.health.stop()
            await self.dispatcher.close()
            await self.client.close()
            unconfirmed = self.dlq.close()
            if unconfirmed:
                log.warning("relay.dead_letters_unconfirmed", count=unconfirmed)
        return self._exit_status()

    def _start_health(self) -> None:
        observability = self.config.settings.observability
        gauges = self.metrics.gauges
        gauges.in_flight = lambda: self.ledger.in_flight
        gauges.partitions = lambda: len(self.intake.assigned)
        gauges.breakers = lambda: {shop: b.state == "open" for shop, b in self.breakers.items()}
        gauges.lag = lambda: dict(self.intake.lag)
        gauges.commit_times = lambda: dict(self.intake.commit_times)
        if observability.port is None:
            return
        self.health = HealthServer(
            self.metrics,
            liveness=self.liveness,
            readiness=self.readiness,
            host=observability.host,
            port=observability.port,
        )
        self.health.start()

    def liveness(self) -> list[str]:
        """What makes this process dead: a stuck event loop, or an intake thread that stopped polling."""
        now = time.monotonic()
        problems = []
        if now - self.heartbeat > HEARTBEAT_STALE_S:
            problems.append(f"the event loop has not ticked for {now - self.heartbeat:.0f}s")
        stall = self.config.settings.observability.stall_after_s
        if now - self.intake.last_poll > stall:
            problems.append(f"the Kafka consumer has not polled for {now - self.intake.last_poll:.0f}s")
        # librdkafka reconnects by itself, but not always: after a broker was restarted and then frozen, its
        # consumer stayed without a connection (broker state INIT) for minutes in about a third of the
        # test runs, while the broker answered others. A relay without a broker for this long asks to be
        # restarted; if the broker is really gone, the restart's start-up check says so and waits.
        lost = self.faults.lasting("kafka")
        if lost is not None and lost > stall:
            problems.append(f"no Kafka broker has answered this process for {lost:.0f}s")
        return problems

    def readiness(self) -> list[str]:
        """What keeps this process from moving events, though alive."""
        problems = self.liveness()
        if self._stopping is not None and self._stopping.is_set():
            problems.append("stopping")
        if not self.intake.assigned:
            problems.append("no partitions assigned")
        problems.extend(self.faults.current())  # broker, registry, dead-letter topic, consume errors
        problems.extend(
            f"circuit breaker open for shop {shop!r}"
            for shop, b in self.breakers.items()
            if b.state == "open"
        )
        problems.extend(self._stalled_partitions())
        return problems

    def _stalled_partitions(self) -> list[str]:
        """Partitions with records behind their committed offset that has not moved for ``stall_after_s``.

        The age runs from the last commit, or from the assignment when the partition was never committed
        here; a partition with nothing behind its commit is idle, not stalled. Read on the health server's
        thread: each read is one dict look-up or copy, safe under the GIL.
        """
        stall = self.config.settings.observability.stall_after_s
        now = time.time()
        lag, commits, assigned = (
            dict(self.intake.lag),
            dict(self.intake.commit_times),
            self.intake.assigned_at,
        )
        stalled = []
        for tp, since in list(assigned.items()):
            # Kafka's lag counts from the committed offset (unknown before a first commit); in flight here
            # are records consumed and not yet settled: either is work that waits.
            behind = max(lag.get(tp, 0), self.ledger.in_flight_for(tp))
            age = now - max(commits.get(tp, 0.0), since)
            if behind > 0 and age > stall:
                stalled.append(
                    f"partition {tp[0]}[{tp[1]}] has not committed for {age:.0f}s "
                    f"with {behind} record(s) behind it"
                )
        return stalled

    async def _stop_when_caught_up(self, redrive: Redrive) -> None:
        """A re-drive ends at the end offsets it started with: it never chases its own output."""
        while True:
            # Suspects (401/403) wait for a call of their shop to succeed; with none to come, none will.
            suspects, ledger = self._suspects, self.ledger
            if (
                suspects
                and ledger.in_flight <= self._suspect_count()
                and ledger.tracked_up_to(redrive.stop_at)
            ):
                shops = ", ".join(map(repr, sorted(suspects)))
                self._halt(f"shop {shops} still answers HTTP 401/403: fix its key, then re-drive again")
                return
            reached = self.ledger.reached
            done = sum(min(reached.get(tp, 0), end) for tp, end in redrive.stop_at.items())
            if redrive.on_progress is not None:
                redrive.on_progress(done)
            if (
                all(reached.get(tp, 0) >= end for tp, end in redrive.stop_at.items())
                and not self.ledger.in_flight
            ):
                log.info(
                    "redrive.caught_up",
                    redriven=redrive.plan.redriven,
                    skipped_by_filter=redrive.plan.skipped_by_filter,
                    skipped_by_guard=redrive.plan.skipped_by_guard,
                )
                self.request_stop()
                return
            await asyncio.sleep(0.2)

    async def _beat(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    def request_stop(self) -> None:
        if self._stopping is not None and not self._stopping.is_set():
            log.info("relay.stopping", in_flight=self.ledger.in_flight)
            self._stopping.set()

    async def _shutdown(self) -> None:
        halted = self._halt_reason is not None
        self.intake.stop_fetching()
        self.dispatcher.flush()
        if not halted and self._intake_error is None:
            await self._drain(
                lambda: self.ledger.in_flight - self._suspect_count(),
                self.config.settings.delivery.shutdown_grace_s,
            )
        released_before_close = self.ledger.released_unsettled
        self.intake.close()
        assert self._intake_stopped is not None
        try:
            # Closing commits and leaves the group: with the broker gone, librdkafka may wait on it for
            # minutes. A stop must end: past the bound the process exits without the final commit (what it
            # did not commit is sent again by the next owner: duplicates, never loss).
            await asyncio.wait_for(asyncio.shield(self._intake_stopped), CLOSE_TIMEOUT_S)
        except TimeoutError:
            self._close_timed_out = True
            log.error(
                "relay.kafka_close_timed_out",
                timeout_s=CLOSE_TIMEOUT_S,
                reason="the Kafka consumer did not close (broker unreachable?): its final commit may be lost",
            )
        log.info(
            "relay.stopped",
            delivered=self.delivered,
            dead_lettered=self.dead_lettered,
            # Left for the next owner: what the closing revoke released unsettled, and anything not released.
            unsettled=self.ledger.released_unsettled - released_before_close + self.ledger.in_flight,
        )

    async def _drain(self, remaining: Callable[[], int], grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while remaining() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)

    def _exit_status(self) -> int:
        if self._halt_reason is not None:
            log.error("relay.halted", reason=self._halt_reason)
            return EXIT_HALTED
        if self._intake_error is not None:
            log.error("relay.failed", error=str(self._intake_error))
            return EXIT_FAILED
        return EXIT_FAILED if self._close_timed_out else EXIT_OK

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)

    # --- what the intake thread asks (IntakeListener) ------------------------------------------------

    def on_records(self, records: list[Record]) -> None:
        if self._halt_reason is not None:
            return  # halted: nothing new is taken, so nothing past the halt is committed
        kept = self.ledger.track(records)
        feeds = self._feeds
        for tp, shop in {(record.tp, record.shop) for record in kept}:
            if shop is not None:
                feeds.setdefault(shop, set()).add(tp)
        self.dispatcher.submit(kept)

    def _breaker_changed(self, shop: str, state: str) -> None:
        self._hold_partitions()

    def _hold_partitions(self) -> None:
        """Pause what cannot move: the partitions that feed a shop whose API is down, and those with a
        record the dead-letter topic refused. Their backlog stays in Kafka, not in memory."""
        held: set[TopicPartition] = set(self._dlq_blocked)
        for name, breaker in self.breakers.items():
            if breaker.state == "open":
                held |= self._feeds.get(name, set())
        self.intake.held = frozenset(held)

    def on_assigned(self, partitions: list[tuple[TopicPartition, int]]) -> None:
        for tp, generation in partitions:
            self.ledger.assign(tp, generation)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.ledger.release(tp)
            self._drop_suspects(tp)
        self._unblock(partitions)

    def _unblock(self, partitions: list[TopicPartition]) -> None:
        """Released partitions are no longer held here (their next owner meets the fault afresh)."""
        if self._dlq_blocked.intersection(partitions):
            self._dlq_blocked.difference_update(partitions)
            self._hold_partitions()

    async def release(
        self, partitions: list[TopicPartition], grace_s: float
    ) -> dict[TopicPartition, int | None]:
        """A revoke: the partitions' in-flight records get ``grace_s`` to settle; return their positions."""
        self.dispatcher.flush()
        await self._drain(lambda: sum(self.ledger.in_flight_for(tp) for tp in partitions), grace_s)
        positions = {}
        for tp in partitions:
            positions[tp] = self.ledger.release(tp)
            self._drop_suspects(tp)
        self._unblock(partitions)
        return positions

    def on_intake_stopped(self, error: BaseException | None) -> None:
        if error is not None:
            self._intake_error = error
            log.error("relay.intake_failed", error=repr(error))
        assert self._intake_stopped is not None
        assert self._stopping is not None
        if not self._intake_stopped.done():
            self._intake_stopped.set_result(None)
        self._stopping.set()

    # --- settle --------------------------------------------------------------------------------------

    def _on_done(self, record: Record) -> None:
        """The dispatcher is finished with a record: settle it, dead-letter it, or hold it as a suspect."""
        if record.failure is None and not record.failed_calls:
            if self.ledger.settle(record):
                self.delivered += 1
                self.guard.note(False)
                self._count_settled(record, "delivered" if record.calls else "skipped")
            if self._suspects and record.calls and record.shop in self._suspects:
                self._acquit_shop(record.shop)
            return
        if (
            record.failure is None
            and record.shop is not None
            and all(failure.status in SHOP_WIDE_STATUSES for failure in record.failed_calls)
        ):
            self._hold_suspect(record.shop, record)
            return
        self._dead_letter(record)

    def _on_done_many(self, records: list[Record]) -> None:
        """A batch got its answer: settle its delivered records together, the others one by one."""
        delivered = []
        for record in records:
            if record.failure is None and not record.failed_calls:
                delivered.append(record)
            else:
                self._on_done(record)
        if not delivered:
            return
        settled = self.ledger.settle_many(delivered)
        self.delivered += settled
        self.guard.note_delivered(settled)
        metrics = self.metrics
        first = delivered[0]
        if all(r.tp[0] == first.tp[0] for r in delivered):
            metrics.settled[(first.tp[0], "delivered")] += settled
        else:
            for record in delivered:
                metrics.settled[(record.tp[0], "delivered")] += 1
        shop = first.shop
        for method, count in Counter([call.method for r in delivered for call in r.calls]).items():
            metrics.calls[(shop or "", method, "delivered")] += count
        if self._suspects and shop in self._suspects:
            self._acquit_shop(shop)

    def _dead_letter(self, record: Record, *, counted: bool = False) -> None:
        if not self.ledger.owns(record) or self._halt_reason is not None:
            return
        if not counted:
            if self.guard.would_trip():
                self._halt(
                    f"{self.guard.ratio:.0%} of the most recent records were dead-lettered "
                    f"(last: {_describe_failure(record)})"
                )
                return
            self.guard.note(True)
        self.dlq.send(record)

    def _dead_letter_written(self, record: Record) -> None:
        if record.tp in self._dlq_blocked:
            self._dlq_blocked.discard(record.tp)
            self._hold_partitions()
            self.faults.clear(
                f"dlq:{self._dlq_topics[record.tp[0]]}",
                event="relay.dead_letter_writable",
                topic=record.tp[0],
            )
        if self.ledger.settle(record):
            self.dead_lettered += 1
            self._count_settled(record, "dead_lettered")
            stage, reason = _failure_class(record)
            self.metrics.dead_lettered[(record.tp[0], stage, reason)] += 1
            log.info(
                "relay.dead_lettered",
                topic=record.tp[0],
                partition=record.tp[1],
                offset=record.offset,
                shop=record.shop,
                method=record.failed_calls[0].method if record.failed_calls else None,
                reason=_describe_failure(record),
            )

    def _count_settled(self, record: Record, outcome: str) -> None:
        metrics = self.metrics
        metrics.settled[(record.tp[0], outcome)] += 1
        shop = record.shop
        if not record.calls or shop is None:
            return
        calls = metrics.calls
        if not record.failed_calls:  # nearly every record (all of single mode's): no set, no index look-up
            for call in record.calls:
                calls[(shop, call.method, "delivered")] += 1
            return
        failed = {failure.index for failure in record.failed_calls}
        for index, call in enumerate(record.calls):
            calls[(shop, call.method, "permanent" if index in failed else "delivered")] += 1

    def _dead_letter_failed(self, record: Record, reason: str) -> None:
        """The dead-letter topic refused the record: keep it unsettled, hold its partition, try again later.

        A dead-letter topic that cannot be written is a fault of the setup, not of the record: nothing
        behind the record is committed, readiness turns red, and the relay recovers by itself once a write
        goes through (the topic created, the ACL granted).
        """
        record.note_failure(time.time())
        delay = self.backoff.delay(record.attempts)
        dlq = self._dlq_topics[record.tp[0]]
        if self.ledger.owns(record) and record.tp not in self._dlq_blocked:
            self._dlq_blocked.add(record.tp)
            self._hold_partitions()
        self.faults.raise_fault(
            f"dlq:{dlq}",
            f"dead-letter topic {dlq!r} cannot be written (topics.dead_letter_topic of {record.tp[0]!r}); "
            f"partitions held: {self._blocked_names(dlq)}: {reason}",
            event="relay.dead_letter_write_failed",
            topic=record.tp[0],
            partition=record.tp[1],
            offset=record.offset,
        )
        log.debug(
            "relay.dead_letter_retry", topic=record.tp[0], offset=record.offset, retry_in=round(delay, 2)
        )
        asyncio.get_running_loop().call_later(delay, lambda: self._dead_letter(record, counted=True))

    def _blocked_names(self, dlq: str) -> str:
        return ", ".join(f"{t}[{p}]" for t, p in sorted(self._dlq_blocked) if self._dlq_topics[t] == dlq)

    # --- suspects: records that failed for a reason that indicts the shop --------------------------

    def _hold_suspect(self, shop: str, record: Record) -> None:
        if self.guard.would_trip():
            status = record.failed_calls[0].status
            self._halt(
                f"shop {shop!r} answers HTTP {status} to every call: its apiKey/partnerId is wrong, "
                "revoked or disabled; nothing from the first failing record on was committed"
            )
            return
        self.guard.note(True)
        self._suspects.setdefault(shop, []).append(record)

    def _acquit_shop(self, shop: str) -> None:
        """A call of the shop succeeded: its credentials work, so its suspects failed on their own."""
        for record in self._suspects.pop(shop, []):
            self._dead_letter(record, counted=True)

    def _drop_suspects(self, tp: TopicPartition) -> None:
        for shop, records in list(self._suspects.items()):
            kept = [r for r in records if r.tp != tp]
            if kept:
                self._suspects[shop] = kept
            else:
                del self._suspects[shop]

    def _suspect_count(self) -> int:
        return sum(len(records) for records in self._suspects.values())

    def _halt(self, reason: str) -> None:
        if self._halt_reason is None:
            self._halt_reason = reason
            log.error("relay.dead_letter_guard_tripped", reason=reason)
            self.request_stop()

    # --- progress ------------------------------------------------------------------------------------

    async def _report_progress(self) -> None:
        last_delivered, last_time = 0, time.monotonic()
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            now = time.monotonic()
            rate = (self.delivered - last_delivered) / (now - last_time)
            last_delivered, last_time = self.delivered, now
            log.info(
                "relay.progress",
                consumed=self.intake.consumed,
                delivered=self.delivered,
                dead_lettered=self.dead_lettered,
                in_flight=self.ledger.in_flight,
                records_per_s=round(rate, 1),
                retries=sum(self.metrics.retries.values()),
                partitions=len(self.intake.assigned),
            )


def _tune_interpreter() -> None:
    """Collect rarely, never the start-up heap again, and hand the GIL over sooner.

    Every record makes a dozen tracked objects that live until its batch is answered, so with CPython's
    defaults young collections ran every few dozen records and full ones walked tens of thousands of
    in-flight records (about 87 ms each, a stall of the event loop too): about a fifth of the relay's CPU.
    Freezing what start-up allocated and raising the young threshold removes most of it; memory stays
    bounded by the in-flight cap, which is what bounds the heap.

    Two threads run Python here: the intake (decoding, CPU-bound) and the event loop (short bursts between
    socket calls). Each socket call releases the GIL, and getting it back from a busy intake thread took
    up to the switch interval, 5 ms by default, while answers waited: the relay idled at 0.8 of a core.
    With 1 ms, batch mode ran at 51,000-61,000 events/s against 39,000-52,000 (3 runs each, side by side).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def _failure_class(record: Record) -> tuple[str, str]:
    """(stage, reason) for the dead-letter metric: few distinct values, never a record's own data."""
    if record.failure is not None:
        return record.failure.stage, type(record.failure).__name__
    failure = record.failed_calls[0]
    return failure.stage, "contract" if failure.status is None else f"http_{failure.status}"


def _describe_failure(record: Record) -> str:
    if record.failure is not None:
        return f"{record.failure.stage}: {record.failure.reason}"
    failure = record.failed_calls[0]
    return f"deliver: {failure.method} {failure.reason}"


def run(config: RelayConfig) -> int:
    """Check the parts around the relay, then run it in a fresh event loop; return its exit status."""
    checks = preflight.run_checks(config, admin_config=kafka_client_config(config.settings))
    failure = preflight.first_failure(checks)
    if failure is not None:
        log.error("relay.preflight_failed", setting=failure.setting, problem=failure.problem)
        return EXIT_CONFIG
    log.info("relay.preflight_passed", checks=[check.line() for check in checks])
    return asyncio.run(Relay(config).run())
