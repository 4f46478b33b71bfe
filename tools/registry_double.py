"""A test double of the Confluent Schema Registry's REST API, for tests where the relay runs as a process.

No real registry runs on the build machines (no Docker), and ``mock://`` registries live inside one process.
This double answers the calls ``confluent_kafka.schema_registry.SchemaRegistryClient`` makes, with bodies and
error JSON shaped like the real registry's (``{"error_code": 40403, "message": ...}``):

=====================================  ==============================================================
``POST /subjects/{s}/versions``        register a schema (same schema → same id) → ``{"id": n, "guid": g}``
``POST /subjects/{s}``                 look a schema up in a subject → subject, id, version, schema
``GET  /schemas/ids/{id}``             a schema by id → ``{"schema": ...}`` (+ ``schemaType`` if not Avro)
``GET  /schemas/guids/{guid}``         a schema by GUID (Confluent Platform 8.1+; Apicurio 3.3.3 lacks it)
``GET  /schemas/ids/{id}/versions``    the (subject, version) pairs of an id
``GET  /schemas/ids/{id}/subjects``    the subjects of an id
``GET  /schemas/types``                ``["AVRO", "JSON", "PROTOBUF"]``
``GET  /subjects``                     subject names
``GET  /subjects/{s}/versions``        version numbers of a subject
``GET  /subjects/{s}/versions/{v}``    one version, or ``latest``
``GET  /config``                       ``{"compatibilityLevel": "BACKWARD"}``
=====================================  ==============================================================

It does not check compatibility or normalise schemas beyond JSON equality, and keeps everything in memory.
Failure switches for tests: :meth:`RegistryDouble.fail_with` answers every request with an HTTP error (503 by
default), :meth:`RegistryDouble.stall` holds every request until :meth:`RegistryDouble.unstall` (to exercise
client timeouts), and :meth:`RegistryDouble.stop` closes the port.

In-process: ``with RegistryDouble() as registry: ... registry.url ...`` (a free port, a background thread).
As a process: ``python -m tools.registry_double --port 8081``.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Final
from urllib.parse import unquote, urlsplit

_CONTENT_TYPE: Final = "application/vnd.schemaregistry.v1+json"
_STALL_LIMIT_S: Final = 60.0  # a stalled request answers 503 after this, so no thread waits forever


class _Answer(Exception):
    """An error answer, raised from a route: HTTP status plus the registry's error code and message."""

    def __init__(self, status: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


@dataclass
class _Store:
    """Schemas by id (1, 2, …) and subjects as lists of ids, one per version."""

    schemas: list[tuple[str, str, list[Any]]] = field(default_factory=list)  # (schema, type, references)
    subjects: dict[str, list[int]] = field(default_factory=dict)

    def schema(self, schema_id: int) -> tuple[str, str, list[Any]]:
        if not 1 <= schema_id <= len(self.schemas):
            raise _Answer(404, 40403, f"Schema {schema_id} not found")
        return self.schemas[schema_id - 1]

    def versions(self, subject: str) -> list[int]:
        versions = self.subjects.get(subject)
        if not versions:
            raise _Answer(404, 40401, f"Subject '{subject}' not found.")
        return versions

    def find(self, schema: str, kind: str) -> int | None:
        wanted = _comparable(schema)
        for index, (text, other_kind, _) in enumerate(self.schemas):
            if other_kind == kind and _comparable(text) == wanted:
                return index + 1
        return None


def _comparable(schema: str) -> Any:
    try:
        return json.loads(schema)
    except ValueError:
        return schema


class RegistryDouble:
    """The registry double, served from a background thread on ``host``:``port`` (0: a free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._store = _Store()
        self._failure: int | None = None
        self._no_registry = False
        self._released = threading.Event()
        self._released.set()
        self._requests: list[tuple[str, str]] = []
        self._server = _Server((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> RegistryDouble:
        # A short poll interval, so that stop() returns at once.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="registry-double", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the port: clients then get connection errors."""
        self._released.set()  # free stalled requests
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> RegistryDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- switches for tests --------------------------------------------------------------------------------

    def fail_with(self, status: int | None = 503) -> None:
        """Answer every request with ``status`` (a registry-style error body) until called with None."""
        with self._lock:
            self._failure = status

    def answer_as_no_registry(self, on: bool = True) -> None:
        """Answer every request with a bare 404 (no registry error code), as a server that is not a Schema
        Registry does (a wrong path, a proxy without the route), until called with False."""
        with self._lock:
            self._no_registry = on

    def stall(self) -> None:
        """Hold every request unanswered until :meth:`unstall` (or for a minute at most)."""
        self._released.clear()

    def unstall(self) -> None:
        self._released.set()

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request received so far, in order."""
        with self._lock:
            return list(self._requests)

    # --- the API -------------------------------------------------------------------------------------------

    def handle(self, method: str, target: str, body: bytes) -> tuple[int, Any]:
        """Answer one request: (HTTP status, JSON body). Public so it can be tested without sockets."""
        path = urlsplit(target).path.rstrip("/")
        with self._lock:
            self._requests.append((method, path))
            failure = self._failure
            if self._no_registry:
                return 404, {"error_code": 404, "message": "HTTP 404 Not Found"}
        if not self._released.wait(_STALL_LIMIT_S):
            failure = 503
        if failure is not None:  # the real registry's server errors carry codes 50001-50003
            code = 50001 if failure >= 500 else failure * 100
            return failure, {"error_code": code, "message": f"HTTP {failure} (registry double)"}
        for route_method, pattern, route in self._routes:
            match = pattern.fullmatch(path)
            if route_method == method and match is not None:
                try:
                    with self._lock:
                        return 200, route(*(unquote(group) for group in match.groups()), body=body)
                except _Answer as answer:
                    return answer.status, {"error_code": answer.error_code, "message": answer.message}
        return 404, {"error_code": 404, "message": "HTTP 404 Not Found"}

    @property
    def _routes(self) -> Sequence[tuple[str, re.Pattern[str], Callable[..., Any]]]:
        segment = r"([^/]+)"
        return (
            ("POST", re.compile(rf"/subjects/{segment}/versions"), self._register),
            ("POST", re.compile(rf"/subjects/{segment}"), self._lookup),
            ("GET", re.compile(r"/schemas/ids/(\d+)"), self._schema_by_id),
            ("GET", re.compile(rf"/schemas/guids/{segment}"), self._schema_by_guid),
            ("GET", re.compile(r"/schemas/ids/(\d+)/versions"), self._versions_of_id),
            ("GET", re.compile(r"/schemas/ids/(\d+)/subjects"), self._subjects_of_id),
            ("GET", re.compile(r"/schemas/types"), lambda body: ["AVRO", "JSON", "PROTOBUF"]),
            ("GET", re.compile(r"/subjects"), lambda body: sorted(self._store.subjects)),
            ("GET", re.compile(rf"/subjects/{segment}/versions"), self._versions),
            ("GET", re.compile(rf"/subjects/{segment}/versions/{segment}"), self._version),
            ("GET", re.compile(r"/config(?:/[^/]+)?"), lambda body: {"compatibilityLevel": "BACKWARD"}),
        )

    def _register(self, subject: str, *, body: bytes) -> dict[str, Any]:
        schema, kind, references = _parse_schema_request(body)
        schema_id = self._store.find(schema, kind)
        if schema_id is None:
            self._store.schemas.append((schema, kind, references))
            schema_id = len(self._store.schemas)
        versions = self._store.subjects.setdefault(subject, [])
        if schema_id not in versions:
            versions.append(schema_id)
        return {"id": schema_id, "guid": schema_guid(schema_id)}

    def _lookup(self, subject: str, *, body: bytes) -> dict[str, Any]:
        versions = self._store.versions(subject)
        schema, kind, _ = _parse_schema_request(body)
        schema_id = self._store.find(schema, kind)
        if schema_id is None or schema_id not in versions:
            raise _Answer(404, 40403, "Schema not found")
        return self._registered(subject, versions.index(schema_id) + 1, schema_id)

    def _schema_by_id(self, schema_id: str, *, body: bytes) -> dict[str, Any]:
        schema, kind, references = self._store.schema(int(schema_id))
        answer: dict[str, Any] = {"schema": schema}
        if kind != "AVRO":  # the real registry leaves schemaType out for Avro
            answer["schemaType"] = kind
        if references:
            answer["references"] = references
        return answer

    def _schema_by_guid(self, guid: str, *, body: bytes) -> dict[str, Any]:
        for schema_id in range(1, len(self._store.schemas) + 1):
            if schema_guid(schema_id) == guid:
                return self._schema_by_id(str(schema_id), body=body)
        raise _Answer(404, 40403, f"Schema {guid} not found")

    def _versions_of_id(self, schema_id: str, *, body: bytes) -> list[dict[str, Any]]:
        self._store.schema(int(schema_id))
        return [
            {"subject": subject, "version": versions.index(int(schema_id)) + 1}
            for subject, versions in sorted(self._store.subjects.items())
            if int(schema_id) in versions
        ]

    def _subjects_of_id(self, schema_id: str, *, body: bytes) -> list[str]:
        return [pair["subject"] for pair in self._versions_of_id(schema_id, body=body)]

    def _versions(self, subject: str, *, body: bytes) -> list[int]:
        return list(range(1, len(self._store.versions(subject)) + 1))

    def _version(self, subject: str, version: str, *, body: bytes) -> dict[str, Any]:
        versions = self._store.versions(subject)
        if version == "latest":
            number = len(versions)
        elif version.isdigit() and 1 <= int(version) <= len(versions):
            number = int(version)
        else:
            raise _Answer(404, 40402, f"Version {version} not found.")
        return self._registered(subject, number, versions[number - 1])

    def _registered(self, subject: str, version: int, schema_id: int) -> dict[str, Any]:
        schema, kind, references = self._store.schema(schema_id)
        answer: dict[str, Any] = {
            "subject": subject,
            "version": version,
            "id": schema_id,
            "guid": schema_guid(schema_id),
            "schema": schema,
        }
        if kind != "AVRO":
            answer["schemaType"] = kind
        if references:
            answer["references"] = references
        return answer

    # --- HTTP plumbing -------------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so stop() really cuts clients off (no kept-alive socket
            # left in a handler thread that would go on answering).
            protocol_version = "HTTP/1.0"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                status, answer = double.handle(self.command, self.path, self.rfile.read(length))
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", _CONTENT_TYPE)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: tests read :attr:`RegistryDouble.requests` instead of a request log."""

        return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (timed out on a stalled request) is expected; anything else is reported."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def schema_guid(schema_id: int) -> str:
    """The GUID of a schema id: fixed per id, so a restarted double gives the same GUIDs."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"registry-double/{schema_id}"))


def _parse_schema_request(body: bytes) -> tuple[str, str, list[Any]]:
    try:
        request = json.loads(body)
        schema = request["schema"]
    except (ValueError, KeyError, TypeError):
        raise _Answer(422, 42201, "Invalid schema: the body must be a JSON object with a 'schema'") from None
    kind = request.get("schemaType") or "AVRO"
    if kind == "AVRO" and not isinstance(_comparable(schema), dict | list | str):
        raise _Answer(422, 42201, "Invalid schema: not an Avro schema")
    return str(schema), str(kind), list(request.get("references") or [])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A test double of the Confluent Schema Registry REST API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port")
    args = parser.parse_args(argv)
    double = RegistryDouble(args.host, args.port).start()
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"schema registry double listening on {double.url}", flush=True)
    stopping.wait()
    double.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
