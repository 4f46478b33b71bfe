"""``rr-consumer replay``: rewind (or fast-forward) the relay's consumer group, the way the relay recovers.

The relay commits an offset only once every call a record implied was settled, so the group's committed
offsets *are* its progress; moving them is how an operator re-sends a window of events (after Retail Rocket
lost data, or after a bad deploy) or skips one. This module does that move safely:

1. it reads where the group stands (committed offsets, watermarks) and where it would go, and prints that
   as a plan first, so the operator sees how many records will be re-sent before anything changes;
2. it refuses while the group has active members: a running relay would overwrite the new offsets with its
   next commit (and the broker rejects admin commits into a live group anyway), so the relay is stopped
   first and the replay happens between its runs;
3. it commits the targets with ``AdminClient.alter_consumer_group_offsets`` and checks every partition's
   result, because that call can succeed as a whole yet fail for single partitions.

Errors are :class:`ReplayError`: one line for the operator plus the exit status (1 when the replay was
refused or failed, 2 when the arguments or configuration are wrong).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from confluent_kafka import (
    Consumer,
    ConsumerGroupState,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from consumer.clients import with_tool_log
from consumer.config import Settings
from consumer.errors import ConfigError, RelayError
from consumer.preflight import require_brokers

#: Exit status when the replay was refused (active members) or failed (unknown topic, broker error).
EXIT_FAILED = 1
#: Exit status when the arguments or the configuration are wrong: nothing was attempted.
EXIT_USAGE = 2

DEFAULT_TIMEOUT_S = 30.0
TIME_EXAMPLE = "2026-11-30T10:00:00+00:00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: Group states in which nobody consumes, so new offsets stick: EMPTY (members left, commits kept) and
#: DEAD (no such group yet, or its metadata expired).
_IDLE_STATES = frozenset({ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD})
#: auto.offset.reset values under which a partition without a commit starts at its first record / its end.
_RESET_EARLIEST = frozenset({"earliest", "smallest", "beginning"})
_RESET_LATEST = frozenset({"latest", "largest", "end"})
#: Client settings that belong to a group member, not to the admin client or the offset probe.
_MEMBER_ONLY_PREFIXES = ("auto.", "group.", "session.", "enable.auto.", "partition.assignment.")

TargetKind = Literal["earliest", "latest", "time", "offsets"]


class ReplayError(RelayError):
    """The replay cannot go ahead; ``str(error)`` is the one line the operator reads."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Target:
    """Where the group should go: the first record, the end, a point in time, or explicit offsets."""

    kind: TargetKind
    #: For ``time``: milliseconds since the epoch (what Kafka's record timestamps are).
    time_ms: int | None = None
    #: For ``offsets``: partition -> offset.
    offsets: Mapping[int, int] = field(default_factory=dict)
    #: How the operator wrote it, for the plan's heading.
    text: str = ""

    def describe(self) -> str:
        if self.kind == "earliest":
            return "the earliest record"
        if self.kind == "latest":
            return "the end (skip everything not yet consumed)"
        if self.kind == "time":
            return f"the first record at or after {self.text}"
        return f"explicit offsets ({self.text})"


@dataclass(frozen=True)
class Request:
    """Everything one replay needs, resolved from the options and (optionally) the relay's configuration."""

    bootstrap_servers: str
    group: str
    topics: tuple[str, ...]
    #: None: every partition of each topic.
    partitions: tuple[int, ...] | None
    target: Target
    #: librdkafka settings from the configuration (SASL, TLS), member-only ones already removed.
    client: Mapping[str, Any] = field(default_factory=dict)
    #: What the relay does on a partition without a commit, to say where the group would start today.
    offset_reset: str = "earliest"
    timeout_s: float = DEFAULT_TIMEOUT_S
    dry_run: bool = False
    #: Where ``bootstrap_servers`` came from, for the line that says no broker answers there.
    bootstrap_setting: str = "kafka.bootstrap_servers"


