"""Preflight: ``run`` and ``config check`` look at the parts around the relay first, and name what is wrong.

Each mistake a new user makes on day one — a broker address that answers nothing, a topic or dead-letter
topic that was never created, a registry URL with the wrong path — stops ``run`` at once with exit status 2
and one line naming the setting, instead of a relay that runs and delivers nothing, or drains the topic into
the dead-letter topic.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from consumer_dev.emulator import EmulatorThread
from tests.kafka import Topics, unique_name
from tests.relay import (
    ROOT,
    RelayProcess,
    SchemaRegistry,
    Stack,
    generate,
    produce_traffic,
    relay_env,
    wait_delivered,
)
from tools import kafka_local

#: The relays here need only seconds to find a broker missing.
FAST = {"kafka": {"connect_timeout_s": 3}}


def json_lines(relay: RelayProcess) -> list[dict[str, Any]]:
    """Every line of the relay's output, each of which must be a JSON log line."""
    lines = relay.output().splitlines()
    assert lines, "the relay said nothing"
    not_json = [line for line in lines if not line.startswith("{")]
    assert not not_json, f"lines outside the JSON log: {not_json[:3]}"
    return [orjson.loads(line) for line in lines]


def preflight_failure(relay: RelayProcess) -> dict[str, Any]:
    assert relay.wait_exit(60) == 2, relay.output()[-2000:]
    failed = [line for line in json_lines(relay) if line["event"] == "relay.preflight_failed"]
    assert len(failed) == 1, relay.output()[-2000:]
    assert not [line for line in json_lines(relay) if line["event"] == "relay.started"], "it must not start"
    return failed[0]


def config_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumer", "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=relay_env(),
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_a_broker_address_that_answers_nothing_stops_run_with_one_line_naming_the_setting(
    stack: Stack, relays: Callable[..., RelayProcess]
) -> None:
    closed = f"127.0.0.1:{kafka_local.free_port()}"
    config = stack.config(
        ["never-reached"], sections={"kafka": {"bootstrap_servers": closed, "connect_timeout_s": 3}}
    )
    failure = preflight_failure(relays(config))
    assert failure["setting"] == "kafka.bootstrap_servers"
    assert f"no broker at {closed} answered within 3s" in failure["problem"]


def test_a_source_topic_that_does_not_exist_stops_run_naming_the_topic_entry(
    stack: Stack, relays: Callable[..., RelayProcess]
) -> None:
    present = stack.topic("present")
    missing = unique_name("missing")
    failure = preflight_failure(relays(stack.config([present, missing], sections=FAST)))
    assert failure["setting"] == "topics[1].name"
    assert failure["problem"] == f"topic {missing!r} does not exist on the brokers"


def test_a_missing_dead_letter_topic_stops_run_and_says_how_to_fix_it(
    stack: Stack, topics: Topics, relays: Callable[..., RelayProcess]
) -> None:
    source = topics.create("no-dlq", partitions=3)
    failure = preflight_failure(relays(stack.config([source], sections=FAST)))
    assert failure["setting"] == "topics[0].dead_letter_topic"
    assert f"dead-letter topic '{source}.dlq' does not exist" in failure["problem"]
    assert "3 partition(s)" in failure["problem"]
    assert "dead_letter.create_topics = true" in failure["problem"]


def test_with_create_topics_a_missing_dead_letter_topic_is_created_like_its_source_and_the_relay_runs(
    stack: Stack,
    topics: Topics,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
) -> None:
    source = topics.create("make-dlq", partitions=3)
    topics.created.append(f"{source}.dlq")  # deleted with the test's topics
    traffic = generate(60, registry=registry.client(), seed=5)
    produce_traffic(stack.bootstrap, source, traffic)
    config = stack.config([source], sections={**FAST, "dead_letter": {"create_topics": True}})
    relay = relays(config)
    wait_delivered(emulator, traffic.expected, relays=[relay], deadline_s=60)
    assert relay.terminate() == 0
    metadata = topics.admin.list_topics(f"{source}.dlq", timeout=10).topics[f"{source}.dlq"]
    assert metadata.error is None
    assert len(metadata.partitions) == 3
    passed = [line for line in json_lines(relay) if line["event"] == "relay.preflight_passed"]
    assert (
        f"ok   topics[0].dead_letter_topic: dead-letter topic '{source}.dlq' created with 3 partition(s)"
        in (passed[0]["checks"])
    )


def test_a_registry_url_with_a_wrong_path_stops_run_before_a_record_is_dead_lettered(
    stack: Stack, registry: SchemaRegistry, relays: Callable[..., RelayProcess]
) -> None:
    topic = stack.topic("wrong-path")
    # What the check answers, not how fast: a loaded CI run saw Apicurio take over the 5 s default to answer
    # a path it had not served yet.
    config = stack.config([topic], sections={**FAST, "schema_registry": {"timeout_s": 30}})
    text = config.read_text().replace(f'url = "{registry.url}"', f'url = "{registry.url}/apis/wrong"')
    config.write_text(text)
    # Apicurio now and then leaves one request unanswered for 30 s or more (seen on several paths, at start
    # and late in a run, in fresh-clone runs): no answer is the registry's stall, not the answer under test,
    # so the relay is started again, up to three times, until the registry answers the check at all.
    for _ in range(3):
        failure = preflight_failure(relays(config))
        if "gave no registry answer" not in failure["problem"]:
            break
    assert failure["setting"] == "schema_registry.url"
    assert "answers HTTP 404 to /subjects: no Schema Registry API at this URL" in failure["problem"]


def test_config_check_says_what_it_checked_and_exits_0_when_everything_holds(stack: Stack) -> None:
    topic = stack.topic("checked", partitions=2)
    result = config_check(stack.config([topic], sections=FAST))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    checks = lines[lines.index("ok   configuration: valid (URLs, settings, API keys resolved)") :]
    assert [line.split(":")[0] for line in checks] == [
        "ok   configuration",
        "ok   kafka.bootstrap_servers",
        "ok   topics[0].name",
        "ok   topics[0].dead_letter_topic",
        "ok   schema_registry.url",
    ]
    assert f"topic {topic!r}: 2 partition(s)" in checks[2]
    assert "k-demo-secret-1" not in result.stdout + result.stderr


def test_config_check_reports_a_dead_letter_topic_run_would_create_without_creating_it(
    stack: Stack, topics: Topics
) -> None:
    source = topics.create("would-create")
    result = config_check(stack.config([source], sections={**FAST, "dead_letter": {"create_topics": True}}))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"dead-letter topic '{source}.dlq' does not exist; run creates it with 1 partition(s)"
        in result.stdout
    )
    assert topics.admin.list_topics(timeout=10).topics.get(f"{source}.dlq") is None, "config check created it"


def test_config_check_exits_2_with_a_fail_line_per_problem(stack: Stack, topics: Topics) -> None:
    source = topics.create("check-fails")
    result = config_check(stack.config([source], sections=FAST))
    assert result.returncode == 2
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == [
        f"FAIL topics[0].dead_letter_topic: dead-letter topic '{source}.dlq' does not exist: create it (e.g. "
        "with 1 partition(s), as its source topic) or set dead_letter.create_topics = true"
    ]
