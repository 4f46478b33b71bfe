"""The test harness itself: a real broker, at-least-once offsets, and a broker tool that cleans up."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from consumer.clients import close_producer
from tests.kafka import (
    Topics,
    clients_left_behind,
    committed_offsets,
    consume,
    consumer,
    produce,
    unique_name,
    wait_for,
)
from tools import kafka_local


def test_consumer_group_resumes_exactly_at_the_committed_offsets(
    kafka_bootstrap: str, topics: Topics
) -> None:
    topic = topics.create("resume", partitions=3)
    produce(kafka_bootstrap, topic, [(f"k{i}".encode(), f"v{i}".encode(), i % 3) for i in range(30)])
    group = unique_name("resume-group")

    # First run: handle (and store) only the first 4 records of each partition, then commit and leave.
    handled: dict[int, list[int]] = {0: [], 1: [], 2: []}
    with consumer(kafka_bootstrap, group, [topic]) as first:
        for message in consume(first, 30):
            partition, offset = message.partition(), message.offset()
            if offset < 4:
                handled[partition].append(offset)
                first.store_offsets(offsets=[TopicPartition(topic, partition, offset + 1)])
        first.commit(asynchronous=False)
    assert all(offsets == [0, 1, 2, 3] for offsets in handled.values())
    assert committed_offsets(kafka_bootstrap, group, topic, 3) == {0: 4, 1: 4, 2: 4}

    # Second run in the same group: it starts exactly at offset 4 of every partition, nothing earlier.
    with consumer(kafka_bootstrap, group, [topic]) as second:
        resumed = consume(second, 18)
    firsts = {p: min(m.offset() for m in resumed if m.partition() == p) for p in range(3)}
    assert firsts == {0: 4, 1: 4, 2: 4}
    assert sorted((m.partition(), m.offset()) for m in resumed) == [
        (p, o) for p in range(3) for o in range(4, 10)
    ]


def test_auto_commit_commits_only_what_was_stored(kafka_bootstrap: str, topics: Topics) -> None:
    topic = topics.create("stored")
    produce(kafka_bootstrap, topic, [(None, b"x")] * 5)
    group = unique_name("stored-group")
    with consumer(
        kafka_bootstrap, group, [topic], **{"enable.auto.commit": True, "auto.commit.interval.ms": 100}
    ) as client:
        consume(client, 5)
        client.store_offsets(offsets=[TopicPartition(topic, 0, 3)])  # records 0..2 are done; 3 and 4 are not
        wait_for(
            lambda: committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 3},
            what="auto-commit of the stored offset",
        )
    # Closing commits the stored offset again, never the consumed-but-unsettled ones.
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 3}


def test_broker_tool_stop_leaves_no_java_process(tmp_path: Path) -> None:
    broker = kafka_local.start(data_root=tmp_path)
    assert broker.alive()
    assert _java_processes_using(broker.data_dir), "the started broker should be visible as a java process"
    kafka_local.stop(broker)
    assert not broker.alive()
    assert _java_processes_using(broker.data_dir) == []
    assert not broker.data_dir.exists()


def test_broker_start_failure_quotes_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Hand the broker a port that is already taken: it cannot bind, exits, and the error must say why.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = iter([port, kafka_local.free_port()])
        monkeypatch.setattr(kafka_local, "free_port", lambda: next(ports))
        with pytest.raises(kafka_local.BrokerError) as raised:
            kafka_local.start(data_root=tmp_path, deadline_s=60)
    message = str(raised.value)
    assert "before it was ready" in message
    assert "Address already in use" in message or "BindException" in message
    assert list(tmp_path.iterdir()) == [], "the failed broker's data directory must be removed"


def _java_processes_using(data_dir: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "java" in cmdline and str(data_dir) in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def test_cluster_ids_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # An id starting with "-" is taken for an option by the storage tool; such draws must be skipped.
    draws = iter([uuid.UUID(bytes=b"\xfb" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(kafka_local.uuid, "uuid4", lambda: next(draws))
    assert kafka_local._cluster_id() == "AQEBAQEBAQEBAQEBAQEBAQ"


def test_readiness_asks_one_group_on_each_consumer_offsets_partition() -> None:
    """The broker counts as ready once a group of every ``__consumer_offsets`` partition answers, so the
    partition of a group must be Kafka's: ``Utils.abs(groupId.hashCode()) % partitions``."""
    assert kafka_local._offsets_partition("a", 1000) == 97  # "a".hashCode() == 97
    assert kafka_local._offsets_partition("rr", 10_000) == 3_648  # 114 * 31 + 114
    assert kafka_local._offsets_partition("polygenelubricants", 7) == 0  # hashCode() == Integer.MIN_VALUE
    groups = kafka_local._readiness_groups(kafka_local.OFFSETS_PARTITIONS)
    partitions = [kafka_local._offsets_partition(g, kafka_local.OFFSETS_PARTITIONS) for g in groups]
    assert partitions == list(range(kafka_local.OFFSETS_PARTITIONS))