@dataclass(frozen=True)
class PlanRow:
    """One partition of the plan: where the group stands, where it goes, and what that re-sends."""

    topic: str
    partition: int
    #: The committed offset, or None when the group never committed on this partition.
    committed: int | None
    #: The partition's first and next offset (low and high watermarks).
    earliest: int
    end: int
    target: int
    #: Set when the target needs an explanation (a time with no record at or after it).
    note: str = ""
    offset_reset: str = "earliest"

    @property
    def resumes_at(self) -> int | None:
        """Where the group would resume today: its commit, or where auto.offset.reset puts it without one."""
        if self.committed is not None:
            return self.committed
        if self.offset_reset in _RESET_EARLIEST:
            return self.earliest
        if self.offset_reset in _RESET_LATEST:
            return self.end
        return None

    @property
    def replayed(self) -> int | None:
        """Records re-sent by the move (negative: records skipped); None when the start is unknowable."""
        start = self.resumes_at
        return None if start is None else start - self.target


def parse_time(text: str) -> int:
    """An ISO 8601 time *with* a UTC offset, as milliseconds since the epoch.

    A time without an offset is refused rather than read as local time: on a recovery the operator's
    laptop and the cluster rarely agree on the time zone, and a wrong guess replays hours too many or few.
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReplayError(
            f"--to-time: {text!r} is not an ISO 8601 time such as {TIME_EXAMPLE}", EXIT_USAGE
        ) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ReplayError(
            f"--to-time: {text!r} has no UTC offset; write it with one, e.g. {TIME_EXAMPLE}", EXIT_USAGE
        )
    # Integer arithmetic, rounding up: float seconds can land a millisecond early, and a sub-millisecond
    # time must not take in the record stamped at the millisecond before it.
    millis = -((_EPOCH - moment) // timedelta(milliseconds=1))
    if millis < 0:
        raise ReplayError(f"--to-time: {text!r} is before 1970, older than any Kafka record", EXIT_USAGE)
    return millis


def parse_offsets(items: Iterable[str]) -> dict[int, int]:
    """``P:OFFSET`` items as partition -> offset; each partition at most once."""
    offsets: dict[int, int] = {}
    for item in items:
        partition_text, sep, offset_text = item.partition(":")
        try:
            if not sep:
                raise ValueError
            partition, offset = int(partition_text), int(offset_text)
        except ValueError:
            raise ReplayError(
                f"--to-offset: {item!r} is not PARTITION:OFFSET (e.g. 0:1500)", EXIT_USAGE
            ) from None
        if partition < 0 or offset < 0:
            raise ReplayError(f"--to-offset: {item!r}: partition and offset must not be negative", EXIT_USAGE)
        if partition in offsets:
            raise ReplayError(f"--to-offset: partition {partition} is given twice", EXIT_USAGE)
        offsets[partition] = offset
    return offsets


def request_from_args(args: argparse.Namespace, settings: Settings | None) -> Request:
    """Combine the options with the relay's configuration: options win, the configuration fills the rest."""
    kafka = settings.kafka if settings is not None else None
    bootstrap = args.bootstrap_servers or (kafka.bootstrap_servers if kafka else None)
    group = args.group or (kafka.group_id if kafka else None)
    if not bootstrap:
        raise ReplayError("give --config FILE or --bootstrap-servers HOST:PORT", EXIT_USAGE)
    if not group:
        raise ReplayError("give --config FILE or --group GROUP", EXIT_USAGE)
    topics = tuple(dict.fromkeys(args.topic or ()))
    if not topics and settings is not None:
        topics = tuple(t.name for t in settings.topics)
    if not topics:
        raise ReplayError("give --topic TOPIC (or --config FILE to replay every topic in it)", EXIT_USAGE)
    partitions = tuple(dict.fromkeys(args.partition)) if args.partition else None
    if partitions is not None and any(p < 0 for p in partitions):
        raise ReplayError("--partition: partitions are numbered from 0", EXIT_USAGE)

    target: Target
    if args.to_earliest:
        target = Target("earliest", text="earliest")
    elif args.to_latest:
        target = Target("latest", text="latest")
    elif args.to_time is not None:
        target = Target("time", time_ms=parse_time(args.to_time), text=args.to_time)
    else:
        if len(topics) != 1:
            raise ReplayError(
                f"--to-offset needs exactly one --topic (the offsets would apply to {len(topics)} topics)",
                EXIT_USAGE,
            )
        if partitions is not None:
            raise ReplayError("--to-offset names its partitions itself; leave out --partition", EXIT_USAGE)
        offsets = parse_offsets(args.to_offset)
        target = Target("offsets", offsets=offsets, text=", ".join(args.to_offset))
        partitions = tuple(offsets)

    client = dict(kafka.client) if kafka else {}
    offset_reset = str(client.get("auto.offset.reset", "earliest"))
    if args.timeout <= 0:
        raise ReplayError("--timeout must be positive", EXIT_USAGE)
    return Request(
        bootstrap_servers=bootstrap,
        group=group,
        topics=topics,
        partitions=partitions,
        target=target,
        client={k: v for k, v in client.items() if not k.startswith(_MEMBER_ONLY_PREFIXES)},
        offset_reset=offset_reset,
        timeout_s=args.timeout,
        dry_run=args.dry_run,
        bootstrap_setting="--bootstrap-servers" if args.bootstrap_servers else "kafka.bootstrap_servers",
    )


