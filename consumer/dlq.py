"""``rr-consumer dlq inspect`` and ``rr-consumer dlq redrive``: the dead-letter topic, for operators.

``inspect`` reads dead-letter topics from their start to their current end, without a consumer group, and
their resolution logs (:mod:`consumer.resolution`), and prints one row per record: where it came from, at
which stage it failed, the status, the reason, its calls (failed and delivered), its age, and its state —
pending, re-driven (when, with what outcome), or why it cannot be re-driven. A copy that a re-drive
dead-lettered again is shown under the record it came from. Every value is printed as text, never as markup.

``redrive`` runs the relay over dead-letter topics (see :mod:`consumer.redrive`): it reads the resolution
logs, starts each partition at its first record not re-driven yet, stops at the end offsets the topics had
when it began, writes the outcome of each re-driven record to the log, and prints one line per record it
could not re-drive or that failed again, then a summary.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from consumer import resolution
from consumer.clients import kafka_client_config, with_tool_log
from consumer.config import RelayConfig, Settings, TopicConfig
from consumer.decode import build_decoders
from consumer.errors import ConfigError
from consumer.record import TopicPartition
from consumer.redrive import (
    PREFIX,
    REDRIVE_COUNT,
    REDRIVE_FROM_OFFSET,
    REDRIVE_FROM_PARTITION,
    Coordinates,
    Outcome,
    Redrive,
    RedriveFilter,
    RedrivePlan,
    dlq_headers,
    parse_indices,
    parse_origin,
    parse_time,
    where,
)
from consumer.service import Relay

READ_TIMEOUT_S = 10.0
#: States a record can be in, as ``inspect --state`` names them.
STATES = ("pending", "re-driven", "unredrivable")


def _client_config(settings: Settings) -> dict[str, Any]:
    """The settings of the tool's own clients: the relay's, with librdkafka's lines in the JSON log."""
    return with_tool_log(kafka_client_config(settings), "dlq")


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    headers: dict[str, str]

    def get(self, name: str, default: str = "") -> str:
        return self.headers.get(PREFIX + name, default)

    @property
    def where(self) -> Coordinates:
        return (self.topic, self.partition, self.offset)

    @property
    def parent(self) -> Coordinates | None:
        """The record this one was re-driven from (a copy a re-drive dead-lettered again), if any."""
        partition = self.headers.get(REDRIVE_FROM_PARTITION, "")
        offset = self.headers.get(REDRIVE_FROM_OFFSET, "")
        if partition.isascii() and partition.isdigit() and offset.isascii() and offset.isdigit():
            return (self.topic, int(partition), int(offset))
        return None


def dead_letter_topics(settings: Settings, chosen: Sequence[str]) -> list[str]:
    known = [topic.dlq for topic in settings.topics]
    for name in chosen:
        if name not in known:
            raise ConfigError(
                "--topic", f"{name!r} is not a dead-letter topic of this configuration ({known})"
            )
    return list(chosen) or known


@dataclass
class Found:
    """What ``dlq inspect`` found: how many records matched, the last ones of them it kept, what the
    resolution logs say, and how many matched records are in each state."""

    matched: int
    letters: list[DeadLetter]
    resolutions: resolution.Resolutions = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)
    #: Records in the resolution logs that are not entries of them.
    ignored: int = 0


def read_dead_letters(
    settings: Settings,
    topics: Sequence[str],
    filters: RedriveFilter,
    keep: int | None = None,
    states: Collection[str] = (),
) -> Found:
    """The records of ``topics`` up to their current end that match ``filters`` (and are in one of
    ``states``, if given): all are counted, the last ``keep`` (all when None) kept, so a topic of millions
    of records costs time but not memory."""
    client = _client_config(settings)
    log = resolution.read(client, topics)
    sources = frozenset(topic.name for topic in settings.topics)
    consumer = Consumer(
        {**client, "group.id": "rr-dlq-inspect", "enable.auto.commit": False, "enable.partition.eof": False}
    )
    kept: deque[DeadLetter] = deque(maxlen=keep)
    found = Found(0, [], log.resolutions, dict.fromkeys(STATES, 0), log.ignored)
    try:
        ends = _end_offsets(consumer, topics)

        def collect(message: Message) -> None:
            letter = DeadLetter(
                message.topic(),  # type: ignore[arg-type]  # a message without an error has coordinates
                message.partition(),  # type: ignore[arg-type]
                message.offset(),  # type: ignore[arg-type]
                dlq_headers(message),
            )
            if not filters.matches(letter.headers):
                return
            state = state_of(letter, log.resolutions, sources)[0]
            if states and state not in states:
                return
            found.matched += 1
            found.states[state] += 1
            kept.append(letter)

        resolution.scan(consumer, ends, collect, timeout_s=READ_TIMEOUT_S)
    finally:
        consumer.close()
    found.letters = list(kept)
    return found


