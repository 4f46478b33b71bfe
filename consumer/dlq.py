"""``rr-consumer dlq inspect`` and ``rr-consumer dlq redrive``: the dead-letter topic, for operators.

``inspect`` reads dead-letter topics from their start to their current end, without a consumer group, and
prints one row per record: where it came from, at which stage it failed, the status, the reason, its age.

``redrive`` runs the relay over dead-letter topics (see :mod:`consumer.redrive`): a consumer group of its
own, ``<group_id>.redrive``, stops at the end offsets the topics had when it began, and prints progress.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from consumer.config import RelayConfig, Settings, TopicConfig
from consumer.errors import ConfigError
from consumer.record import TopicPartition
from consumer.redrive import PREFIX, REDRIVE_COUNT, RedriveFilter, RedrivePlan, dlq_headers
from consumer.service import Redrive, Relay, build_decoders, kafka_client_config

READ_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    headers: dict[str, str]

    def get(self, name: str, default: str = "") -> str:
        return self.headers.get(PREFIX + name, default)


def dead_letter_topics(settings: Settings, chosen: Sequence[str]) -> list[str]:
    known = [topic.dlq for topic in settings.topics]
    for name in chosen:
        if name not in known:
            raise ConfigError(
                "--topic", f"{name!r} is not a dead-letter topic of this configuration ({known})"
            )
    return list(chosen) or known


@dataclass(frozen=True)
class Found:
    """What ``dlq inspect`` found: how many records matched, and the last ones of them it kept."""

    matched: int
    letters: list[DeadLetter]


def read_dead_letters(
    settings: Settings, topics: Sequence[str], filters: RedriveFilter, keep: int | None = None
) -> Found:
    """The records of ``topics`` up to their current end that match ``filters``: all are counted, the last
    ``keep`` (all when None) kept, so a topic of millions of records costs time but not memory."""
    consumer = Consumer(
        {
            **kafka_client_config(settings),
            "group.id": "rr-dlq-inspect",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    try:
        ends = _end_offsets(consumer, topics)
        wanted = {tp: end for tp, end in ends.items() if end > 0}
        consumer.assign([KafkaTopicPartition(t, p, OFFSET_BEGINNING) for t, p in wanted])
        found: deque[DeadLetter] = deque(maxlen=keep)
        matched = 0
        remaining = dict(wanted)
        while remaining:
            messages = consumer.consume(num_messages=500, timeout=READ_TIMEOUT_S)
            if not messages:
                raise KafkaException(f"no answer from the broker while reading {sorted(remaining)}")
            for message in messages:
                matched += _collect(message, remaining, filters, found)
        return Found(matched, list(found))
    finally:
        consumer.close()


def _collect(
    message: Message, remaining: dict[TopicPartition, int], filters: RedriveFilter, found: deque[DeadLetter]
) -> bool:
    """Keep ``message`` in ``found`` if it matches; True when it did."""
    if message.error() is not None:
        raise KafkaException(message.error())
    tp: TopicPartition = (message.topic(), message.partition())  # type: ignore[assignment]
    offset: int = message.offset()  # type: ignore[assignment]
    headers = dlq_headers(message)
    matches = filters.matches(headers)
    if matches:
        found.append(DeadLetter(tp[0], tp[1], offset, headers))
    if tp in remaining and offset + 1 >= remaining[tp]:
        del remaining[tp]
    return matches


def _end_offsets(consumer: Consumer, topics: Sequence[str]) -> dict[TopicPartition, int]:
    ends: dict[TopicPartition, int] = {}
    metadata = consumer.list_topics(timeout=READ_TIMEOUT_S)
    for topic in topics:
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            raise ConfigError("--topic", f"dead-letter topic {topic!r} does not exist")
        for partition in info.partitions:
            _, high = consumer.get_watermark_offsets(
                KafkaTopicPartition(topic, partition), timeout=READ_TIMEOUT_S
            )
            ends[(topic, partition)] = high
    return ends


def render(
    letters: Sequence[DeadLetter], console: Console, now: datetime | None = None, matched: int | None = None
) -> None:
    """A table of ``letters``; ``matched``: how many matched in all, when only the last of them are shown."""
    title = f"{len(letters)} dead-lettered record(s)"
    if matched is not None and matched > len(letters):
        title = f"the last {len(letters)} of {matched} dead-lettered record(s) (see --limit)"
    table = Table(title=title, show_lines=False)
    for column in ("dlq", "source", "stage", "status", "method", "reason", "age", "redrives"):
        table.add_column(column, overflow="fold")
    moment = now or datetime.now(UTC)
    for letter in letters:
        table.add_row(
            f"{letter.topic}[{letter.partition}]@{letter.offset}",
            f"{letter.get('source.topic')}[{letter.get('source.partition')}]@{letter.get('source.offset')}",
            letter.get("stage"),
            letter.get("http.status", "-"),
            letter.get("method", "-"),
            letter.get("error.message")[:120],
            _age(letter.get("last.failure"), moment),
            letter.headers.get(REDRIVE_COUNT, "0"),
        )
    console.print(table)


def _age(text: str, now: datetime) -> str:
    try:
        seconds = (now - datetime.fromisoformat(text)).total_seconds()
    except ValueError:
        return "?"
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


def pending(
    config: RelayConfig, topics: Sequence[str], *, from_beginning: bool
) -> dict[TopicPartition, tuple[int, int]]:
    """Per partition: (where the re-drive group stands, the end now), for partitions with work to do."""
    group = config.settings.kafka.group_id
    consumer = Consumer(
        {**kafka_client_config(config.settings), "group.id": group, "enable.auto.commit": False}
    )
    try:
        ends = _end_offsets(consumer, topics)
        committed = consumer.committed([KafkaTopicPartition(t, p) for t, p in ends], timeout=READ_TIMEOUT_S)
        work = {}
        for partition in committed:
            tp = (partition.topic, partition.partition)
            low, _ = consumer.get_watermark_offsets(KafkaTopicPartition(*tp), timeout=READ_TIMEOUT_S)
            start = low if from_beginning or partition.offset < 0 else partition.offset
            if start < ends[tp]:
                work[tp] = (start, ends[tp])
        return work
    finally:
        consumer.close()


def rewind(config: RelayConfig, work: dict[TopicPartition, tuple[int, int]]) -> None:
    """``--from-beginning``: move the re-drive group to where the work starts (it must have no members)."""
    from confluent_kafka import ConsumerGroupTopicPartitions

    group = config.settings.kafka.group_id
    admin = AdminClient(kafka_client_config(config.settings))
    partitions = [KafkaTopicPartition(t, p, start) for (t, p), (start, _) in work.items()]
    try:
        for future in admin.alter_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, partitions)]
        ).values():
            future.result(timeout=READ_TIMEOUT_S)
    finally:
        del admin  # destroyed now (it has no close()), not by a garbage collection holding a traceback


def run_redrive(
    config: RelayConfig, topics: Sequence[str], plan: RedrivePlan, *, from_beginning: bool, console: Console
) -> int:
    decoders = build_decoders(config)  # of the original topics, before the configuration is turned
    turned = redrive_config(config, topics)
    work = pending(turned, topics, from_beginning=from_beginning)
    if not work:
        console.print("nothing to re-drive: the re-drive group is at the end of " + ", ".join(topics))
        return 0
    if from_beginning:
        rewind(turned, work)
    total = sum(end - start for start, end in work.values())
    starts = sum(start for start, _ in work.values())
    columns = (TextColumn("re-driving"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
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
    left_alone = plan.skipped_by_filter + plan.skipped_by_guard
    console.print(
        f"re-driven {plan.redriven} (delivered {relay.delivered - left_alone}, dead-lettered again "
        f"{relay.dead_lettered}); left alone: {plan.skipped_by_filter} by the filters, "
        f"{plan.skipped_by_guard} by the loop guard"
    )
    return status
