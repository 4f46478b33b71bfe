"""Fixtures shared by the suite: one real Kafka broker per test session, unique topics per test.

The broker is the one named by ``KAFKA_BOOTSTRAP_SERVERS`` (``make test`` starts one and sets it), or one this
fixture starts itself through ``tools.kafka_local`` and stops when the session ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from consumer.emulator import EmulatorShop, EmulatorThread
from tests.kafka import Topics
from tests.relay import SHOPS, RelayProcess, Stack, relay_env
from tools import kafka_local
from tools.registry_double import RegistryDouble


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the broker are marked ``broker``; the rest are ``unit``, so either set runs alone."""
    for item in items:
        uses_broker = "kafka_bootstrap" in getattr(item, "fixturenames", ())
        item.add_marker(pytest.mark.broker if uses_broker else pytest.mark.unit)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    with kafka_local.running() as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def topics(kafka_admin: AdminClient) -> Iterator[Topics]:
    created = Topics(kafka_admin)
    yield created
    created.delete_all()


@pytest.fixture(scope="session")
def registry() -> Iterator[RegistryDouble]:
    """A Schema Registry (test double) over HTTP, for relays running as their own processes."""
    with RegistryDouble() as double:
        yield double


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    """The tracking API emulator, knowing the test shops (tests.relay.SHOPS)."""
    with EmulatorThread([EmulatorShop(partner_id=pid, api_key=key) for pid, key in SHOPS.values()]) as server:
        yield server


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """Start relays as processes (``relays(config, name=..., **env)``); any still running is killed after."""
    started: list[RelayProcess] = []

    def start(config: Path, name: str = "relay", **env: str) -> RelayProcess:
        relay = RelayProcess(config=config, log=tmp_path / f"{name}-{len(started)}.log", env=relay_env(**env))
        started.append(relay.start())
        return relay

    yield start
    for relay in started:
        relay.cleanup()


@pytest.fixture
def stack(
    kafka_bootstrap: str, topics: Topics, registry: RegistryDouble, emulator: EmulatorThread, tmp_path: Path
) -> Stack:
    """The broker, the registry double and the emulator of this test, for a relay to be configured against."""
    return Stack(kafka_bootstrap, topics, registry.url, emulator.url, tmp_path)
