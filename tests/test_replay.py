"""``rr-consumer replay`` against the real broker: the recovery tool moves a group exactly where it says.

Each test drives the command in-process through ``consumer.cli.main`` and checks the group's committed
offsets afterwards with an independent reader, so what the plan promised and what the broker holds are
compared, not two views of the same code.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from consumer.cli import main
from consumer.clients import close_producer
from consumer.replay import parse_time
from tests.kafka import (
    Topics,
    committed_offsets,
    consumer,
    end_offsets,
    produce,
    unique_name,
    wait_for,
)
from tests.relay import ROOT
from tools import kafka_local

NO_COMMIT = -1001  # what Consumer.committed reports for a partition the group never committed
RunReplay = Callable[..., tuple[int, str, str]]


@pytest.fixture
def replay(capsys: pytest.CaptureFixture[str]) -> RunReplay:
    """Run ``rr-consumer replay ARGS`` in-process; returns (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop anything earlier
        try:
            status = main(["replay", *args])
        finally:
            structlog.reset_defaults()  # the command configured the log onto this test's captured stderr
        out, err = capsys.readouterr()
        return status, out, err

    return run


def produce_timed(bootstrap: str, topic: str, records: Sequence[tuple[int, int]]) -> None:
    """Produce ``(partition, timestamp_ms)`` records, in order, and wait until every one is acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    failures: list[str] = []

    def report(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    try:
        for index, (partition, timestamp) in enumerate(records):
            producer.produce(
                topic,
                key=b"k%d" % index,
                value=b"v%d" % index,
                partition=partition,
                timestamp=timestamp,
                on_delivery=report,
            )
        remaining = producer.flush(30)
    finally:
        close_producer(producer, 0)  # flushed above: whatever is left is purged, and the assertion says so
    assert remaining == 0, "records not acknowledged within 30s"
    assert not failures, failures[:3]


def commit_group(admin: AdminClient, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit offsets for a group with no members, as a relay that consumed up to there would have."""
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p, o) for p, o in offsets.items()])
    result = admin.alter_consumer_group_offsets([request])[group].result(timeout=30)
    assert all(tp.error is None for tp in result.topic_partitions)


def ten_per_partition(bootstrap: str, topic: str, partitions: int) -> None:
    produce(bootstrap, topic, [(b"k", b"v%d" % i, p) for p in range(partitions) for i in range(10)])


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    return lines[0]


def wait_until_assigned(client: Consumer) -> None:
    """Poll until the member holds partitions: only then is the group visibly active."""

    def assigned() -> bool:
        client.poll(0.1)
        return bool(client.assignment())

    wait_for(assigned, what="the member's assignment")


# --- replay to a point in time -------------------------------------------------------------------------


def test_replay_to_a_time_commits_the_first_offset_at_or_after_it_per_partition(
    kafka_bootstrap: str, kafka_admin: AdminClient, topics: Topics, replay: RunReplay
) -> None:
    topic = topics.create("replay-time", partitions=3)
    group = unique_name("replay-time")
    base = int((datetime.now(UTC) - timedelta(hours=1)).timestamp()) * 1000
    when_ms = base + 7_500
    # Partition 0 has a record at exactly the replay time ("at or after" includes it); partition 1 only
    # records before it (it must go to its end); on partition 2 the time falls between two records.
    timestamps = {
        0: [base + i * 500 for i in range(30)],
        1: [base + i * 100 for i in range(5)],
        2: [base + 250 + i * 1000 for i in range(20)],
    }
    produce_timed(kafka_bootstrap, topic, [(p, ts) for p, stamps in timestamps.items() for ts in stamps])
    ends = end_offsets(kafka_bootstrap, topic, 3)
    commit_group(kafka_admin, group, topic, ends)

    # Written with a +02:00 offset: the command must honour it, not read the time as UTC or local.
    when = datetime.fromtimestamp(when_ms / 1000, tz=timezone(timedelta(hours=2))).isoformat()
    status, out, err = replay(
        "--bootstrap-servers", kafka_bootstrap, "--group", group, "--topic", topic, "--to-time", when
    )

    assert (status, err) == (0, ""), err
    expected = {
        p: next((offset for offset, ts in enumerate(stamps) if ts >= when_ms), len(stamps))
        for p, stamps in timestamps.items()
    }
    assert expected == {0: 15, 1: 5, 2: 8}, "the fixture itself"
    assert committed_offsets(kafka_bootstrap, group, topic, 3) == expected
    assert "applied" in out
    assert f"total: {(30 - 15) + (20 - 8)} record(s) to replay" in out