def _kinds(found: list[str]) -> Counter[str]:
    return Counter(description.split(" (")[0] for description in found)


def test_the_leak_check_finds_open_clients_and_not_closed_or_released_ones() -> None:
    """The check run after each test (tests/conftest.py) sees every kind of client left open."""
    nowhere = f"127.0.0.1:{kafka_local.free_port()}"  # nothing listens: nothing to wait for either
    before = _kinds(clients_left_behind())  # the session's own admin client, when a broker test ran first
    producer = Producer({"bootstrap.servers": nowhere, "log_level": 0})
    probe = Consumer({"bootstrap.servers": nowhere, "group.id": "g", "log_level": 0})
    admin = AdminClient({"bootstrap.servers": nowhere, "log_level": 0})
    try:
        found = _kinds(clients_left_behind()) - before
        assert found == Counter(["an open Producer", "an open Consumer", "an open AdminClient"])
    finally:
        close_producer(producer, 0)
        probe.close()
        del admin
    assert _kinds(clients_left_behind()) == before, "closed, and released: none is reported"


def test_the_leak_check_counts_a_client_that_only_a_reference_cycle_holds() -> None:
    """Such a client is the one a garbage collection would destroy at some random later point: left behind."""
    nowhere = f"127.0.0.1:{kafka_local.free_port()}"
    before = _kinds(clients_left_behind())
    cycle: dict[str, object] = {"admin": AdminClient({"bootstrap.servers": nowhere, "log_level": 0})}
    cycle["self"] = cycle
    del cycle
    assert _kinds(clients_left_behind()) - before == Counter(["an open AdminClient"])
    gc.collect()  # destroyed now, deterministically, as no test may leave it
    assert _kinds(clients_left_behind()) == before


# --- the watchdogs: a hang fails in minutes and says where --------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _pytest(folder: Path, test: str, *options: str, **env: str) -> tuple[int, str, float]:
    """Run pytest, with this suite's configuration and conftest, on one generated test file."""
    (folder / "test_generated.py").write_text(test)
    command = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT)]
    command += ["-p", "tests.conftest", "-p", "no:cacheprovider", *options, str(folder / "test_generated.py")]
    started = time.monotonic()
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def test_a_test_hung_inside_c_code_fails_within_the_limit_and_dumps_every_threads_stack(
    tmp_path: Path,
) -> None:
    """As the suite hung in librdkafka's destroy: the main thread waits on a mutex inside C code, where no
    signal handler runs (so pytest-timeout's "signal" method would wait with it); "thread" ends it."""
    status, output, took = _pytest(
        tmp_path,
        "import ctypes, threading\n"
        "def test_hangs() -> None:\n"
        "    threading.Thread(target=threading.Event().wait, name='helper-that-waits', daemon=True).start()\n"
        "    libc = ctypes.CDLL(None)\n"
        "    mutex = ctypes.create_string_buffer(64)  # PTHREAD_MUTEX_INITIALIZER: all zeros\n"
        "    libc.pthread_mutex_lock(mutex)\n"
        "    libc.pthread_mutex_lock(mutex)  # a normal mutex locked twice: a deadlock, in C\n",
        "-o",
        "timeout=2",
    )
    assert status != 0, output
    assert "Timeout" in output, output[-3000:]
    assert "helper-that-waits" in output, "every thread's stack, not only the main one's"
    assert "test_hangs" in output, "the main thread's stack shows where it hung"
    assert took < 60


def test_a_hang_after_the_last_test_is_ended_by_the_exit_watchdog(tmp_path: Path) -> None:
    """A thread that never ends holds the interpreter's exit, outside any test's limit."""
    status, output, took = _pytest(
        tmp_path,
        "import threading\n"
        "def block_the_exit() -> None:\n"
        "    threading.Event().wait()\n"
        "def test_passes_but_leaves_a_thread() -> None:\n"
        "    threading.Thread(target=block_the_exit, name='never-ends').start()\n",
        RR_TEST_EXIT_DEADLINE_S="10",
    )
    assert "1 passed" in output, output[-3000:]
    assert status == 1, f"the watchdog ends the process with status 1, not {status}"
    assert "block_the_exit" in output, "the stack of the thread that held the exit is dumped"
    assert took < 60
