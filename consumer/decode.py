"""Decode: a Kafka record's value bytes → one :class:`DomainEvent`.

Three value formats, configured per topic (:data:`ValueFormat`):

``confluent-avro``
    The Confluent wire format, in every form confluent-kafka 2.16's ``AvroDeserializer`` reads: the value
    starts with magic byte ``0x00`` and a 4-byte big-endian schema id, or with magic byte ``0x01`` and a
    16-byte schema GUID (Confluent Platform 8.1+), then the Avro body; or the id travels in the record's
    ``__value_schema_id`` header (``0x00`` + 4-byte id, or ``0x01`` + GUID) and the value is the bare body.
    The writer schema is fetched from a Confluent Schema Registry once per id (or GUID) and cached, with the
    schemas it references (``references``: shared types, resolved recursively, each subject version once);
    the record type is the writer schema's full name, so one topic may carry several event types. The body
    is read with the writer schema resolved against the project's reader schema of the same full name
    (``schemas/``), so a writer that added or dropped optional fields, or renamed one with an alias, still
    decodes.
``avro``
    A bare Avro body; the writer schema is the project's own schema of a configured record name.
``json``
    A JSON object in the shape of the Avro record. Its type is the topic's configured record name, or, when
    none is configured, the object's ``"eventType"`` key (:data:`consumer.events.JSON_TYPE_KEY`; short or full
    name). Fields are coerced to what Avro decoding would give (see :func:`build_decoder`); unknown keys are
    ignored, as a newer writer's extra Avro fields are.

Failures: every way a value can be bad raises a :class:`~consumer.errors.DecodeError` (permanent: the record
is dead-lettered) with a reason precise enough to act on; :class:`UnknownEventType` is one of them, so the
engine can choose to skip such records instead. A schema registry that cannot be reached, times out or
answers an error other than its own "not found" (a 404 with a registry error code, 404xx) raises
:class:`~consumer.errors.RegistryUnavailable` (transient: retry): a bare 404 comes from a URL that is no
registry, and would otherwise drain the topic into the dead-letter topic.

Timestamps: fields of logical type ``timestamp-millis`` are decoded as **epoch milliseconds** (``int``, UTC),
not as ``datetime``. fastavro's conversion to ``datetime`` costs about 1.2 µs per record, a third of the whole
decode, and translation only needs the ISO 8601 text, which it formats from the integer far more cheaply.
``decimal`` fields are :class:`decimal.Decimal`, as fastavro gives them.

Everything here is a plain synchronous call: the delivery engine decodes on its consuming thread, once per
record, and the only I/O is the first registry lookup of each schema id.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, cast, get_args

import orjson
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.common._httpx_compat import httpx  # the HTTP library the client uses
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro import parse_schema, schemaless_reader
from fastavro.read import SchemaResolutionError
from fastavro.schema import SchemaParseException

from consumer import events
from consumer.errors import ConfigError, DecodeError, RegistryUnavailable

if TYPE_CHECKING:
    from consumer.config import RelayConfig

ValueFormat = Literal["confluent-avro", "avro", "json"]
VALUE_FORMATS: Final[tuple[ValueFormat, ...]] = get_args(ValueFormat)

#: The project's reader schemas: package data (``consumer/schemas/``), so an installed wheel has them as a
#: checkout does. Wheels install as files, never zipped, so the resource is a directory on disk.
SCHEMAS_DIR: Final = Path(str(resources.files("consumer").joinpath("schemas")))

#: A parsed fastavro schema (a dict for the records this module deals in).
ParsedSchema = dict[str, Any]

_MAGIC: Final = 0  # a 4-byte schema id follows
_MAGIC_GUID: Final = 1  # a 16-byte schema GUID follows (Confluent Platform 8.1+)
_BytesIO: Final = io.BytesIO  # a module global: one look-up per record instead of two
_HEADER: Final = 5  # magic byte + 4-byte schema id
_GUID_HEADER: Final = 17  # magic byte + 16-byte schema GUID
_FRAMING_SIZE: Final = {_MAGIC: _HEADER, _MAGIC_GUID: _GUID_HEADER}

#: The record headers confluent-kafka's serializers write a schema id into (``header_schema_id_serializer``)
#: and its deserializers read first (``dual_schema_id_deserializer``): the same framing as a value's prefix.
VALUE_SCHEMA_ID_HEADER: Final = "__value_schema_id"
KEY_SCHEMA_ID_HEADER: Final = "__key_schema_id"

#: A record's headers as confluent-kafka gives them (``Message.headers()``: a list of pairs), or a mapping.
Headers = Sequence[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None]


@dataclass(slots=True)
class DomainEvent:
    """One decoded event (not frozen: a frozen dataclass costs three times as much to build, per record).

    ``type`` is the record's short name (``"ProductViewed"``). Records are recognised by full name: a writer
    schema named ``com.shopplatform.events.ProductViewed`` (see :mod:`consumer.events`) is read with the
    project's schema of that full name and becomes ``type="ProductViewed"``; the same short name in another
    namespace is an unknown type. ``fields`` is the record as Avro decoding gives it (reader schema field
    names; ``timestamp-millis`` as epoch milliseconds, ``decimal`` as :class:`~decimal.Decimal`).
    """

    type: str
    fields: dict[str, Any]


class UnknownEventType(DecodeError):
    """The record decodes, or would, but its type is not an event this service knows.

    ``type_name`` is the writer's full name (or the JSON type name, or the Avro type of a non-record schema).
    The engine decides by configuration whether such a record is dead-lettered (the default) or skipped.
    """

    def __init__(self, type_name: str, reason: str) -> None:
        super().__init__(reason)
        self.type_name = type_name


class SchemaNotFound(DecodeError):
    """The registry does not know the record's schema id or GUID (HTTP 404 with a registry error code): the
    record can never be decoded. ``schema_id`` is the id (``int``) or the GUID (``str``)."""

    def __init__(self, schema_id: int | str, reason: str) -> None:
        super().__init__(reason)
        self.schema_id = schema_id


class Decoder(Protocol):
    def decode(self, value: bytes | None, headers: Headers | None = None) -> DomainEvent:
        """Decode one record value; ``headers`` (the record's) may carry its schema id (confluent-avro).

        Raises a :class:`~consumer.errors.DecodeError` subclass (permanent) or
        :class:`~consumer.errors.RegistryUnavailable` (transient).
        """
        ...


# --- the project's schemas --------------------------------------------------------------------------------


def load_reader_schemas(directory: Path = SCHEMAS_DIR) -> dict[str, ParsedSchema]:
    """Every ``.avsc`` record schema in ``directory``, parsed, by full name.

    Raises :class:`~consumer.errors.ConfigError` when the folder holds no schema, a file is not a valid Avro
    record schema, or two files define the same name.
    """
    return {name: record.parsed for name, record in _Catalogue.load(directory).by_full_name.items()}


@dataclass(frozen=True, slots=True)
class _Record:
    """One of the project's record schemas, in the forms decoding needs."""

    full_name: str
    type: str  # short name
    parsed: ParsedSchema  # as written: logical types intact (JSON coercion reads them)
    decoding: ParsedSchema  # timestamp-millis left as a plain long: what fastavro reads with


@dataclass(frozen=True, slots=True)
class _Catalogue:
    by_full_name: Mapping[str, _Record]
    by_any_name: Mapping[str, _Record]  # full and short names

    @classmethod
    def load(cls, directory: Path) -> _Catalogue:
        records: dict[str, _Record] = {}
        short: dict[str, _Record] = {}
        for path in sorted(directory.glob("*.avsc")):
            record = _load_record(path)
            clash = records.get(record.full_name) or short.get(record.type)
            if clash is not None:
                raise ConfigError("schemas_dir", f"{path.name} and another file both define {record.type}")
            records[record.full_name] = short[record.type] = record
        if not records:
            raise ConfigError("schemas_dir", f"no .avsc schema in {directory}")
        return cls(by_full_name=records, by_any_name={**short, **records})

    def resolve(self, setting: str, name: str) -> _Record:
        record = self.by_any_name.get(name)
        if record is None:
            known = ", ".join(sorted(r.type for r in self.by_full_name.values()))
            raise ConfigError(setting, f"unknown record {name!r}; known: {known}")
        return record


def _load_record(path: Path) -> _Record:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        parsed = parse_schema(raw)
        decoding = parse_schema(_without_timestamp_conversion(raw))
    # fastavro reports a malformed schema with any of these (ValueError includes bad JSON and UnknownType).
    except (OSError, ValueError, TypeError, KeyError, SchemaParseException) as exc:
        raise ConfigError("schemas_dir", f"{path.name}: {exc}") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise ConfigError("schemas_dir", f"{path.name}: must hold one Avro record schema")
    full_name = str(parsed["name"])
    return _Record(full_name, events.short_name(full_name), parsed, cast(ParsedSchema, decoding))


def _without_timestamp_conversion(node: Any) -> Any:
    """A copy of a schema (JSON form) whose ``timestamp-millis`` longs read as plain integers."""
    if isinstance(node, list):
        return [_without_timestamp_conversion(item) for item in node]
    if not isinstance(node, dict):
        return node
    copy = {key: _without_timestamp_conversion(value) for key, value in node.items()}
    if copy.get("type") == "long" and copy.get("logicalType") == "timestamp-millis":
        del copy["logicalType"]
    return copy


_NOT_SHAPE: Final = frozenset({"doc", "aliases"})


def _shape(schema: Any) -> Any:
    """What decides how bytes are read: the parsed schema without docs, aliases (names only: a writer's are
    applied before, see _renamed_by_aliases) and fastavro's bookkeeping keys."""
    if isinstance(schema, list):
        return [_shape(item) for item in schema]
    if isinstance(schema, dict):
        return {k: _shape(v) for k, v in schema.items() if k not in _NOT_SHAPE and not k.startswith("__")}
    return schema


# --- Avro bodies ------------------------------------------------------------------------------------------


def _require_bytes(value: bytes | None) -> bytes:
    if value is None:
        raise DecodeError("value is null (a tombstone), not an event")
    if not value:
        raise DecodeError("value is empty")
    return value


def _read_avro(value: bytes, start: int, writer: ParsedSchema, reader: ParsedSchema | None, what: str) -> Any:
    """Read exactly one record from ``value[start:]``; every way the bytes can be wrong is a DecodeError.

    The exception types are the ones fastavro raises for bad input, found by fuzzing (the property tests in
    ``tests/test_decode.py`` keep them honest): EOFError when a length runs past the end; IndexError when the
    body ends inside a varint or holds a union index out of range; UnicodeDecodeError for a string that is
    not UTF-8; SchemaResolutionError for data the reader schema cannot take; ValueError and OverflowError for
    values a logical type cannot hold.
    """
    stream = _BytesIO(value)
    stream.seek(start)
    try:
        record = schemaless_reader(stream, writer, reader)
    except EOFError as exc:
        raise DecodeError(
            f"Avro body of {what} is truncated: {str(exc) or 'it ends inside a value'}"
        ) from exc
    except IndexError as exc:
        raise DecodeError(
            f"Avro body does not match {what}: it ends inside a number or holds an out-of-range union index "
            f"({exc})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DecodeError(f"Avro body of {what} holds a string that is not UTF-8 ({exc.reason})") from exc
    except SchemaResolutionError as exc:
        raise DecodeError(f"Avro body of {what} does not fit the reader schema: {exc}") from exc
    except (ValueError, OverflowError) as exc:
        raise DecodeError(f"Avro body does not match {what}: {type(exc).__name__}: {exc}") from exc
    left = len(value) - stream.tell()
    if left:
        raise DecodeError(f"Avro body does not match {what}: {left} bytes left after a complete record")
    return record


@dataclass(frozen=True, slots=True)
class _WriterPlan:
    """How to read the bodies written with one registry schema id."""

    type: str
    writer: ParsedSchema
    reader: ParsedSchema | None  # None when the writer is the reader: no resolution, cheaper
    what: str  # "com.….ProductViewed (schema id 7)", for reasons


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A schema id whose records are never decodable; cached so the registry is asked once."""

    reason: str
    unknown_type: str | None = None

    def error(self) -> DecodeError:
        if self.unknown_type is not None:
            return UnknownEventType(self.unknown_type, self.reason)
        return DecodeError(self.reason)


class ConfluentAvroDecoder:
    """``confluent-avro``: the Confluent wire format, writer schemas from the registry, cached per id/GUID.

    Only found schemas are cached (including those this service refuses, e.g. an unknown record type); a 404
    is not, so a mistyped id costs one registry request per record that carries it.

    The registry is asked through confluent-kafka's ``SchemaRegistryClient`` (its HTTP, auth and caching),
    not its ``AvroDeserializer``: the deserializer turns every registry failure into one
    ``SerializationError``, losing the difference between "not found" (permanent) and "unreachable"
    (transient) that decides whether a record is dead-lettered or its partition waits; and it reads with the
    writer schema alone, where the relay resolves it against its own reader schemas.
    """

    def __init__(self, registry: SchemaRegistryClient, catalogue: _Catalogue) -> None:
        self._registry = registry
        self._catalogue = catalogue
        # Plans by schema id (int) or GUID (str): what the registry said, asked once.
        self._plans: dict[int | str, _WriterPlan | _Refusal] = {}
        # The decodable plans again, keyed by their whole framing (magic byte and id, or magic byte and GUID),
        # the bytes a value starts with or a __value_schema_id header holds: the hot path checks the magic
        # byte and finds the plan with one slice and one look-up.
        self._by_header: dict[bytes, _WriterPlan] = {}
        self._reader_fields = _reader_fields(catalogue)

    def decode(self, value: bytes | None, headers: Headers | None = None) -> DomainEvent:
        if headers is None:  # most records carry no headers: the id is the first five bytes, or not cached
            plan = self._by_header.get(value[:_HEADER]) if value else None
            if plan is not None:
                # A plan was found, so the value has a header: it is bytes, whatever its declared type.
                return DomainEvent(plan.type, _read_avro(value, _HEADER, plan.writer, plan.reader, plan.what))  # type: ignore[arg-type]
        plan, start = self._locate(value, headers)
        return DomainEvent(plan.type, _read_avro(value, start, plan.writer, plan.reader, plan.what))  # type: ignore[arg-type]

    def _locate(self, value: bytes | None, headers: Headers | None) -> tuple[_WriterPlan, int]:
        """The plan of a record whose id is in a header, in a GUID prefix, or not cached yet; and where its
        Avro body starts. Checks everything, asks the registry."""
        value = _require_bytes(value)
        framing = _header_schema_id(headers, VALUE_SCHEMA_ID_HEADER) if headers else None
        if framing is not None:
            return self._plan_of(framing), 0  # the id is in the header: the whole value is the body
        size = _FRAMING_SIZE.get(value[0])
        if size is None:
            raise DecodeError(
                f"wrong magic byte 0x{value[0]:02x}: not the Confluent wire format (0x00: schema id, "
                f"0x01: schema GUID), and no {VALUE_SCHEMA_ID_HEADER} header"
            )
        if len(value) < size:
            raise DecodeError(f"value of {len(value)} bytes ends inside the {size}-byte Confluent header")
        return self._plan_of(value[:size]), size

    def _plan_of(self, framing: bytes) -> _WriterPlan:
        """The plan of one framing (``0x00`` + id or ``0x01`` + GUID, already checked for size)."""
        plan = self._by_header.get(framing)
        if plan is not None:
            return plan
        key: int | str
        if framing[0] == _MAGIC:
            key = int.from_bytes(framing[1:], "big")
            label = f"schema id {key}"
        else:
            key = str(uuid.UUID(bytes=framing[1:]))
            label = f"schema GUID {key}"
        found = self._plans.get(key)
        if found is None:
            found = self._plans[key] = self._plan(label, self._fetch(key, label))
        if isinstance(found, _Refusal):
            raise found.error()
        self._by_header[framing] = found
        return found

    def _fetch(self, key: int | str, label: str) -> Schema:
        """The writer schema of an id (``int``) or GUID (``str``), mapped onto the relay's error tree."""
        registry = self._registry
        if isinstance(key, int):
            schema: Schema = _ask(label, key, registry.get_schema, key)
        else:
            schema = _ask(label, key, registry.get_schema_by_guid, key)
        if schema.schema_str is None:  # a 200 without a schema: the registry is broken, not the record
            raise RegistryUnavailable(f"schema registry answered without a schema for {label}")
        return schema

    def _named_types(self, schema: Schema, label: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The named types a writer schema's references define: parsed by fastavro (its ``named_schemas``),
        and as JSON by full name (for :func:`_flattened`). Both empty without references.

        References are followed depth-first (a referenced schema's own references are parsed before it), and
        each subject version once, so a type reached along two paths is defined once. A reference the
        registry does not know is permanent (a DecodeError, not cached: the reference may be registered
        later); an unreachable registry is transient, as for the schema itself.
        """
        named: dict[str, Any] = {}
        definitions: dict[str, Any] = {}
        seen: set[tuple[str, int]] = set()
        registry = self._registry

        def visit(references: Sequence[Any] | None, via: str) -> None:
            for ref in references or ():
                subject, version = ref.subject, ref.version
                if subject is None or version is None:
                    raise _BadReference(f"{via} has a reference without a subject or version")
                if (subject, version) in seen:
                    continue
                seen.add((subject, version))
                what = f"reference {subject} version {version} of {label}"
                registered = _ask(what, None, registry.get_version, subject, version, True)
                text = registered.schema.schema_str if registered.schema is not None else None
                if text is None:
                    raise RegistryUnavailable(f"schema registry answered without a schema for {what}")
                visit(registered.schema.references, what)
                try:
                    raw = _without_timestamp_conversion(json.loads(text))
                    # A shared type renames its fields as a schema of its own would. Not the type itself:
                    # the schemas that refer to it do so by the name the writer gave it.
                    raw = _renamed_by_aliases(raw, self._reader_fields, "", records=False)
                    parse_schema(raw, named_schemas=named)
                except (ValueError, TypeError, KeyError, AttributeError, SchemaParseException) as exc:
                    raise _BadReference(f"{what} is not a schema this service can parse: {exc!r}") from exc
                if isinstance(raw, dict) and isinstance(raw.get("name"), str):
                    definitions[_full_name(raw, "")] = raw

        visit(schema.references, label)
        return named, definitions

    def _plan(self, label: str, schema: Schema) -> _WriterPlan | _Refusal:
        kind = schema.schema_type or "AVRO"
        if kind != "AVRO":
            return _Refusal(f"{label} is a {kind} schema, not Avro")
        try:
            named, definitions = self._named_types(schema, label)
        except _BadReference as exc:
            return _Refusal(str(exc))
        try:
            raw = _without_timestamp_conversion(json.loads(schema.schema_str or ""))
            raw = _renamed_by_aliases(raw, self._reader_fields, "")
            writer = parse_schema(raw, named_schemas=named)
        # The registry validates what it stores, so this is theoretical; fastavro reports malformed schemas
        # with these four types (ValueError includes bad JSON and UnknownType), the alias walk with
        # AttributeError (a field that is no object).
        except (ValueError, TypeError, KeyError, AttributeError, SchemaParseException) as exc:
            return _Refusal(f"{label} is not a schema this service can parse: {exc!r}")
        if not isinstance(writer, dict) or writer.get("type") != "record":
            kind = _avro_kind(writer)
            return _Refusal(f"{label} is an Avro {kind}, not an event record", kind)
        name = str(writer["name"])
        record = self._catalogue.by_full_name.get(name)
        if record is None:
            return _Refusal(f"record type {name} ({label}) is not an event this service knows", name)
        if definitions:
            # A writer with references names its shared types where the reader defines them inline. Read with
            # resolution, it decodes several times slower (tools/bench_decode.py); flattened, the writer is
            # often the reader's very shape, and then read as fast as any other.
            writer = _flat_if_same(raw, definitions, record.decoding) or writer
        same = _shape(writer) == _shape(record.decoding)
        return _WriterPlan(record.type, writer, None if same else record.decoding, f"{name} ({label})")


def _reader_fields(catalogue: _Catalogue) -> dict[str, frozenset[str]]:
    """The field names of every record type the reader schemas define (nested ones too), by full name."""
    found: dict[str, frozenset[str]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            if node.get("type") in ("record", "error"):
                found[str(node["name"])] = frozenset(f["name"] for f in node["fields"])
                for f in node["fields"]:
                    walk(f["type"])
            else:
                for key in ("type", "items", "values"):
                    walk(node.get(key))

    for record in catalogue.by_full_name.values():
        walk(record.parsed)
    return found


def _renamed_by_aliases(
    node: Any, reader: Mapping[str, frozenset[str]], namespace: str, *, records: bool = True
) -> Any:
    """A writer schema (JSON) with its aliases applied toward the reader's names (``records=False``: the
    fields' only, the named types keep the writer's names).

    Avro resolves aliases on the reader's side only: a platform that renames a field (or a record) and keeps
    the old name as an alias writes a schema the registry accepts as BACKWARD compatible, but an older
    reader, as the relay's schemas are, would drop the field (take its default) or not know the record. So
    the writer is read as if it used the old name wherever the reader knows that name and the writer does
    not: names only, never a layout, so the bytes read exactly as written.
    """
    if isinstance(node, list):
        return [_renamed_by_aliases(item, reader, namespace, records=records) for item in node]
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    copy = dict(node)
    if kind in _NAMED_KINDS:
        full = _full_name(node, namespace)
        namespace = full.rpartition(".")[0]
        if records and full not in reader:
            known = [a for a in (_alias_name(a, namespace) for a in node.get("aliases", ())) if a in reader]
            if known:
                copy["name"], copy["namespace"] = known[0].rpartition(".")[2], known[0].rpartition(".")[0]
                full, namespace = known[0], known[0].rpartition(".")[0]
    if kind in ("record", "error"):
        wanted = reader.get(full, frozenset())
        present = {f["name"] for f in node["fields"]}
        fields = []
        for f in node["fields"]:
            renamed = dict(f, type=_renamed_by_aliases(f["type"], reader, namespace, records=records))
            if f["name"] not in wanted:
                old = [a for a in f.get("aliases", ()) if a in wanted and a not in present]
                if old:
                    renamed["name"] = old[0]
            fields.append(renamed)
        copy["fields"] = fields
    elif kind == "array":
        copy["items"] = _renamed_by_aliases(node["items"], reader, namespace, records=records)
    elif kind == "map":
        copy["values"] = _renamed_by_aliases(node["values"], reader, namespace, records=records)
    elif isinstance(kind, dict | list):
        copy["type"] = _renamed_by_aliases(kind, reader, namespace, records=records)
    return copy


def _alias_name(alias: str, namespace: str) -> str:
    return alias if "." in alias or not namespace else f"{namespace}.{alias}"


class _BadReference(Exception):
    """A writer schema's reference that can never resolve (malformed, or not a parseable schema)."""


_NAMED_KINDS: Final = frozenset({"record", "error", "enum", "fixed"})


def _full_name(node: Mapping[str, Any], namespace: str) -> str:
    name = str(node["name"])
    if "." in name:
        return name
    space = node.get("namespace", namespace) or ""
    return f"{space}.{name}" if space else name


def _flattened(node: Any, definitions: Mapping[str, Any], defined: set[str], namespace: str) -> Any:
    """A writer schema (JSON) with each referenced type defined inline where it is first used, as a
    self-contained schema defines it; later uses keep the name. Only a candidate: see _flat_if_same."""
    if isinstance(node, str):
        full = node if "." in node or not namespace else f"{namespace}.{node}"
        for name in (full, node):
            if name in definitions and name not in defined:
                defined.add(name)
                return _flattened(definitions[name], definitions, defined, namespace)
        return node
    if isinstance(node, list):
        return [_flattened(item, definitions, defined, namespace) for item in node]
    if not isinstance(node, dict):
        return node
    copy = dict(node)
    kind = node.get("type")
    if kind in _NAMED_KINDS:
        full = _full_name(node, namespace)
        defined.add(full)
        copy["name"] = full  # absolute, so its meaning does not depend on where it was inlined
        copy.pop("namespace", None)
        namespace = full.rpartition(".")[0]
    if kind in ("record", "error"):
        copy["fields"] = [
            {**f, "type": _flattened(f["type"], definitions, defined, namespace)} for f in node["fields"]
        ]
    elif kind == "array":
        copy["items"] = _flattened(node["items"], definitions, defined, namespace)
    elif kind == "map":
        copy["values"] = _flattened(node["values"], definitions, defined, namespace)
    elif not isinstance(kind, str) or kind not in _NAMED_KINDS:
        copy["type"] = _flattened(kind, definitions, defined, namespace)
    return copy


def _flat_if_same(raw: Any, definitions: Mapping[str, Any], reader: ParsedSchema) -> ParsedSchema | None:
    """The writer flattened and parsed, when that is exactly the reader's shape; else None (read with
    resolution against the writer parsed with its references, which is always right)."""
    try:
        flat = parse_schema(_flattened(raw, definitions, set(), ""))
    except (ValueError, TypeError, KeyError, SchemaParseException):
        return None
    return cast(ParsedSchema, flat) if _shape(flat) == _shape(reader) else None


def _header_schema_id(headers: Headers, name: str) -> bytes | None:
    """The framing a record's schema-id header holds (``0x00`` + 4-byte id, ``0x01`` + 16-byte GUID), or
    None without such a header. The first one counts, as in confluent-kafka's deserializer. A header that is
    there but malformed is a DecodeError: its record names a schema no one can find."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for key, raw in pairs:
        if key != name:
            continue
        data = raw.encode() if isinstance(raw, str) else raw
        if data and _FRAMING_SIZE.get(data[0]) == len(data):
            return data
        size = 0 if data is None else len(data)
        raise DecodeError(
            f"header {name} is not 0x00 + a 4-byte schema id nor 0x01 + a 16-byte schema GUID "
            f"({size} bytes{f', first 0x{data[0]:02x}' if data else ''})"
        )
    return None


def _ask(what: str, not_found_key: int | str | None, call: Callable[..., Any], *args: Any) -> Any:
    """One registry request, its failures mapped onto the relay's error tree.

    A registry's own "not found" (404 with a 404xx error code) is permanent: :class:`SchemaNotFound` for a
    schema id or GUID (``not_found_key``), a plain :class:`~consumer.errors.DecodeError` for a reference.
    Everything else — a bare 404, any other status, no answer, an unreadable answer — is transient.
    """
    try:
        return call(*args)
    except SchemaRegistryError as exc:
        if exc.http_status_code == 404 and is_registry_answer(exc):
            if not_found_key is not None:
                raise SchemaNotFound(not_found_key, f"{what} is not in the registry") from exc
            raise DecodeError(f"{what} is not in the registry") from exc
        if exc.http_status_code == 404:
            # A 404 without a registry's error code comes from a server that is not a Schema Registry
            # (a wrong path in schema_registry.url, a proxy), or one without this endpoint (Apicurio has no
            # /schemas/guids): a fault of the setup, so every record would be refused. Held and retried
            # like an outage, never dead-lettered.
            raise RegistryUnavailable(
                f"schema registry answered HTTP 404 without a registry error code for {what}: "
                f"schema_registry.url does not point at a Schema Registry API that serves it"
            ) from exc
        # Anything else (5xx, 408, 429, but also 401/403) says nothing about the record: it is the
        # service's view of the registry that is broken, so the record is retried, never dead-lettered.
        raise RegistryUnavailable(
            f"schema registry answered HTTP {exc.http_status_code} (error code {exc.error_code}) for {what}"
        ) from exc
    except httpx.RequestError as exc:  # connection refused or reset, DNS, timeouts, protocol errors
        raise RegistryUnavailable(
            f"schema registry unreachable for {what}: {type(exc).__name__}: {exc}"
        ) from exc
    except ValueError as exc:  # a 2xx answer that is not JSON: a broken registry or proxy, not the record
        raise RegistryUnavailable(f"schema registry gave an unreadable answer for {what}") from exc


def is_registry_answer(error: SchemaRegistryError) -> bool:
    """Whether an error came from a Schema Registry's API: its error codes extend the HTTP status
    (``40403``: schema not found, ``40401``: subject not found); a server that is not one answers a bare 404
    (error code -1 or 404)."""
    status = error.http_status_code
    return status is not None and status * 100 <= error.error_code < (status + 1) * 100


def _avro_kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    return str(schema["type"] if isinstance(schema, dict) else schema)


class AvroDecoder:
    """``avro``: bare Avro bodies written with the project's schema of one configured record."""

    def __init__(self, record: _Record) -> None:
        self._record = record

    def decode(self, value: bytes | None, headers: Headers | None = None) -> DomainEvent:
        record = self._record
        fields = _read_avro(_require_bytes(value), 0, record.decoding, None, record.full_name)
        return DomainEvent(record.type, fields)


# --- JSON -------------------------------------------------------------------------------------------------

_Convert = Callable[[Any], Any]  # one JSON value → the value Avro decoding would give; raises DecodeError

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND: Final = timedelta(milliseconds=1)
_INT_RANGE: Final = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}


class JsonDecoder:
    """``json``: one JSON object per value, shaped like the Avro record (see the module docstring)."""

    def __init__(self, catalogue: _Catalogue, fixed: _Record | None) -> None:
        self._fixed = fixed
        compiled = {
            r.full_name: (r, _record_converter(r.parsed, r.type)) for r in catalogue.by_full_name.values()
        }
        self._by_name = {name: compiled[r.full_name] for name, r in catalogue.by_any_name.items()}

    def decode(self, value: bytes | None, headers: Headers | None = None) -> DomainEvent:
        try:
            obj = orjson.loads(_require_bytes(value))
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"value is not JSON: {exc}") from exc
        if type(obj) is not dict:
            raise DecodeError(f"JSON value must be an object, got {_json_kind(obj)}")
        record, convert = self._type_of(obj)
        try:
            return DomainEvent(record.type, convert(obj))
        except DecodeError as exc:
            raise DecodeError(f"JSON {record.type}: {exc.reason}") from None

    def _type_of(self, obj: dict[str, Any]) -> tuple[_Record, _Convert]:
        named = obj.get(events.JSON_TYPE_KEY)
        if named is not None and type(named) is not str:
            raise DecodeError(f"JSON key {events.JSON_TYPE_KEY} must be a string, got {_json_kind(named)}")
        found = None if named is None else self._by_name.get(named)
        if self._fixed is not None:  # the topic's configured record; a type named as well must agree
            if named is not None and (found is None or found[0] is not self._fixed):
                raise DecodeError(
                    f"JSON {events.JSON_TYPE_KEY} {named!r} contradicts the topic's record {self._fixed.type}"
                )
            return self._by_name[self._fixed.full_name]
        if named is None:
            raise DecodeError(f"JSON object lacks the {events.JSON_TYPE_KEY!r} key naming its record type")
        if found is None:
            raise UnknownEventType(
                named, f"JSON record type {named[:60]!r} is not an event this service knows"
            )
        return found


_JSON_KINDS: Final[Mapping[type, str]] = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a fractional number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def _json_kind(value: object) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _record_converter(schema: ParsedSchema, path: str) -> _Convert:
    named: dict[str, Any] = schema.get("__named_schemas", {})
    return _converter(schema, path, named)


def _converter(schema: Any, path: str, named: Mapping[str, Any]) -> _Convert:
    """Compile, once per record type, the function that shapes a JSON value like the Avro decoder would.

    Paths are fixed at compile time (``lines[].quantity``) so a valid record pays nothing for them.
    """
    if isinstance(schema, list):
        return _union(path, [_converter(branch, path, named) for branch in schema])
    if isinstance(schema, str):
        if schema in named:
            return _converter(named[schema], path, named)
        return _primitive(schema, path)
    kind, logical = schema["type"], schema.get("logicalType")
    if kind == "long" and logical == "timestamp-millis":
        return _timestamp_millis(path)
    if kind == "bytes" and logical == "decimal":
        return _decimal(path, int(schema["precision"]), int(schema.get("scale", 0)))
    if kind == "record":
        return _record(schema, path, named)
    if kind == "array":
        item = _converter(schema["items"], f"{path}[]", named)
        return lambda value: [item(v) for v in _expect(value, list, path, "an array")]
    return _primitive(kind, path)  # {"type": "long"} and unknown logical types read as their base type


def _expect(value: Any, kind: type, path: str, what: str) -> Any:
    if type(value) is not kind:
        raise DecodeError(f"field {path} must be {what}, got {_json_kind(value)}")
    return value


def _record(schema: ParsedSchema, path: str, named: Mapping[str, Any]) -> _Convert:
    fields = [
        (f["name"], _converter(f["type"], f"{path}.{f['name']}", named), "default" in f, f.get("default"))
        for f in schema["fields"]
    ]

    def convert(value: Any) -> dict[str, Any]:
        obj = _expect(value, dict, path, "an object")
        out: dict[str, Any] = {}
        for name, field, has_default, default in fields:
            if name in obj:
                out[name] = field(obj[name])
            elif has_default:
                out[name] = default
            else:
                raise DecodeError(f"field {path}.{name} is missing")
        return out

    return convert


def _union(path: str, branches: list[_Convert]) -> _Convert:
    def convert(value: Any) -> Any:
        problems = []
        for branch in branches:
            try:
                return branch(value)
            except DecodeError as exc:
                problems.append(exc.reason)
        raise DecodeError(f"field {path} matches no type of its union: {'; '.join(problems)}")

    return convert


def _primitive(kind: str, path: str) -> _Convert:
    if kind == "null":
        return lambda value: _expect(value, type(None), path, "null")
    if kind == "boolean":
        return lambda value: _expect(value, bool, path, "a boolean")
    if kind == "string":
        return lambda value: _expect(value, str, path, "a string")
    if kind in _INT_RANGE:
        low, high = _INT_RANGE[kind]

        def integer(value: Any) -> int:
            if type(value) is not int or not low <= value <= high:
                raise DecodeError(f"field {path} must be an Avro {kind} (an integer), got {_describe(value)}")
            return value

        return integer
    if kind in ("float", "double"):

        def number(value: Any) -> float:
            if type(value) is not int and type(value) is not float:
                raise DecodeError(f"field {path} must be a number, got {_json_kind(value)}")
            return float(value)

        return number
    raise ConfigError("schemas_dir", f"the json format cannot read Avro type {kind!r} (at {path})")


def _describe(value: Any) -> str:
    return str(value) if type(value) is int else _json_kind(value)


def _timestamp_millis(path: str) -> _Convert:
    """Epoch milliseconds as they are, or an ISO 8601 string with an offset; both become epoch millis."""
    low, high = _INT_RANGE["long"]

    def convert(value: Any) -> int:
        if type(value) is int and low <= value <= high:
            return value
        if type(value) is str:
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                raise DecodeError(f"field {path} is not an ISO 8601 time: {value[:60]!r}") from None
            if moment.tzinfo is None:
                raise DecodeError(f"field {path} must carry a UTC offset or Z: {value[:60]!r}")
            return (moment - _EPOCH) // _MILLISECOND
        raise DecodeError(
            f"field {path} must be epoch milliseconds or an ISO 8601 string, got {_describe(value)}"
        )

    return convert


def _decimal(path: str, precision: int, scale: int) -> _Convert:
    """A JSON string or number as the Decimal Avro would carry: finite, at most ``scale`` places."""
    quantum = Decimal(1).scaleb(-scale)

    def convert(value: Any) -> Decimal:
        if type(value) is str or type(value) is int:
            text = value
        elif type(value) is float:
            text = repr(value)  # the shortest text of the float, not its binary expansion
        else:
            raise DecodeError(f"field {path} must be a decimal string or number, got {_json_kind(value)}")
        try:
            number = Decimal(text)
        except InvalidOperation:
            raise DecodeError(f"field {path} is not a decimal number: {str(text)[:60]!r}") from None
        if not number.is_finite():
            raise DecodeError(f"field {path} must be a finite number, got {text!r}")
        if cast(int, number.as_tuple().exponent) < -scale:
            raise DecodeError(f"field {path} has more than {scale} decimal places: {text!r}")
        number = number.quantize(quantum)
        if len(number.as_tuple().digits) > precision:
            raise DecodeError(f"field {path} has more than {precision} digits: {text!r}")
        return number

    return convert


# --- building -------------------------------------------------------------------------------------------


def build_decoder(
    fmt: ValueFormat,
    *,
    registry: SchemaRegistryClient | None = None,
    record_name: str | None = None,
    schemas_dir: Path | None = None,
) -> Decoder:
    """The decoder of one topic's value format.

    - ``confluent-avro`` needs ``registry`` (see :func:`registry_client`) and takes no ``record_name``: the
      writer schema names each record's type.
    - ``avro`` needs ``record_name`` (short or full name of a schema in ``schemas_dir``).
    - ``json`` takes an optional ``record_name``; without one, each object names its type in ``"eventType"``.
      JSON values are coerced as Avro decoding would give them: ``timestamp-millis`` from epoch milliseconds
      or an ISO 8601 string with an offset (to epoch milliseconds); ``decimal`` from a string or a number (to
      a Decimal of the schema's scale); a missing field takes its Avro default or is an error.

    Raises :class:`~consumer.errors.ConfigError` for an impossible combination.
    """
    catalogue = _Catalogue.load(schemas_dir or SCHEMAS_DIR)
    if fmt == "confluent-avro":
        if registry is None:
            raise ConfigError("registry", "the confluent-avro format needs a schema registry")
        if record_name is not None:
            raise ConfigError(
                "record_name", "not used by confluent-avro: each writer schema names its record"
            )
        return ConfluentAvroDecoder(registry, catalogue)
    if fmt == "avro":
        if record_name is None:
            raise ConfigError("record_name", "the avro format needs the record name of the topic's schema")
        return AvroDecoder(catalogue.resolve("record_name", record_name))
    if fmt == "json":
        fixed = None if record_name is None else catalogue.resolve("record_name", record_name)
        return JsonDecoder(catalogue, fixed)
    raise ConfigError("format", f"unknown value format {fmt!r}; known: {', '.join(VALUE_FORMATS)}")


def registry_client(
    url: str,
    *,
    timeout: float = 5.0,
    max_retries: int = 0,
    retries_wait_ms: int = 100,
    retries_max_wait_ms: int = 1000,
    extra: Mapping[str, Any] | None = None,
) -> SchemaRegistryClient:
    """A schema registry client that fails fast; ``mock://…`` URLs give the client's in-memory registry.

    The client's own defaults wait forever (no HTTP timeout) and retry 3 times from a 1 s backoff, sleeping on
    the thread that decodes. The relay retries :class:`~consumer.errors.RegistryUnavailable` itself, with its
    backoff and pause, so the client should give up quickly: no retries and a bounded timeout by default.
    ``extra`` passes further client settings (e.g. ``basic.auth.user.info``) through unchanged.
    """
    conf: dict[str, Any] = {
        "url": url,
        "timeout": timeout,
        "max.retries": max_retries,
        "retries.wait.ms": retries_wait_ms,
        "retries.max.wait.ms": retries_max_wait_ms,
        **(extra or {}),
    }
    return SchemaRegistryClient.new_client(conf)


def build_decoders(config: RelayConfig) -> dict[str, Decoder]:
    settings = config.settings
    registry = None
    if settings.schema_registry.url:
        extra: dict[str, Any] = {}
        if config.schema_registry_auth is not None:
            extra["basic.auth.user.info"] = config.schema_registry_auth.get_secret_value()
        registry = registry_client(
            settings.schema_registry.url, timeout=settings.schema_registry.timeout_s, extra=extra
        )
    return {
        topic.name: build_decoder(
            topic.format,
            registry=registry if topic.format == "confluent-avro" else None,
            record_name=topic.record_name,
            schemas_dir=settings.schemas_dir,
        )
        for topic in settings.topics
    }