# --- replay to explicit offsets ------------------------------------------------------------------------


def test_replay_to_explicit_offsets_moves_only_the_partitions_named(
    kafka_bootstrap: str, kafka_admin: AdminClient, topics: Topics, replay: RunReplay
) -> None:
    topic = topics.create("replay-offsets", partitions=3)
    group = unique_name("replay-offsets")
    ten_per_partition(kafka_bootstrap, topic, 3)
    commit_group(kafka_admin, group, topic, {0: 10, 1: 10, 2: 10})

    status, out, err = replay(
        "--bootstrap-servers",
        kafka_bootstrap,
        "--group",
        group,
        "--topic",
        topic,
        "--to-offset",
        "0:3",
        "--to-offset",
        "1:7",
    )

    assert (status, err) == (0, ""), err
    assert committed_offsets(kafka_bootstrap, group, topic, 3) == {0: 3, 1: 7, 2: 10}
    assert "total: 10 record(s) to replay" in out


def test_an_offset_outside_the_partition_is_refused_and_nothing_moves(
    kafka_bootstrap: str, kafka_admin: AdminClient, topics: Topics, replay: RunReplay
) -> None:
    topic = topics.create("replay-offsets-range", partitions=2)
    group = unique_name("replay-offsets-range")
    ten_per_partition(kafka_bootstrap, topic, 2)
    commit_group(kafka_admin, group, topic, {0: 10, 1: 10})

    status, out, err = replay(
        "--bootstrap-servers",
        kafka_bootstrap,
        "--group",
        group,
        "--topic",
        topic,
        "--to-offset",
        "0:3",
        "--to-offset",
        "1:11",
    )

    assert status == 1
    assert "offset 11 is outside the records it holds (0..10)" in one_line(err)
    assert out == ""
    assert committed_offsets(kafka_bootstrap, group, topic, 2) == {0: 10, 1: 10}


# --- replay to the earliest record and to the end ------------------------------------------------------


def test_replay_to_earliest_rewinds_and_to_latest_skips_the_backlog(
    kafka_bootstrap: str, kafka_admin: AdminClient, topics: Topics, replay: RunReplay
) -> None:
    topic = topics.create("replay-ends", partitions=2)
    group = unique_name("replay-ends")
    ten_per_partition(kafka_bootstrap, topic, 2)
    commit_group(kafka_admin, group, topic, {0: 4, 1: 6})
    common = ("--bootstrap-servers", kafka_bootstrap, "--group", group, "--topic", topic)

    status, out, err = replay(*common, "--to-earliest")
    assert (status, err) == (0, ""), err
    assert committed_offsets(kafka_bootstrap, group, topic, 2) == {0: 0, 1: 0}
    assert "total: 10 record(s) to replay" in out

    status, out, err = replay(*common, "--to-latest")
    assert (status, err) == (0, ""), err
    assert committed_offsets(kafka_bootstrap, group, topic, 2) == {0: 10, 1: 10}
    assert "skips 10" in out
    assert "total: 0 record(s) to replay, 20 skipped" in out


def test_replay_takes_the_group_and_topics_from_the_configuration_and_honours_partition(
    kafka_bootstrap: str,
    kafka_admin: AdminClient,
    topics: Topics,
    replay: RunReplay,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = topics.create("replay-config-a", partitions=2), topics.create("replay-config-b", 2)
    group = unique_name("replay-config")
    for topic in (first, second):
        ten_per_partition(kafka_bootstrap, topic, 2)
        commit_group(kafka_admin, group, topic, {0: 10, 1: 10})
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\ngroup_id = "{group}"\n\n'
        f'[[topics]]\nname = "{first}"\nformat = "json"\n\n'
        f'[[topics]]\nname = "{second}"\nformat = "json"\n\n'
        '[shops.demo]\npartner_id = "demo"\n'
    )
    # Replay never calls the tracking API: the shop's key need not be set.
    monkeypatch.delenv("RR_API_KEY_DEMO", raising=False)

    status, _out, err = replay("--config", str(config), "--partition", "1", "--to-earliest")

    assert (status, err) == (0, ""), err
    assert committed_offsets(kafka_bootstrap, group, first, 2) == {0: 10, 1: 0}
    assert committed_offsets(kafka_bootstrap, group, second, 2) == {0: 10, 1: 0}

    # --group overrides the configuration's group; the configured one stays where it is.
    other = unique_name("replay-config-other")
    status, _out, err = replay("--config", str(config), "--group", other, "--topic", first, "--to-latest")
    assert (status, err) == (0, ""), err
    assert committed_offsets(kafka_bootstrap, other, first, 2) == {0: 10, 1: 10}
    assert committed_offsets(kafka_bootstrap, group, first, 2) == {0: 10, 1: 0}