def _end_offsets(consumer: Consumer, topics: Sequence[str]) -> dict[TopicPartition, tuple[int, int]]:
    try:
        return resolution.end_offsets(consumer, topics)
    except resolution.MissingTopic as missing:
        # Named by the configuration (a topic entry's dead_letter_topic, default <name>.dlq) or by --topic.
        raise ConfigError(
            "topics.dead_letter_topic", f"dead-letter topic {missing.args[0]!r} does not exist on the brokers"
        ) from None


def state_of(
    letter: DeadLetter, resolutions: resolution.Resolutions, sources: Collection[str]
) -> tuple[str, Outcome | str | None]:
    """(state, detail): ``re-driven`` with its outcome, ``unredrivable`` with the reason, or ``pending``."""
    outcome = resolutions.get((letter.topic, letter.partition), {}).get(letter.offset)
    if outcome is not None:
        return "re-driven", outcome
    origin = parse_origin(letter.headers, sources)
    if isinstance(origin, str):
        return "unredrivable", origin
    return "pending", None


def render(
    found: Found, console: Console, now: datetime | None = None, sources: Collection[str] = ()
) -> None:
    """A table of the records found, copies under their original, every value as text; ``sources``: the
    configuration's topics (a record from another cannot be re-driven)."""
    letters = found.letters
    title = f"{len(letters)} dead-lettered record(s)"
    if found.matched > len(letters):
        title = f"the last {len(letters)} of {found.matched} dead-lettered record(s) (see --limit)"
    table = Table(title=Text(title), show_lines=False)
    for column in ("dlq", "source", "stage", "status", "method"):
        table.add_column(column, no_wrap=True)
    for column in ("reason", "calls"):
        table.add_column(column, overflow="fold")
    table.add_column("age", no_wrap=True)
    table.add_column("state", overflow="fold")
    moment = now or datetime.now(UTC)
    copies: dict[Coordinates, list[Coordinates]] = {}
    for letter in letters:
        if letter.parent is not None:
            copies.setdefault(letter.parent, []).append(letter.where)
    for letter, depth in _grouped(letters):
        table.add_row(*(Text(cell) for cell in _row(letter, depth, found, copies, sources, moment)))
    console.print(table)
    counts = {state: count for state, count in found.states.items() if count}
    if counts:
        console.print(Text(", ".join(f"{state}: {count}" for state, count in counts.items())))
    if found.ignored:
        console.print(
            Text(f"{found.ignored} record(s) in the resolution logs are not entries of them (ignored)")
        )


def _grouped(letters: Sequence[DeadLetter]) -> list[tuple[DeadLetter, int]]:
    """The letters with each copy right under the record it came from: (letter, copies deep)."""
    by_where = {letter.where: letter for letter in letters}

    def lineage(letter: DeadLetter) -> tuple[Coordinates, int]:
        root, depth, seen = letter.where, 0, {letter.where}
        current: DeadLetter | None = letter
        while current is not None and current.parent is not None and current.parent not in seen:
            root, depth = current.parent, depth + 1
            seen.add(root)
            current = by_where.get(root)
        return root, depth

    keyed = [(lineage(letter), letter) for letter in letters]
    keyed.sort(key=lambda item: (item[0][0], item[0][1], item[1].partition, item[1].offset))
    return [(letter, depth) for (_, depth), letter in keyed]


