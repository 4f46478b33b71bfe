"""`rr-consumer dlq inspect` and `dlq redrive`, end to end: the recovery runbook's second half."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from consumer import resolution
from consumer.decode import VALUE_SCHEMA_ID_HEADER, DomainEvent
from consumer.translate import Translator
from consumer_dev.emulator import EmulatorShop, EmulatorThread, Faults
from consumer_dev.sample import build_encoder
from tests.kafka import Topics, end_offsets, produce, produce_with_headers, unique_name, wait_for
from tests.relay import (
    ROOT,
    SHOPS,
    RelayProcess,
    SchemaRegistry,
    Stack,
    canonical,
    dead_letters,
    event,
    received,
    relay_env,
    test_shops,
    write_config,
)
from tools import kafka_local

REJECTED_ORDER_ITEM = 11
REJECTED_VIEW = 77


def rr(
    *args: str, keys: bool = True, columns: int | None = None, timeout_s: float = 120, **env_extra: str
) -> subprocess.CompletedProcess[str]:
    """Run the CLI; ``keys=False`` leaves the shops' API keys out of its environment; ``columns``: the
    width of its tables; ``env_extra``: more variables."""
    env = relay_env(**env_extra)
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    if not keys:
        env = {name: value for name, value in env.items() if not name.startswith("RR_API_KEY_")}
    return subprocess.run(
        [sys.executable, "-m", "consumer", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def calls_at(emulator: EmulatorThread) -> list[tuple[str, dict[str, Any]]]:
    return [(e["method"], e["body"]) for e in emulator.events()]


def run_until_dead_lettered(
    bootstrap: str,
    topic: str,
    emulator: EmulatorThread,
    registry: SchemaRegistry,
    tmp_path: Path,
    *,
    dead_lettered: int,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run a relay over ``topic`` until it dead-lettered that many records, then stop it cleanly: the
    configuration (for the CLI after it) and the dead letters."""
    config = write_config(
        tmp_path / "relay.toml",
        bootstrap=bootstrap,
        topics=[topic],
        group=unique_name("group"),
        emulator_url=emulator.url,
        registry_url=registry.url,
    )
    relay = RelayProcess(config=config, log=tmp_path / "relay.log").start()
    try:
        letters = dead_letters(bootstrap, f"{topic}.dlq", dead_lettered)
        assert relay.terminate() == 0
    finally:
        relay.cleanup()
    return config, letters


