"""Micro-benchmark: the confluent-avro decode hot path, a git revision's decoder beside this tree's, one run.

    python -m tools.bench_decode [--before main] [--records 20000] [--repeat 7]

Encodes ``--records`` events of :class:`consumer_dev.sample.TrafficGenerator` in the Confluent wire format
(magic byte 0, 4-byte schema id, against the client's in-memory ``mock://`` registry), warms both decoders'
caches, then times decoding all of them with ``consumer/decode.py`` as it is at ``--before`` (loaded from
git as its own module) and as it is in this working tree, alternating the two in each of ``--repeat`` rounds
so both see the same machine load. Prints the best round of each in records per second, and, for this
tree's decoder, the other placements it reads (GUID prefix, id in a header, writer with references) so
their cost is seen too. A measurement to read, not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaReference

from consumer import decode
from consumer_dev.sample import TrafficGenerator, build_encoder

ROOT = Path(__file__).resolve().parent.parent
SHOPS = ("shop1", "shop2", "shop3")


def _module_at(revision: str) -> ModuleType:
    """``consumer/decode.py`` as it is at ``revision``, imported under another name."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:consumer/decode.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="rr-bench-decode-"))
    path = folder / "decode_before.py"
    path.write_text(source.replace("Path(__file__).resolve().parent.parent", f"Path({str(ROOT)!r})"))
    spec = importlib.util.spec_from_file_location("decode_before", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["decode_before"] = module
    spec.loader.exec_module(module)
    return module


def _rate(run: Callable[[], object], records: int) -> float:
    gc.collect()
    start = time.perf_counter_ns()
    run()
    return records / ((time.perf_counter_ns() - start) / 1e9)


def _decode_all(decoder: Any, values: Sequence[tuple[bytes, Any]]) -> Callable[[], None]:
    def run() -> None:
        for value, headers in values:
            decoder.decode(value, headers)

    return run


def _decode_all_old(decoder: Any, values: Sequence[tuple[bytes, Any]]) -> Callable[[], None]:
    def run() -> None:
        for value, _ in values:
            decoder.decode(value)

    return run


def _other_placements(registry: Any, values: list[tuple[bytes, Any]]) -> dict[str, list[tuple[bytes, Any]]]:
    """The same values with their id as a GUID prefix, and in a ``__value_schema_id`` header."""
    guids: dict[bytes, bytes] = {}
    for value, _ in values:
        framing = value[:5]
        if framing not in guids:
            schema = registry.get_schema(int.from_bytes(framing[1:], "big"))
            subject = f"bench-guid-{uuid.uuid4().hex}"
            registry.register_schema(subject, schema)
            guid = registry.get_latest_version(subject).guid
            guids[framing] = b"\x01" + uuid.UUID(guid).bytes
    return {
        "magic 1 (GUID prefix)": [(guids[v[:5]] + v[5:], None) for v, _ in values],
        "id in __value_schema_id header": [
            (v[5:], [(decode.VALUE_SCHEMA_ID_HEADER, v[:5])]) for v, _ in values
        ],
    }


def _with_references(registry: Any, orders: Sequence[dict[str, Any]]) -> list[tuple[bytes, Any]]:
    """The same orders, written with their line item type in a referenced subject."""
    raw = json.loads((decode.SCHEMAS_DIR / "OrderPlaced.avsc").read_text())
    lines = next(f for f in raw["fields"] if f["name"] == "lines")
    item = lines["type"]["items"]
    namespace = raw.get("namespace", "")
    full = item["name"] if "." in item["name"] else f"{namespace}.{item['name']}"
    shared = {**item, "namespace": namespace}
    subject = f"bench-ref-{uuid.uuid4().hex}"
    registry.register_schema(subject, Schema(json.dumps(shared), "AVRO"))
    lines["type"]["items"] = full
    writer = Schema(json.dumps(raw), "AVRO", [SchemaReference(full, subject, 1)])
    schema_id = registry.register_schema(f"bench-order-{uuid.uuid4().hex}", writer)
    named: dict[str, Any] = {}
    fastavro.parse_schema(shared, named_schemas=named)
    parsed = fastavro.parse_schema(raw, named_schemas=named)
    out = []
    for fields in orders:
        body = io.BytesIO()
        fastavro.schemaless_writer(body, parsed, fields)
        out.append((b"\x00" + schema_id.to_bytes(4, "big") + body.getvalue(), None))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_decode", description=__doc__)
    parser.add_argument("--before", default="main", help="the git revision to compare with (default: main)")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)

    old = _module_at(args.before)
    registry = decode.registry_client(f"mock://bench-decode-{uuid.uuid4().hex}")
    encoder = build_encoder("confluent-avro", registry=registry)
    traffic = list(TrafficGenerator(seed=42, shops=SHOPS, now_ms=1_700_000_000_000).events(args.records))
    named_values = [(name, encoder.encode(name, fields)) for name, fields in traffic]
    values: list[tuple[bytes, Any]] = [(value, None) for _, value in named_values]
    before = old.build_decoder("confluent-avro", registry=registry)
    after = decode.build_decoder("confluent-avro", registry=registry)
    for value, _ in values:  # warm both caches: the hot path is what is measured
        old_event, new_event = before.decode(value), after.decode(value)
        assert (old_event.type, old_event.fields) == (new_event.type, new_event.fields)

    rates: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.repeat):
        rates["before"].append(_rate(_decode_all_old(before, values), len(values)))
        rates["after"].append(_rate(_decode_all(after, values), len(values)))
    print(
        f"confluent-avro decode, magic 0, cached id, no headers: {len(values)} records, best of {args.repeat}"
    )
    print(f"  {args.before + ' (before)':<34} {max(rates['before']):>12,.0f} records/s")
    print(f"  {'this tree (after)':<34} {max(rates['after']):>12,.0f} records/s")
    ratio = max(rates["after"]) / max(rates["before"])
    print(f"  after / before                     {ratio:>12.3f}")

    print("this tree, other placements (cached):")
    others = _other_placements(registry, values)
    # Orders are the largest records: their own baseline, beside the same records written with a reference.
    others["orders only, no reference"] = [(v, None) for name, v in named_values if name == "OrderPlaced"]
    orders = [fields for name, fields in traffic if name == "OrderPlaced"]
    others["orders, line type a reference"] = _with_references(registry, orders)
    for label, placed in others.items():
        run = _decode_all(after, placed)
        run()  # warm
        best = max(_rate(run, len(placed)) for _ in range(args.repeat))
        print(f"  {label:<34} {best:>12,.0f} records/s  ({len(placed)} records)")
    registry.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
