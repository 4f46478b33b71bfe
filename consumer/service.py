"""The relay service: wires the stages together and runs them until SIGTERM/SIGINT.

::

    intake thread                  │ handoff │  event loop
    consume ─► decode ─► translate ─► entries ─► Settler.admit ─► Dispatcher ─► Settler (delivered, done)
                                                                                   └─► dead-letter topic
    commit ◄─────────────────────────── positions ◄────────────────────────────────────── ledger (runs)
    pause  ◄─────────────────────────── held, unsettled ◄─────────────────────────────────── Settler

In batch mode a ``consume()`` batch crosses as per-shop entries (``consumer.record.Entry``), in single mode
as records. The settler (``consumer.settle``) decides every record's outcome and so what may be committed:
a record is settled when every call it implied was delivered, or when it was confirmed written to the
dead-letter topic. The intake thread only executes it: it commits the positions handed over
(``consumer.commit``: periodically, and synchronously on revoke and at shutdown) and pauses what it is told
to hold. What crosses between the threads goes through ``consumer.handoff``, nothing else.

Shutdown (SIGTERM): stop fetching, seal open batches, let in-flight records settle within
``delivery.shutdown_grace_s``, commit, leave the group, exit 0. A tripped dead-letter guard exits 3 without
waiting and without committing the records it stopped on.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Final

import structlog

from consumer import __version__, preflight
from consumer.breaker import CircuitBreaker
from consumer.clients import kafka_client_config
from consumer.config import RelayConfig
from consumer.deadletter import DeadLetterWriter
from consumer.decode import build_decoders
from consumer.deliver import BatchDispatcher, make_dispatcher
from consumer.faults import FaultBoard
from consumer.guard import DeadLetterGuard
from consumer.handoff import Handoff
from consumer.health import HealthServer
from consumer.intake import Intake
from consumer.interpreter import tune_interpreter
from consumer.ledger import OffsetLedger
from consumer.metrics import RelayMetrics, report_progress
from consumer.probes import Probes
from consumer.record import Consumed, Record, TopicPartition
from consumer.redrive import Redrive
from consumer.retry import Backoff
from consumer.settle import Settler
from consumer.tracking import TrackingClient
from consumer.translate import Translator

log = structlog.get_logger(__name__)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2
EXIT_HALTED: Final = 3
#: How often a draining revoke or shutdown looks at the in-flight count.
DRAIN_POLL_S: Final = 0.01
PROGRESS_EVERY_S: Final = 5.0
#: How long closing the Kafka consumer (final commit, leaving the group) may take at shutdown.
CLOSE_TIMEOUT_S: Final = 15.0


class Relay:
    """One process of the relay: a member of the consumer group delivering to the tracking API.

    Wiring and lifecycle only: :meth:`run` builds the stages in flow order, starts them, waits for a stop,
    and shuts them down in reverse; what each stage does is its own module's business.
    """

    def __init__(self, config: RelayConfig, *, redrive: Redrive | None = None) -> None:
        self.config = config
        self.redrive = redrive
        self.metrics = RelayMetrics()
        #: Faults of the parts around the relay (broker, registry, dead-letter topic): readiness and the log.
        self.faults = FaultBoard()
        self.ledger = OffsetLedger(on_settled=redrive.plan.settled if redrive is not None else None)
        self.health: HealthServer | None = None
        self._stopping: asyncio.Event | None = None
        self._intake_error: BaseException | None = None
        self._intake_stopped: asyncio.Future[None] | None = None
        self._close_timed_out = False

    # --- lifecycle -----------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until stopped; return the process exit status."""
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._intake_stopped = loop.create_future()
        await self._build(loop)
        self._start_health()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        tune_interpreter()
        self.intake.start()
        progress = report_progress(self.settler.progress, PROGRESS_EVERY_S)
        background = [asyncio.create_task(progress), asyncio.create_task(self.probes.beat())]
        if self.redrive is not None:
            watch = self.redrive.stop_when_caught_up(self.settler, self.request_stop)
            background.append(asyncio.create_task(watch))
        settings = self.config.settings
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
            self.dlq.close()  # what it could not confirm was never settled, so never committed
        return self._exit_status()

    async def _build(self, loop: asyncio.AbstractEventLoop) -> None:
        """The stages, each made before what reports to it: settle (delivery and the dead-letter topic report
        their outcomes to it), the dead-letter topic, deliver, then the intake that feeds them all."""
        settings, retry = self.config.settings, self.config.settings.retry
        self.handoff = Handoff(loop)
        self.ledger.positions = self.handoff.positions
        self.breakers = CircuitBreaker.per_shop(
            self.config.shops, retry, lambda shop, state: self.settler.breaker_changed(shop, state)
        )
        self.backoff = Backoff(retry)
        dlq_topics = {t.name: t.dlq for t in settings.topics}
        self.settler = Settler(
            self.ledger,
            DeadLetterGuard(settings.dead_letter),
            breakers=self.breakers,
            dead_letter_topics=dlq_topics,
            backoff=self.backoff,
            schedule=loop.call_later,
            handoff=self.handoff,
            halt=self.request_stop,
            metrics=self.metrics,
            faults=self.faults,
        )
        self.dlq = DeadLetterWriter(
            kafka_client_config(settings),
            dlq_topics.__getitem__,
            loop,
            write_timeout_s=settings.dead_letter.write_timeout_s,
            on_written=self.settler.dead_letter_written,
            on_failed=self.settler.dead_letter_failed,
        )
        self.settler.bind_dead_letters(self.dlq)
        self.client = TrackingClient(settings.tracking, self.config.shops)
        await self.client.start()
        self.dispatcher = make_dispatcher(
            self.client,
            settings.delivery,
            settings.tracking,
            self.backoff,
            breakers=self.breakers,
            done=self.settler.done,
            done_many=self.settler.done_many,
            delivered=self.settler.batch_delivered,
            owns=self.ledger.owns,
            releases=lambda: self.ledger.releases,
            metrics=self.metrics,
        )
        self.dispatcher.start()
        redrive = self.redrive
        self.intake = Intake(
            settings,
            redrive.decoders if redrive is not None else build_decoders(self.config),
            Translator(self.config.shops, settings.delivery.default_shop),
            self.handoff,
            self,
            metrics=self.metrics,
            faults=self.faults,
            redrive=redrive.plan if redrive is not None else None,
            stop_at=redrive.stop_at if redrive is not None else None,
        )
        self.probes = Probes(
            self.handoff, self.faults, self.breakers, stall_after_s=settings.observability.stall_after_s
        )

    def _start_health(self) -> None:
        observability = self.config.settings.observability
        self.metrics.gauges.watch(self.handoff, self.breakers)
        if observability.port is None:
            return
        self.health = HealthServer(
            self.metrics,
            liveness=self.probes.liveness,
            readiness=self.probes.readiness,
            host=observability.host,
            port=observability.port,
        )
        self.health.start()

    def request_stop(self) -> None:
        if self._stopping is not None and not self._stopping.is_set():
            log.info("relay.stopping", in_flight=self.ledger.in_flight)
            self.probes.stopping = True
            self._stopping.set()

    async def _shutdown(self) -> None:
        halted = self.settler.halt_reason is not None
        self.intake.stop_fetching()
        self.dispatcher.flush()
        if not halted and self._intake_error is None:
            await self._drain(
                lambda: self.ledger.in_flight - self.settler.suspect_count,
                self.config.settings.delivery.shutdown_grace_s,
            )
        released_before_close = self.ledger.released_unsettled
        self.intake.close()
        assert self._intake_stopped is not None
        try:
            # Closing commits and leaves the group, and with no broker may wait minutes. A stop must end:
            # past the bound it exits without the final commit (the next owner resends: duplicates, not loss).
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
            delivered=self.settler.delivered,
            dead_lettered=self.settler.dead_lettered,
            # Left for the next owner: what the closing revoke released unsettled, and anything not released.
            unsettled=self.ledger.released_unsettled - released_before_close + self.ledger.in_flight,
        )

    async def _drain(self, remaining: Callable[[], int], grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while remaining() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)

    def _exit_status(self) -> int:
        if self.settler.halt_reason is not None:
            log.error("relay.halted", reason=self.settler.halt_reason)
            return EXIT_HALTED
        if self._intake_error is not None:
            log.error("relay.failed", error=str(self._intake_error))
            return EXIT_FAILED
        return EXIT_FAILED if self._close_timed_out else EXIT_OK

    # --- what the intake thread hands over (IntakeListener, called on the loop) ----------------------

    def on_records(self, records: list[Record]) -> None:
        self.dispatcher.submit(self.settler.admit(records))

    def on_consumed(self, consumed: Consumed) -> None:
        assert isinstance(self.dispatcher, BatchDispatcher)  # the intake hands lots over in batch mode only
        self.dispatcher.submit_lots(self.settler.admit_consumed(consumed))

    def on_assigned(self, partitions: list[tuple[TopicPartition, int]]) -> None:
        self.settler.assign(partitions)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        self.settler.release(partitions)

    async def release(
        self, partitions: list[TopicPartition], grace_s: float
    ) -> dict[TopicPartition, int | None]:
        """A revoke: the partitions' in-flight records get ``grace_s`` to settle; return their positions."""
        self.dispatcher.flush()
        await self._drain(lambda: sum(self.ledger.in_flight_for(tp) for tp in partitions), grace_s)
        return self.settler.release(partitions)

    def on_intake_stopped(self, error: BaseException | None) -> None:
        if error is not None:
            self._intake_error = error
            log.error("relay.intake_failed", error=repr(error))
        assert self._intake_stopped is not None
        if not self._intake_stopped.done():
            self._intake_stopped.set_result(None)
        self.request_stop()


def run(config: RelayConfig) -> int:
    """Check the parts around the relay, then run it in a fresh event loop; return its exit status."""
    checks = preflight.run_checks(config, admin_config=kafka_client_config(config.settings))
    failure = preflight.first_failure(checks)
    if failure is not None:
        log.error("relay.preflight_failed", setting=failure.setting, problem=failure.problem)
        return EXIT_CONFIG
    log.info("relay.preflight_passed", checks=[check.line() for check in checks])
    return asyncio.run(Relay(config).run())