def _row(
    letter: DeadLetter,
    depth: int,
    found: Found,
    copies: Mapping[Coordinates, list[Coordinates]],
    sources: Collection[str],
    now: datetime,
) -> list[str]:
    dlq = where(letter.where)
    if depth:
        dlq = "  " * (depth - 1) + "↳ " + dlq
    if not letter.headers:
        reason = "no rr.dlq headers: not a record the relay dead-lettered"
        return [dlq, "-", "-", "-", "-", reason, "-", "-", "cannot be re-driven"]
    source = "-"
    if PREFIX + "source.topic" in letter.headers:
        source = (
            f"{letter.get('source.topic')}[{letter.get('source.partition')}]@{letter.get('source.offset')}"
        )
    state, detail = state_of(letter, found.resolutions, sources)
    if isinstance(detail, Outcome):
        at = datetime.fromtimestamp(detail.at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        text = f"re-driven {at}: {detail.outcome}"
        if detail.outcome == "dead-lettered":
            text += " again" + "".join(f", see @{o}" for _, _, o in copies.get(letter.where, ()))
    elif state == "unredrivable":
        text = f"cannot be re-driven: {detail}"
    else:
        text = "pending"
    count = letter.headers.get(REDRIVE_COUNT)
    if count and count != "0":
        text += f" (re-drive {count})"
    return [
        dlq,
        source,
        letter.get("stage", "-"),
        letter.get("http.status", "-"),
        letter.get("method", "-"),
        letter.get("error.message", "-"),
        _calls(letter),
        _age(letter.get("last.failure"), now),
        text,
    ]


def _calls(letter: DeadLetter) -> str:
    """An order's failed and delivered calls: ``failed #1 order HTTP 400; delivered #0 #2``."""
    failed_text = letter.headers.get(PREFIX + "calls.failed")
    delivered_text = letter.headers.get(PREFIX + "calls.delivered")
    if failed_text is None and delivered_text is None:
        return "-"
    parts = []
    if failed_text is not None:
        try:
            failed = orjson.loads(failed_text)
            items = [
                f"#{f.get('index')} {f.get('method')}"
                + (f" HTTP {f['status']}" if f.get("status") is not None else " contract")
                for f in failed
            ]
            parts.append("failed " + ", ".join(items))
        except (orjson.JSONDecodeError, TypeError, AttributeError):
            parts.append(f"failed: unreadable rr.dlq.calls.failed {failed_text!r}")
    if delivered_text is not None:
        delivered = parse_indices(delivered_text)
        if isinstance(delivered, str):
            parts.append(f"delivered: rr.dlq.calls.delivered {delivered}")
        else:
            parts.append("delivered " + (" ".join(f"#{i}" for i in sorted(delivered)) or "none"))
    return "; ".join(parts)


def _age(text: str, now: datetime) -> str:
    if not text:
        return "-"
    moment = parse_time(text)
    if moment is None:
        return f"? ({text})"
    seconds = (now - moment).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


# --- re-drive ---------------------------------------------------------------------------------------------


def redrive_config(config: RelayConfig, topics: Sequence[str]) -> RelayConfig:
    """The relay's configuration turned towards dead-letter topics: its own group; failures go back there."""
    settings = config.settings
    redrive_settings = settings.model_copy(
        update={
            "topics": [TopicConfig(name=topic, format="json", dead_letter_topic=topic) for topic in topics],
            "kafka": settings.kafka.model_copy(update={"group_id": settings.kafka.group_id + ".redrive"}),
        }
    )
    return config.model_copy(update={"settings": redrive_settings})


def dead_letter_ends(settings: Settings, topics: Sequence[str]) -> dict[TopicPartition, tuple[int, int]]:
    """(first offset held, end) of every partition of ``topics``; ConfigError naming a missing topic."""
    consumer = Consumer(
        {**_client_config(settings), "group.id": settings.kafka.group_id, "enable.auto.commit": False}
    )
    try:
        return _end_offsets(consumer, topics)
    finally:
        consumer.close()


def pending(
    ends: Mapping[TopicPartition, tuple[int, int]], resolved: Mapping[TopicPartition, Collection[int]]
) -> dict[TopicPartition, tuple[int, int]]:
    """Per partition with work to do: (its first record not re-driven yet, its end)."""
    work = {}
    for tp, (low, high) in ends.items():
        done = resolved.get(tp, ())
        start = low
        while start < high and start in done:
            start += 1
        if start < high:
            work[tp] = (start, high)
    return work


#: Answers to moving a group's offsets that mean "it has members" (or is busy): wait and try again.
_GROUP_BUSY = frozenset(
    {
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.GROUP_SUBSCRIBED_TO_TOPIC,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.NOT_COORDINATOR,
    }
)
REWIND_RETRY_S = 1.0


def rewind(
    config: RelayConfig, work: Mapping[TopicPartition, tuple[int, int]], console: Console | None = None
) -> None:
    """Move the re-drive group to where the work starts. While the group has members — another re-drive,
    or the member of a killed one until its session times out — wait for them to leave, up to a session
    timeout; then fail."""
    kafka = config.settings.kafka
    group = kafka.group_id
    session_s = float(kafka.client.get("session.timeout.ms", 45_000)) / 1000
    deadline = time.monotonic() + session_s + 5.0
    admin = AdminClient(_client_config(config.settings))
    partitions = [KafkaTopicPartition(t, p, start) for (t, p), (start, _) in work.items()]
    said = False
    try:
        while True:
            try:
                _alter(admin, group, partitions)
                return
            except KafkaException as error:
                inner = error.args[0] if error.args else None
                busy = isinstance(inner, KafkaError) and inner.code() in _GROUP_BUSY
                if not busy or time.monotonic() > deadline:
                    raise KafkaException(
                        f"cannot move the re-drive group {group} to the first records to re-drive "
                        f"(is another re-drive running?): {error}"
                    ) from None
            if not said and console is not None:
                console.print(
                    Text(
                        f"waiting up to {session_s:.0f}s for the members of {group} to leave (another "
                        "re-drive, or the member of one that was killed, until its session times out)"
                    )
                )
                said = True
            time.sleep(REWIND_RETRY_S)
    finally:
        del admin


def _alter(admin: AdminClient, group: str, partitions: list[KafkaTopicPartition]) -> None:
    for future in admin.alter_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, partitions)]
    ).values():
        result = future.result(timeout=READ_TIMEOUT_S)
        for partition in result.topic_partitions or ():
            if partition.error is not None:
                raise KafkaException(partition.error)


