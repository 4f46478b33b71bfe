"""Faults of the parts around the relay, end to end: the broker, the schema registry, the dead-letter topic.

Each is the normal case for a service beside a shop platform. For each: one clear line that names the part
(and one when it is back), readiness red while it lasts, nothing committed that was not delivered or safely
dead-lettered, nothing drained into the dead-letter topic, and recovery by itself once the fault clears.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from consumer.decode import registry_client
from consumer.service import CLOSE_TIMEOUT_S
from consumer_dev.emulator import EmulatorThread, Faults
from consumer_dev.sample import build_encoder
from tests.kafka import Topics, committed_offsets, end_offsets, produce, unique_name, wait_for
from tests.relay import (
    RelayProcess,
    SchemaRegistry,
    Stack,
    dead_letters,
    event,
    generate,
    received,
    wait_delivered,
    write_config,
)
from tools import kafka_local
from tools.registry_double import RegistryDouble


def probe(port: int, path: str = "/readyz") -> tuple[int, list[str]]:
    """(status, problems) of a probe; (0, []) while the server does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())["problems"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["problems"]
    except OSError:
        return 0, []


def red_with(port: int, text: str) -> Callable[[], list[str] | None]:
    """A condition: readiness is red and one of its problems contains ``text``."""

    def check() -> list[str] | None:
        status, problems = probe(port)
        return problems if status == 503 and any(text in p for p in problems) else None

    return check


def first_lines(relay: RelayProcess, event_name: str) -> list[dict[str, Any]]:
    """The lines of ``event_name`` that opened a fault (reminders of a lasting one say lasting_s > 0)."""
    return [line for line in relay.log_events(event_name) if line.get("lasting_s", 0) == 0]


def observed(port: int, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        "observability": {"port": port, "host": "127.0.0.1"},
        "kafka": {"statistics_interval_ms": 250},
        "retry": {"base_s": 0.2, "cap_s": 1.0},
        **sections,
    }


def test_a_dead_letter_topic_that_cannot_be_written_holds_the_partition_and_recovers_by_itself(
    kafka_bootstrap: str,
    topics: Topics,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    encoder = build_encoder("confluent-avro", registry=registry.client())

    def views(first: int) -> list[tuple[bytes | None, bytes | None]]:
        fields = [
            event("ProductViewed", productId=p, groupId=None, sessionId=f"v{p}")
            for p in range(first, first + 5)
        ]
        return [(f["sessionId"].encode(), encoder.encode("ProductViewed", f)) for f in fields]

    topic = stack.topic("dlq-gone")
    dlq, group, port = f"{topic}.dlq", unique_name("group"), kafka_local.free_port()
    config = stack.config([topic], group=group, sections=observed(port, dead_letter={"write_timeout_s": 2}))
    relay = relays(config)
    produce(kafka_bootstrap, topic, views(0))
    wait_for(lambda: len(received(emulator)) == 5, deadline_s=60, what="the first five views")

    # The dead-letter topic goes away under the running relay (deleted by mistake, or an ACL revoked).
    for future in topics.admin.delete_topics([dlq], operation_timeout=30).values():
        future.result(timeout=30)
    wait_for(lambda: dlq not in topics.admin.list_topics(timeout=10).topics, what="the deletion")
    produce(kafka_bootstrap, topic, [(b"poison", b"not avro at all"), *views(5)])

    problems = wait_for(
        red_with(port, f"dead-letter topic {dlq!r} cannot be written"), deadline_s=60, what="red"
    )
    assert any(f"partitions held: {topic}[0]" in p for p in problems), problems
    wait_for(lambda: len(received(emulator)) == 10, deadline_s=30, what="the views around the poison record")
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 5}, "nothing past the poison record"
    assert probe(port, "/healthz")[0] == 200, "alive: it waits for the dead-letter topic, it is not stuck"

    topics.create_named(dlq)
    letters = dead_letters(kafka_bootstrap, dlq, 1)
    assert letters[0]["headers"]["rr.dlq.source.offset"] == "5"
    wait_for(
        lambda: committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 11}, what="the commit to move on"
    )
    wait_for(lambda: probe(port)[0] == 200, deadline_s=30, what="ready again")
    assert relay.terminate() == 0
    # One line said what broke, however often the write was retried, and one said it works again.
    assert len(first_lines(relay, "relay.dead_letter_write_failed")) == 1
    assert len(relay.log_events("relay.dead_letter_writable")) == 1