def test_inspect_shows_the_story_and_redrive_sends_only_what_failed_with_a_loop_guard(
    kafka_bootstrap: str,
    topics: Topics,
    registry: SchemaRegistry,
    tmp_path: Path,
) -> None:
    encoder = build_encoder("confluent-avro", registry=registry.client())
    order = event(
        "OrderPlaced",
        orderId="o-7",
        sessionId="buyer1",
        lines=[
            {"productId": 10, "quantity": 1, "unitPrice": Decimal("3.00")},
            {"productId": REJECTED_ORDER_ITEM, "quantity": 2, "unitPrice": Decimal("4.50")},
            {"productId": 12, "quantity": 1, "unitPrice": Decimal("1.00")},
        ],
    )
    view = event("ProductViewed", productId=REJECTED_VIEW, groupId=None, sessionId="viewer1")
    fine = event("ProductViewed", productId=5, groupId=None, sessionId="viewer2")
    records = [
        (b"buyer1", encoder.encode("OrderPlaced", order)),
        (b"viewer1", encoder.encode("ProductViewed", view)),
        (b"broken", b"\x00\x00\x00\x00"),  # never decodable: it can only fail again
        (b"viewer2", encoder.encode("ProductViewed", fine)),
    ]
    topic = topics.create("dlqcmd")
    dlq = topics.create_named(f"{topic}.dlq")
    topics.created.append(f"{dlq}.resolved")  # the re-drive creates it; the test deletes it
    produce(kafka_bootstrap, topic, records)
    shops = [EmulatorShop(partner_id=pid, api_key=key) for pid, key in SHOPS.values()]
    with EmulatorThread(shops, Faults(reject_product_ids=(REJECTED_ORDER_ITEM, REJECTED_VIEW))) as emulator:
        config, _ = run_until_dead_lettered(
            kafka_bootstrap, topic, emulator, registry, tmp_path, dead_lettered=3
        )
        first_pass = calls_at(emulator)
        assert sorted(body["productId"] for _, body in first_pass) == [5, 10, 12]

        # Inspect: one row per dead-lettered record, with stage, status and source. It reads Kafka only,
        # so it needs no shop's API key.
        shown = rr("dlq", "inspect", "--config", str(config), keys=False)
        assert shown.returncode == 0, shown.stderr
        assert "3 dead-lettered record(s)" in shown.stdout
        for needle in (f"{topic}[0]@0", f"{topic}[0]@1", f"{topic}[0]@2", "deliver", "decode", "400"):
            assert needle in shown.stdout, needle
        only_decode = rr("dlq", "inspect", "--config", str(config), "--stage", "decode")
        assert "1 dead-lettered record(s)" in only_decode.stdout
        # --limit keeps the last rows (the rest are counted, not held) and says how many matched.
        last_two = rr("dlq", "inspect", "--config", str(config), "--limit", "2", keys=False)
        assert "the last 2 of 3 dead-lettered record(s)" in last_two.stdout
        assert f"{topic}.dlq[0]@0" not in last_two.stdout
        assert f"{topic}.dlq[0]@1" in last_two.stdout
        assert f"{topic}.dlq[0]@2" in last_two.stdout

        # The cause is fixed: the API takes those products now. Re-drive.
        emulator.set_faults(Faults())
        emulator.reset()
        redriven = rr("dlq", "redrive", "--config", str(config))
        assert redriven.returncode == 0, redriven.stderr[-3000:]
        second_pass = calls_at(emulator)
        # Only what failed: the order's rejected item (not its two delivered ones) and the view.
        assert sorted((m, body["productId"]) for m, body in second_pass) == [
            ("order", REJECTED_ORDER_ITEM),
            ("view", REJECTED_VIEW),
        ]
        item = next(body for m, body in second_pass if m == "order")
        assert canonical(item) == canonical({**item, "quantity": 2, "price": 4.5, "transaction": "o-7"})

        # The undecodable record failed again: dead-lettered again, counted, with its original source.
        letters = dead_letters(kafka_bootstrap, dlq, 4)
        again = letters[3]["headers"]
        assert again["rr.dlq.redrive.count"] == "1"
        assert again["rr.dlq.source.topic"] == topic
        assert again["rr.dlq.source.offset"] == "2"
        assert list(letters[3]["headers"]).count("rr.dlq.stage") == 1

        # Resumable: a second run picks up only what is new (the re-dead-lettered record), and fails it again.
        assert rr("dlq", "redrive", "--config", str(config)).returncode == 0
        assert end_offsets(kafka_bootstrap, dlq, 1) == {0: 5}
        # The loop guard: at the limit, the record is left alone, not dead-lettered a third time.
        guarded = rr("dlq", "redrive", "--config", str(config), "--max-redrives", "2")
        assert guarded.returncode == 0, guarded.stderr[-2000:]
        assert "1 by the loop guard" in guarded.stderr
        assert end_offsets(kafka_bootstrap, dlq, 1) == {0: 5}
        assert len(calls_at(emulator)) == 2, "nothing was sent twice by the later runs"
        counts = [
            orjson.loads(letter["headers"].get("rr.dlq.redrive.count", "0"))
            for letter in dead_letters(kafka_bootstrap, dlq, 5)
        ]
        assert counts == [0, 0, 0, 1, 2]


