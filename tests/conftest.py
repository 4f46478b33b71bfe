"""Fixtures shared by the suite: one real Kafka broker per test session, unique topics per test.

The broker is the one named by ``KAFKA_BOOTSTRAP_SERVERS`` (``make test`` starts one and sets it), or one this
fixture starts itself through ``tools.kafka_local`` and stops when the session ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient

from tests.kafka import Topics
from tools import kafka_local


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