def _kafka_problem(error: KafkaException) -> str:
    """The broker's reason in one line (a KafkaException's first argument is usually a KafkaError)."""
    first = error.args[0] if error.args else error
    return first.str() if isinstance(first, KafkaError) else str(first)


def _error_code(error: KafkaException) -> int | None:
    first = error.args[0] if error.args else None
    return first.code() if isinstance(first, KafkaError) else None


class Cluster:
    """The two clients a replay needs, made from one set of settings and closed together.

    The admin client reads and moves the group; the consumer is only an offset probe (watermarks and
    ``offsets_for_times``). The probe carries the group's id because brokers with ACLs often allow only
    that group, but it never subscribes, so it never joins the group or commits for it.
    """

    def __init__(self, request: Request) -> None:
        common = with_tool_log({**request.client, "bootstrap.servers": request.bootstrap_servers}, "replay")
        self.timeout_s = request.timeout_s
        try:
            self.admin = AdminClient(common)
            self.probe = Consumer({**common, "group.id": request.group, "enable.auto.commit": False})
        except (KafkaException, ValueError, TypeError) as error:
            # A bad pass-through setting in [kafka.client] fails here, before any connection.
            self.__dict__.pop("admin", None)  # the traceback keeps this object: no client left in it
            problem = _kafka_problem(error) if isinstance(error, KafkaException) else str(error)
            raise ReplayError(f"cannot create the Kafka clients: {problem}", EXIT_USAGE) from None

    def close(self) -> None:
        """Close the probe and destroy the admin client now, while the broker is known to be there.

        An AdminClient has no close(): it is destroyed with its last reference, which is this one.
        """
        try:
            self.probe.close()
        finally:
            del self.admin

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def active_members(self, group: str) -> tuple[str, int] | None:
        """The group's state and member count when it has members (a replay would be lost), else None."""
        try:
            description = self.admin.describe_consumer_groups([group], request_timeout=self.timeout_s)[
                group
            ].result()
        except KafkaException as error:
            if _error_code(error) == KafkaError.GROUP_ID_NOT_FOUND:
                return None  # newer brokers answer so for a group that never existed: nobody to disturb
            raise ReplayError(f"cannot describe group {group}: {_kafka_problem(error)}") from None
        state: ConsumerGroupState = description.state
        members = len(description.members or ())
        if members or state not in _IDLE_STATES:
            return state.name, members
        return None

    def partitions_of(self, topic: str) -> list[int]:
        try:
            metadata = self.admin.list_topics(topic, timeout=self.timeout_s).topics.get(topic)
        except KafkaException as error:
            raise ReplayError(f"cannot read the metadata of topic {topic}: {_kafka_problem(error)}") from None
        if metadata is None:
            raise ReplayError(f"unknown topic: {topic}")
        problem = metadata.error
        if problem is not None:
            if problem.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise ReplayError(f"unknown topic: {topic}")
            raise ReplayError(f"topic {topic}: {problem.str()}")
        return sorted(metadata.partitions)

    def committed(self, group: str, partitions: list[TopicPartition]) -> dict[tuple[str, int], int | None]:
        """The group's committed offsets; None where it never committed."""
        request = [ConsumerGroupTopicPartitions(group, partitions)]
        try:
            result = self.admin.list_consumer_group_offsets(request, request_timeout=self.timeout_s)[
                group
            ].result()
        except KafkaException as error:
            raise ReplayError(f"cannot read the offsets of group {group}: {_kafka_problem(error)}") from None
        found: dict[tuple[str, int], int | None] = {}
        for tp in result.topic_partitions:
            if tp.error is not None:
                raise ReplayError(f"{tp.topic} [{tp.partition}]: cannot read the commit: {tp.error.str()}")
            found[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else None
        return found

    def watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        try:
            return self.probe.get_watermark_offsets(tp, timeout=self.timeout_s)
        except KafkaException as error:
            raise ReplayError(
                f"{tp.topic} [{tp.partition}]: cannot read its offsets: {_kafka_problem(error)}"
            ) from None

    def offsets_at(self, partitions: list[TopicPartition], time_ms: int) -> dict[tuple[str, int], int]:
        """The first offset at or after ``time_ms`` per partition; -1 where no record is that recent."""
        query = [TopicPartition(tp.topic, tp.partition, time_ms) for tp in partitions]
        try:
            found = self.probe.offsets_for_times(query, timeout=self.timeout_s)
        except KafkaException as error:
            raise ReplayError(f"cannot look up offsets by time: {_kafka_problem(error)}") from None
        result: dict[tuple[str, int], int] = {}
        for tp in found:
            if tp.error is not None:
                raise ReplayError(f"{tp.topic} [{tp.partition}]: cannot look up by time: {tp.error.str()}")
            result[(tp.topic, tp.partition)] = tp.offset
        return result

    def commit(self, group: str, rows: Sequence[PlanRow]) -> None:
        """Commit every row's target for the group, failing on the first partition the broker refused."""
        request = [
            ConsumerGroupTopicPartitions(
                group, [TopicPartition(row.topic, row.partition, row.target) for row in rows]
            )
        ]
        try:
            result = self.admin.alter_consumer_group_offsets(request, request_timeout=self.timeout_s)[
                group
            ].result()
        except KafkaException as error:
            raise ReplayError(
                f"the broker refused the new offsets of group {group}: {_kafka_problem(error)} "
                "(did a member join since the check?)"
            ) from None
        failed = [tp for tp in result.topic_partitions if tp.error is not None]
        if failed:
            tp = failed[0]
            raise ReplayError(
                f"{tp.topic} [{tp.partition}]: the broker refused the new offset: {tp.error.str()}"
                + (f" (and {len(failed) - 1} more partition(s))" if len(failed) > 1 else "")
            )


def build_plan(request: Request, cluster: Cluster) -> list[PlanRow]:
    """Read the group's position and compute each partition's target; nothing is changed."""
    selected: list[TopicPartition] = []
    for topic in request.topics:
        existing = cluster.partitions_of(topic)
        if request.partitions is None:
            selected.extend(TopicPartition(topic, p) for p in existing)
            continue
        missing = [p for p in request.partitions if p not in existing]
        if missing:
            raise ReplayError(
                f"topic {topic} has partitions 0..{len(existing) - 1}; there is no partition {missing[0]}"
            )
        selected.extend(TopicPartition(topic, p) for p in request.partitions)

    committed = cluster.committed(request.group, selected)
    marks = {(tp.topic, tp.partition): cluster.watermarks(tp) for tp in selected}
    by_time = (
        cluster.offsets_at(selected, request.target.time_ms)
        if request.target.kind == "time" and request.target.time_ms is not None
        else {}
    )

    rows: list[PlanRow] = []
    for tp in selected:
        key = (tp.topic, tp.partition)
        earliest, end = marks[key]
        note = ""
        kind = request.target.kind
        if kind == "earliest":
            target = earliest
        elif kind == "latest":
            target = end
        elif kind == "time":
            target = by_time.get(key, -1)
            if target < 0:
                target, note = end, "no record at or after the time: the end"
        else:
            target = request.target.offsets[tp.partition]
            if not earliest <= target <= end:
                raise ReplayError(
                    f"{tp.topic} [{tp.partition}]: offset {target} is outside the records it holds "
                    f"({earliest}..{end})"
                )
        rows.append(
            PlanRow(
                topic=tp.topic,
                partition=tp.partition,
                committed=committed.get(key),
                earliest=earliest,
                end=end,
                target=target,
                note=note,
                offset_reset=request.offset_reset,
            )
        )
    return rows


def _replay_cell(row: PlanRow) -> str:
    replayed = row.replayed
    if replayed is None:
        return "unknown"
    if replayed < 0:
        return f"skips {-replayed}"
    return str(replayed)


def format_plan(request: Request, rows: Sequence[PlanRow]) -> str:
    """The plan as a table an operator can check before it is applied (and paste into an incident log)."""
    header = ("TOPIC", "PARTITION", "COMMITTED", "TARGET", "REPLAY", "")
    table = [header]
    for row in rows:
        committed = str(row.committed) if row.committed is not None else f"none (starts at {row.resumes_at})"
        if row.committed is None and row.resumes_at is None:
            committed = "none"
        table.append((row.topic, str(row.partition), committed, str(row.target), _replay_cell(row), row.note))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [
        f"replay plan for group {request.group}: move to {request.target.describe()}",
        *(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            for line in table
        ),
    ]
    replayed = sum(r.replayed for r in rows if r.replayed is not None and r.replayed > 0)
    skipped = sum(-r.replayed for r in rows if r.replayed is not None and r.replayed < 0)
    lines.append(f"total: {replayed} record(s) to replay, {skipped} skipped, {len(rows)} partition(s)")
    if any(r.committed is None for r in rows):
        lines.append(
            f"none: no commit there yet; the group would start per auto.offset.reset={request.offset_reset}"
        )
    return "\n".join(lines)


def replay(request: Request) -> int:
    """Check, plan, print, apply. Returns the exit status; raises ReplayError for the one-line failures."""
    try:
        require_brokers(
            dict(request.client), request.bootstrap_servers, request.timeout_s, request.bootstrap_setting
        )
    except ConfigError as error:
        raise ReplayError(str(error), EXIT_USAGE) from None
    with Cluster(request) as cluster:
        active = cluster.active_members(request.group)
        if active is not None and not request.dry_run:
            state, members = active
            raise ReplayError(
                f"group {request.group} has {members} active member(s) (state {state}); "
                "stop every relay process of the group, then replay"
            )
        rows = build_plan(request, cluster)
        print(format_plan(request, rows))
        if request.dry_run:
            if active is not None:
                print(
                    f"note: group {request.group} has {active[1]} active member(s) (state {active[0]}); "
                    "a real replay is refused until they stop",
                    file=sys.stderr,
                )
            print("dry run: nothing changed")
            return 0
        cluster.commit(request.group, rows)
    print(f"applied: group {request.group} now resumes at the targets of {len(rows)} partition(s)")
    return 0


def run_command(args: argparse.Namespace, settings: Settings | None) -> int:
    """The ``replay`` subcommand: every failure becomes one line on stderr and a non-zero status."""
    try:
        return replay(request_from_args(args, settings))
    except ReplayError as error:
        print(f"rr-consumer: replay: {error}", file=sys.stderr)
        return error.status