# A retry drawn (full jitter) shorter than the rest of the loop's turn was once due before the partition's
# pause was booked, so it was never resumed: a registry outage stalled the partition for good, about one run
# in five. A base of a microsecond makes every retry due at once: that interleaving is the rule, not luck.
@pytest.mark.parametrize("retry_base_s", [0.2, 1e-6], ids=["backoff", "retry-due-at-once"])
def test_a_registry_that_stops_answering_as_one_holds_the_partition_and_dead_letters_nothing(
    retry_base_s: float,
    kafka_bootstrap: str,
    registry_double: RegistryDouble,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    """The double, not the real registry: a real one cannot be made to answer a bare 404 on demand."""
    registry = registry_double
    stack = dataclasses.replace(stack, registry_url=registry.url)
    topic = stack.topic("registry-gone")
    group, port = unique_name("group"), kafka_local.free_port()
    retry = {"base_s": retry_base_s, "cap_s": 1.0}
    relay = relays(stack.config([topic], group=group, sections=observed(port, retry=retry)))
    wait_for(lambda: probe(port)[0] == 200, deadline_s=60, what="ready")
    client = registry_client(registry.url)
    traffic = generate(30, registry=client, seed=31)  # registered while it answers
    registry.answer_as_no_registry()  # e.g. a proxy in front of it lost its route: a bare 404 to everything
    try:
        produce(kafka_bootstrap, topic, traffic.records)
        problems = wait_for(red_with(port, "schema registry unavailable"), deadline_s=60, what="red")
        assert any("schema_registry.url does not point at a Schema Registry API" in p for p in problems)
        assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: -1001}, "nothing committed"
        assert emulator.counters["events_accepted"] == 0
    finally:
        registry.answer_as_no_registry(False)
        client.close()
    wait_delivered(emulator, traffic.expected, relays=[relay], deadline_s=60)
    wait_for(lambda: committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 30}, what="all committed")
    assert end_offsets(kafka_bootstrap, f"{topic}.dlq", 1) == {0: 0}, "a setup fault is never dead-lettered"
    wait_for(lambda: probe(port)[0] == 200, deadline_s=30, what="ready again")
    assert relay.terminate() == 0
    assert len(first_lines(relay, "intake.registry_unavailable")) == 1
    assert len(relay.log_events("intake.registry_back")) == 1


