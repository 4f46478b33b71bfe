"""Fixtures shared by the suite: one real Kafka broker per test session, unique topics per test.

The broker is the one named by ``KAFKA_BOOTSTRAP_SERVERS`` (``make test`` starts one and sets it), or one this
fixture starts itself through ``tools.kafka_local`` and stops when the session ends. The Schema Registry, in
the same way, is the one named by ``SCHEMA_REGISTRY_URL`` (``make test`` starts Apicurio Registry's
Confluent-compatible API) or one started through ``tools.registry_local``: one registry for the whole run.
The registry double (``tools.registry_double``) is only for what a real registry cannot do on demand.

No librdkafka client outlives the code that made it (``tests.kafka``'s docstring says why): after each test,
and once more before the session's broker stops, any client still open fails the run, naming what holds it.
pytest-timeout (``pyproject.toml``) bounds each test, fixtures included, and dumps every thread's stack when
one hangs; once the session is over, :func:`pytest_sessionfinish` arms a last watchdog for the way out.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from consumer_dev.emulator import EmulatorShop, EmulatorThread
from tests.kafka import Topics, clients_left_behind
from tests.relay import SHOPS, RelayProcess, SchemaRegistry, Stack, relay_env
from tools import kafka_local, registry_local
from tools.registry_double import RegistryDouble


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the broker are marked ``broker``, those that use the real registry ``registry``; the
    rest are ``unit``, so either set runs alone."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        uses_broker, uses_registry = "kafka_bootstrap" in names, "schema_registry_url" in names
        if uses_broker:
            item.add_marker(pytest.mark.broker)
        if uses_registry:
            item.add_marker(pytest.mark.registry)
        if not uses_broker and not uses_registry:
            item.add_marker(pytest.mark.unit)


#: How long the process may take to exit once the session is over (plugins' session end, interpreter exit:
#: what no test's timeout covers) before faulthandler dumps every thread's stack and ends it with status 1.
EXIT_DEADLINE_S = float(os.environ.get("RR_TEST_EXIT_DEADLINE_S", "120"))  # shorter only to test it
#: The session's own clients (the ``kafka_admin`` fixture's), open on purpose until the session ends.
_SESSION_CLIENTS: list[object] = []
#: Ids of clients reported already: each is reported once, by the first test after which it was found.
_REPORTED: set[int] = set()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The session's fixtures are torn down inside the last test's teardown, while that test's arguments
    (the session's admin client among them) are still held by the test item: drop them first, so the check
    in ``kafka_bootstrap`` sees what the code left open, not what pytest still holds for the last test."""
    if nextitem is None:
        funcargs = getattr(item, "funcargs", None)
        if isinstance(funcargs, dict):
            funcargs.clear()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    with kafka_local.running() as bootstrap:
        yield bootstrap
        # kafka_admin depends on this fixture, so it was torn down (and its client destroyed) already. What a
        # kept traceback or a reference cycle still holds (each reported after its test) goes now, while the
        # broker is up; what is left after that is held for good.
        _release_kept_tracebacks()
        gc.collect()
        left = clients_left_behind()
        assert not left, f"librdkafka clients still open as the session's broker stops: {left}"


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Iterator[AdminClient]:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    _SESSION_CLIENTS.append(admin)
    yield admin
    # pytest drops its own reference once this teardown is done, so the client is destroyed then: before
    # kafka_bootstrap's teardown, which stops the broker.
    _SESSION_CLIENTS.clear()
    del admin


@pytest.fixture(autouse=True)
def _no_kafka_client_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test after which a librdkafka client is still open (one the code under test or the test made
    and neither closed nor released): left to a later garbage collection, it can hang the suite.

    Checked after each test that can make one (a broker test, or one in a module that uses confluent_kafka or
    the broker tool): the look over the heap costs tens of milliseconds, too much for each of a thousand
    unit tests. The module-wide check below covers the others. During such a test the automatic garbage
    collection is off, so a client that only a reference cycle holds is still there to be found, rather than
    destroyed by a collection that happened to run in time.
    """
    checked = "kafka_bootstrap" in request.fixturenames or _uses_kafka(request.module)
    if not checked:
        yield
        return
    gc.disable()
    try:
        yield
        left = clients_left_behind(_SESSION_CLIENTS, skip=_REPORTED)
    finally:
        gc.enable()
    assert not left, f"librdkafka clients left open after the test: {left}"


@pytest.fixture(scope="module", autouse=True)
def _no_kafka_client_left_behind_by_the_module(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    left = clients_left_behind(_SESSION_CLIENTS, skip=_REPORTED)
    assert not left, f"librdkafka clients left open after the tests of {request.module.__name__}: {left}"


_KAFKA_MODULES = ("confluent_kafka", "cimpl", "tools.kafka_local")


def _uses_kafka(module: object) -> bool:
    """Whether a test module imports confluent_kafka or the broker tool (or names from them)."""
    for value in vars(module).values():
        name = getattr(value, "__module__", None) or getattr(value, "__name__", None)
        if isinstance(name, str) and name.startswith(_KAFKA_MODULES):
            return True
    return False


def _release_kept_tracebacks() -> None:
    """pytest keeps the last failure's traceback (for post-mortem debugging), and with it that test's
    frames and whatever clients they held: drop it, so a client only it held is destroyed now."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Arm a watchdog for the way out: a hang after the last test (a client destroyed at interpreter exit,
    a thread that never ends) dumps every thread's stack and exits 1 instead of hanging CI for good."""
    faulthandler.dump_traceback_later(EXIT_DEADLINE_S, exit=True, file=sys.__stderr__)


@pytest.fixture
def topics(kafka_admin: AdminClient) -> Iterator[Topics]:
    created = Topics(kafka_admin)
    yield created
    created.delete_all()


@pytest.fixture(scope="session")
def schema_registry_url() -> Iterator[str]:
    """The base URL of the session's real Schema Registry (its Confluent-compatible API)."""
    with registry_local.running() as url:
        yield url


@pytest.fixture(scope="session")
def registry(schema_registry_url: str) -> Iterator[SchemaRegistry]:
    """The real Schema Registry, for producers and for relays running as their own processes."""
    registry = SchemaRegistry(schema_registry_url)
    yield registry
    registry.close()


@pytest.fixture
def registry_double() -> Iterator[RegistryDouble]:
    """The registry double: only for what a real registry cannot do on demand (an outage, a bare 404)."""
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
    kafka_bootstrap: str, topics: Topics, registry: SchemaRegistry, emulator: EmulatorThread, tmp_path: Path
) -> Stack:
    """The broker, the real registry and the emulator of this test, for a relay to be configured against."""
    return Stack(kafka_bootstrap, topics, registry.url, emulator.url, tmp_path)