def run_redrive(
    config: RelayConfig, topics: Sequence[str], plan: RedrivePlan, *, from_beginning: bool, console: Console
) -> int:
    decoders = build_decoders(config)  # of the original topics, before the configuration is turned
    client = _client_config(config.settings)
    turned = redrive_config(config, topics)
    ends = dead_letter_ends(turned.settings, topics)  # first: a missing topic gets no log created
    resolution.ensure_logs(client, topics)
    resolved = {} if from_beginning else resolution.read(client, topics, outcomes=False).resolved
    work = pending(ends, resolved)
    if not work:
        console.print(
            Text(
                "nothing to re-drive: every record of " + ", ".join(topics) + " up to its end is re-driven "
                "already (see dlq inspect)"
            )
        )
        return 0
    rewind(turned, work, console)
    plan.sources = frozenset(decoders)
    plan.resolved = resolved
    writer = resolution.Writer(client)
    plan.log = writer
    total = sum(end - start for start, end in work.values())
    starts = sum(start for start, _ in work.values())
    columns = (TextColumn("re-driving"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("redrive", total=total)
            redrive = Redrive(
                plan=plan,
                decoders=decoders,
                stop_at={tp: end for tp, (_, end) in work.items()},
                on_progress=lambda done: progress.update(task, completed=max(0, done - starts)),
            )
            relay = Relay(turned, redrive=redrive)
            status = asyncio.run(relay.run())
    finally:
        unrecorded = writer.close()
    complete = all(relay.ledger.reached.get(tp, 0) >= end for tp, (_, end) in work.items())
    logs = [resolution.log_topic(t) for t in topics]
    report(plan, console, status=status, unrecorded=unrecorded, logs=logs, complete=complete)
    return status if status != 0 else (0 if complete and not unrecorded else 1)


def report(
    plan: RedrivePlan,
    console: Console,
    *,
    status: int,
    unrecorded: int,
    logs: Iterable[str],
    complete: bool = True,
) -> None:
    """One line per record passed over as unredrivable or dead-lettered again, then the summary: a success
    line only when the run reached its end (``complete``) and every outcome was recorded."""
    for coordinates, reason in plan.unredrivable_reasons:
        console.print(Text(f"skipped {where(coordinates)}: cannot be re-driven: {reason}"))
    more = plan.unredrivable - len(plan.unredrivable_reasons)
    if more > 0:
        console.print(Text(f"... and {more} more that cannot be re-driven (dlq inspect lists them)"))
    for coordinates, reason in plan.dead_lettered_reasons:
        console.print(Text(f"dead-lettered again {where(coordinates)}: {reason}"))
    more = plan.dead_lettered - len(plan.dead_lettered_reasons)
    if more > 0:
        console.print(Text(f"... and {more} more dead-lettered again (dlq inspect lists them)"))
    done = f"delivered {plan.delivered}, dead-lettered again {plan.dead_lettered}"
    if status != 0 or unrecorded or not complete:
        problems = []
        if status == 0 and not complete:
            problems.append("it was stopped before the end")
        if status == 3:
            problems.append("it halted (exit status 3; the log line above says why)")
        elif status != 0:
            last = f", the last record read {where(plan.current)}" if plan.current is not None else ""
            problems.append(f"it stopped with exit status {status}{last} (the log line above says why)")
        if unrecorded:
            problems.append(
                f"{unrecorded} outcome(s) could not be written to {', '.join(logs)}: "
                "those records will be re-driven again"
            )
        console.print(
            Text(
                f"re-drive failed: {'; '.join(problems)}. Before it stopped: {done}, "
                f"{plan.unsettled} unfinished; run it again to resume."
            )
        )
        return
    console.print(
        Text(
            f"re-driven {plan.redriven} ({done}); left alone: {plan.skipped_by_filter} by the filters, "
            f"{plan.skipped_by_guard} by the loop guard, {plan.unredrivable} that cannot be re-driven; "
            f"{plan.skipped_resolved} already re-driven"
        )
    )
