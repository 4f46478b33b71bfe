"""The registry tool and the real registry it runs: Apicurio Registry's Confluent-compatible API, as the
decoder meets it (ids, not-found answers, references, the GUID endpoint it lacks), and the tool's own
failures, each one line naming what is missing."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaReference, SchemaRegistryClient

from consumer.decode import SCHEMAS_DIR, DomainEvent, SchemaNotFound, build_decoder, registry_client
from consumer.errors import PermanentError, RegistryUnavailable
from tests.kafka import wait_for
from tests.relay import PATIENT
from tests.test_decode import EVENTS
from tools import registry_local

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def client(schema_registry_url: str) -> Iterator[SchemaRegistryClient]:
    made = registry_client(schema_registry_url, **PATIENT)  # it sets the scene: it may wait for Apicurio
    yield made
    made.close()


@pytest.fixture
def reader(schema_registry_url: str) -> Iterator[SchemaRegistryClient]:
    """Another client, with an empty cache: what its decoder reads, it asks the registry for.

    These tests hold what the registry answers, not how fast: Apicurio's first answer on a path it has not
    served yet (its error path included) once took over the relay's 5 s under a loaded CI run, so they wait
    longer for it."""
    made = registry_client(schema_registry_url, timeout=30.0)
    yield made
    made.close()


# --- the registry, as the decoder meets it ------------------------------------------------------------------


def answered(call: Callable[[], object]) -> Exception | None:
    """The error ``call`` ends in, or None while the registry gives no answer at all (a timeout).

    These tests hold what the registry answers. In two loaded CI runs, Apicurio left its first request on
    ``/schemas/guids`` unanswered for over 5 s, then over 30 s, while every other path answered at once: no
    answer is the registry's slowness (the decoder holds such a record too), not the answer under test."""
    try:
        call()
    except RegistryUnavailable as exc:
        return None if "unreachable" in str(exc) else exc
    except Exception as exc:  # any other outcome is the answer, asserted by the caller
        return exc
    raise AssertionError("the call succeeded; the test expects the registry to refuse it")


def test_the_registry_checks_backward_compatibility_as_confluents_does_by_default(
    client: SchemaRegistryClient,
) -> None:
    assert client.get_compatibility() == "BACKWARD"


def test_an_id_the_registry_does_not_know_is_schema_not_found(reader: SchemaRegistryClient) -> None:
    value = b"\x00" + (987654321).to_bytes(4, "big") + b"\x00"
    refused = wait_for(
        lambda: answered(lambda: build_decoder("confluent-avro", registry=reader).decode(value)),
        deadline_s=120,
        what="an answer from the registry on /schemas/ids",
    )
    assert isinstance(refused, SchemaNotFound)
    assert isinstance(refused, PermanentError)
    assert "schema id 987654321 is not in the registry" in str(refused)


def test_a_schema_guid_is_transient_here_because_this_registry_has_no_guid_endpoint(
    reader: SchemaRegistryClient,
) -> None:
    """Apicurio 3.3.3 answers /schemas/guids/{guid} with a bare 404 (no registry error code): a setup fault,
    so magic-1 records wait for a registry that serves GUIDs rather than being dead-lettered. Should a later
    Apicurio serve the endpoint, this test fails and the README's table changes."""
    value = b"\x01" + uuid.uuid4().bytes + b"\x00"
    refused = wait_for(
        lambda: answered(lambda: build_decoder("confluent-avro", registry=reader).decode(value)),
        deadline_s=120,
        what="an answer from the registry on /schemas/guids",
    )
    assert isinstance(refused, RegistryUnavailable)
    assert "HTTP 404 without a registry error code for schema GUID" in str(refused)


def test_a_writer_with_references_registered_in_the_registry_decodes(
    client: SchemaRegistryClient, reader: SchemaRegistryClient
) -> None:
    """OrderPlaced with its line type in a subject of its own, as a platform sharing types registers it."""
    tag = uuid.uuid4().hex
    order = json.loads((SCHEMAS_DIR / "OrderPlaced.avsc").read_text(encoding="utf-8"))
    lines = next(f for f in order["fields"] if f["name"] == "lines")
    line = lines["type"]["items"] | {"namespace": "com.shopplatform.events"}
    line_subject = f"order-line-{tag}"
    client.register_schema(line_subject, Schema(json.dumps(line), "AVRO"))
    lines["type"]["items"] = "com.shopplatform.events.OrderLine"
    ref = SchemaReference("com.shopplatform.events.OrderLine", line_subject, 1)
    schema_id = client.register_schema(f"orders-{tag}-value", Schema(json.dumps(order), "AVRO", [ref]))
    assert reader.get_schema(schema_id).references == [ref]

    named: dict[str, object] = {}
    fastavro.parse_schema(line, named_schemas=named)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(order, named_schemas=named), EVENTS["OrderPlaced"])
    value = b"\x00" + schema_id.to_bytes(4, "big") + body.getvalue()
    event = build_decoder("confluent-avro", registry=reader).decode(value)
    assert event == DomainEvent("OrderPlaced", EVENTS["OrderPlaced"])