# --- the plan ------------------------------------------------------------------------------------------


def test_a_dry_run_prints_the_plan_rows_and_changes_nothing(
    kafka_bootstrap: str, kafka_admin: AdminClient, topics: Topics, replay: RunReplay
) -> None:
    topic = topics.create("replay-dry", partitions=2)
    group = unique_name("replay-dry")
    ten_per_partition(kafka_bootstrap, topic, 2)
    commit_group(kafka_admin, group, topic, {0: 8})  # partition 1: never committed

    status, out, err = replay(
        "--bootstrap-servers",
        kafka_bootstrap,
        "--group",
        group,
        "--topic",
        topic,
        "--to-offset",
        "0:2",
        "--to-offset",
        "1:5",
        "--dry-run",
    )

    assert (status, err) == (0, ""), err
    assert committed_offsets(kafka_bootstrap, group, topic, 2) == {0: 8, 1: NO_COMMIT}
    rows = [line.split() for line in out.splitlines() if line.startswith(topic)]
    assert rows == [
        [topic, "0", "8", "2", "6"],  # rewinding replays committed - target
        [topic, "1", "none", "(starts", "at", "0)", "5", "skips", "5"],  # would start at 0 (earliest)
    ]
    assert out.splitlines()[1].split() == ["TOPIC", "PARTITION", "COMMITTED", "TARGET", "REPLAY"]
    assert "auto.offset.reset=earliest" in out
    assert out.rstrip().endswith("dry run: nothing changed")


# --- refusal while the group is live -------------------------------------------------------------------


def test_replay_is_refused_while_the_group_has_an_active_member(
    kafka_bootstrap: str, topics: Topics, replay: RunReplay
) -> None:
    topic = topics.create("replay-live", partitions=2)
    group = unique_name("replay-live")
    ten_per_partition(kafka_bootstrap, topic, 2)
    common = ("--bootstrap-servers", kafka_bootstrap, "--group", group, "--topic", topic)

    with consumer(kafka_bootstrap, group, [topic]) as member:
        wait_until_assigned(member)
        member.commit(offsets=[TopicPartition(topic, 0, 9), TopicPartition(topic, 1, 9)], asynchronous=False)

        status, out, err = replay(*common, "--to-earliest")

        assert status == 1
        line = one_line(err)
        assert f"group {group} has 1 active member(s)" in line
        assert "stop every relay process" in line
        assert out == "", "no plan is printed for a replay that will not happen"
        assert committed_offsets(kafka_bootstrap, group, topic, 2) == {0: 9, 1: 9}

        # A dry run still shows the plan (to prepare the replay before stopping the relay), with a note.
        status, out, err = replay(*common, "--to-earliest", "--dry-run")
        assert status == 0
        assert "a real replay is refused until they stop" in one_line(err)
        assert "total: 18 record(s) to replay" in out
        member.poll(0.1)  # still a live, polling member throughout
        assert member.assignment()

    assert committed_offsets(kafka_bootstrap, group, topic, 2) == {0: 9, 1: 9}


# --- clear errors --------------------------------------------------------------------------------------


def test_an_unknown_topic_is_one_clear_line_and_status_1(kafka_bootstrap: str, replay: RunReplay) -> None:
    missing = unique_name("replay-no-such-topic")
    status, out, err = replay(
        "--bootstrap-servers",
        kafka_bootstrap,
        "--group",
        unique_name("g"),
        "--topic",
        missing,
        "--to-earliest",
    )
    assert status == 1
    assert one_line(err) == f"rr-consumer: replay: unknown topic: {missing}"
    assert out == ""