class OwnBroker:
    """A broker of a test's own, which the test kills, restarts and freezes; stopped at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.broker = kafka_local.start(data_root=folder)

    def relay_config(
        self, topic: str, emulator: EmulatorThread, registry: SchemaRegistry, sections: dict[str, Any]
    ) -> Path:
        """A relay configuration for ``topic`` on this broker (its address stays the same across restarts)."""
        return write_config(
            self.folder / "relay.toml",
            bootstrap=self.broker.bootstrap,
            topics=[topic],
            group="g",
            emulator_url=emulator.url,
            registry_url=registry.url,
            sections=sections,
        )

    def create(self, name: str, partitions: int) -> None:
        admin = AdminClient({"bootstrap.servers": self.broker.bootstrap})
        try:
            futures = admin.create_topics([NewTopic(n, partitions, 1) for n in (name, f"{name}.dlq")])
            for future in futures.values():
                future.result(30)
        finally:
            del admin  # destroyed now, while the broker is up: never by a later garbage collection

    def stop(self) -> None:
        kafka_local.thaw(self.broker)  # a frozen broker cannot handle SIGTERM
        kafka_local.stop(self.broker)


def test_a_broker_killed_and_restarted_then_frozen_under_load_loses_nothing_and_readiness_tells_the_truth(
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    tmp_path: Path,
) -> None:
    own = OwnBroker(tmp_path)
    try:
        own.create("shaky", 3)
        port = kafka_local.free_port()
        stall_s = 30  # a broker lost for longer makes the process ask to be restarted (liveness)
        sections = observed(port, observability={"port": port, "host": "127.0.0.1", "stall_after_s": stall_s})
        config = own.relay_config("shaky", emulator, registry, sections)
        emulator.set_faults(Faults(latency_ms=5))  # deliveries in flight whenever the broker goes
        client = registry.client()
        traffic = [generate(1500, registry=client, seed=s, visitors=300) for s in (41, 42, 43)]
        relay = relays(config)
        produce(own.broker.bootstrap, "shaky", traffic[0].records)
        wait_for(lambda: emulator.counters["events_accepted"] > 200, deadline_s=60, what="load")

        # 1. kill -9, and back on the same data and ports.
        kafka_local.kill(own.broker)
        wait_for(red_with(port, "no Kafka broker reachable"), deadline_s=30, what="red without a broker")
        assert probe(port, "/healthz")[0] == 200
        own.broker = kafka_local.restart(own.broker)
        wait_for(lambda: relay.log_events("kafka.broker_back"), deadline_s=60, what="the broker back")
        produce(own.broker.bootstrap, "shaky", traffic[1].records)
        wait_for(lambda: emulator.counters["events_accepted"] > 1500 + 200, deadline_s=60, what="load again")

        # 2. frozen for 20 s: its sockets stay open, nothing answers.
        kafka_local.freeze(own.broker)
        frozen_at = time.monotonic()
        try:
            problems = wait_for(
                red_with(port, "no Kafka broker reachable"), deadline_s=19, what="red, frozen"
            )
            assert any("no broker has answered for" in p for p in problems), problems
            time.sleep(max(0.0, 20 - (time.monotonic() - frozen_at)))  # the freeze's length (noqa: sleep-ok)
        finally:
            kafka_local.thaw(own.broker)
        produce(own.broker.bootstrap, "shaky", traffic[2].records)
        expected = traffic[0].expected + traffic[1].expected + traffic[2].expected

        # librdkafka's consumer reconnects by itself, or (a third of the runs here) stays without a
        # connection: then the process must say so on /healthz, and a restart (the orchestrator's) resumes.
        def recovered_or_asking_for_a_restart() -> str | None:
            if not expected - received(emulator):
                return "recovered"
            status, problems = probe(port, "/healthz")
            return (
                "restart"
                if status == 503 and any("no Kafka broker has answered" in p for p in problems)
                else None
            )

        outcome = wait_for(recovered_or_asking_for_a_restart, deadline_s=120, what="recovery", interval_s=0.5)
        lost, back = first_lines(relay, "kafka.broker_lost"), relay.log_events("kafka.broker_back")
        assert len(lost) >= 2, "a line for the kill and one for the freeze"
        assert all(
            "kafka.bootstrap_servers" in line["problem"] for line in relay.log_events("kafka.broker_lost")
        )
        if outcome == "recovered":
            wait_for(lambda: probe(port)[0] == 200, deadline_s=60, what="ready after the freeze")
            assert len(back) == len(lost), "every loss has its line saying the broker is back"
            assert relay.terminate() == 0
        else:
            assert back, "the broker's return after the kill was said"
            assert relay.terminate(timeout_s=60) in (0, 1)  # a stuck consumer's close ends at its bound
            relays(config, name="restarted")
            wait_delivered(emulator, expected, deadline_s=120)
        assert not expected - received(emulator), "nothing lost"
    finally:
        own.stop()


def test_a_stop_while_the_broker_is_gone_ends_within_its_grace(
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    tmp_path: Path,
) -> None:
    own = OwnBroker(tmp_path)
    try:
        own.create("orphan", 1)
        config = own.relay_config(
            "orphan", emulator, registry, {"delivery": {"shutdown_grace_s": 2, "revoke_grace_s": 2}}
        )
        traffic = generate(50, registry=registry.client(), seed=8)
        relay = relays(config)
        produce(own.broker.bootstrap, "orphan", traffic.records)
        wait_delivered(emulator, traffic.expected, relays=[relay], deadline_s=60)
        kafka_local.kill(own.broker)
        wait_for(lambda: relay.log_events("kafka.broker_lost"), deadline_s=30, what="the broker noticed gone")
        # Within the grace, the bound on closing the consumer and the dead-letter producer's flush.
        status = relay.terminate(timeout_s=2 + CLOSE_TIMEOUT_S + 10 + 15)
        # Everything was delivered and committed before the broker went, so the close may still finish
        # (exit 0); if librdkafka waits for the broker, the stop ends at the bound and says so (exit 1).
        timed_out = relay.log_events("relay.kafka_close_timed_out")
        assert (status, bool(timed_out)) in ((0, False), (1, True)), relay.output()[-2000:]
        assert relay.log_events("relay.stopped")
    finally:
        own.stop()


def test_readiness_turns_red_while_a_partition_with_a_backlog_has_not_committed_for_stall_after_s(
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    """Lag that looks healthy while nothing moves: every call takes longer than the stall bound."""
    topic = stack.topic("stalled")
    port = kafka_local.free_port()
    sections = observed(port, observability={"port": port, "host": "127.0.0.1", "stall_after_s": 1.5})
    relay = relays(stack.config([topic], sections=sections))
    wait_for(lambda: probe(port)[0] == 200, deadline_s=60, what="ready")
    emulator.set_faults(Faults(latency_ms=6000))  # slow, not failing: no breaker, no retry
    traffic = generate(20, registry=registry.client(), seed=12, shops=("demo",))
    produce(kafka_bootstrap, topic, traffic.records)
    problems = wait_for(
        red_with(port, f"partition {topic}[0] has not committed for"), deadline_s=30, what="red"
    )
    assert any("with 20 record(s) behind it" in p for p in problems), problems
    wait_delivered(emulator, traffic.expected, relays=[relay], deadline_s=60)
    wait_for(lambda: probe(port)[0] == 200, deadline_s=30, what="ready once the commit moved")
    assert relay.terminate() == 0


def test_a_topic_deleted_under_the_relay_is_one_line_and_red_readiness_not_a_line_per_poll(
    kafka_bootstrap: str,
    topics: Topics,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    topic = stack.topic("deleted")
    port = kafka_local.free_port()
    relay = relays(stack.config([topic], sections=observed(port)))
    wait_for(lambda: probe(port)[0] == 200, deadline_s=60, what="ready")
    for future in topics.admin.delete_topics([topic], operation_timeout=30).values():
        future.result(timeout=30)
    problems = wait_for(lambda: probe(port)[0] == 503 and probe(port)[1], deadline_s=60, what="red")
    time.sleep(3)  # let the errors repeat: on every poll, as they did (noqa: sleep-ok)
    assert relay.running()
    lines = relay.log_events("intake.consume_error")
    assert len(lines) <= 1, lines
    assert probe(port)[0] == 503, problems
    assert relay.terminate() == 0