# --- the tool -----------------------------------------------------------------------------------------------


def fake_java(home: Path, script: str) -> Path:
    """``home/bin/java``: an executable that runs ``script`` (sh) instead of a JVM."""
    java = home / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\n{script}\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return java


def test_without_a_java_21_the_tool_says_which_setting_to_fix_and_what_it_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = fake_java(tmp_path / "jdk-17", "echo '    java.specification.version = 17' >&2")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk-17"))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(registry_local.RegistryError) as caught:
        registry_local.find_java(jvm_root=tmp_path / "no-jvms")
    message = str(caught.value)
    assert "Apicurio Registry needs Java 21 or newer: set JAVA_HOME to such a JDK" in message
    assert f"{old} (17)" in message
    assert "\n" not in message


def test_java_home_wins_when_new_enough_else_the_newest_jdk_found_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jvms = tmp_path / "jvm"
    for name, version in (("jdk-17", 17), ("jdk-21", 21), ("jdk-25", 25)):
        fake_java(jvms / name, f"echo '    java.specification.version = {version}' >&2")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setenv("JAVA_HOME", str(jvms / "jdk-21"))
    assert registry_local.find_java(jvm_root=jvms) == jvms / "jdk-21" / "bin" / "java"
    monkeypatch.setenv("JAVA_HOME", str(jvms / "jdk-17"))
    assert registry_local.find_java(jvm_root=jvms) == jvms / "jdk-25" / "bin" / "java"


def test_a_registry_that_dies_while_starting_fails_at_once_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, schema_registry_url: str
) -> None:
    """(The session's registry is asked for only so the application is fetched already.)"""
    java = fake_java(tmp_path / "jdk", "echo 'Quarkus failed: port already bound' ; exit 3")
    monkeypatch.setattr(registry_local, "find_java", lambda: java)
    with pytest.raises(registry_local.RegistryError) as caught:
        registry_local.start(data_root=tmp_path, deadline_s=60)
    message = str(caught.value)
    assert "the registry exited with status 3 before it was ready" in message
    assert "Quarkus failed: port already bound" in message
    assert not list(tmp_path.glob("rr-registry-*")), "its data directory is removed"


def test_a_registry_that_never_gets_ready_is_stopped_at_the_deadline_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, schema_registry_url: str
) -> None:
    java = fake_java(tmp_path / "jdk", "echo 'still starting'; exec sleep 600")
    monkeypatch.setattr(registry_local, "find_java", lambda: java)
    with pytest.raises(registry_local.RegistryError) as caught:
        registry_local.start(data_root=tmp_path, deadline_s=1)
    message = str(caught.value)
    assert "was not ready within 1s" in message
    assert "still starting" in message


def test_run_uses_the_registry_schema_registry_url_names_and_exits_with_the_commands_status() -> None:
    check = (
        "import os, sys; sys.exit(7 if os.environ['SCHEMA_REGISTRY_URL'] == 'http://127.0.0.1:1/x' else 1)"
    )
    env = {**os.environ, "SCHEMA_REGISTRY_URL": "http://127.0.0.1:1/x"}
    result = subprocess.run(
        [sys.executable, "-m", "tools.registry_local", "run", "--", sys.executable, "-c", check],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 7, result.stderr


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Dropping:
    """A registry stand-in on a free port that drops its first ``drops`` connections unanswered, then 404s."""

    def __init__(self, drops: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/apis/ccompat/v7"
        self.drops = drops
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            with connection:
                self.connections += 1
                connection.recv(65536)
                if self.connections > self.drops:
                    connection.sendall(NOT_FOUND)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() the thread waits in
        self.listener.close()
        self.thread.join(timeout=5)


def test_warm_up_asks_again_when_the_registry_drops_a_connection_unanswered() -> None:
    """Seen in a CI run: Apicurio closed a first ``/schemas/guids`` request unanswered, and the run died."""
    dropping = _Dropping(drops=2)
    try:
        registry_local.warm_up(dropping.url)
    finally:
        dropping.close()
    assert dropping.connections == 2 + len(registry_local.WARM_UP_PATHS), "each path answered, 2 asked again"


def test_warm_up_fails_naming_the_path_when_the_registry_never_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry_local, "WARM_UP_TIMEOUT_S", 1.0)
    dropping = _Dropping(drops=10**9)
    try:
        with pytest.raises(registry_local.RegistryError) as caught:
            registry_local.warm_up(dropping.url)
    finally:
        dropping.close()
    assert f"did not answer {registry_local.WARM_UP_PATHS[0]} when warmed up" in str(caught.value)