def test_a_partition_out_of_range_is_one_clear_line_and_status_1(
    kafka_bootstrap: str, topics: Topics, replay: RunReplay
) -> None:
    topic = topics.create("replay-partition", partitions=2)
    status, out, err = replay(
        "--bootstrap-servers",
        kafka_bootstrap,
        "--group",
        unique_name("g"),
        "--topic",
        topic,
        "--partition",
        "5",
        "--to-earliest",
    )
    assert status == 1
    assert f"topic {topic} has partitions 0..1; there is no partition 5" in one_line(err)
    assert out == ""


# Argument errors are found before any broker is contacted (the address below accepts no connection).
OFFLINE = ("--bootstrap-servers", "127.0.0.1:1", "--group", "g", "--topic", "t")


@pytest.mark.parametrize(
    ("args", "names"),
    [
        pytest.param(
            [*OFFLINE, "--to-time", "yesterday"], "--to-time: 'yesterday' is not an ISO 8601", id="bad"
        ),
        pytest.param([*OFFLINE, "--to-time", "2026-11-30T10:00:00"], "has no UTC offset", id="naive-time"),
        pytest.param([*OFFLINE, "--to-offset", "3"], "--to-offset: '3' is not PARTITION:OFFSET", id="offset"),
        pytest.param([*OFFLINE, "--to-offset", "0:1", "--to-offset", "0:2"], "given twice", id="twice"),
        pytest.param([*OFFLINE, "--topic", "u", "--to-offset", "0:1"], "exactly one --topic", id="topics"),
        pytest.param([*OFFLINE, "--partition", "0", "--to-offset", "0:1"], "leave out --partition", id="p"),
        pytest.param(["--group", "g", "--topic", "t", "--to-latest"], "--bootstrap-servers", id="no-kafka"),
        pytest.param(["--bootstrap-servers", "h:1", "--topic", "t", "--to-latest"], "--group", id="no-group"),
        pytest.param(["--bootstrap-servers", "h:1", "--group", "g", "--to-latest"], "--topic", id="no-topic"),
        pytest.param(["--config", "/nonexistent/relay.toml", "--to-latest"], "--config", id="no-config"),
    ],
)
def test_bad_arguments_are_one_clear_line_and_status_2(
    replay: RunReplay, args: list[str], names: str
) -> None:
    status, out, err = replay(*args)
    assert status == 2
    assert names in one_line(err)
    assert out == ""


def test_an_address_where_no_broker_answers_is_one_line_naming_the_option_and_status_2() -> None:
    """Before, this waited out the request timeout while librdkafka printed raw connection failures, then
    said "cannot describe group g: Local: Timed out" (no setting named), exit 1."""
    port = kafka_local.free_port()
    command = ["replay", "--bootstrap-servers", f"127.0.0.1:{port}", "--group", "g", "--topic", "t"]
    result = subprocess.run(
        [sys.executable, "-m", "consumer", *command, "--to-latest", "--timeout", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines[:5]  # no raw librdkafka line (%3|...) around it
    assert lines[0].startswith(
        f"rr-consumer: replay: --bootstrap-servers: no broker at 127.0.0.1:{port} answered within 2s ("
    ), lines[0]
    assert result.stdout == ""


def test_a_bad_pass_through_setting_is_one_line_naming_kafka_client_and_status_2(
    tmp_path: Path, replay: RunReplay
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        '[kafka]\nbootstrap_servers = "127.0.0.1:1"\n[kafka.client]\n"no.such.setting" = "x"\n'
        '[[topics]]\nname = "t"\nformat = "json"\n[shops.demo]\npartner_id = "p"\n'
    )
    status, out, err = replay("--config", str(config), "--to-latest", "--dry-run")
    assert status == 2
    assert err.startswith("rr-consumer: replay: kafka.client: cannot create a Kafka client: "), err
    assert "no.such.setting" in err
    assert len(err.strip().splitlines()) == 1
    assert out == ""


def test_a_time_is_read_to_the_millisecond_in_its_own_offset_rounding_up() -> None:
    assert parse_time("2026-11-30T10:00:00+00:00") == 1_796_032_800_000
    assert parse_time("2026-11-30T12:00:00.007+02:00") == 1_796_032_800_007
    assert parse_time("2026-11-30T10:00:00Z") == 1_796_032_800_000
    # A record stamped .007 is before .0071: "at or after" must not take it in.
    assert parse_time("2026-11-30T10:00:00.0071+00:00") == 1_796_032_800_008


def test_help_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "--to-time 2026-11-30T10:00:00+00:00" in out
    assert "--to-offset 0:1500" in out
    assert "exit status" in out