def test_redrive_with_nothing_to_do_says_so_and_a_missing_key_is_named(
    kafka_bootstrap: str,
    topics: Topics,
    registry: SchemaRegistry,
    tmp_path: Path,
) -> None:
    topic = topics.create("nothing")
    topics.create_named(f"{topic}.dlq")
    topics.created.append(f"{topic}.dlq.resolved")
    config = write_config(
        tmp_path / "relay.toml",
        bootstrap=kafka_bootstrap,
        topics=[topic],
        group=unique_name("group"),
        emulator_url="http://127.0.0.1:9/1.0/",
        registry_url=registry.url,
    )
    result = rr("dlq", "redrive", "--config", str(config))
    assert result.returncode == 0
    assert "nothing to re-drive" in result.stderr
    missing = rr("dlq", "inspect", "--config", str(config), "--topic", "no-such.dlq")
    assert missing.returncode == 2
    assert "no-such.dlq" in missing.stderr
    # A re-drive delivers, so it does need the keys, and says which one is missing.
    keyless = rr("dlq", "redrive", "--config", str(config), keys=False)
    assert keyless.returncode == 2
    assert "api_key_env" in keyless.stderr
    assert "RR_API_KEY_" in keyless.stderr
    # A dead-letter topic of the configuration that was never created is named as such, not as --topic.
    gone = topics.create("never-dead-lettered")
    unmade = write_config(
        tmp_path / "unmade.toml",
        bootstrap=kafka_bootstrap,
        topics=[gone],
        group=unique_name("group"),
        emulator_url="http://127.0.0.1:9/1.0/",
        registry_url=registry.url,
    )
    absent = rr("dlq", "inspect", "--config", str(unmade), keys=False)
    assert absent.returncode == 2
    assert absent.stderr.splitlines()[-1] == (
        f"rr-consumer: topics.dead_letter_topic: dead-letter topic '{gone}.dlq' does not exist on the brokers"
    )


# --- whatever is in the dead-letter topic (issue 14) -------------------------------------------------------

BULK_VIEWS = 42


def dead_letter(
    source: str,
    offset: int,
    *,
    stage: str = "deliver",
    status: str | None = "400",
    method: str = "view",
    message: str = "rejected",
    failed: list[int] = (0,),  # type: ignore[assignment]
    delivered: str | None = "[]",
    **overrides: str | None,
) -> list[tuple[str, bytes]]:
    """The rr.dlq headers the relay writes, for a record of ``source`` at ``offset``; ``overrides`` (with
    ``_`` for ``.``) replace or, when None, drop one."""
    headers: dict[str, str | None] = {
        "source.topic": source,
        "source.partition": "0",
        "source.offset": str(offset),
        "stage": stage,
        "error.class": "Permanent" if stage == "deliver" else "TranslateError",
        "error.message": message,
        "http.status": status,
        "method": method,
        "calls.failed": orjson.dumps(
            [
                {"index": i, "method": method, "status": int(status) if status else None, "reason": message}
                for i in failed
            ]
        ).decode(),
        "calls.delivered": delivered,
        "attempts": "1",
        "first.failure": "2026-11-30T09:00:00.000+00:00",
        "last.failure": "2026-11-30T09:00:00.000+00:00",
    }
    headers.update({name.replace("_", "."): value for name, value in overrides.items()})
    return [(f"rr.dlq.{name}", value.encode()) for name, value in headers.items() if value is not None]


