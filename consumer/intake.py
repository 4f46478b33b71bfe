"""Intake: the one thread that owns the Kafka consumer.

librdkafka's consumer is not shared between threads, and its rebalance callbacks run inside ``consume()`` on
the thread that called it. So this thread does everything that touches the consumer — consume, decode and
translate each batch of records (plain function calls), pause and resume, commit settled positions
(``consumer.commit``: periodically, on revoke, at close) — and hands finished batches of :class:`Record`
to the event loop, one hand-off per batch, never per record. Everything that crosses between this thread
and the loop goes through ``consumer.handoff``.

A revoke must wait for in-flight HTTP calls without blocking what completes them: the callback asks the
loop to release the partitions (a coroutine that waits up to the grace period) and blocks only this
thread on the answer; the loop keeps delivering meanwhile.

Backpressure, shared fairly: the in-flight budget (``delivery.max_in_flight_records``) is split evenly
between the partitions that have records in flight. A partition that reaches its share is paused (its
backlog stays in Kafka, not in memory) until half of its share has settled; the others keep being fetched.
So a partition with a backlog always holds a share of the records in flight, whichever partitions
librdkafka's prefetch happens to favour, and the budget of idle partitions goes to the busy ones. The
paused set is re-applied after each assignment, as librdkafka forgets it across a rebalance.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Hashable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

import orjson
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as KafkaTopicPartition

from consumer.commit import Committer
from consumer.config import DeliveryMode, Settings, UnknownEventPolicy
from consumer.contract import TrackingCall
from consumer.decode import Decoder, DomainEvent, UnknownEventType
from consumer.deliver.envelope import PREFIXES, SUFFIX
from consumer.deliver.envelope import encode as envelope
from consumer.errors import DecodeError, PermanentError, RegistryUnavailable, TranslateError
from consumer.faults import FaultBoard
from consumer.handoff import Handoff
from consumer.logs import KafkaLog
from consumer.metrics import RelayMetrics
from consumer.record import CallFailure, Consumed, Entry, Record, Run, TopicPartition
from consumer.redrive import RedrivePlan
from consumer.retry import Backoff
from consumer.translate import Translator

log = structlog.get_logger(__name__)

#: How long one consume() call may block: bounds how late a stop, a store or a resume is applied.
POLL_TIMEOUT_S = 0.1
#: How long one end-offset query for a paused partition may take (once per statistics interval).
LAG_QUERY_TIMEOUT_S = 0.5
#: A broker connection that received nothing for this long counts as lost, though its socket is open (a
#: frozen or cut-off broker). A member hears from its coordinator every heartbeat, so the bound is this
#: many heartbeat intervals, and never under BROKER_SILENT_MIN_S.
BROKER_SILENT_HEARTBEATS = 2.5
BROKER_SILENT_MIN_S = 6.0
#: A consume error (e.g. a topic deleted under the relay) stays a fault this long after it was last seen.
CONSUME_FAULT_TTL_S = 30.0


class IntakeListener(Protocol):
    """What the intake thread asks of the event loop side (all called on the loop)."""

    def on_records(self, records: list[Record]) -> None: ...
    def on_consumed(self, consumed: Consumed) -> None: ...
    def on_assigned(self, partitions: list[tuple[TopicPartition, int]]) -> None: ...
    def on_lost(self, partitions: list[TopicPartition]) -> None: ...
    def release(
        self, partitions: list[TopicPartition], grace_s: float
    ) -> Coroutine[Any, Any, dict[TopicPartition, int | None]]: ...
    def on_intake_stopped(self, error: BaseException | None) -> None: ...


def consumer_config(settings: Settings) -> dict[str, Any]:
    kafka = settings.kafka
    static = {"group.instance.id": kafka.group_instance_id} if kafka.group_instance_id else {}
    return {
        # The user's pass-through settings first, so the ones below that the guarantees rest on win.
        **kafka.client,
        **static,
        "bootstrap.servers": kafka.bootstrap_servers,
        "group.id": kafka.group_id,
        "partition.assignment.strategy": "cooperative-sticky",
        # Nothing is stored or committed behind the relay's back: consumer.commit commits settled positions.
        "enable.auto.offset.store": False,
        "enable.auto.commit": False,
        "auto.offset.reset": kafka.client.get("auto.offset.reset", "earliest"),
        "enable.partition.eof": False,
        "queued.max.messages.kbytes": kafka.queued_max_messages_kbytes,
        "queued.min.messages": max(kafka.consume_batch * 2, 1000),
        # When a partition's prefetch queue is full librdkafka waits this long before fetching it again;
        # its default (1 s) starved the relay: consume + decode ran at half speed with the bound above.
        "fetch.queue.backoff.ms": 20,
        "statistics.interval.ms": kafka.statistics_interval_ms,
        # librdkafka's own lines go through the relay's JSON log, folded when they repeat, never raw.
        "logger": KafkaLog("consumer"),
    }


class Intake:
    """Runs the consumer on its own thread; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        decoders: Mapping[str, Decoder],
        translator: Translator,
        handoff: Handoff,
        listener: IntakeListener,
        *,
        consumer_factory: Callable[[dict[str, Any]], Consumer] = Consumer,
        metrics: RelayMetrics | None = None,
        faults: FaultBoard | None = None,
        redrive: RedrivePlan | None = None,
        stop_at: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        self._metrics = metrics or RelayMetrics()
        self.faults = faults or FaultBoard()
        self._redrive = redrive
        # A bounded run (a re-drive) reads each partition only up to this offset; a partition not named
        # is not read at all. What lies beyond is neither processed nor committed, and the partition pauses.
        self._stop_at = stop_at
        self._finished: set[TopicPartition] = set()
        self._settings = settings
        self._decoders = decoders
        self._translator = translator
        self._handoff = handoff
        self._listener = listener
        self._consumer_factory = consumer_factory
        self._mode: DeliveryMode = settings.delivery.mode
        self._ordering = settings.delivery.ordering
        # Batch mode reads whole consume() batches into per-shop entries (_prepare_lots); single mode and a
        # re-drive make a Record of every record.
        self._batch_path = self._mode == "batch" and redrive is None
        self._unknown: UnknownEventPolicy = settings.delivery.unknown_event
        self._cap = settings.delivery.max_in_flight_records
        self._backoff = Backoff(settings.retry)
        self._generation: dict[TopicPartition, int] = {}
        self._assigned: set[TopicPartition] = set()
        # Partitions paused because they hold their share of the in-flight budget (see _over_share).
        self._loaded: set[TopicPartition] = set()
        self._committer = Committer(settings.kafka.commit_interval_ms / 1000)
        self._currently_paused: set[TopicPartition] = set()
        self._draining = False
        self._closing = False
        # partition -> (resume at, failed attempts): partitions waiting out a schema registry outage
        self._decode_retry: dict[TopicPartition, tuple[float, int]] = {}
        self._lag_refresh_due = False
        heartbeat_s = float(settings.kafka.client.get("heartbeat.interval.ms", 3000)) / 1000
        self._broker_silent_s = max(BROKER_SILENT_MIN_S, BROKER_SILENT_HEARTBEATS * heartbeat_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rr-intake", daemon=True)

    # --- control, from the loop ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop_fetching(self) -> None:
        """Shutdown, first step: stop taking new records (keep serving stores and rebalances)."""
        self._draining = True

    def close(self) -> None:
        """Shutdown, second step: commit what is settled, leave the group, end the thread.

        The loop has had its drain time already, so the revoke that closing triggers waits for nothing.
        """
        self._closing = True
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        error: BaseException | None = None
        consumer: Consumer | None = None
        config = {
            **consumer_config(self._settings),
            "stats_cb": self._on_stats,
            "error_cb": self._on_error,
            "on_commit": self._on_commit,
        }
        try:
            consumer = self._consumer_factory(config)
            consumer.subscribe(
                [topic.name for topic in self._settings.topics],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            while not self._stop.is_set():
                self._iteration(consumer)
            self._commit_before_close(consumer)
        except BaseException as exc:  # noqa: BLE001 - reported to the loop, which stops the service
            error = exc
        finally:
            if consumer is not None:
                self._close_consumer(consumer)
            config["logger"].flush()  # the counts of librdkafka's lines held back, now the consumer is closed
            self._handoff.to_loop(self._listener.on_intake_stopped, error)

    def _iteration(self, consumer: Consumer) -> None:
        self._handoff.last_poll = time.monotonic()
        self._commit_positions(consumer)
        self._apply_pause(consumer)
        messages = self._fetch(consumer)
        if self._lag_refresh_due:
            self._refresh_paused_lag(consumer)
        if not messages:
            return
        if self._batch_path:
            consumed = self._prepare_lots(consumer, messages)
            if consumed.runs:
                self._handoff.to_loop(self._listener.on_consumed, consumed)
            return
        records = self._prepare(consumer, messages)
        if records:
            self._handoff.to_loop(self._listener.on_records, records)

    def _fetch(self, consumer: Consumer) -> list[Message]:
        """What the consumer holds now, up to a batch; when it holds nothing, the first record to come (within
        ``POLL_TIMEOUT_S``) and whatever came with it.

        ``consume(n, timeout)`` returns only once it has ``n`` records or the timeout has passed, so under a
        trickle each call waited out its whole timeout and added up to 100 ms to every record's latency (the
        end-to-end latency figure in BENCHMARKS.md). Asking without waiting first keeps full batches under a
        backlog (the prefetch queue holds more than a batch) and takes a lone record the moment it arrives.
        """
        batch = self._settings.kafka.consume_batch
        messages = consumer.consume(num_messages=batch, timeout=0)
        if messages:
            return messages
        first = consumer.consume(num_messages=1, timeout=POLL_TIMEOUT_S)
        if not first or batch == 1:
            return first
        return first + consumer.consume(num_messages=batch - 1, timeout=0)

    def _commit_before_close(self, consumer: Consumer) -> None:
        """Commit what settled before close() (whose revoke commits again, or may not come at all).

        A stop in the middle of a rebalance (a member joined a moment ago) finds the group refusing commits
        until the rebalance is through: keep serving it, every partition paused, within the revoke grace,
        and commit then; closing at once would leave the settled records to be sent again.
        """
        deadline = time.monotonic() + max(self._settings.delivery.revoke_grace_s, POLL_TIMEOUT_S)
        self._committer.note(self._handoff.positions.take())
        while not self._committer.commit_now(consumer, self._owned()):
            if time.monotonic() > deadline:
                log.error("intake.final_commit_abandoned", partitions=len(self._assigned))
                return
            self._apply_pause(consumer)
            consumer.consume(num_messages=self._settings.kafka.consume_batch, timeout=POLL_TIMEOUT_S)
            self._committer.note(self._handoff.positions.take())

    def _close_consumer(self, consumer: Consumer) -> None:
        # close() revokes every partition through _on_revoke, which commits each one's settled position.
        log.debug("intake.closing", partitions=len(self._assigned))
        try:
            consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("intake.close_failed", error=str(exc))

    # --- records -------------------------------------------------------------------------------------

    def _prepare(self, consumer: Consumer, messages: list[Message]) -> list[Record]:
        records: list[Record] = []
        retrying: set[TopicPartition] = set()
        stop_at = self._stop_at
        process = self._decode_and_translate if self._redrive is None else self._redrive_record
        # consume() returns runs of one partition: its coordinates and generation are looked up per run.
        topic: str | None = None
        partition: int | None = None
        tp: TopicPartition = ("", -1)
        generation = 0
        counts: dict[str, int] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                self._consume_error(error)
                continue
            if message.partition() != partition or message.topic() != topic:
                # A message without an error always has its coordinates.
                topic, partition = message.topic(), message.partition()
                tp = (topic, partition)  # type: ignore[assignment]
                generation = self._generation.get(tp, 0)
            offset: int = message.offset()  # type: ignore[assignment]
            if retrying and tp in retrying:
                continue  # an earlier record of this partition is waiting for the registry: re-read later
            if stop_at is not None and offset >= stop_at.get(tp, 0):
                self._finished.add(tp)
                continue
            record = Record(tp, offset, generation, message.key(), message)
            try:
                process(record, message)
            except RegistryUnavailable as exc:
                retrying.add(tp)
                self._retry_decode_later(consumer, tp, offset, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one record's surprise is its dead letter, not the thread's end
                record.failure = DecodeError(_unexpected("preparing", exc))
            records.append(record)
            counts[tp[0]] = counts.get(tp[0], 0) + 1
        self._after_prepare(retrying, {record.tp for record in records}, len(records), counts)
        return records

    def _after_prepare(
        self, retrying: set[TopicPartition], read: set[TopicPartition], count: int, counts: dict[str, int]
    ) -> None:
        if self._decode_retry:
            # The registry answered for these partitions again (unless a later record of one failed).
            for tp in read - retrying:
                self._decode_retry.pop(tp, None)
            if not self._decode_retry:
                self.faults.clear("registry", event="intake.registry_back")
        self._handoff.consumed += count
        consumed = self._metrics.consumed
        for name, topic_count in counts.items():
            consumed[name] += topic_count

    def _prepare_lots(self, consumer: Consumer, messages: list[Message]) -> Consumed:
        """Batch mode: a consume() batch, decoded and translated straight into per-shop entries.

        The common record becomes one tuple (``consumer.record.Entry``) holding its envelope bytes, its
        ordering key, its run and its message; no :class:`Record` is made of it unless a call of it fails
        later. A record that fails decoding or translating, or whose translation refused some of its calls,
        is a Record from the start, counted in its run like the others. A record that implies no call (an
        unknown type skipped) is counted in no run: it settles as its run is read.
        """
        runs: list[Run] = []
        lots: dict[str, list[Entry]] = {}
        failed: list[Record] = []
        retrying: set[TopicPartition] = set()
        decoders, translate = self._decoders, self._translator.translate_partial
        by_key, by_partition = self._ordering == "key", self._ordering == "partition"
        dumps, prefixes = orjson.dumps, PREFIXES
        topic: str | None = None
        partition: int | None = None
        tp: TopicPartition = ("", -1)
        decoder: Decoder | None = None
        run: Run | None = None
        read = 0
        # records read per topic, added up as the topic changes (a per-record count costs more)
        counts: dict[str, int] = {}
        counted: str | None = None
        counted_from = 0
        for message in messages:
            error = message.error()
            if error is not None:
                self._consume_error(error)
                continue
            if message.partition() != partition or message.topic() != topic:
                # consume() returns runs of one partition: a Run per run, its coordinates looked up once.
                topic, partition = message.topic(), message.partition()
                tp = (topic, partition)  # type: ignore[assignment]
                decoder = decoders[topic]  # type: ignore[index]
                offset: int = message.offset()  # type: ignore[assignment]
                run = Run(tp, self._generation.get(tp, 0), offset, offset)
                runs.append(run)
                if topic != counted:
                    if counted is not None:
                        counts[counted] = counts.get(counted, 0) + read - counted_from
                    counted, counted_from = topic, read
            if retrying and tp in retrying:
                continue  # an earlier record of this partition is waiting for the registry: re-read later
            assert run is not None
            assert decoder is not None
            offset = message.offset()  # type: ignore[assignment]
            try:
                event = decoder.decode(message.value(), message.headers())
                calls, rejected = translate(event)
            except RegistryUnavailable as exc:
                retrying.add(tp)
                self._retry_decode_later(consumer, tp, offset, exc)
                continue
            except Exception:  # noqa: BLE001 - the record's own failure: found and classified one by one
                run.end = offset + 1
                read += 1
                record = self._failed_record(run, offset, message)
                if record is not None:
                    run.open += 1
                    run.records.append(record)
                    failed.append(record)
                continue
            run.end = offset + 1
            read += 1
            if not calls:
                continue  # nothing to send: it settles as its run does
            run.open += 1
            shop = calls[0].shop
            key: Hashable | None = message.key() if by_key else (tp if by_partition else None)
            if rejected:
                record = Record(tp, offset, run.generation, message.key(), message, run=run)
                run.records.append(record)
                self._translate(record, event, frozenset())
                entry: Entry = (b",".join(record.payloads), key, None, None, record, len(record.payloads))
            elif len(calls) == 1:
                call = calls[0]
                method = call.method
                entry = (prefixes[method] + dumps(call.body) + SUFFIX, key, run, method, message, 1)
            else:
                # Orders: one call per product, all of one method.
                entry = (
                    b",".join([envelope(c) for c in calls]),
                    key,
                    run,
                    calls[0].method,
                    message,
                    len(calls),
                )
            lot = lots.get(shop)
            if lot is None:
                lot = lots[shop] = []
            lot.append(entry)
        if counted is not None:
            counts[counted] = counts.get(counted, 0) + read - counted_from
        runs = [run for run in runs if run.end > run.first]  # a run cut at its first record (the registry)
        self._after_prepare(retrying, {run.tp for run in runs}, read, counts)
        return Consumed(runs, lots, failed)

    def _failed_record(self, run: Run, offset: int, message: Message) -> Record | None:
        """The record that decoding or translating refused, with its failure; None when it is to be skipped.

        Decoded and translated again through the per-record path, which classifies each failure."""
        record = Record(run.tp, offset, run.generation, message.key(), message, run=run)
        try:
            self._decode_and_translate(record, message)
        except RegistryUnavailable as exc:  # the registry failed between the two reads: a surprise, too
            record.failure = DecodeError(_unexpected("decoding", exc))
        if record.failure is None and not record.failed_calls and not record.payloads:
            return None  # an unknown type under unknown_event = "skip"
        if record.failure is None and record.payloads:
            # A surprise the second read did not repeat: dead-letter it rather than guess.
            record.failure = DecodeError("the record could not be prepared for the batch path")
        return record

    def _redrive_record(self, record: Record, message: Message) -> None:
        assert self._redrive is not None
        source = self._redrive.prepare(record, message)
        if source is None:
            return  # not to be re-driven (filtered out or past the loop guard): settles at once
        topic, value, delivered = source
        self._decode_and_translate(record, message, topic, value, delivered)

    def _decode_and_translate(
        self,
        record: Record,
        message: Message,
        topic: str | None = None,
        value: bytes | None = None,
        delivered: frozenset[int] = frozenset(),
    ) -> None:
        if topic is None:
            topic, value = record.tp[0], message.value()
        try:
            # The headers may carry the schema id (confluent-avro's __value_schema_id); re-driven records keep
            # the original's.
            event = self._decoders[topic].decode(value, message.headers())
        except UnknownEventType as exc:
            if self._unknown == "skip":
                return  # no calls, no failure: it settles at once and is committed
            record.failure = exc
            return
        except PermanentError as exc:
            record.failure = exc
            return
        except RegistryUnavailable:
            raise  # transient: the partition waits for the registry (see _prepare)
        except Exception as exc:  # noqa: BLE001 - a decoder's surprise is this record's dead letter
            record.failure = DecodeError(_unexpected("decoding", exc))
            return
        try:
            self._translate(record, event, delivered)
        except PermanentError as exc:
            record.failure = exc
        except Exception as exc:  # noqa: BLE001 - as above, for translating and encoding
            record.failure = TranslateError(_unexpected("translating", exc))

    def _translate(self, record: Record, event: DomainEvent, delivered: frozenset[int]) -> None:
        calls, rejected = self._translator.translate_partial(event)
        record.shop = calls[0].shop if calls else None
        record.calls = calls
        if rejected or delivered:
            # Calls that broke the contract (an order's bad line item) are never sent, and neither are those
            # a re-driven record delivered before; the rest are.
            record.failed_calls = [
                CallFailure(index, calls[index].method, None, reason, stage="translate")
                for index, reason in rejected
                if index not in delivered
            ]
            skipped = {index for index, _ in rejected} | delivered
            record.send_index = [i for i in range(len(calls)) if i not in skipped]
            calls = [calls[i] for i in record.send_index]
        record.payloads = self._encode(calls)

    def _encode(self, calls: list[TrackingCall]) -> list[bytes]:
        if self._mode == "batch":
            return [envelope(call) for call in calls]
        return [orjson.dumps(call.body) for call in calls]

    def _consume_error(self, error: KafkaError) -> None:
        if error.fatal():
            raise KafkaException(error)
        # Such an error repeats on every poll while it lasts (a deleted topic): one fault, not a line each.
        self.faults.raise_fault(
            f"consume:{error.name()}",
            f"consuming failed: {error.str()}",
            event="intake.consume_error",
            ttl_s=CONSUME_FAULT_TTL_S,
            code=error.name(),
        )

    def _retry_decode_later(
        self, consumer: Consumer, tp: TopicPartition, offset: int, exc: RegistryUnavailable
    ) -> None:
        """The registry is down: rewind the partition to this record and pause it for a backoff."""
        _, attempts = self._decode_retry.get(tp, (0.0, 0))
        delay = self._backoff.delay(attempts + 1)
        self._decode_retry[tp] = (time.monotonic() + delay, attempts + 1)
        partition = KafkaTopicPartition(tp[0], tp[1], offset)
        # Paused at once, so nothing fetched behind this record is read before the rewind, and booked as
        # paused: a retry drawn shorter than the rest of this turn is due before _apply_pause next runs, which
        # would otherwise see nothing to change and leave the partition paused for good.
        consumer.pause([partition])
        self._currently_paused = self._currently_paused | {tp}
        consumer.seek(partition)
        log.debug(
            "intake.registry_retry",
            topic=tp[0],
            partition=tp[1],
            offset=offset,
            attempt=attempts + 1,
            retry_in=round(delay, 2),
            reason=str(exc),
        )
        self.faults.raise_fault(
            "registry",
            f"schema registry unavailable (schema_registry.url), {len(self._decode_retry)} partition(s) "
            f"paused: {exc}",
            event="intake.registry_unavailable",
            topic=tp[0],
            partition=tp[1],
            offset=offset,
        )

    # --- pause, resume, offsets ----------------------------------------------------------------------

    def _apply_pause(self, consumer: Consumer) -> None:
        now = time.monotonic()
        wanted_paused = set(self._assigned) if self._draining else self._over_share()
        wanted_paused |= {tp for tp, (resume_at, _) in self._decode_retry.items() if resume_at > now}
        wanted_paused |= self._handoff.held | self._finished
        current = self._currently_paused
        if wanted_paused != current:
            to_pause = wanted_paused - current
            to_resume = (current - wanted_paused) & self._assigned
            if to_pause:
                consumer.pause([KafkaTopicPartition(t, p) for t, p in to_pause])
            if to_resume:
                consumer.resume([KafkaTopicPartition(t, p) for t, p in to_resume])
            self._currently_paused = wanted_paused & self._assigned

    def _over_share(self) -> set[TopicPartition]:
        """The partitions that hold their share of the in-flight budget, to be paused.

        The share is the cap split evenly between the partitions with records in flight (at least one), so
        that idle partitions lend theirs to busy ones. A partition is paused on reaching its share and
        resumed once it is down to half of it. A partition with nothing in flight is never paused here: it
        may always take one consume() batch, so the records in flight exceed the cap only by what partitions
        coming out of idleness take before the others' shares shrink to make room for them.
        """
        unsettled = self._handoff.unsettled
        assigned = self._assigned
        busy = [tp for tp, count in unsettled.items() if count > 0 and tp in assigned]
        share = max(1, self._cap // max(1, len(busy)))
        loaded = self._loaded
        for tp in list(loaded):
            if unsettled.get(tp, 0) <= share // 2 or tp not in assigned:
                loaded.discard(tp)
        for tp in busy:
            if unsettled[tp] >= share:
                loaded.add(tp)
        return set(loaded)

    def _owned(self) -> dict[TopicPartition, int]:
        """The generation of each partition this consumer owns now."""
        generation = self._generation
        return {tp: generation[tp] for tp in self._assigned}

    def _commit_positions(self, consumer: Consumer) -> None:
        positions = self._handoff.positions.take()
        if positions:
            self._committer.note(positions)
        self._committer.commit_due(consumer, self._owned())

    # --- librdkafka callbacks (run inside consume()/close() on this thread) ---------------------------

    def _on_stats(self, raw: str) -> None:
        stats = orjson.loads(raw)
        brokers = stats.get("brokers", {})
        if any(b.get("nodeid", -1) >= 0 for b in brokers.values()):  # else too early to tell: no metadata yet
            self._broker_state(_brokers_answering(brokers, self._broker_silent_s))
        lag: dict[TopicPartition, int] = {}
        for topic, info in stats.get("topics", {}).items():
            for key, partition in info.get("partitions", {}).items():
                tp = (topic, int(key))
                if tp in self._assigned and partition.get("consumer_lag", -1) >= 0:
                    lag[tp] = int(partition["consumer_lag"])
        self._handoff.lag = lag
        self._lag_refresh_due = bool(self._currently_paused)

    def _refresh_paused_lag(self, consumer: Consumer) -> None:
        """A paused partition is not fetched, so librdkafka's lag for it goes stale just when the backlog
        grows (a breaker open, backpressure). Ask the broker for its end offset instead."""
        self._lag_refresh_due = False
        lag = dict(self._handoff.lag)
        for tp in self._currently_paused & self._assigned:
            partition = KafkaTopicPartition(tp[0], tp[1])
            try:
                _, high = consumer.get_watermark_offsets(partition, timeout=LAG_QUERY_TIMEOUT_S, cached=False)
                position = consumer.position([partition])[0].offset
            except KafkaException as exc:
                log.debug("intake.lag_query_failed", topic=tp[0], partition=tp[1], reason=str(exc))
                continue
            if position >= 0:
                lag[tp] = max(0, high - position)
        self._handoff.lag = lag

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka's error events (served inside consume()); the rest of its news is in its log."""
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._broker_state(f"every broker connection is down ({error.str()})")
        else:
            log.debug("intake.kafka_error", code=error.name(), reason=error.str(), fatal=error.fatal())

    def _broker_state(self, problem: str | None) -> None:
        """Readiness and one line per change: the brokers answer (``problem`` None) or not."""
        servers = self._settings.kafka.bootstrap_servers
        if problem is None:
            self.faults.clear("kafka", event="kafka.broker_back", bootstrap_servers=servers)
        else:
            self.faults.raise_fault(
                "kafka",
                f"no Kafka broker reachable (kafka.bootstrap_servers = {servers}): {problem}",
                event="kafka.broker_lost",
            )

    def _on_commit(self, error: KafkaError | None, partitions: list[KafkaTopicPartition]) -> None:
        if error is not None:
            log.warning("intake.commit_failed", error=error.str())
            self._committer.failed(partitions)
            return
        refused = [partition for partition in partitions if partition.error is not None]
        if refused:
            log.warning("intake.commit_failed", partitions=_names(refused), error=str(refused[0].error))
            self._committer.failed(refused)
        now = time.time()
        acknowledged = [p for p in partitions if p.error is None and p.offset >= 0]
        if acknowledged:
            commit_times = dict(self._handoff.commit_times)
            commit_times.update(((p.topic, p.partition), now) for p in acknowledged)
            self._handoff.commit_times = commit_times
        self._committer.confirm(acknowledged, self._owned())

    # --- rebalance callbacks (run inside consume()/close() on this thread) ---------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        assigned = []
        assigned_at = dict(self._handoff.assigned_at)
        for partition in partitions:
            tp = (partition.topic, partition.partition)
            self._generation[tp] = self._generation.get(tp, 0) + 1
            self._assigned.add(tp)
            assigned_at[tp] = time.time()
            assigned.append((tp, self._generation[tp]))
        self._handoff.assigned_at = assigned_at
        self._handoff.assigned = frozenset(self._assigned)
        # The loop learns of the assignment before any record of it: both go through the same FIFO.
        self._handoff.to_loop(self._listener.on_assigned, assigned)
        self._currently_paused = self._currently_paused - {tp for tp, _ in assigned}
        log.info("intake.assigned", partitions=_names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        grace = 0.0 if self._closing else self._settings.delivery.revoke_grace_s
        try:
            positions = self._handoff.ask_loop(self._listener.release(tps, grace), timeout=grace + 5.0)
        except (FutureTimeout, RuntimeError, asyncio.CancelledError) as exc:
            log.error("intake.release_failed", partitions=_names(partitions), error=repr(exc))
            positions = {}
        final = {tp: (self._generation.get(tp, 0), positions.get(tp)) for tp in tps}
        self._forget(tps)
        # The final commit of these partitions; the committer commits nothing more for this generation.
        held = self._committer.commit_final(consumer, final, ask=not self._closing)
        log.info(
            "intake.revoked",
            partitions=_names(partitions),
            # What the broker holds after the commit, asked of it: what the next owner starts from.
            committed={f"{t}[{p}]": offset for (t, p), offset in held.items()},
        )

    def _on_lost(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._forget(tps)
        self._committer.forget(tps)
        # Another member may own these already: nothing of them is committed from here.
        self._handoff.to_loop(self._listener.on_lost, tps)
        log.warning("intake.lost", partitions=_names(partitions))

    def _forget(self, tps: list[TopicPartition]) -> None:
        gone = set(tps)
        for tp in tps:
            self._assigned.discard(tp)
            self._decode_retry.pop(tp, None)
            self._finished.discard(tp)
        self._currently_paused = self._currently_paused - gone
        handoff = self._handoff
        handoff.assigned = frozenset(self._assigned)
        handoff.commit_times = {tp: t for tp, t in handoff.commit_times.items() if tp not in gone}
        handoff.assigned_at = {tp: t for tp, t in handoff.assigned_at.items() if tp not in gone}
        handoff.lag = {tp: n for tp, n in handoff.lag.items() if tp not in gone}


def _names(partitions: list[KafkaTopicPartition]) -> list[str]:
    return [f"{p.topic}[{p.partition}]" for p in partitions]


def _brokers_answering(brokers: Mapping[str, Any], silent_s: float) -> str | None:
    """None when a broker connection is up and heard from within ``silent_s``; else what is wrong.

    A socket can stay up to a broker that stopped answering (frozen, cut off): ``rxidle`` (µs since the
    last byte received) tells that apart. The group coordinator's connection (a logical broker, node id -1)
    counts: a member hears from it every heartbeat even while every partition is paused.
    """
    up = [b for b in brokers.values() if b.get("state") == "UP"]
    if not up:
        states = sorted({str(b.get("state")) for b in brokers.values() if b.get("nodeid", -1) >= 0})
        return f"no connection to any broker (state {', '.join(states)})"
    # -1: nothing received yet on a connection just made, which counts as fresh.
    silent_us = min(max(b.get("rxidle", -1), 0) for b in up)
    if silent_us > silent_s * 1_000_000:
        return f"connected, but no broker has answered for {silent_us / 1_000_000:.0f}s"
    return None


def _unexpected(step: str, exc: Exception) -> str:
    """The dead-letter reason for an error no stage anticipated: its type and message, never a traceback."""
    return f"unexpected {type(exc).__name__} while {step} the record: {exc}"[:500]