def test_redrive_is_total_over_malformed_records_and_filters_never_cost_a_record_its_turn(
    stack: Stack, emulator: EmulatorThread
) -> None:
    topic = stack.topic("total", partitions=1)
    dlq = f"{topic}.dlq"
    stack.topics.created.append(f"{dlq}.resolved")  # the re-drive creates it; the test deletes it
    encode = build_encoder("json").encode
    translator = Translator(test_shops())

    def view(product: int) -> tuple[str, dict[str, Any]]:
        return "ProductViewed", event(
            "ProductViewed", productId=product, groupId=None, sessionId=f"v{product}"
        )

    order = (
        "OrderPlaced",
        event(
            "OrderPlaced",
            orderId="o-9",
            sessionId="buyer9",
            lines=[
                {"productId": 10, "quantity": 1, "unitPrice": Decimal("3.00")},
                {"productId": 11, "quantity": 2, "unitPrice": Decimal("4.50")},
                {"productId": 12, "quantity": 1, "unitPrice": Decimal("1.00")},
            ],
        ),
    )
    markup_shop = ("ProductViewed", {**view(600)[1], "shopId": "[/x]"})
    # (event, headers, calls the re-drive must send: all but the delivered ones; None: none, ever)
    seeded: list[tuple[tuple[str, dict[str, Any]], list[tuple[str, bytes]] | None, list[int] | None]] = [
        (view(1), dead_letter("orders.legacy", 0), None),
        (view(2), dead_letter(topic, 1, message="lost [abc] here", source_partition="abc"), None),
        (view(3), dead_letter(topic, 2, delivered="{not json"), None),
        (view(4), dead_letter(topic, 3, redrive_count="x"), None),
        (view(5), None, None),  # no rr.dlq headers at all: not the relay's record
        (
            markup_shop,
            dead_letter(
                topic,
                5,
                stage="translate",
                status=None,
                message="shop '[/x]' is not configured and there is no default shop",
                failed=[],
                delivered=None,
                calls_failed=None,
            ),
            None,  # fails again: dead-lettered again, under its original
        ),
        *((view(401 + i), dead_letter(topic, 6 + i, status="401"), [0]) for i in range(3)),
        *((view(400 + i * 10), dead_letter(topic, 9 + i, status="400"), [0]) for i in range(3)),
        (
            order,
            dead_letter(topic, 12, method="order", status="404", failed=[1, 2], delivered="[0]"),
            [1, 2],
        ),
        *(
            (view(1000 + i), dead_letter(topic, 13 + i, stage="translate", status=None), [0])
            for i in range(BULK_VIEWS)
        ),
    ]
    produce_with_headers(
        stack.bootstrap,
        dlq,
        [
            (b"k", encode(name, fields), headers or [("trace", b"[abc]")])
            for (name, fields), headers, _ in seeded
        ],
    )
    total = len(seeded)

    def calls_of(indices: range) -> Counter[tuple[str, str, bytes]]:
        expected: Counter[tuple[str, str, bytes]] = Counter()
        for (name, fields), _, sent in (seeded[i] for i in indices):
            if sent is None:
                continue
            calls, _ = translator.translate_partial(DomainEvent(name, fields))
            for index in sent:
                call = calls[index]
                expected[(SHOPS[call.shop][0], call.method, canonical(call.body))] += 1
        return expected

    config = stack.config([topic], fmt="json")

    def redrive(*args: str) -> subprocess.CompletedProcess[str]:
        result = rr("dlq", "redrive", "--config", str(config), *args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not re.search(r"(?<![\w.])-\d", result.stderr), result.stderr[-2000:]  # no negative count
        return result

    # A filtered run re-drives what matches, and only that is recorded as re-driven ...
    redrive("--status", "401")
    assert received(emulator) == calls_of(range(6, 9))
    # ... so a run with another filter still finds its records, though they came before the end of the last
    redrive("--status", "400")
    assert received(emulator) == calls_of(range(6, 12))

    # Without filters: everything else, to the end. Each record that cannot be re-driven is one line with
    # its coordinates and the reason; the one that fails again is one line with the reason.
    third = redrive()
    good = calls_of(range(total))
    assert sum(good.values()) == 50
    assert received(emulator) == good, "every good call exactly once"
    for offset, reason in (
        (0, "its source topic 'orders.legacy' is not a topic of this configuration"),
        (1, "rr.dlq.source.partition is not a whole number: 'abc'"),
        (2, "rr.dlq.calls.delivered is not JSON: '{not json'"),
        (3, "rr.dlq.redrive.count is not a whole number: 'x'"),
        (4, "no rr.dlq headers"),
    ):
        assert f"skipped {dlq}[0]@{offset}: cannot be re-driven: {reason}" in third.stderr, third.stderr
    assert f"dead-lettered again {dlq}[0]@5: translate: shop '[/x]' is not configured" in third.stderr
    assert "re-driven 44 (delivered 43, dead-lettered again 1)" in third.stderr, third.stderr[-2000:]
    assert "5 that cannot be re-driven" in third.stderr
    assert end_offsets(stack.bootstrap, dlq, 1) == {0: total + 1}
    copy = dead_letters(stack.bootstrap, dlq, total + 1)[total]["headers"]
    assert (copy["rr.dlq.redrive.from.partition"], copy["rr.dlq.redrive.from.offset"]) == ("0", "5")
    assert copy["rr.dlq.redrive.count"] == "1"
    resolved = end_offsets(stack.bootstrap, f"{dlq}.resolved", 1)

    # A second run does nothing new: no call, no dead letter, no record of a resolution; the records that
    # cannot be re-driven are named again (and the copy is at the loop guard's limit).
    fourth = redrive("--max-redrives", "1")
    assert received(emulator) == good
    assert end_offsets(stack.bootstrap, dlq, 1) == {0: total + 1}
    assert end_offsets(stack.bootstrap, f"{dlq}.resolved", 1) == resolved
    assert f"skipped {dlq}[0]@0: cannot be re-driven" in fourth.stderr
    assert "re-driven 0 (delivered 0, dead-lettered again 0)" in fourth.stderr
    assert "1 by the loop guard" in fourth.stderr

    # Inspect shows each record's state, an order's failed and delivered calls, a record without headers as
    # such, the copy right under its original, and every value as it is, markup and all.
    shown = rr("dlq", "inspect", "--config", str(config), keys=False, columns=400)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"{total + 1} dead-lettered record(s)" in out
    assert "shop '[/x]' is not configured" in out
    assert "lost [abc] here" in out
    assert "no rr.dlq headers" in out
    assert "[]@" not in out
    assert "failed #1 order HTTP 404, #2 order HTTP 404; delivered #0" in out
    rows = [line for line in out.splitlines() if f"{dlq}[0]@" in line]
    assert len(rows) == total + 1
    assert f"{dlq}[0]@5 " in rows[5], "\n".join(rows[4:8])
    assert f"↳ {dlq}[0]@{total} " in rows[6], "\n".join(rows[4:8])
    assert "re-driven" in rows[5]
    assert "dead-lettered again, see" in out
    assert all("re-driven" in row and "delivered" in row for row in rows[7:])
    assert "pending (re-drive 1)" in rows[6]
    assert "pending: 1, re-driven: 50, unredrivable: 5" in out


def test_a_redrive_while_the_key_is_still_wrong_stops_and_leaves_the_records_pending(
    stack: Stack, emulator: EmulatorThread
) -> None:
    """Answers 401 are held as suspects of a bad key until a call of the shop succeeds; in a re-drive of
    only such records none ever does, so the run must not wait for one: it stops (exit 3) once nothing
    else is in flight, and records nothing, so the run after the fix re-drives them."""
    topic = stack.topic("rekey", partitions=1)
    dlq = f"{topic}.dlq"
    stack.topics.created.append(f"{dlq}.resolved")
    encode = build_encoder("json").encode
    views = [
        event("ProductViewed", productId=700 + i, groupId=None, sessionId=f"s{i}", shopId="other")
        for i in range(3)
    ]
    produce_with_headers(
        stack.bootstrap,
        dlq,
        [
            (b"k", encode("ProductViewed", fields), dead_letter(topic, i, status="401"))
            for i, fields in enumerate(views)
        ],
    )
    config = stack.config([topic], fmt="json")
    still_wrong = rr("dlq", "redrive", "--config", str(config), timeout_s=60, RR_API_KEY_OTHER="k-revoked")
    assert still_wrong.returncode == 3, still_wrong.stderr[-3000:]
    assert "re-drive failed" in still_wrong.stderr
    assert "still answers HTTP 401" in still_wrong.stderr, still_wrong.stderr[-3000:]
    assert "k-revoked" not in still_wrong.stderr
    assert received(emulator) == Counter()
    assert end_offsets(stack.bootstrap, dlq, 1) == {0: 3}, "nothing dead-lettered again"

    fixed = rr("dlq", "redrive", "--config", str(config))
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "re-driven 3 (delivered 3, dead-lettered again 0)" in fixed.stderr
    assert sorted(body["productId"] for _, body in calls_at(emulator)) == [700, 701, 702]


def test_inspect_prints_record_data_as_it_is_never_as_markup(stack: Stack) -> None:
    topic = stack.topic("markup", partitions=1)
    dlq = f"{topic}.dlq"
    encode = build_encoder("json").encode
    fields = event("ProductViewed", productId=1, groupId=None, shopId="[/x]")
    produce_with_headers(
        stack.bootstrap,
        dlq,
        [
            # What the relay writes for an event whose shopId is "[/x]".
            (
                b"k",
                encode("ProductViewed", fields),
                dead_letter(
                    topic,
                    0,
                    stage="translate",
                    status=None,
                    message="shop '[/x]' is not configured and there is no default shop",
                    method="[abc]",
                    delivered=None,
                    calls_failed=None,
                ),
            ),
            (
                b"k",
                encode("ProductViewed", fields),
                dead_letter(topic, 1, message="[bold]loud[/bold] :thumbs_up:"),
            ),
            (b"k", encode("ProductViewed", fields), [("trace", b"[red]")]),  # not the relay's: unredrivable
        ],
    )
    config = stack.config([topic], fmt="json")
    shown = rr("dlq", "inspect", "--config", str(config), "--state", "pending", keys=False, columns=400)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for text in ("shop '[/x]' is not configured", "[abc]", "[bold]loud[/bold] :thumbs_up:"):
        assert text in shown.stdout, text
    assert "2 dead-lettered record(s)" in shown.stdout, (
        "--state pending leaves out the record without headers"
    )
    assert f"{dlq}[0]@2" not in shown.stdout


def test_a_redrive_killed_midway_loses_nothing_and_the_next_run_finishes_it(
    stack: Stack, emulator: EmulatorThread
) -> None:
    """At-least-once: what a killed run delivered but did not record goes again; nothing is skipped."""
    topic = stack.topic("killed", partitions=1)
    dlq = f"{topic}.dlq"
    stack.topics.created.append(f"{dlq}.resolved")
    encode = build_encoder("json").encode
    count = 150
    views = [
        event("ProductViewed", productId=2000 + i, groupId=None, sessionId=f"k{i}") for i in range(count)
    ]
    produce_with_headers(
        stack.bootstrap,
        dlq,
        [
            (b"k", encode("ProductViewed", f), dead_letter(topic, i, status="400"))
            for i, f in enumerate(views)
        ],
    )
    config = stack.config(
        [topic], fmt="json", sections={"delivery": {"mode": "single"}, "tracking": {"concurrency": 2}}
    )
    emulator.set_faults(Faults(latency_ms=20))
    env = relay_env()
    env.pop("COLUMNS", None)
    run = subprocess.Popen(
        [sys.executable, "-m", "consumer", "dlq", "redrive", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: emulator.counters["events_accepted"] >= 30, what="the re-drive under way")
    finally:
        run.kill()  # kill -9, midway
        run.wait(30)
    assert emulator.counters["events_accepted"] < count, "killed before the end"

    emulator.set_faults(Faults())
    finished = rr("dlq", "redrive", "--config", str(config))
    assert finished.returncode == 0, finished.stderr[-3000:]
    got = Counter(body["productId"] for _, body in calls_at(emulator))
    assert set(got) == {2000 + i for i in range(count)}, "every call arrived"
    # ... and every record has its outcome recorded: the next run has nothing to do.
    recorded = resolution.read({"bootstrap.servers": stack.bootstrap}, [dlq], outcomes=False).resolved
    assert recorded == {(dlq, 0): set(range(count))}


def test_a_record_whose_schema_id_travels_in_a_header_is_re_driven_with_it(
    kafka_bootstrap: str,
    topics: Topics,
    registry: SchemaRegistry,
    tmp_path: Path,
) -> None:
    """The value is a bare Avro body and its schema id is in ``__value_schema_id``: the dead letter keeps that
    header, so the re-drive decodes the record as the first pass did, instead of failing it as undecodable."""
    encoder = build_encoder("confluent-avro", registry=registry.client())
    framed = encoder.encode("ProductViewed", event("ProductViewed", productId=REJECTED_VIEW, sessionId="v1"))
    topic = topics.create("header-redrive")
    dlq = topics.create_named(f"{topic}.dlq")
    topics.created.append(f"{dlq}.resolved")
    produce_with_headers(
        kafka_bootstrap, topic, [(b"v1", framed[5:], [(VALUE_SCHEMA_ID_HEADER, framed[:5])])]
    )
    shops = [EmulatorShop(partner_id=pid, api_key=key) for pid, key in SHOPS.values()]
    with EmulatorThread(shops, Faults(reject_product_ids=(REJECTED_VIEW,))) as emulator:
        config, (letter,) = run_until_dead_lettered(
            kafka_bootstrap, topic, emulator, registry, tmp_path, dead_lettered=1
        )
        assert letter["headers"]["rr.dlq.stage"] == "deliver", "rejected by the API, not undecodable"

        emulator.set_faults(Faults())
        emulator.reset()
        redriven = rr("dlq", "redrive", "--config", str(config))
        assert redriven.returncode == 0, redriven.stderr[-3000:]
        assert [(m, body["productId"]) for m, body in calls_at(emulator)] == [("view", REJECTED_VIEW)]
        assert end_offsets(kafka_bootstrap, dlq, 1) == {0: 1}, "nothing dead-lettered again"


def test_inspect_where_no_broker_answers_is_one_line_naming_the_setting(stack: Stack) -> None:
    """Before, ``dlq inspect`` against a wrong address printed librdkafka's raw connection failures (about
    20 a second) and ended in a line that named no setting, exit 1."""
    topic = stack.topic("nobroker", partitions=1)
    config = stack.config([topic], fmt="json", sections={"kafka": {"connect_timeout_s": 2}})
    shown = rr(
        "dlq",
        "inspect",
        "--config",
        str(config),
        keys=False,
        RR_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{kafka_local.free_port()}",
    )
    assert shown.returncode == 2, shown.stderr[-2000:]
    lines = shown.stderr.strip().splitlines()
    assert len(lines) == 1, lines[:5]
    assert lines[0].startswith("rr-consumer: kafka.bootstrap_servers: no broker at 127.0.0.1:"), lines[0]
    assert "answered within 2s" in lines[0]
    assert shown.stdout == ""


def test_the_tools_librdkafka_lines_are_events_of_the_json_log_never_raw_lines(stack: Stack) -> None:
    """librdkafka's debug lines (asked for here so that there are lines for certain) come out of the tool's
    own clients as ``kafka.log`` events on stderr; the table stays alone on stdout."""
    topic = stack.topic("toollog", partitions=1)
    config = stack.config(
        [topic],
        fmt="json",
        sections={"kafka": {"client": {"debug": "broker"}}, "observability": {"log_level": "debug"}},
    )
    shown = rr("dlq", "inspect", "--config", str(config), keys=False)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert not [line for line in shown.stderr.splitlines() if line.startswith("%")], "no raw librdkafka line"
    events = [orjson.loads(line) for line in shown.stderr.splitlines() if line.strip()]
    tool = [e for e in events if e["event"] == "kafka.log" and e["client"] == "dlq"]
    assert tool, "the tool's clients' lines are in the log"
    assert {e["level"] for e in tool} == {"debug"}
    assert "0 dead-lettered record(s)" in shown.stdout
    assert "kafka.log" not in shown.stdout
